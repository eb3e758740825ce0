//! EfficientNet-Lite0 with the converted ImageNet weights on scikit-image sample photos, with
//! the Lite preprocessing at 224x224.

mod common;

use common::{artifact, init};
use densebert4ret_model::{
    decode_image, image_to_chw, stack_images, Device, ImageArchitecture, ImageTower, Normalization,
    Tensor,
};

/// ImageNet class 967 is "espresso".
const ESPRESSO: i64 = 967;
/// ImageNet classes 281..=285 are the domestic cats: tabby, tiger cat, Persian, Siamese,
/// Egyptian cat.
const DOMESTIC_CATS: std::ops::RangeInclusive<i64> = 281..=285;

fn load_image(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(artifact(&format!("data/skimage/{name}"))).expect("read image");
    let image = decode_image(&bytes, 10_000_000).expect("decode");
    image_to_chw(&image, 224, Normalization::EfficientNetLite)
}

fn top1(logits: &Tensor, row: i64) -> i64 {
    logits.get(row).argmax(0, false).int64_value(&[])
}

#[test]
fn imagenet_top1_on_sample_photos() {
    init();
    let weights = artifact("weights/efficientnet_lite0.safetensors");
    let tower = ImageTower::load_with_classifier(
        ImageArchitecture::EfficientNetLite0,
        &weights,
        1000,
        Device::Cpu,
    )
    .expect("load EfficientNet-Lite0");
    assert_eq!(
        ImageArchitecture::EfficientNetLite0.normalization(),
        Normalization::EfficientNetLite
    );

    let batch =
        stack_images(&[load_image("coffee.png"), load_image("chelsea.png")], 224).expect("stack");
    let features = tower.f_features(&batch).expect("features");
    assert_eq!(features.size(), vec![2, 1280]);
    let logits = tower.f_logits(&features).expect("logits");
    assert_eq!(logits.size(), vec![2, 1000]);

    let coffee = top1(&logits, 0);
    assert_eq!(
        coffee, ESPRESSO,
        "coffee.png top-1 is class {coffee}, expected espresso ({ESPRESSO})"
    );
    let chelsea = top1(&logits, 1);
    assert!(
        DOMESTIC_CATS.contains(&chelsea),
        "chelsea.png top-1 is class {chelsea}, expected a domestic cat class in {DOMESTIC_CATS:?}"
    );

    let probabilities = logits.softmax(-1, densebert4ret_model::Kind::Float);
    let espresso_probability = probabilities.double_value(&[0, ESPRESSO]);
    assert!(
        espresso_probability > 0.5,
        "espresso probability {espresso_probability}"
    );
}

#[test]
fn odd_input_size_uses_same_padding() {
    init();
    let weights = artifact("weights/efficientnet_lite0.safetensors");
    let tower = ImageTower::load_with_classifier(
        ImageArchitecture::EfficientNetLite0,
        &weights,
        1000,
        Device::Cpu,
    )
    .expect("load EfficientNet-Lite0");
    let bytes = std::fs::read(artifact("data/skimage/coffee.png")).expect("read image");
    let image = decode_image(&bytes, 10_000_000).expect("decode");
    let batch = stack_images(
        &[image_to_chw(&image, 225, Normalization::EfficientNetLite)],
        225,
    )
    .expect("stack");
    let logits = tower
        .f_logits(&tower.f_features(&batch).expect("features"))
        .expect("logits");
    assert_eq!(top1(&logits, 0), ESPRESSO);
}

#[test]
fn invalid_image_tensors_rejected() {
    init();
    let weights = artifact("weights/efficientnet_lite0.safetensors");
    let tower = ImageTower::load(ImageArchitecture::EfficientNetLite0, &weights, Device::Cpu)
        .expect("load");

    let grey = Tensor::zeros(
        [1, 1, 64, 64],
        (densebert4ret_model::Kind::Float, Device::Cpu),
    );
    let error = tower.f_features(&grey).expect_err("one channel");
    assert!(error.to_string().contains("[1, 1, 64, 64]"), "{error}");

    let tiny = Tensor::zeros(
        [1, 3, 16, 16],
        (densebert4ret_model::Kind::Float, Device::Cpu),
    );
    let error = tower.f_features(&tiny).expect_err("too small");
    assert!(error.to_string().contains("16x16"), "{error}");

    let empty = Tensor::zeros(
        [0, 3, 64, 64],
        (densebert4ret_model::Kind::Float, Device::Cpu),
    );
    let features = tower.f_features(&empty).expect("empty batch");
    assert_eq!(features.size(), vec![0, 1280]);
}
