//! The `config.json` of a model directory.
//!
//! A model directory contains:
//!
//! ```text
//! <dir>/config.json
//! <dir>/image_backbone.safetensors
//! <dir>/text_encoder/{config.json,model.safetensors,tokenizer.json}
//! <dir>/head.safetensors
//! ```
//!
//! The file names are those of [`ModelConfig::new`]. `config.json` stores every path relative to
//! the directory, and loading rejects paths that leave it, so the directory fingerprint covers
//! every file the model reads.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::preprocess::Normalization;
use crate::tokenizer::TokenOverflow;

/// Name of the configuration file inside a model directory.
pub const MODEL_CONFIG_FILE: &str = "config.json";

/// Smallest accepted `image_size`: DenseNet-121 downsamples by 32, so smaller inputs leave no
/// spatial extent for its last transition.
pub const MIN_IMAGE_SIZE: u32 = 32;

/// Largest accepted `image_size`, which bounds the memory of one image batch.
pub const MAX_IMAGE_SIZE: u32 = 1024;

/// Image backbone architectures the model can load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageArchitecture {
    /// EfficientNet-Lite0 with the tensor names of the lukemelas EfficientNet-PyTorch code.
    #[serde(rename = "efficientnet_lite0")]
    EfficientNetLite0,
    /// torchvision DenseNet-121, the image tower of DenseBert4Ret (Khan et al., 2022).
    #[serde(rename = "densenet121")]
    DenseNet121,
}

impl ImageArchitecture {
    /// Length of the pooled feature vector.
    pub fn feature_dim(self) -> i64 {
        match self {
            Self::EfficientNetLite0 => crate::efficientnet::FEATURE_DIM,
            Self::DenseNet121 => crate::densenet::FEATURE_DIM,
        }
    }

    /// Pixel normalisation the pretrained weights expect.
    pub fn normalization(self) -> Normalization {
        match self {
            Self::EfficientNetLite0 => Normalization::EfficientNetLite,
            Self::DenseNet121 => Normalization::ImageNet,
        }
    }

    /// Name used in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EfficientNetLite0 => "efficientnet_lite0",
            Self::DenseNet121 => "densenet121",
        }
    }
}

impl std::fmt::Display for ImageArchitecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageArchitecture {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "efficientnet_lite0" => Ok(Self::EfficientNetLite0),
            "densenet121" => Ok(Self::DenseNet121),
            other => Err(format!(
                "unknown image architecture {other:?}; expected \"efficientnet_lite0\" or \"densenet121\""
            )),
        }
    }
}

/// Reduction of token states to one text feature vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean of the states of the tokens the attention mask keeps (sentence-transformers style).
    Mean,
    /// State of the first token, `[CLS]`.
    Cls,
}

/// Image tower settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBackboneConfig {
    /// Backbone architecture.
    pub architecture: ImageArchitecture,
    /// Safetensors weights, relative to the model directory.
    pub weights: PathBuf,
    /// Side of the square input in pixels.
    pub image_size: u32,
}

/// Text tower settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderConfig {
    /// Hugging Face BERT `config.json`, relative to the model directory.
    pub config: PathBuf,
    /// Safetensors weights with Hugging Face `BertModel` names, relative to the model directory.
    pub weights: PathBuf,
    /// Hugging Face `tokenizer.json`, relative to the model directory.
    pub tokenizer: PathBuf,
    /// Reduction of token states to one vector.
    pub pooling: Pooling,
    /// Maximum number of tokens per text, including `[CLS]` and `[SEP]`.
    pub max_tokens: usize,
    /// Prefix of the tensor names in `weights`, for example `bert.` for checkpoints saved from
    /// a task model. Empty for plain `BertModel` checkpoints.
    #[serde(default)]
    pub weights_prefix: String,
    /// Handling of texts longer than `max_tokens`.
    #[serde(default)]
    pub overflow: TokenOverflow,
}

/// Fusion MLP and projection head settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Safetensors weights of both heads, relative to the model directory.
    pub weights: PathBuf,
    /// Width of the hidden layers.
    pub hidden_dim: i64,
    /// Dimension of the joint embedding space.
    pub joint_dim: i64,
    /// Dropout probability after the first fusion layer during training.
    pub dropout: f64,
    /// Normalisation of the fusion MLP's image and text inputs. Model directories written
    /// before this setting existed have none.
    #[serde(default)]
    pub input_norm: InputNorm,
}

/// Normalisation applied to each input of the fusion MLP before concatenation.
///
/// Backbone features differ in scale: EfficientNet-Lite0 pooled features at 96 pixels have an
/// L2 norm of about 60 and MiniLM sentence embeddings about 6, so with raw inputs the first
/// fusion layer starts out dominated by the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputNorm {
    /// Raw features, concatenated as they are.
    #[default]
    None,
    /// A separate LayerNorm (with learned scale and shift) over the image and over the text
    /// features. Variables `image_norm` and `text_norm` under the fusion path.
    LayerNorm,
}

