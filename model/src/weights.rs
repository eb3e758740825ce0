//! Loading safetensors files into a `VarStore` with shape checks.

use std::collections::HashMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::Tensor;

use crate::backbones::is_floating_point;
use crate::error::ModelError;

/// Number of offending tensor names quoted in an error message.
const NAMES_IN_ERROR: usize = 5;

/// Copies the tensors named `prefix + variable name` from a safetensors file into every variable
/// of `store`, converting them to the variable's type and device.
///
/// Tensors in the file that no variable uses are ignored, such as BatchNorm's
/// `num_batches_tracked` or a classifier the caller did not build. Every missing tensor and
/// every shape mismatch is reported in one error.
pub(crate) fn load_safetensors(
    store: &VarStore,
    path: &Path,
    prefix: &str,
) -> Result<(), ModelError> {
    if !path.is_file() {
        return Err(ModelError::io(
            "failed to open weights file",
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let file_tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|error| invalid(path, format!("not a readable safetensors file: {error}")))?
        .into_iter()
        .collect();

    let mut variables: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));

    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, variable) in &variables {
        let key = format!("{prefix}{name}");
        match file_tensors.get(&key) {
            None => missing.push(key),
            Some(source) if source.size() != variable.size() => {
                mismatched.push(format!(
                    "{key} is {:?}, expected {:?}",
                    source.size(),
                    variable.size()
                ));
            }
            Some(source) if !is_floating_point(source.kind()) => {
                mismatched.push(format!(
                    "{key} has type {:?}, expected a floating-point type",
                    source.kind()
                ));
            }
            Some(_) => {}
        }
    }

    if !missing.is_empty() {
        let mut reason = format!(
            "{} tensors are missing, including {}",
            missing.len(),
            quote(&missing)
        );
        if let Some(hint) = prefix_hint(&missing[0], prefix, file_tensors.keys()) {
            reason.push_str("; ");
            reason.push_str(&hint);
        }
        return Err(invalid(path, reason));
    }
    if !mismatched.is_empty() {
        return Err(invalid(
            path,
            format!(
                "{} tensors have the wrong shape or type: {}; check that the file matches the configured architecture",
                mismatched.len(),
                quote(&mismatched)
            ),
        ));
    }

    tch::no_grad(|| -> Result<(), ModelError> {
        for (name, variable) in &variables {
            let source = &file_tensors[&format!("{prefix}{name}")];
            let mut target = variable.shallow_clone();
            target.f_copy_(&source.f_to_kind(variable.kind())?)?;
        }
        Ok(())
    })?;

    let unused = file_tensors.len() - variables.len();
    tracing::debug!(
        path = %path.display(),
        loaded = variables.len(),
        unused,
        "loaded weights"
    );
    Ok(())
}

fn invalid(path: &Path, reason: String) -> ModelError {
    ModelError::InvalidWeights {
        path: path.to_path_buf(),
        reason,
    }
}

fn quote(names: &[String]) -> String {
    let quoted: Vec<&str> = names
        .iter()
        .take(NAMES_IN_ERROR)
        .map(String::as_str)
        .collect();
    let mut text = quoted.join(", ");
    if names.len() > NAMES_IN_ERROR {
        text.push_str(&format!(" and {} more", names.len() - NAMES_IN_ERROR));
    }
    text
}

/// Suggests a prefix when the file names the missing tensor with a different prefix, as
/// checkpoints saved from `BertForSequenceClassification` do with `bert.`.
fn prefix_hint<'a>(
    missing_key: &str,
    prefix: &str,
    file_keys: impl Iterator<Item = &'a String>,
) -> Option<String> {
    let name = missing_key.strip_prefix(prefix)?;
    let suffix = format!(".{name}");
    let mut candidates: Vec<&String> = file_keys
        .filter(|key| *key == name || key.ends_with(&suffix))
        .collect();
    candidates.sort();
    let key = candidates.first()?;
    let found_prefix = &key[..key.len() - name.len()];
    Some(format!(
        "the file contains {key}, so its tensor names start with {found_prefix:?}; set the weights prefix to that"
    ))
}
