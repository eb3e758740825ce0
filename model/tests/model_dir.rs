//! Writing, loading and running a complete DenseBert4Ret model directory with the real
//! backbones and randomly initialised heads.

mod common;

use std::path::{Path, PathBuf};

use common::{artifact, init, max_abs_diff, row_norms};
use densebert4ret_model::{
    build_heads, decode_image, fingerprint_dir, image_to_chw, nn, stack_images, write_model_dir,
    DenseBert4Ret, Device, ImageArchitecture, Kind, ModelConfig, ModelError, Tensor, TokenOverflow,
};

const IMAGE_SIZE: u32 = 96;
const HIDDEN_DIM: i64 = 64;
const JOINT_DIM: i64 = 32;
const MINILM_DIM: i64 = 384;

fn small_config(architecture: ImageArchitecture) -> ModelConfig {
    let mut config = ModelConfig::new(architecture);
    config.image_backbone.image_size = IMAGE_SIZE;
    config.head.hidden_dim = HIDDEN_DIM;
    config.head.joint_dim = JOINT_DIM;
    config.text_encoder.max_tokens = 32;
    config
}

fn random_heads(config: &ModelConfig, seed: i64) -> nn::VarStore {
    tch::manual_seed(seed);
    let store = nn::VarStore::new(Device::Cpu);
    let image_dim = config.image_backbone.architecture.feature_dim();
    let _ = build_heads(&store.root(), image_dim, MINILM_DIM, &config.head);
    store
}

fn backbone_weights(architecture: ImageArchitecture) -> PathBuf {
    match architecture {
        ImageArchitecture::EfficientNetLite0 => artifact("weights/efficientnet_lite0.safetensors"),
        ImageArchitecture::DenseNet121 => artifact("references/densenet121_random.safetensors"),
    }
}

fn write_model(dir: &Path, config: &ModelConfig, heads: &nn::VarStore) -> String {
    let architecture = config.image_backbone.architecture;
    write_model_dir(
        dir,
        config,
        &backbone_weights(architecture),
        &artifact("weights/minilm"),
        heads,
    )
    .expect("write model directory")
}

fn sample_images(model: &DenseBert4Ret) -> Tensor {
    let size = model.image_size() as u32;
    let chw: Vec<Vec<f32>> = ["coffee.png", "chelsea.png", "astronaut.png"]
        .iter()
        .map(|name| {
            let bytes =
                std::fs::read(artifact(&format!("data/skimage/{name}"))).expect("read image");
            let image = decode_image(&bytes, 10_000_000).expect("decode");
            image_to_chw(&image, size, model.image_normalization())
        })
        .collect();
    stack_images(&chw, size).expect("stack")
}

fn assert_unit_rows(rows: &Tensor, expected_rows: i64) {
    assert_eq!(rows.size(), vec![expected_rows, JOINT_DIM]);
    for (index, norm) in row_norms(rows).into_iter().enumerate() {
        assert!((norm - 1.0).abs() < 1e-5, "row {index} has norm {norm}");
    }
}

