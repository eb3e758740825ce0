//! Image and text towers, loaded from weight files and run in eval mode without gradients.
//!
//! For fine-tuning, each tower splits into a frozen trunk and a trainable tail: the image
//! backbone's last block, or the text encoder's top layers. The trunk outputs are computed
//! once, and the tail runs with gradients on top of them.

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::bert::{self, BertConfig, BertModel};
use crate::config::{validate_weights_prefix, ImageArchitecture, Pooling, MIN_IMAGE_SIZE};
use crate::densenet::DenseNet121;
use crate::efficientnet::EfficientNetLite0;
use crate::error::{catch_inference_panic, ModelError};
use crate::weights::load_safetensors;

/// File name of the BERT configuration inside a text encoder directory.
pub const TEXT_CONFIG_FILE: &str = "config.json";
/// File name of the BERT weights inside a text encoder directory.
pub const TEXT_WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the tokenizer inside a text encoder directory.
pub const TEXT_TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug)]
enum ImageNetwork {
    DenseNet121(DenseNet121),
    EfficientNetLite0(EfficientNetLite0),
}

/// Image backbone with its weights.
#[derive(Debug)]
pub struct ImageTower {
    store: VarStore,
    network: ImageNetwork,
    architecture: ImageArchitecture,
}

impl ImageTower {
    /// Loads a backbone without its ImageNet classifier.
    pub fn load(
        architecture: ImageArchitecture,
        weights: &Path,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::build(architecture, weights, None, device)
    }

    /// Loads a backbone with its classifier (`classifier.*` for DenseNet-121, `_fc.*` for
    /// EfficientNet-Lite0), so [`ImageTower::f_logits`] works.
    pub fn load_with_classifier(
        architecture: ImageArchitecture,
        weights: &Path,
        num_classes: i64,
        device: Device,
    ) -> Result<Self, ModelError> {
        if num_classes < 1 {
            return Err(ModelError::InvalidInput(format!(
                "num_classes is {num_classes}, expected at least 1"
            )));
        }
        Self::build(architecture, weights, Some(num_classes), device)
    }

    fn build(
        architecture: ImageArchitecture,
        weights: &Path,
        num_classes: Option<i64>,
        device: Device,
    ) -> Result<Self, ModelError> {
        let mut store = VarStore::new(device);
        let root = store.root();
        let network = match architecture {
            ImageArchitecture::DenseNet121 => {
                ImageNetwork::DenseNet121(DenseNet121::new(&root, num_classes))
            }
            ImageArchitecture::EfficientNetLite0 => {
                ImageNetwork::EfficientNetLite0(EfficientNetLite0::new(&root, num_classes))
            }
        };
        load_safetensors(&store, weights, "")?;
        store.freeze();
        tracing::info!(%architecture, weights = %weights.display(), ?device, "loaded image backbone");
        Ok(Self {
            store,
            network,
            architecture,
        })
    }

    /// Backbone architecture.
    pub fn architecture(&self) -> ImageArchitecture {
        self.architecture
    }

    /// Length of the pooled feature vector.
    pub fn feature_dim(&self) -> i64 {
        self.architecture.feature_dim()
    }

    /// Device holding the weights.
    pub fn device(&self) -> Device {
        self.store.device()
    }

    /// Computes pooled features `[N, feature_dim]` on the tower's device from normalised images
    /// `[N, 3, H, W]` on any device, with H and W at least 32.
    pub fn f_features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        self.check_images(images)?;
        let device = self.device();
        if images.size()[0] == 0 {
            return Ok(Tensor::zeros(
                [0, self.feature_dim()],
                (Kind::Float, device),
            ));
        }