impl InputNorm {
    /// Name in `config.json` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            InputNorm::None => "none",
            InputNorm::LayerNorm => "layer_norm",
        }
    }
}

impl std::fmt::Display for InputNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for InputNorm {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "none" => Ok(InputNorm::None),
            "layer_norm" | "layer-norm" => Ok(InputNorm::LayerNorm),
            other => Err(format!(
                "invalid input normalisation {other:?}: expected \"none\" or \"layer_norm\""
            )),
        }
    }
}

/// Contents of a model directory's `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Image tower settings.
    pub image_backbone: ImageBackboneConfig,
    /// Text tower settings.
    pub text_encoder: TextEncoderConfig,
    /// Head settings.
    pub head: HeadConfig,
}

impl ModelConfig {
    /// Creates a configuration with the standard file layout and default sizes: 224-pixel
    /// images (the ImageNet resolution of both backbones), mean pooling, 64 tokens with
    /// truncation, hidden width 1024, joint dimension 256 and dropout 0.1.
    pub fn new(architecture: ImageArchitecture) -> Self {
        Self {
            image_backbone: ImageBackboneConfig {
                architecture,
                weights: PathBuf::from("image_backbone.safetensors"),
                image_size: 224,
            },
            text_encoder: TextEncoderConfig {
                config: PathBuf::from("text_encoder/config.json"),
                weights: PathBuf::from("text_encoder/model.safetensors"),
                tokenizer: PathBuf::from("text_encoder/tokenizer.json"),
                pooling: Pooling::Mean,
                max_tokens: 64,
                weights_prefix: String::new(),
                overflow: TokenOverflow::Truncate,
            },
            head: HeadConfig {
                weights: PathBuf::from("head.safetensors"),
                hidden_dim: 1024,
                joint_dim: 256,
                dropout: 0.1,
                input_norm: InputNorm::None,
            },
        }
    }

    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        Self::from_file(&dir.join(MODEL_CONFIG_FILE))
    }

    /// Reads and validates a model configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ModelError::io("failed to read", path, error))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|error| ModelError::config(path, error.to_string()))?;
        config
            .validate()
            .map_err(|reason| ModelError::config(path, reason))?;
        Ok(config)
    }

    /// Serialises the configuration as pretty-printed JSON.
    ///
    /// Fails only for a path that is not valid UTF-8, which JSON cannot represent.
    pub fn to_json_pretty(&self) -> Result<String, ModelError> {
        serde_json::to_string_pretty(self).map_err(|error| {
            ModelError::config(MODEL_CONFIG_FILE, format!("failed to serialise: {error}"))
        })
    }

    /// Checks sizes and paths, returning a message that names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let image_size = self.image_backbone.image_size;
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&image_size) {
            return Err(format!(
                "image_backbone.image_size is {image_size}, expected {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}"
            ));
        }
        if self.text_encoder.max_tokens < 3 {
            return Err(format!(
                "text_encoder.max_tokens is {}, expected at least 3 ([CLS], one token, [SEP])",
                self.text_encoder.max_tokens
            ));
        }
        validate_weights_prefix(&self.text_encoder.weights_prefix)?;
        if self.head.hidden_dim < 1 {
            return Err(format!(
                "head.hidden_dim is {}, expected at least 1",
                self.head.hidden_dim
            ));
        }
        if self.head.joint_dim < 1 {
            return Err(format!(
                "head.joint_dim is {}, expected at least 1",
                self.head.joint_dim
            ));
        }
        if !(0.0..1.0).contains(&self.head.dropout) {
            return Err(format!(
                "head.dropout is {}, expected 0 <= dropout < 1",
                self.head.dropout
            ));
        }

        let paths = [
            ("image_backbone.weights", &self.image_backbone.weights),
            ("text_encoder.config", &self.text_encoder.config),
            ("text_encoder.weights", &self.text_encoder.weights),
            ("text_encoder.tokenizer", &self.text_encoder.tokenizer),
            ("head.weights", &self.head.weights),
        ];
        for (field, path) in paths {
            validate_relative_path(field, path)?;
            if path == Path::new(MODEL_CONFIG_FILE) {
                return Err(format!(
                    "{field} is {MODEL_CONFIG_FILE}, which is the model configuration itself"
                ));
            }
        }
        for (index, (field, path)) in paths.iter().enumerate() {
            if let Some((other, _)) = paths[index + 1..].iter().find(|(_, other)| other == path) {
                return Err(format!("{field} and {other} are both {}", path.display()));
            }
        }
        Ok(())
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::new(ImageArchitecture::EfficientNetLite0)
    }
}

