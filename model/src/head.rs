//! Trainable heads of DenseBert4Ret: the fusion MLP that maps concatenated image and text
//! features of a query to the joint space, and the projection head that maps catalog image
//! features to the same space. Both outputs are L2-normalised, so a dot product is a cosine
//! similarity.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::config::{HeadConfig, InputNorm};

/// Variable path of the fusion MLP in the head `VarStore`.
pub const FUSION_PATH: &str = "fusion";
/// Variable path of the projection head in the head `VarStore`.
pub const PROJECTION_PATH: &str = "projection";

/// Divides each row by its L2 norm, with the norm clamped to at least 1e-12 so zero rows stay
/// zero instead of becoming NaN.
pub fn l2_normalize(xs: &Tensor) -> Tensor {
    let norms = xs
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    xs / norms
}

/// Fusion MLP: optional per-input LayerNorm, `Linear(image + text -> hidden)`, ReLU, Dropout,
/// `Linear(hidden -> hidden)`, ReLU, `Linear(hidden -> joint)`, L2 normalisation. Variables
/// `fc1`, `fc2`, `fc3`, plus `image_norm` and `text_norm` with [`InputNorm::LayerNorm`].
#[derive(Debug)]
pub struct FusionMlp {
    input_norms: Option<(nn::LayerNorm, nn::LayerNorm)>,
    fc1: nn::Linear,
    fc2: nn::Linear,
    fc3: nn::Linear,
    dropout: f64,
    image_dim: i64,
    text_dim: i64,
}

impl FusionMlp {
    /// Creates the MLP's variables under `path`.
    pub fn new(
        path: &nn::Path,
        image_dim: i64,
        text_dim: i64,
        hidden_dim: i64,
        joint_dim: i64,
        dropout: f64,
        input_norm: InputNorm,
    ) -> Self {
        let input_norms = match input_norm {
            InputNorm::None => None,
            InputNorm::LayerNorm => Some((
                nn::layer_norm(path / "image_norm", vec![image_dim], Default::default()),
                nn::layer_norm(path / "text_norm", vec![text_dim], Default::default()),
            )),
        };
        Self {
            input_norms,
            fc1: nn::linear(
                path / "fc1",
                image_dim + text_dim,
                hidden_dim,
                Default::default(),
            ),
            fc2: nn::linear(path / "fc2", hidden_dim, hidden_dim, Default::default()),
            fc3: nn::linear(path / "fc3", hidden_dim, joint_dim, Default::default()),
            dropout,
            image_dim,
            text_dim,
        }
    }

    /// Maps image features `[N, image_dim]` and text features `[N, text_dim]` to unit rows
    /// `[N, joint_dim]`. Dropout is active only when `train` is true.
    pub fn forward_t(
        &self,
        image_features: &Tensor,
        text_features: &Tensor,
        train: bool,
    ) -> Tensor {
        let inputs = match &self.input_norms {
            Some((image_norm, text_norm)) => Tensor::cat(
                &[
                    image_features.apply(image_norm),
                    text_features.apply(text_norm),
                ],
                1,
            ),
            None => Tensor::cat(&[image_features, text_features], 1),
        };
        let joint = inputs
            .apply(&self.fc1)
            .relu()
            .dropout(self.dropout, train)
            .apply(&self.fc2)
            .relu()
            .apply(&self.fc3);
        l2_normalize(&joint)
    }

    /// Expected width of image features.
    pub fn image_dim(&self) -> i64 {
        self.image_dim
    }

    /// Expected width of text features.
    pub fn text_dim(&self) -> i64 {
        self.text_dim
    }
}

/// Projection head: `Linear(image -> hidden)`, ReLU, `Linear(hidden -> joint)`, L2
/// normalisation. Variables `fc1`, `fc2`.
#[derive(Debug)]
pub struct ProjectionHead {
    fc1: nn::Linear,
    fc2: nn::Linear,
    image_dim: i64,
}

impl ProjectionHead {
    /// Creates the head's variables under `path`.
    pub fn new(path: &nn::Path, image_dim: i64, hidden_dim: i64, joint_dim: i64) -> Self {
        Self {
            fc1: nn::linear(path / "fc1", image_dim, hidden_dim, Default::default()),
            fc2: nn::linear(path / "fc2", hidden_dim, joint_dim, Default::default()),
            image_dim,
        }
    }

    /// Maps image features `[N, image_dim]` to unit rows `[N, joint_dim]`. The head has no
    /// dropout, so `train` does not change the result; it is kept for symmetry with
    /// [`FusionMlp::forward_t`].
    pub fn forward_t(&self, image_features: &Tensor, train: bool) -> Tensor {
        let _ = train;
        l2_normalize(&image_features.apply(&self.fc1).relu().apply(&self.fc2))
    }

    /// Expected width of image features.
    pub fn image_dim(&self) -> i64 {
        self.image_dim
    }
}

impl Module for ProjectionHead {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_t(xs, false)
    }
}

/// Creates both heads under `root`, with variables `fusion.{fc1,fc2,fc3}.{weight,bias}`
/// (plus `fusion.{image_norm,text_norm}.{weight,bias}` when `head.input_norm` is
/// [`InputNorm::LayerNorm`]) and `projection.{fc1,fc2}.{weight,bias}`.
///
/// Pass the root of a `VarStore` (`&store.root()`) so that the store saves to, and
/// [`crate::DenseBert4Ret::load`] reads, a `head.safetensors` with exactly these names.
pub fn build_heads(
    root: &nn::Path,
    image_dim: i64,
    text_dim: i64,
    head: &HeadConfig,
) -> (FusionMlp, ProjectionHead) {
    let fusion = FusionMlp::new(
        &(root / FUSION_PATH),
        image_dim,
        text_dim,
        head.hidden_dim,
        head.joint_dim,
        head.dropout,
        head.input_norm,
    );
    let projection = ProjectionHead::new(
        &(root / PROJECTION_PATH),
        image_dim,
        head.hidden_dim,
        head.joint_dim,
    );
    (fusion, projection)
}