#[test]
fn round_trip_composes_unit_embeddings() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let dir = workspace.path().join("model");
    let config = small_config(ImageArchitecture::EfficientNetLite0);
    let heads = random_heads(&config, 7);
    let written_fingerprint = write_model(&dir, &config, &heads);

    for relative in [
        "config.json",
        "image_backbone.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/tokenizer.json",
        "head.safetensors",
    ] {
        assert!(dir.join(relative).is_file(), "{relative} was not written");
    }

    let model = DenseBert4Ret::load(&dir, Device::Cpu).expect("load model");
    assert_eq!(model.config(), &config);
    assert_eq!(model.fingerprint(), written_fingerprint);
    assert_eq!(model.joint_dim(), JOINT_DIM);
    assert_eq!(model.image_feature_dim(), 1280);
    assert_eq!(model.text_feature_dim(), MINILM_DIM);
    assert_eq!(model.image_size(), i64::from(IMAGE_SIZE));
    assert_eq!(model.device(), Device::Cpu);

    let image_features = model
        .f_image_features(&sample_images(&model))
        .expect("image features");
    assert_eq!(image_features.size(), vec![3, 1280]);

    let texts = [
        "make it a latte",
        "a black cat instead",
        "wearing a red helmet and a much longer caption",
    ];
    let (ids, mask) = model.tokenize_batch(&texts).expect("tokenize");
    let text_features = model.f_text_features(&ids, &mask).expect("text features");
    assert_eq!(text_features.size(), vec![3, MINILM_DIM]);

    let queries = model
        .f_compose(&image_features, &text_features)
        .expect("compose");
    assert_unit_rows(&queries, 3);
    let catalog = model.f_project_images(&image_features).expect("project");
    assert_unit_rows(&catalog, 3);

    // Fusion depends on the text: swapping texts between images changes the query.
    let swapped = model
        .f_compose(&image_features, &text_features.flip([0]))
        .expect("compose swapped");
    assert!(
        max_abs_diff(&swapped.get(0), &queries.get(0)) > 1e-3,
        "the query ignored the text"
    );

    // A query composed alone equals its row in the padded batch.
    let (single_ids, single_mask) = model.tokenize_batch(&texts[..1]).expect("tokenize");
    let single_text = model
        .f_text_features(&single_ids, &single_mask)
        .expect("text features");
    let single_query = model
        .f_compose(&image_features.narrow(0, 0, 1), &single_text)
        .expect("compose single");
    let diff = max_abs_diff(&single_query, &queries.narrow(0, 0, 1));
    assert!(diff < 1e-5, "batching changed the query by {diff}");

    let reloaded = DenseBert4Ret::load(&dir, Device::Cpu).expect("reload model");
    assert_eq!(
        reloaded.fingerprint(),
        model.fingerprint(),
        "fingerprint changed across loads"
    );
    let reloaded_catalog = reloaded.f_project_images(&image_features).expect("project");
    assert_eq!(
        max_abs_diff(&reloaded_catalog, &catalog),
        0.0,
        "reloaded heads differ"
    );
}

#[test]
fn fingerprint_changes_with_head_weights() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let config = small_config(ImageArchitecture::EfficientNetLite0);
    let heads = random_heads(&config, 1);

    let first_dir = workspace.path().join("first");
    let first = write_model(&first_dir, &config, &heads);
    let same_dir = workspace.path().join("same");
    let same = write_model(&same_dir, &config, &heads);
    assert_eq!(
        first, same,
        "identical contents must give identical fingerprints"
    );
    assert_eq!(fingerprint_dir(&first_dir).expect("fingerprint"), first);

    // Nudge one bias element in place; `get` returns a view that shares the variable's storage.
    let mut element = heads.variables()["projection.fc2.bias"].get(0);
    let _ = tch::no_grad(|| element.f_add_scalar_(1e-3)).expect("edit bias");
    let edited_dir = workspace.path().join("edited");
    let edited = write_model(&edited_dir, &config, &heads);
    assert_ne!(
        first, edited,
        "a changed head weight must change the fingerprint"
    );

    let model = DenseBert4Ret::load(&edited_dir, Device::Cpu).expect("load");
    assert_eq!(model.fingerprint(), edited);
}

#[test]
fn densenet_model_dir_loads() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let dir = workspace.path().join("densenet");
    let mut config = small_config(ImageArchitecture::DenseNet121);
    config.text_encoder.overflow = TokenOverflow::Reject;
    config.text_encoder.max_tokens = 8;
    write_model(&dir, &config, &random_heads(&config, 3));

    let model = DenseBert4Ret::load(&dir, Device::Cpu).expect("load");
    assert_eq!(model.image_feature_dim(), 1024);
    let features = model
        .f_image_features(&sample_images(&model))
        .expect("features");
    assert_eq!(features.size(), vec![3, 1024]);
    assert_unit_rows(&model.f_project_images(&features).expect("project"), 3);

    let error = model
        .tokenize_batch(&["this caption is far too long for eight tokens"])
        .expect_err("reject");
    assert!(
        matches!(error, ModelError::TooManyTokens { max_tokens: 8, .. }),
        "{error:?}"
    );
}