/// Accepts an empty prefix or dot-separated name components ending in a dot, such as `bert.`.
pub(crate) fn validate_weights_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    let valid = prefix
        .strip_suffix('.')
        .is_some_and(|body| body.split('.').all(|part| !part.is_empty()));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "text_encoder.weights_prefix is {prefix:?}, expected \"\" or dot-separated names ending in a dot, such as \"bert.\""
        ))
    }
}

fn validate_relative_path(field: &str, path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err(format!(
            "{field} is empty, expected a file path relative to the model directory"
        ));
    }
    if path.to_str().is_none() {
        return Err(format!(
            "{field} is {}, which is not valid UTF-8",
            path.display()
        ));
    }
    let inside = path
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    if !inside {
        return Err(format!(
            "{field} is {}, expected a path inside the model directory without `..`, `.` or a root",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_through_json() {
        let config = ModelConfig::new(ImageArchitecture::DenseNet121);
        let json = config.to_json_pretty().expect("serialise");
        let parsed: ModelConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(parsed, config);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn documented_example_parses() {
        let text = r#"{
            "image_backbone": {"architecture": "efficientnet_lite0", "weights": "image_backbone.safetensors", "image_size": 96},
            "text_encoder": {"config": "text_encoder/config.json", "weights": "text_encoder/model.safetensors",
                             "tokenizer": "text_encoder/tokenizer.json", "pooling": "mean", "max_tokens": 64, "weights_prefix": ""},
            "head": {"weights": "head.safetensors", "hidden_dim": 1024, "joint_dim": 256, "dropout": 0.1}
        }"#;
        let config: ModelConfig = serde_json::from_str(text).expect("parse");
        assert_eq!(
            config.image_backbone.architecture,
            ImageArchitecture::EfficientNetLite0
        );
        assert_eq!(config.image_backbone.image_size, 96);
        assert_eq!(config.text_encoder.overflow, TokenOverflow::Truncate);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn input_norm_defaults_to_none_and_parses() {
        let mut value = serde_json::to_value(ModelConfig::default()).expect("serialise");
        value["head"]
            .as_object_mut()
            .expect("head object")
            .remove("input_norm");
        let config: ModelConfig = serde_json::from_value(value.clone()).expect("parse");
        assert_eq!(config.head.input_norm, InputNorm::None);

        value["head"]["input_norm"] = serde_json::json!("layer_norm");
        let config: ModelConfig = serde_json::from_value(value.clone()).expect("parse");
        assert_eq!(config.head.input_norm, InputNorm::LayerNorm);

        value["head"]["input_norm"] = serde_json::json!("batch_norm");
        assert!(serde_json::from_value::<ModelConfig>(value).is_err());
        assert_eq!("layer-norm".parse::<InputNorm>(), Ok(InputNorm::LayerNorm));
        assert!("batch_norm".parse::<InputNorm>().is_err());
    }

    #[test]
    fn paths_outside_directory_rejected() {
        for bad in [
            "../weights.safetensors",
            "/etc/passwd",
            "./head.safetensors",
            "",
        ] {
            let mut config = ModelConfig::default();
            config.head.weights = PathBuf::from(bad);
            let error = config.validate().expect_err(bad);
            assert!(error.contains("head.weights"), "{error}");
        }
    }

    #[test]
    fn duplicate_paths_rejected() {
        let mut config = ModelConfig::default();
        config.head.weights = config.image_backbone.weights.clone();
        let error = config.validate().expect_err("duplicate");
        assert!(
            error.contains("image_backbone.weights and head.weights"),
            "{error}"
        );
    }

    #[test]
    fn out_of_range_sizes_rejected() {
        let mut config = ModelConfig::default();
        config.image_backbone.image_size = 16;
        assert!(config
            .validate()
            .expect_err("size")
            .contains("image_size is 16"));

        let mut config = ModelConfig::default();
        config.head.dropout = 1.0;
        assert!(config
            .validate()
            .expect_err("dropout")
            .contains("head.dropout is 1"));

        let mut config = ModelConfig::default();
        config.text_encoder.max_tokens = 2;
        assert!(config
            .validate()
            .expect_err("tokens")
            .contains("max_tokens is 2"));
    }

    #[test]
    fn weights_prefix_format_checked() {
        assert_eq!(validate_weights_prefix(""), Ok(()));
        assert_eq!(validate_weights_prefix("bert."), Ok(()));
        assert_eq!(validate_weights_prefix("model.bert."), Ok(()));
        for bad in ["bert", ".", "bert..", ".bert."] {
            assert!(validate_weights_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_rejected() {
        let mut value = serde_json::to_value(ModelConfig::default()).expect("to value");
        value["head"]["hiden_dim"] = serde_json::json!(12);
        let error = serde_json::from_value::<ModelConfig>(value).expect_err("typo");
        assert!(error.to_string().contains("hiden_dim"), "{error}");
    }
}
