//! Writing a model directory that [`crate::DenseBert4Ret::load`] reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::backbones::{TEXT_CONFIG_FILE, TEXT_TOKENIZER_FILE, TEXT_WEIGHTS_FILE};
use crate::bert::BertConfig;
use crate::config::{ModelConfig, MODEL_CONFIG_FILE};
use crate::error::ModelError;
use crate::fingerprint::fingerprint_dir;
use crate::head::build_heads;

/// Writes a complete model directory and returns its fingerprint.
///
/// Copies the image backbone weights and the text encoder directory's `config.json`,
/// `model.safetensors` and `tokenizer.json` to the paths named in `config`. Saves the
/// `fusion.*` and `projection.*` variables of `heads` to `config.head.weights`; they must have
/// the names and shapes that [`build_heads`] creates under the store root, and other variables
/// in `heads` are not saved. Writes `config.json` last.
///
/// The files are written to a sibling staging directory that is renamed to `dir` at the end,
/// so `dir` never holds a partial model. `dir` must not exist or must be empty.
pub fn write_model_dir(
    dir: &Path,
    config: &ModelConfig,
    backbone_weights: &Path,
    text_dir: &Path,
    heads: &VarStore,
) -> Result<String, ModelError> {
    config
        .validate()
        .map_err(|reason| ModelError::config(dir, reason))?;
    ensure_absent_or_empty(dir)?;

    let text_config = BertConfig::from_file(&text_dir.join(TEXT_CONFIG_FILE))?;
    let head_tensors = collect_head_tensors(config, text_config.hidden_size, heads)?;

    let staging = staging_path(dir)?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(|error| ModelError::io("failed to remove", &staging, error))?;
    }
    let written = write_contents(&staging, config, backbone_weights, text_dir, &head_tensors);
    if let Err(error) = written {
        if let Err(cleanup) = std::fs::remove_dir_all(&staging) {
            tracing::warn!(staging = %staging.display(), error = %cleanup, "failed to remove staging directory");
        }
        return Err(error);
    }

    if dir.exists() {
        std::fs::remove_dir(dir)
            .map_err(|error| ModelError::io("failed to replace empty directory", dir, error))?;
    }
    std::fs::rename(&staging, dir)
        .map_err(|error| ModelError::io("failed to move the model into", dir, error))?;

    let fingerprint = fingerprint_dir(dir)?;
    tracing::info!(dir = %dir.display(), %fingerprint, "wrote model directory");
    Ok(fingerprint)
}

fn ensure_absent_or_empty(dir: &Path) -> Result<(), ModelError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ModelError::io(
                    "refusing to overwrite",
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the directory is not empty; remove it or choose another path",
                    ),
                ));
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(ModelError::io("failed to inspect", dir, error)),
    }
}

fn staging_path(dir: &Path) -> Result<PathBuf, ModelError> {
    let name = dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| {
            ModelError::config(
                dir,
                "the model directory path must end in a UTF-8 directory name",
            )
        })?;
    let parent = dir
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.partial-{}", std::process::id())))
}

/// Returns the head variables `build_heads` would create, checked against `heads`, as CPU
/// float tensors.
fn collect_head_tensors(
    config: &ModelConfig,
    text_dim: i64,
    heads: &VarStore,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    let expected_store = VarStore::new(Device::Cpu);
    let image_dim = config.image_backbone.architecture.feature_dim();
    let _ = build_heads(&expected_store.root(), image_dim, text_dim, &config.head);

    let actual: HashMap<String, Tensor> = heads.variables();
    let mut expected: Vec<(String, Tensor)> = expected_store.variables().into_iter().collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));

    let mut problems = Vec::new();
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, template) in expected {
        match actual.get(&name) {
            None => problems.push(format!("{name} is missing")),
            Some(tensor) if tensor.size() != template.size() => {
                problems.push(format!(
                    "{name} is {:?}, expected {:?}",
                    tensor.size(),
                    template.size()
                ));
            }
            Some(tensor) => {
                let copy = tch::no_grad(|| {
                    tensor
                        .to_device(Device::Cpu)
                        .to_kind(Kind::Float)
                        .contiguous()
                });
                tensors.push((name, copy));
            }
        }
    }
    if !problems.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "the head variables do not match image dim {image_dim}, text dim {text_dim}, hidden dim {} and joint dim {}: {}; \
             build them with build_heads(&store.root(), ..) from the same configuration",
            config.head.hidden_dim,
            config.head.joint_dim,
            problems.join(", ")
        )));
    }
    Ok(tensors)
}

fn write_contents(
    staging: &Path,
    config: &ModelConfig,
    backbone_weights: &Path,
    text_dir: &Path,
    head_tensors: &[(String, Tensor)],
) -> Result<(), ModelError> {
    std::fs::create_dir_all(staging)
        .map_err(|error| ModelError::io("failed to create", staging, error))?;

    let text = &config.text_encoder;
    let copies = [
        (
            backbone_weights.to_path_buf(),
            &config.image_backbone.weights,
        ),
        (text_dir.join(TEXT_CONFIG_FILE), &text.config),
        (text_dir.join(TEXT_WEIGHTS_FILE), &text.weights),
        (text_dir.join(TEXT_TOKENIZER_FILE), &text.tokenizer),
    ];
    for (source, relative) in copies {
        let target = staging.join(relative);
        create_parent(&target)?;
        std::fs::copy(&source, &target)
            .map_err(|error| ModelError::io("failed to copy", &source, error))?;
    }

    let head_path = staging.join(&config.head.weights);
    create_parent(&head_path)?;
    Tensor::write_safetensors(head_tensors, &head_path)?;

    let config_path = staging.join(MODEL_CONFIG_FILE);
    let mut json = config.to_json_pretty()?;
    json.push('\n');
    std::fs::write(&config_path, json)
        .map_err(|error| ModelError::io("failed to write", &config_path, error))?;
    Ok(())
}

fn create_parent(path: &Path) -> Result<(), ModelError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| ModelError::io("failed to create", parent, error))?;
    }
    Ok(())
}