        catch_inference_panic(|| {
            tch::no_grad(|| {
                let images = images.to_device(device).to_kind(Kind::Float);
                match &self.network {
                    ImageNetwork::DenseNet121(network) => network.features_t(&images, false),
                    ImageNetwork::EfficientNetLite0(network) => network.features_t(&images, false),
                }
            })
        })
    }

    /// Computes the input of the backbone's last block, `[N, C, H/32, W/32]`, from the images
    /// that [`ImageTower::f_features`] takes, without gradients. [`ImageTower::tail`] turns it
    /// into the pooled features.
    pub fn f_trunk(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        self.check_images(images)?;
        let device = self.device();
        catch_inference_panic(|| {
            tch::no_grad(|| {
                let images = images.to_device(device).to_kind(Kind::Float);
                match &self.network {
                    ImageNetwork::DenseNet121(network) => network.trunk_t(&images, false),
                    ImageNetwork::EfficientNetLite0(network) => network.trunk_t(&images, false),
                }
            })
        })
    }

    /// Runs the backbone's last block and pooling on outputs of [`ImageTower::f_trunk`],
    /// recording gradients for the variables that [`ImageTower::unfreeze_tail`] made
    /// trainable. BatchNorm uses its running statistics, so a row's features do not depend
    /// on the other rows of the batch.
    pub fn tail(&self, trunk: &Tensor) -> Tensor {
        match &self.network {
            ImageNetwork::DenseNet121(network) => network.tail_t(trunk, false),
            ImageNetwork::EfficientNetLite0(network) => network.tail_t(trunk, false),
        }
    }

    /// Makes the weights of the last block trainable and returns them by variable name.
    pub fn unfreeze_tail(&self) -> Vec<(String, Tensor)> {
        let prefixes: &[&str] = match self.architecture {
            ImageArchitecture::DenseNet121 => &crate::densenet::TAIL_PREFIXES,
            ImageArchitecture::EfficientNetLite0 => &crate::efficientnet::TAIL_PREFIXES,
        };
        unfreeze(&self.store, prefixes)
    }

    /// Writes every variable to a safetensors file that [`ImageTower::load`] reads.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        save_store(&self.store, path)
    }

    fn check_images(&self, images: &Tensor) -> Result<(), ModelError> {
        let size = images.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(ModelError::InvalidInput(format!(
                "images have shape {size:?}, expected [N, 3, H, W]"
            )));
        }
        let min_side = i64::from(MIN_IMAGE_SIZE);
        if size[2] < min_side || size[3] < min_side {
            return Err(ModelError::InvalidInput(format!(
                "images are {}x{}, expected at least {min_side}x{min_side}",
                size[3], size[2]
            )));
        }
        if !is_floating_point(images.kind()) {
            return Err(ModelError::InvalidInput(format!(
                "images have type {:?}, expected a floating-point type",
                images.kind()
            )));
        }
        Ok(())
    }

    /// Applies the ImageNet classifier to pooled features `[N, feature_dim]`.
    ///
    /// Returns [`ModelError::InvalidInput`] when the tower was loaded without a classifier.
    pub fn f_logits(&self, features: &Tensor) -> Result<Tensor, ModelError> {
        check_features("features", features, self.feature_dim())?;
        let device = self.device();
        let logits = catch_inference_panic(|| {
            tch::no_grad(|| {
                let features = features.to_device(device).to_kind(Kind::Float);
                match &self.network {
                    ImageNetwork::DenseNet121(network) => network.logits(&features),
                    ImageNetwork::EfficientNetLite0(network) => network.logits(&features),
                }
            })
        })?;
        logits.ok_or_else(|| {
            ModelError::InvalidInput(
                "the image tower was loaded without a classifier; use load_with_classifier"
                    .to_owned(),
            )
        })
    }
}

/// BERT text encoder with its weights and pooling.
#[derive(Debug)]
pub struct TextTower {
    store: VarStore,
    bert: BertModel,
    pooling: Pooling,
}

impl TextTower {
    /// Loads a BERT encoder from a Hugging Face `config.json` and safetensors weights whose
    /// names start with `weights_prefix` (empty, or for example `bert.`).
    pub fn load(
        config: &Path,
        weights: &Path,
        weights_prefix: &str,
        pooling: Pooling,
        device: Device,
    ) -> Result<Self, ModelError> {
        validate_weights_prefix(weights_prefix).map_err(ModelError::InvalidInput)?;
        let bert_config = BertConfig::from_file(config)?;
        let mut store = VarStore::new(device);
        let bert = BertModel::new(&store.root(), &bert_config)?;
        load_safetensors(&store, weights, weights_prefix)?;
        store.freeze();
        tracing::info!(
            weights = %weights.display(),
            layers = bert_config.num_hidden_layers,
            hidden_size = bert_config.hidden_size,
            ?pooling,
            ?device,
            "loaded text encoder"
        );
        Ok(Self {
            store,
            bert,
            pooling,
        })
    }

    /// Loads `config.json` and `model.safetensors` from a text encoder directory.
    pub fn load_dir(
        dir: &Path,
        weights_prefix: &str,
        pooling: Pooling,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::load(
            &dir.join(TEXT_CONFIG_FILE),
            &dir.join(TEXT_WEIGHTS_FILE),
            weights_prefix,
            pooling,
            device,
        )
    }

    /// The BERT configuration.
    pub fn bert_config(&self) -> &BertConfig {
        self.bert.config()
    }

    /// Length of the pooled feature vector (`hidden_size`).
    pub fn feature_dim(&self) -> i64 {
        self.bert.config().hidden_size
    }

    /// Pooling of token states.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Device holding the weights.
    pub fn device(&self) -> Device {
        self.store.device()
    }

