//! DenseBert4Ret (Khan et al., "DenseBert4Ret: Deep bi-modal for image retrieval",
//! Information Sciences 612, 2022) for composed image retrieval: a query is a reference image
//! plus a modifying text, and the results are catalog images.
//!
//! - An image tower (DenseNet-121, 1024-d pooled features, or EfficientNet-Lite0, 1280-d)
//!   turns images into feature vectors.
//! - A text tower (BERT, for example all-MiniLM-L6-v2 with 384-d mean pooling) turns the
//!   modifying text into a feature vector.
//! - A fusion MLP maps `[image features; text features]` of a query to an L2-normalised joint
//!   embedding, and a projection head maps catalog image features into the same space.
//!
//! Decoding, resizing and tokenization ([`decode_image`], [`image_to_chw`],
//! [`TextTokenizer`]) need no libtorch and can run on any thread. The networks run in eval
//! mode without gradients. tch tensors are `Send` but not `Sync`, so a [`DenseBert4Ret`] can
//! move between threads but is used from one at a time.

mod backbones;
mod batch;
pub mod bert;
mod config;
pub mod densenet;
pub mod efficientnet;
mod error;
mod fingerprint;
mod head;
mod model_dir;
mod modification;
mod preprocess;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use tch::nn;
pub use tch::{Device, Kind, Tensor};

pub use backbones::{
    Backbones, ImageTower, TextTower, TEXT_CONFIG_FILE, TEXT_TOKENIZER_FILE, TEXT_WEIGHTS_FILE,
};
pub use batch::{pad_batch, stack_images};
pub use config::{
    HeadConfig, ImageArchitecture, ImageBackboneConfig, InputNorm, ModelConfig, Pooling,
    TextEncoderConfig, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MODEL_CONFIG_FILE,
};
pub use error::ModelError;
pub use fingerprint::{fingerprint_dir, FINGERPRINT_LEN};
pub use head::{
    build_heads, l2_normalize, FusionMlp, ProjectionHead, FUSION_PATH, PROJECTION_PATH,
};
pub use model_dir::write_model_dir;
pub use modification::{join_modifications, MODIFICATION_SEPARATOR};
pub use preprocess::{decode_image, image_to_chw, preprocess_image, Normalization};
pub use tokenizer::{TextTokenizer, TokenOverflow};

use backbones::check_features;
use error::catch_inference_panic;

/// A loaded DenseBert4Ret model: image and text towers, tokenizer and heads.
#[derive(Debug)]
pub struct DenseBert4Ret {
    dir: PathBuf,
    config: ModelConfig,
    fingerprint: String,
    backbones: Backbones,
    tokenizer: Arc<TextTokenizer>,
    heads: nn::VarStore,
    fusion: FusionMlp,
    projection: ProjectionHead,
}

impl DenseBert4Ret {
    /// Loads a model directory (see [`ModelConfig`] for the layout) onto `device`.
    ///
    /// The fingerprint is computed from the files before the weights are read.
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let fingerprint = fingerprint_dir(dir)?;

        let image_config = &config.image_backbone;
        let image = ImageTower::load(
            image_config.architecture,
            &dir.join(&image_config.weights),
            device,
        )?;

        let text_config = &config.text_encoder;
        let text = TextTower::load(
            &dir.join(&text_config.config),
            &dir.join(&text_config.weights),
            &text_config.weights_prefix,
            text_config.pooling,
            device,
        )?;
        let max_positions = text.bert_config().max_position_embeddings;
        if text_config.max_tokens as i64 > max_positions {
            return Err(ModelError::config(
                dir.join(MODEL_CONFIG_FILE),
                format!(
                    "text_encoder.max_tokens is {}, but the text encoder has only {max_positions} positions",
                    text_config.max_tokens
                ),
            ));
        }
        let tokenizer = TextTokenizer::from_file(
            dir.join(&text_config.tokenizer),
            text_config.max_tokens,
            text_config.overflow,
        )?;
        let vocab_size = text.bert_config().vocab_size;
        if tokenizer.vocab_size() as i64 > vocab_size {
            return Err(ModelError::config(
                dir.join(MODEL_CONFIG_FILE),
                format!(
                    "the tokenizer has {} tokens but the text encoder embeds only {vocab_size}; \
                     use the tokenizer.json that belongs to the text encoder",
                    tokenizer.vocab_size()
                ),
            ));
        }

        let mut heads = nn::VarStore::new(device);
        let (fusion, projection) = build_heads(
            &heads.root(),
            image.feature_dim(),
            text.feature_dim(),
            &config.head,
        );
        weights::load_safetensors(&heads, &dir.join(&config.head.weights), "")?;
        heads.freeze();

