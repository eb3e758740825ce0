//! The trainable heads with their variable store, and batched inference over cached features.

use std::fmt;
use std::str::FromStr;

use densebert4ret_model::{
    build_heads, l2_normalize, FusionMlp, HeadConfig, ProjectionHead, PROJECTION_PATH,
};
use serde::{Deserialize, Serialize};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// Rows per forward pass when embedding a whole query set or catalog.
const EMBED_BATCH: i64 = 1024;

/// Variable path of the TIRG composition in the head store.
pub const TIRG_PATH: &str = "tirg";

/// Query composition trained against the projected catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompositionKind {
    /// The DenseBert4Ret fusion MLP over concatenated image and text features.
    Fusion,
    /// The gated residual composition of TIRG (Vo et al., CVPR 2019).
    Tirg,
}

impl CompositionKind {
    /// Name accepted on the command line and written to `metrics.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            CompositionKind::Fusion => "fusion",
            CompositionKind::Tirg => "tirg",
        }
    }
}

impl fmt::Display for CompositionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompositionKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "fusion" => Ok(CompositionKind::Fusion),
            "tirg" => Ok(CompositionKind::Tirg),
            other => Err(format!(
                "invalid method {other:?}: expected \"fusion\" or \"tirg\""
            )),
        }
    }
}

/// TIRG's gated residual composition (Vo et al., "Composing Text and Image for Image
/// Retrieval - An Empirical Odyssey", CVPR 2019), over the projected reference image.
///
/// Let `x` be the reference projected by the catalog head and `t` the LayerNorm-ed text
/// features projected to the joint width. The query is
/// `l2(w_g * sigmoid(G([x; t])) * x + w_r * R([x; t]))`. The gate `G` and the residual `R`
/// are two-layer MLPs, and `w_g`, `w_r` are learned scalars that start at 1. The reference
/// goes through the same projection as the catalog, so query and catalog images share one
/// image embedding.
#[derive(Debug)]
pub struct TirgComposition {
    text_norm: nn::LayerNorm,
    text_projection: nn::Linear,
    gate_hidden: nn::Linear,
    gate_out: nn::Linear,
    residual_hidden: nn::Linear,
    residual_out: nn::Linear,
    gate_weight: Tensor,
    residual_weight: Tensor,
}

impl TirgComposition {
    /// Creates the composition's variables under `path`.
    pub fn new(path: &nn::Path, text_dim: i64, hidden_dim: i64, joint_dim: i64) -> Self {
        let linear = |name: &str, inputs: i64, outputs: i64| {
            nn::linear(path / name, inputs, outputs, Default::default())
        };
        Self {
            text_norm: nn::layer_norm(path / "text_norm", vec![text_dim], Default::default()),
            text_projection: linear("text_projection", text_dim, joint_dim),
            gate_hidden: linear("gate_hidden", 2 * joint_dim, hidden_dim),
            gate_out: linear("gate_out", hidden_dim, joint_dim),
            residual_hidden: linear("residual_hidden", 2 * joint_dim, hidden_dim),
            residual_out: linear("residual_out", hidden_dim, joint_dim),
            gate_weight: path.var("gate_weight", &[1], nn::Init::Const(1.0)),
            residual_weight: path.var("residual_weight", &[1], nn::Init::Const(1.0)),
        }
    }

    /// Composes projected reference embeddings `[N, joint]` and raw text features
    /// `[N, text_dim]` into unit query rows `[N, joint]`.
    pub fn forward(&self, projected_reference: &Tensor, text_features: &Tensor) -> Tensor {
        let text = text_features
            .apply(&self.text_norm)
            .apply(&self.text_projection);
        let joint = Tensor::cat(&[projected_reference, &text], 1);
        let gate = joint
            .apply(&self.gate_hidden)
            .relu()
            .apply(&self.gate_out)
            .sigmoid();
        let residual = joint
            .apply(&self.residual_hidden)
            .relu()
            .apply(&self.residual_out);
        let composed =
            gate * projected_reference * &self.gate_weight + residual * &self.residual_weight;
        l2_normalize(&composed)
    }
}

