//! DenseNet-121 (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017) with the
//! tensor names of torchvision's `densenet121`, so torchvision state dicts load unchanged.
//!
//! The pooled features follow torchvision's forward up to the classifier: the feature maps go
//! through ReLU and a global average pool, so inputs of any size of at least 32x32 work.

use tch::nn;
use tch::Tensor;

/// Length of the pooled feature vector.
pub const FEATURE_DIM: i64 = 1024;

/// Variable name prefixes of the modules that [`DenseNet121::tail_t`] runs: the last dense
/// block and the final BatchNorm.
pub const TAIL_PREFIXES: [&str; 2] = ["features.denseblock4.", "features.norm5."];

/// Number of output channels each dense layer adds.
const GROWTH_RATE: i64 = 32;
/// Bottleneck width of a dense layer as a multiple of the growth rate.
const BOTTLENECK_FACTOR: i64 = 4;
/// Channels after the stem convolution.
const STEM_CHANNELS: i64 = 64;
/// Dense layers in each of the four blocks of DenseNet-121.
const BLOCK_LAYERS: [i64; 4] = [6, 12, 24, 16];
/// torchvision uses BatchNorm2d's default epsilon.
const BATCH_NORM_EPS: f64 = 1e-5;

fn batch_norm(path: nn::Path, channels: i64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps: BATCH_NORM_EPS,
        ..Default::default()
    };
    nn::batch_norm2d(path, channels, config)
}

fn conv(
    path: nn::Path,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(path, in_channels, out_channels, kernel, config)
}

#[derive(Debug)]
struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
}

impl DenseLayer {
    fn new(path: &nn::Path, in_channels: i64) -> Self {
        let bottleneck = BOTTLENECK_FACTOR * GROWTH_RATE;
        Self {
            norm1: batch_norm(path / "norm1", in_channels),
            conv1: conv(path / "conv1", in_channels, bottleneck, 1, 1, 0),
            norm2: batch_norm(path / "norm2", bottleneck),
            conv2: conv(path / "conv2", bottleneck, GROWTH_RATE, 3, 1, 1),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let bottleneck = xs.apply_t(&self.norm1, train).relu().apply(&self.conv1);
        bottleneck
            .apply_t(&self.norm2, train)
            .relu()
            .apply(&self.conv2)
    }
}

#[derive(Debug)]
struct DenseBlock {
    layers: Vec<DenseLayer>,
}

impl DenseBlock {
    fn new(path: &nn::Path, in_channels: i64, num_layers: i64) -> Self {
        let layers = (0..num_layers)
            .map(|index| {
                DenseLayer::new(
                    &(path / format!("denselayer{}", index + 1)),
                    in_channels + index * GROWTH_RATE,
                )
            })
            .collect();
        Self { layers }
    }

    /// Each layer receives the concatenation of the block input and all earlier layer outputs.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut features = vec![xs.shallow_clone()];
        for layer in &self.layers {
            let input = Tensor::cat(&features, 1);
            features.push(layer.forward_t(&input, train));
        }
        Tensor::cat(&features, 1)
    }
}

#[derive(Debug)]
struct Transition {
    norm: nn::BatchNorm,
    conv: nn::Conv2D,
}

impl Transition {
    fn new(path: &nn::Path, in_channels: i64, out_channels: i64) -> Self {
        Self {
            norm: batch_norm(path / "norm", in_channels),
            conv: conv(path / "conv", in_channels, out_channels, 1, 1, 0),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply_t(&self.norm, train)
            .relu()
            .apply(&self.conv)
            .avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)
    }
}

/// DenseNet-121 image backbone.
#[derive(Debug)]
pub struct DenseNet121 {
    conv0: nn::Conv2D,
    norm0: nn::BatchNorm,
    blocks: Vec<DenseBlock>,
    transitions: Vec<Transition>,
    norm5: nn::BatchNorm,
    classifier: Option<nn::Linear>,
}

