//! The trunk and tail split of both towers that fine-tuning trains through, on the real
//! EfficientNet-Lite0 and all-MiniLM-L6-v2 weights.

mod common;

use common::{artifact, init, max_abs_diff};
use densebert4ret_model::{
    decode_image, image_to_chw, pad_batch, stack_images, Device, ImageArchitecture, ImageTower,
    ModelError, Pooling, Tensor, TextTokenizer, TextTower, TokenOverflow,
};

/// Largest difference accepted between the split and the whole forward pass.
const SPLIT_TOLERANCE: f64 = 1e-4;

fn image_tower() -> ImageTower {
    ImageTower::load(
        ImageArchitecture::EfficientNetLite0,
        &artifact("weights/efficientnet_lite0.safetensors"),
        Device::Cpu,
    )
    .expect("load EfficientNet-Lite0")
}

fn photos(size: u32) -> Tensor {
    let rows: Vec<Vec<f32>> = ["coffee.png", "chelsea.png"]
        .iter()
        .map(|name| {
            let bytes = std::fs::read(artifact(&format!("data/skimage/{name}"))).expect("read");
            let image = decode_image(&bytes, 10_000_000).expect("decode");
            image_to_chw(
                &image,
                size,
                ImageArchitecture::EfficientNetLite0.normalization(),
            )
        })
        .collect();
    stack_images(&rows, size).expect("stack")
}

fn text_tower() -> TextTower {
    TextTower::load_dir(&artifact("weights/minilm"), "", Pooling::Mean, Device::Cpu)
        .expect("load MiniLM")
}

fn tokens() -> (Tensor, Tensor) {
    let tokenizer = TextTokenizer::from_file(
        artifact("weights/minilm/tokenizer.json"),
        32,
        TokenOverflow::Truncate,
    )
    .expect("load tokenizer");
    let sequences = ["make it red", "the same shirt as a dress in dark blue"]
        .iter()
        .map(|text| tokenizer.encode(text).expect("encode"))
        .collect::<Vec<_>>();
    pad_batch(&sequences, tokenizer.pad_id())
}

#[test]
fn image_trunk_and_tail_equal_features() {
    init();
    let tower = image_tower();
    let images = photos(96);
    let trunk = tower.f_trunk(&images).expect("trunk");
    assert_eq!(trunk.size(), vec![2, 192, 3, 3]);
    let split = tch::no_grad(|| tower.tail(&trunk));
    let whole = tower.f_features(&images).expect("features");
    let difference = max_abs_diff(&split, &whole);
    assert!(difference < SPLIT_TOLERANCE, "max difference {difference}");
}

#[test]
fn image_tail_trains_only_last_block() {
    init();
    let tower = image_tower();
    let trunk = tower.f_trunk(&photos(96)).expect("trunk");
    let trainable = tower.unfreeze_tail();
    assert!(!trainable.is_empty());
    for (name, _) in &trainable {
        let in_tail = ["_blocks.15.", "_conv_head.", "_bn1."]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        assert!(in_tail, "{name} is not in the last block");
        assert!(
            !name.ends_with("running_mean"),
            "{name} is a BatchNorm buffer"
        );
        assert!(
            !name.ends_with("running_var"),
            "{name} is a BatchNorm buffer"
        );
    }

    tower.tail(&trunk).square().sum(tch::Kind::Float).backward();
    for (name, variable) in &trainable {
        assert!(variable.grad().defined(), "{name} got no gradient");
    }
}

#[test]
fn saved_image_tail_reloads() {
    init();
    let tower = image_tower();
    let trainable = tower.unfreeze_tail();
    let (name, variable) = trainable
        .iter()
        .find(|(name, _)| name.ends_with("_project_conv.weight"))
        .expect("the last block's projection");
    tch::no_grad(|| {
        let _ = variable.shallow_clone().g_mul_scalar_(0.5);
    });
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("tuned.safetensors");
    tower.save(&path).expect("save");

    let reloaded =
        ImageTower::load(ImageArchitecture::EfficientNetLite0, &path, Device::Cpu).expect("reload");
    let images = photos(96);
    let before = tower.f_features(&images).expect("features");
    let after = reloaded.f_features(&images).expect("reloaded features");
    let difference = max_abs_diff(&before, &after);
    assert!(
        difference < 1e-6,
        "{name} changed in the round trip: {difference}"
    );
    let original = image_tower()
        .f_features(&images)
        .expect("original features");
    assert!(
        max_abs_diff(&original, &after) > 1e-3,
        "halving {name} did not change the features"
    );
}

#[test]
fn text_trunk_and_tail_equal_features() {
    init();
    let tower = text_tower();
    let (ids, mask) = tokens();
    let whole = tower.f_features(&ids, &mask).expect("features");
    for tail_layers in 1..=tower.layer_count() {
        let hidden = tower.f_trunk(&ids, &mask, tail_layers).expect("trunk");
        let split = tch::no_grad(|| tower.tail_t(&hidden, &mask, tail_layers, false));
        let difference = max_abs_diff(&split, &whole);
        assert!(
            difference < SPLIT_TOLERANCE,
            "{tail_layers} tail layers: max difference {difference}"
        );
    }
}

#[test]
fn text_tail_trains_only_top_layers() {
    init();
    let tower = text_tower();
    let (ids, mask) = tokens();
    let hidden = tower.f_trunk(&ids, &mask, 2).expect("trunk");
    let trainable = tower.unfreeze_tail(2).expect("unfreeze");
    assert_eq!(trainable.len(), 2 * 16, "two layers of 16 tensors each");
    for (name, _) in &trainable {
        let top = name.starts_with("encoder.layer.4.") || name.starts_with("encoder.layer.5.");
        assert!(top, "{name} is not in the top two layers");
    }
    tower
        .tail_t(&hidden, &mask, 2, true)
        .square()
        .sum(tch::Kind::Float)
        .backward();
    for (name, variable) in &trainable {
        assert!(variable.grad().defined(), "{name} got no gradient");
    }
}

#[test]
fn text_tail_layers_out_of_range_rejected() {
    init();
    let tower = text_tower();
    let (ids, mask) = tokens();
    for tail_layers in [0, 7] {
        let error = tower.f_trunk(&ids, &mask, tail_layers).unwrap_err();
        assert!(matches!(error, ModelError::InvalidInput(_)), "{error}");
        assert!(
            error.to_string().contains("expected 1 to the encoder's 6"),
            "{error}"
        );
        assert!(tower.unfreeze_tail(tail_layers).is_err());
    }
}