/// The query composition of a set of heads.
#[derive(Debug)]
pub enum Composition {
    /// DenseBert4Ret fusion MLP.
    Fusion(FusionMlp),
    /// TIRG gated residual composition over the projection head's output.
    Tirg(TirgComposition),
}

/// Query composition and projection head created under the root of their own store, so the
/// store saves with the variable names a model directory expects (for the fusion MLP).
#[derive(Debug)]
pub struct Heads {
    /// Store of every head variable.
    pub store: VarStore,
    /// Query composition.
    pub composition: Composition,
    /// Catalog projection head.
    pub projection: ProjectionHead,
    joint_dim: i64,
}

impl Heads {
    /// Creates freshly initialised fusion heads on the CPU; call `tch::manual_seed` first for a
    /// reproducible start.
    pub fn new(image_dim: i64, text_dim: i64, config: &HeadConfig) -> Self {
        Self::with_composition(CompositionKind::Fusion, image_dim, text_dim, config)
    }

    /// Creates freshly initialised heads with the given query composition on the CPU.
    ///
    /// The fusion heads have exactly the variables of `build_heads`, so their store saves as a
    /// model directory's `head.safetensors`. The TIRG heads have `projection.*` and `tirg.*`.
    pub fn with_composition(
        kind: CompositionKind,
        image_dim: i64,
        text_dim: i64,
        config: &HeadConfig,
    ) -> Self {
        let store = VarStore::new(Device::Cpu);
        let (composition, projection) = match kind {
            CompositionKind::Fusion => {
                let (fusion, projection) = build_heads(&store.root(), image_dim, text_dim, config);
                (Composition::Fusion(fusion), projection)
            }
            CompositionKind::Tirg => {
                let projection = ProjectionHead::new(
                    &(store.root() / PROJECTION_PATH),
                    image_dim,
                    config.hidden_dim,
                    config.joint_dim,
                );
                let tirg = TirgComposition::new(
                    &(store.root() / TIRG_PATH),
                    text_dim,
                    config.hidden_dim,
                    config.joint_dim,
                );
                (Composition::Tirg(tirg), projection)
            }
        };
        Self {
            store,
            composition,
            projection,
            joint_dim: config.joint_dim,
        }
    }

    /// Composition implemented by these heads.
    pub fn kind(&self) -> CompositionKind {
        match self.composition {
            Composition::Fusion(_) => CompositionKind::Fusion,
            Composition::Tirg(_) => CompositionKind::Tirg,
        }
    }

    /// Maps image and text features to unit query embeddings, with dropout when `train`.
    pub fn compose_t(
        &self,
        image_features: &Tensor,
        text_features: &Tensor,
        train: bool,
    ) -> Tensor {
        match &self.composition {
            Composition::Fusion(fusion) => fusion.forward_t(image_features, text_features, train),
            Composition::Tirg(tirg) => tirg.forward(
                &self.projection.forward_t(image_features, train),
                text_features,
            ),
        }
    }

    /// Maps image and text features to query embeddings in eval mode, in batches.
    pub fn compose(&self, image_features: &Tensor, text_features: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let rows = image_features.size()[0];
            let mut parts = Vec::new();
            for start in (0..rows).step_by(EMBED_BATCH as usize) {
                let length = EMBED_BATCH.min(rows - start);
                parts.push(self.compose_t(
                    &image_features.narrow(0, start, length),
                    &text_features.narrow(0, start, length),
                    false,
                ));
            }
            concat_rows(parts, self.joint_dim)
        })
    }

    /// Maps catalog image features to catalog embeddings in eval mode, in batches.
    pub fn project(&self, image_features: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let rows = image_features.size()[0];
            let mut parts = Vec::new();
            for start in (0..rows).step_by(EMBED_BATCH as usize) {
                let length = EMBED_BATCH.min(rows - start);
                parts.push(
                    self.projection
                        .forward_t(&image_features.narrow(0, start, length), false),
                );
            }
            concat_rows(parts, self.joint_dim)
        })
    }

    /// Dimension of the joint embedding space.
    pub fn joint_dim(&self) -> i64 {
        self.joint_dim
    }
}

fn concat_rows(parts: Vec<Tensor>, width: i64) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0, width], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&parts, 0)
    }
}