#[test]
fn mismatched_inputs_rejected() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let dir = workspace.path().join("model");
    let config = small_config(ImageArchitecture::EfficientNetLite0);
    write_model(&dir, &config, &random_heads(&config, 4));
    let model = DenseBert4Ret::load(&dir, Device::Cpu).expect("load");

    let image = Tensor::zeros([2, 1280], (Kind::Float, Device::Cpu));
    let text = Tensor::zeros([3, MINILM_DIM], (Kind::Float, Device::Cpu));
    let error = model.f_compose(&image, &text).expect_err("row mismatch");
    assert!(
        error
            .to_string()
            .contains("2 image feature rows but 3 text feature rows"),
        "{error}"
    );

    let wrong_width = Tensor::zeros([2, 1024], (Kind::Float, Device::Cpu));
    let error = model.f_project_images(&wrong_width).expect_err("width");
    assert!(
        error.to_string().contains("[2, 1024], expected [N, 1280]"),
        "{error}"
    );

    let empty = model
        .f_compose(&image.narrow(0, 0, 0), &text.narrow(0, 0, 0))
        .expect("empty batch");
    assert_eq!(empty.size(), vec![0, JOINT_DIM]);
}

#[test]
fn write_rejects_mismatched_heads_and_existing_dir() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let config = small_config(ImageArchitecture::EfficientNetLite0);

    let mut other_dims = config.clone();
    other_dims.head.joint_dim = JOINT_DIM * 2;
    let error = write_model_dir(
        &workspace.path().join("bad"),
        &config,
        &backbone_weights(ImageArchitecture::EfficientNetLite0),
        &artifact("weights/minilm"),
        &random_heads(&other_dims, 5),
    )
    .expect_err("head shapes");
    assert!(
        error
            .to_string()
            .contains("fusion.fc3.weight is [64, 64], expected [32, 64]"),
        "{error}"
    );
    assert!(
        !workspace.path().join("bad").exists(),
        "a failed write left a directory"
    );

    let occupied = workspace.path().join("occupied");
    std::fs::create_dir(&occupied).expect("mkdir");
    std::fs::write(occupied.join("notes.txt"), b"keep me").expect("write");
    let error = write_model_dir(
        &occupied,
        &config,
        &backbone_weights(ImageArchitecture::EfficientNetLite0),
        &artifact("weights/minilm"),
        &random_heads(&config, 5),
    )
    .expect_err("occupied");
    assert!(error.to_string().contains("not empty"), "{error}");
    assert!(occupied.join("notes.txt").exists());

    let leftovers: Vec<_> = std::fs::read_dir(workspace.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging directories left behind");
}

#[test]
fn load_reports_missing_head_file() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let dir = workspace.path().join("model");
    let config = small_config(ImageArchitecture::EfficientNetLite0);
    write_model(&dir, &config, &random_heads(&config, 6));
    std::fs::remove_file(dir.join("head.safetensors")).expect("remove head");

    let error = DenseBert4Ret::load(&dir, Device::Cpu).expect_err("missing head");
    assert!(error.to_string().contains("head.safetensors"), "{error}");
}

#[test]
fn load_rejects_max_tokens_beyond_positions() {
    init();
    let workspace = tempfile::tempdir().expect("tempdir");
    let dir = workspace.path().join("model");
    let mut config = small_config(ImageArchitecture::EfficientNetLite0);
    config.text_encoder.max_tokens = 1000;
    write_model(&dir, &config, &random_heads(&config, 8));

    let error = DenseBert4Ret::load(&dir, Device::Cpu).expect_err("too many tokens");
    assert!(error.to_string().contains("max_tokens is 1000"), "{error}");
    assert!(error.to_string().contains("512 positions"), "{error}");
}