        tracing::info!(
            dir = %dir.display(),
            %fingerprint,
            image_backbone = %image_config.architecture,
            joint_dim = config.head.joint_dim,
            ?device,
            "loaded DenseBert4Ret model"
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            fingerprint,
            backbones: Backbones::from_towers(image, text),
            tokenizer: Arc::new(tokenizer),
            heads,
            fusion,
            projection,
        })
    }

    /// Returns the model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Returns the directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// First 16 hex digits of the SHA-256 of the model directory; see [`fingerprint_dir`].
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Device holding the weights; outputs are returned on it.
    pub fn device(&self) -> Device {
        self.heads.device()
    }

    /// Dimension of the joint embedding space.
    pub fn joint_dim(&self) -> i64 {
        self.config.head.joint_dim
    }

    /// Width of image features.
    pub fn image_feature_dim(&self) -> i64 {
        self.backbones.image().feature_dim()
    }

    /// Width of text features.
    pub fn text_feature_dim(&self) -> i64 {
        self.backbones.text().feature_dim()
    }

    /// Side of the square model input in pixels.
    pub fn image_size(&self) -> i64 {
        i64::from(self.config.image_backbone.image_size)
    }

    /// Pixel normalisation the image backbone expects.
    pub fn image_normalization(&self) -> Normalization {
        self.config.image_backbone.architecture.normalization()
    }

    /// Returns the tokenizer configured for the text encoder, shareable with preprocessing
    /// threads.
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// Returns the image and text towers.
    pub fn backbones(&self) -> &Backbones {
        &self.backbones
    }

    /// Tokenizes texts and pads them into `input_ids` and `attention_mask` CPU tensors.
    pub fn tokenize_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
    ) -> Result<(Tensor, Tensor), ModelError> {
        let sequences = texts
            .iter()
            .map(|text| self.tokenizer.encode(text.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pad_batch(&sequences, self.tokenizer.pad_id()))
    }

    /// Computes image features `[N, image_feature_dim]` on the model device from images
    /// `[N, 3, S, S]` normalised by [`image_to_chw`], on any device. Other sizes of at least
    /// 32x32 are accepted too, but the heads were trained on `image_size`.
    pub fn f_image_features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        self.backbones.f_image_features(images)
    }

    /// Computes text features `[N, text_feature_dim]` from [`pad_batch`] output.
    pub fn f_text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.backbones.f_text_features(input_ids, attention_mask)
    }

    /// Maps query image features `[N, image_feature_dim]` and text features
    /// `[N, text_feature_dim]` to unit rows `[N, joint_dim]` on the model device.
    pub fn f_compose(
        &self,
        image_features: &Tensor,
        text_features: &Tensor,
    ) -> Result<Tensor, ModelError> {
        check_features("image features", image_features, self.image_feature_dim())?;
        check_features("text features", text_features, self.text_feature_dim())?;
        let (image_rows, text_rows) = (image_features.size()[0], text_features.size()[0]);
        if image_rows != text_rows {
            return Err(ModelError::InvalidInput(format!(
                "{image_rows} image feature rows but {text_rows} text feature rows; compose needs one text per image"
            )));
        }
        let device = self.device();
        catch_inference_panic(|| {
            tch::no_grad(|| {
                let image_features = image_features.to_device(device).to_kind(Kind::Float);
                let text_features = text_features.to_device(device).to_kind(Kind::Float);
                self.fusion
                    .forward_t(&image_features, &text_features, false)
            })
        })
    }

    /// Maps catalog image features `[N, image_feature_dim]` to unit rows `[N, joint_dim]` on the
    /// model device.
    pub fn f_project_images(&self, image_features: &Tensor) -> Result<Tensor, ModelError> {
        check_features("image features", image_features, self.image_feature_dim())?;
        let device = self.device();
        catch_inference_panic(|| {
            tch::no_grad(|| {
                let image_features = image_features.to_device(device).to_kind(Kind::Float);
                self.projection.forward_t(&image_features, false)
            })
        })
    }

    /// Like [`DenseBert4Ret::f_image_features`].
    ///
    /// # Panics
    ///
    /// Panics on invalid input or a libtorch failure; use the `f_` variant for untrusted input.
    pub fn image_features(&self, images: &Tensor) -> Tensor {
        self.f_image_features(images)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Like [`DenseBert4Ret::f_text_features`].
    ///
    /// # Panics
    ///
    /// Panics on invalid input or a libtorch failure; use the `f_` variant for untrusted input.
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.f_text_features(input_ids, attention_mask)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Like [`DenseBert4Ret::f_compose`].
    ///
    /// # Panics
    ///
    /// Panics on invalid input or a libtorch failure; use the `f_` variant for untrusted input.
    pub fn compose(&self, image_features: &Tensor, text_features: &Tensor) -> Tensor {
        self.f_compose(image_features, text_features)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Like [`DenseBert4Ret::f_project_images`].
    ///
    /// # Panics
    ///
    /// Panics on invalid input or a libtorch failure; use the `f_` variant for untrusted input.
    pub fn project_images(&self, image_features: &Tensor) -> Tensor {
        self.f_project_images(image_features)
            .unwrap_or_else(|error| panic!("{error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_are_send() {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send::<DenseBert4Ret>();
        assert_send::<Backbones>();
        assert_send_sync::<TextTokenizer>();
    }
}
