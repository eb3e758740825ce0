//! Helpers shared by the integration tests: artifact paths and libtorch set-up.
//!
//! The tests run against real weights and reference outputs under the artifacts directory
//! (`$DB4R_ARTIFACTS`, else `artifacts/` in the repository). A missing artifact fails the test
//! with a message that explains how to create it, because a skipped comparison proves nothing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;

use densebert4ret_model::Tensor;

/// Maximum absolute difference accepted between Rust and PyTorch outputs.
pub const REFERENCE_TOLERANCE: f64 = 1e-4;

/// Limits libtorch to two intra-op threads, enough for these small batches without
/// oversubscribing a CI runner that runs several test binaries at once.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| tch::set_num_threads(2));
}

/// Returns the artifacts root.
pub fn artifacts_root() -> PathBuf {
    match std::env::var_os("DB4R_ARTIFACTS") {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("artifacts"),
    }
}

/// Returns `<artifacts>/<relative>`, failing the test when it does not exist.
pub fn artifact(relative: &str) -> PathBuf {
    let path = artifacts_root().join(relative);
    assert!(
        path.exists(),
        "missing test artifact {}; run scripts/setup.sh to create the weights and reference outputs \
         (or set DB4R_ARTIFACTS to a directory that has them)",
        path.display()
    );
    path
}

/// Reads one tensor from a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> Tensor {
    let tensors = Tensor::read_safetensors(path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
    tensors
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, tensor)| tensor)
        .unwrap_or_else(|| {
            panic!(
                "{} has no tensor {name}; rerun scripts/make_references.py",
                path.display()
            )
        })
}

/// Maximum absolute element-wise difference of two tensors of the same shape.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape mismatch");
    let actual = actual
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Double);
    let expected = expected
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Double);
    (actual - expected).abs().max().double_value(&[])
}

/// Euclidean norm of each row of a `[N, D]` tensor.
pub fn row_norms(rows: &Tensor) -> Vec<f64> {
    let norms = rows
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Double)
        .norm_scalaropt_dim(2, [1i64].as_slice(), false);
    Vec::<f64>::try_from(norms).expect("norms to vec")
}
