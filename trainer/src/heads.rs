//! The trainable heads with their variable store, and batched inference over cached features.

use densebert4ret_model::{build_heads, FusionMlp, HeadConfig, ProjectionHead};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Rows per forward pass when embedding a whole query set or catalog.
const EMBED_BATCH: i64 = 1024;

/// Fusion MLP and projection head created under the root of their own store,
/// so the store saves with the variable names a model directory expects.
#[derive(Debug)]
pub struct Heads {
    /// Store of every head variable.
    pub store: VarStore,
    /// Query fusion MLP.
    pub fusion: FusionMlp,
    /// Catalog projection head.
    pub projection: ProjectionHead,
    joint_dim: i64,
}

impl Heads {
    /// Creates freshly initialised heads on the CPU; call `tch::manual_seed` first for a reproducible start.
    pub fn new(image_dim: i64, text_dim: i64, config: &HeadConfig) -> Self {
        let store = VarStore::new(Device::Cpu);
        let (fusion, projection) = build_heads(&store.root(), image_dim, text_dim, config);
        Self {
            store,
            fusion,
            projection,
            joint_dim: config.joint_dim,
        }
    }

    /// Maps image and text features to query embeddings in eval mode, in batches.
    pub fn compose(&self, image_features: &Tensor, text_features: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let rows = image_features.size()[0];
            let mut parts = Vec::new();
            for start in (0..rows).step_by(EMBED_BATCH as usize) {
                let length = EMBED_BATCH.min(rows - start);
                parts.push(self.fusion.forward_t(
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
