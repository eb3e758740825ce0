//! The Rust DenseNet-121 against torchvision's `densenet121` on a non-square input that is not
//! 224x224.
//!
//! scripts/make_references.py initialises torchvision's network with `torch.manual_seed(0)`,
//! draws random BatchNorm statistics so normalisation errors show, and saves its weights, a
//! `[2, 3, 160, 192]` input, the pooled features and the classifier logits.

mod common;

use common::{artifact, init, max_abs_diff, read_tensor, REFERENCE_TOLERANCE};
use densebert4ret_model::{Device, ImageArchitecture, ImageTower};

#[test]
fn features_and_logits_match_torchvision() {
    init();
    let weights = artifact("references/densenet121_random.safetensors");
    let reference = artifact("references/densenet121_reference.safetensors");
    let input = read_tensor(&reference, "input");
    let expected_features = read_tensor(&reference, "features");
    let expected_logits = read_tensor(&reference, "logits");
    assert_eq!(input.size(), vec![2, 3, 160, 192]);

    let tower = ImageTower::load_with_classifier(
        ImageArchitecture::DenseNet121,
        &weights,
        1000,
        Device::Cpu,
    )
    .expect("load DenseNet-121");
    let features = tower.f_features(&input).expect("features");
    assert_eq!(features.size(), vec![2, 1024]);
    let diff = max_abs_diff(&features, &expected_features);
    eprintln!("features: max abs diff {diff:e}");
    assert!(
        diff < REFERENCE_TOLERANCE,
        "features: max abs diff {diff} against torchvision"
    );

    let logits = tower.f_logits(&features).expect("logits");
    let diff = max_abs_diff(&logits, &expected_logits);
    eprintln!("logits: max abs diff {diff:e}");
    assert!(
        diff < REFERENCE_TOLERANCE,
        "logits: max abs diff {diff} against torchvision"
    );
}

#[test]
fn features_only_load_ignores_classifier() {
    init();
    let weights = artifact("references/densenet121_random.safetensors");
    let tower =
        ImageTower::load(ImageArchitecture::DenseNet121, &weights, Device::Cpu).expect("load");
    let features = densebert4ret_model::Tensor::zeros(
        [1, 1024],
        (densebert4ret_model::Kind::Float, Device::Cpu),
    );
    let error = tower.f_logits(&features).expect_err("no classifier");
    assert!(
        error.to_string().contains("without a classifier"),
        "{error}"
    );
}

#[test]
fn wrong_architecture_weights_rejected() {
    init();
    let weights = artifact("weights/efficientnet_lite0.safetensors");
    let error = ImageTower::load(ImageArchitecture::DenseNet121, &weights, Device::Cpu)
        .expect_err("mismatch");
    let message = error.to_string();
    assert!(message.contains("features.conv0.weight"), "{message}");
    assert!(message.contains("tensors are missing"), "{message}");
}