    /// Computes pooled text features `[N, hidden_size]` on the tower's device.
    ///
    /// `input_ids` and `attention_mask` are integer `[N, L]` tensors on any device, as
    /// [`crate::pad_batch`] builds them: ids below `vocab_size`, L at most
    /// `max_position_embeddings`, mask 1 for tokens and 0 for padding.
    pub fn f_features(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let device = self.device();
        if input_ids.size().first() == Some(&0) {
            check_token_shapes(input_ids, attention_mask)?;
            return Ok(Tensor::zeros(
                [0, self.feature_dim()],
                (Kind::Float, device),
            ));
        }
        let (input_ids, attention_mask) = self.checked_tokens(input_ids, attention_mask)?;
        catch_inference_panic(|| {
            tch::no_grad(|| {
                let hidden = self
                    .bert
                    .forward_t(&input_ids, &attention_mask, None, false);
                bert::pool(&hidden, &attention_mask, self.pooling)
            })
        })
    }

    /// Number of encoder layers.
    pub fn layer_count(&self) -> usize {
        self.bert.config().num_hidden_layers.max(0) as usize
    }

    /// Computes, without gradients, the hidden states `[N, L, hidden_size]` that the top
    /// `tail_layers` layers read, from the tokens that [`TextTower::f_features`] takes.
    /// [`TextTower::tail_t`] turns them into the pooled features.
    pub fn f_trunk(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        tail_layers: usize,
    ) -> Result<Tensor, ModelError> {
        let end = self.tail_start(tail_layers)?;
        let (input_ids, attention_mask) = self.checked_tokens(input_ids, attention_mask)?;
        catch_inference_panic(|| {
            tch::no_grad(|| {
                self.bert
                    .forward_until_t(&input_ids, &attention_mask, end, false)
            })
        })
    }

    /// Runs the top `tail_layers` layers and the pooling on outputs of [`TextTower::f_trunk`]
    /// with the same `[N, L]` attention mask, recording gradients for the variables that
    /// [`TextTower::unfreeze_tail`] made trainable. `train` turns dropout on.
    pub fn tail_t(
        &self,
        hidden: &Tensor,
        attention_mask: &Tensor,
        tail_layers: usize,
        train: bool,
    ) -> Tensor {
        let first = self.layer_count().saturating_sub(tail_layers);
        let hidden = self
            .bert
            .forward_from_t(hidden, attention_mask, first, train);
        bert::pool(&hidden, attention_mask, self.pooling)
    }

    /// Makes the weights of the top `tail_layers` layers trainable and returns them by
    /// variable name.
    pub fn unfreeze_tail(&self, tail_layers: usize) -> Result<Vec<(String, Tensor)>, ModelError> {
        let first = self.tail_start(tail_layers)?;
        let prefixes: Vec<String> = (first..self.layer_count())
            .map(BertModel::layer_prefix)
            .collect();
        let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        Ok(unfreeze(&self.store, &prefixes))
    }

    /// Writes every variable, without a prefix, to a safetensors file that
    /// [`TextTower::load`] reads with an empty `weights_prefix`.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        save_store(&self.store, path)
    }

    /// Index of the first of the top `tail_layers` layers.
    fn tail_start(&self, tail_layers: usize) -> Result<usize, ModelError> {
        let layers = self.layer_count();
        if tail_layers == 0 || tail_layers > layers {
            return Err(ModelError::InvalidInput(format!(
                "{tail_layers} tail layers requested, expected 1 to the encoder's {layers}"
            )));
        }
        Ok(layers - tail_layers)
    }

    /// Validates token tensors and moves them to the tower's device as Int64.
    fn checked_tokens(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        check_token_shapes(input_ids, attention_mask)?;
        let config = self.bert.config();
        let length = input_ids.size()[1];
        if length < 1 || length > config.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "sequences have {length} tokens, expected 1..={}",
                config.max_position_embeddings
            )));
        }

        let device = self.device();
        let input_ids = input_ids.to_device(device).to_kind(Kind::Int64);
        let attention_mask = attention_mask.to_device(device).to_kind(Kind::Int64);
        if input_ids.numel() > 0 {
            let min_id = input_ids.min().int64_value(&[]);
            let max_id = input_ids.max().int64_value(&[]);
            if min_id < 0 || max_id >= config.vocab_size {
                return Err(ModelError::InvalidInput(format!(
                    "input_ids range over {min_id}..={max_id}, expected 0..{}",
                    config.vocab_size
                )));
            }
        }
        Ok((input_ids, attention_mask))
    }
}