impl DenseNet121 {
    /// Creates the network under `path`, with variables named `features.*` and, when
    /// `num_classes` is given, `classifier.{weight,bias}`.
    pub fn new(path: &nn::Path, num_classes: Option<i64>) -> Self {
        let features = path / "features";
        let conv0 = conv(&features / "conv0", 3, STEM_CHANNELS, 7, 2, 3);
        let norm0 = batch_norm(&features / "norm0", STEM_CHANNELS);

        let mut channels = STEM_CHANNELS;
        let mut blocks = Vec::with_capacity(BLOCK_LAYERS.len());
        let mut transitions = Vec::with_capacity(BLOCK_LAYERS.len() - 1);
        for (index, &num_layers) in BLOCK_LAYERS.iter().enumerate() {
            blocks.push(DenseBlock::new(
                &(&features / format!("denseblock{}", index + 1)),
                channels,
                num_layers,
            ));
            channels += num_layers * GROWTH_RATE;
            if index + 1 < BLOCK_LAYERS.len() {
                let path = &features / format!("transition{}", index + 1);
                transitions.push(Transition::new(&path, channels, channels / 2));
                channels /= 2;
            }
        }
        debug_assert_eq!(channels, FEATURE_DIM);
        let norm5 = batch_norm(&features / "norm5", channels);
        let classifier = num_classes
            .map(|classes| nn::linear(path / "classifier", channels, classes, Default::default()));

        Self {
            conv0,
            norm0,
            blocks,
            transitions,
            norm5,
            classifier,
        }
    }

    /// Computes pooled features `[N, 1024]` from normalised images `[N, 3, H, W]`.
    pub fn features_t(&self, images: &Tensor, train: bool) -> Tensor {
        self.tail_t(&self.trunk_t(images, train), train)
    }

    /// Computes the input of the last dense block, `[N, 512, H/32, W/32]`: everything that
    /// [`DenseNet121::tail_t`] does not run.
    pub fn trunk_t(&self, images: &Tensor, train: bool) -> Tensor {
        let mut xs = images
            .apply(&self.conv0)
            .apply_t(&self.norm0, train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let last = self.blocks.len() - 1;
        for (block, transition) in self.blocks[..last].iter().zip(&self.transitions) {
            xs = transition.forward_t(&block.forward_t(&xs, train), train);
        }
        xs
    }

    /// Runs the last dense block, the final BatchNorm and the pooling on the output of
    /// [`DenseNet121::trunk_t`], giving pooled features `[N, 1024]`.
    pub fn tail_t(&self, trunk: &Tensor, train: bool) -> Tensor {
        let last = &self.blocks[self.blocks.len() - 1];
        last.forward_t(trunk, train)
            .apply_t(&self.norm5, train)
            .relu()
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
    }

    /// Applies the ImageNet classifier to pooled features, or returns `None` when the network
    /// was built without one.
    pub fn logits(&self, features: &Tensor) -> Option<Tensor> {
        self.classifier
            .as_ref()
            .map(|classifier| features.apply_t(classifier, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trunk_then_tail_equals_features() {
        tch::manual_seed(1);
        let store = nn::VarStore::new(tch::Device::Cpu);
        let network = DenseNet121::new(&store.root(), None);
        let images = Tensor::randn([2, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let trunk = network.trunk_t(&images, false);
        assert_eq!(trunk.size(), vec![2, 512, 2, 2]);
        let split = network.tail_t(&trunk, false);
        let whole = network.features_t(&images, false);
        let difference = (split - whole).abs().max().double_value(&[]);
        assert!(difference < 1e-5, "max difference {difference}");
    }

    #[test]
    fn tail_prefixes_name_existing_variables() {
        let store = nn::VarStore::new(tch::Device::Cpu);
        let _network = DenseNet121::new(&store.root(), None);
        let variables = store.variables();
        for prefix in TAIL_PREFIXES {
            assert!(
                variables.keys().any(|name| name.starts_with(prefix)),
                "no variable starts with {prefix}"
            );
        }
    }
}