/// Checks that token ids and mask are integer `[N, L]` tensors of one shape.
fn check_token_shapes(input_ids: &Tensor, attention_mask: &Tensor) -> Result<(), ModelError> {
    let size = input_ids.size();
    if size.len() != 2 {
        return Err(ModelError::InvalidInput(format!(
            "input_ids have shape {size:?}, expected [N, L]"
        )));
    }
    if attention_mask.size() != size {
        return Err(ModelError::InvalidInput(format!(
            "attention_mask has shape {:?}, expected the input_ids shape {size:?}",
            attention_mask.size()
        )));
    }
    for (name, tensor) in [("input_ids", input_ids), ("attention_mask", attention_mask)] {
        if !is_integer(tensor.kind()) {
            return Err(ModelError::InvalidInput(format!(
                "{name} have type {:?}, expected an integer type",
                tensor.kind()
            )));
        }
    }
    Ok(())
}

/// Names that tch gives BatchNorm's running statistics, which are buffers, not weights.
const BATCH_NORM_BUFFERS: [&str; 2] = ["running_mean", "running_var"];

/// Makes the variables of `store` under any of `prefixes` trainable, BatchNorm buffers
/// excepted, and returns them sorted by name.
fn unfreeze(store: &VarStore, prefixes: &[&str]) -> Vec<(String, Tensor)> {
    let mut variables: Vec<(String, Tensor)> = store
        .variables()
        .into_iter()
        .filter(|(name, _)| prefixes.iter().any(|prefix| name.starts_with(prefix)))
        .filter(|(name, _)| {
            !BATCH_NORM_BUFFERS
                .iter()
                .any(|buffer| name.rsplit('.').next() == Some(*buffer))
        })
        .collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, variable) in &mut variables {
        // The returned tensors share storage and autograd state with the store's variables,
        // so the flag and later in-place updates reach the network.
        let _ = variable.set_requires_grad(true);
    }
    variables
}

/// Writes every variable of `store`, sorted by name, to the safetensors file `path`.
fn save_store(store: &VarStore, path: &Path) -> Result<(), ModelError> {
    let mut variables: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let detached: Vec<(String, Tensor)> = variables
        .into_iter()
        .map(|(name, variable)| (name, variable.detach()))
        .collect();
    Tensor::write_safetensors(&detached, path)?;
    Ok(())
}

/// The image backbone and text encoder without heads, for computing features ahead of head
/// training.
#[derive(Debug)]
pub struct Backbones {
    image: ImageTower,
    text: TextTower,
}

impl Backbones {
    /// Loads the image backbone from `image_weights` and the text encoder from a directory with
    /// `config.json` and `model.safetensors`.
    pub fn load(
        image_architecture: ImageArchitecture,
        image_weights: &Path,
        text_dir: &Path,
        pooling: Pooling,
        weights_prefix: &str,
        device: Device,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            image: ImageTower::load(image_architecture, image_weights, device)?,
            text: TextTower::load_dir(text_dir, weights_prefix, pooling, device)?,
        })
    }

    /// Combines towers loaded separately.
    pub fn from_towers(image: ImageTower, text: TextTower) -> Self {
        Self { image, text }
    }

    /// The image tower.
    pub fn image(&self) -> &ImageTower {
        &self.image
    }

    /// The text tower.
    pub fn text(&self) -> &TextTower {
        &self.text
    }

    /// See [`ImageTower::f_features`].
    pub fn f_image_features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        self.image.f_features(images)
    }

    /// See [`TextTower::f_features`].
    pub fn f_text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.text.f_features(input_ids, attention_mask)
    }

    /// Like [`Backbones::f_image_features`].
    ///
    /// # Panics
    ///
    /// Panics on invalid input or a libtorch failure; use the `f_` variant for untrusted input.
    pub fn image_features(&self, images: &Tensor) -> Tensor {
        self.f_image_features(images)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Like [`Backbones::f_text_features`].
    ///
    /// # Panics
    ///
    /// Panics on invalid input or a libtorch failure; use the `f_` variant for untrusted input.
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.f_text_features(input_ids, attention_mask)
            .unwrap_or_else(|error| panic!("{error}"))
    }
}

pub(crate) fn is_floating_point(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

fn is_integer(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 | Kind::Bool
    )
}

/// Checks that `features` is a floating-point `[N, width]` tensor.
pub(crate) fn check_features(name: &str, features: &Tensor, width: i64) -> Result<(), ModelError> {
    let size = features.size();
    if size.len() != 2 || size[1] != width {
        return Err(ModelError::InvalidInput(format!(
            "{name} have shape {size:?}, expected [N, {width}]"
        )));
    }
    if !is_floating_point(features.kind()) {
        return Err(ModelError::InvalidInput(format!(
            "{name} have type {:?}, expected a floating-point type",
            features.kind()
        )));
    }
    Ok(())
}
