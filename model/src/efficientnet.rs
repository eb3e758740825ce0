//! EfficientNet-Lite0 (Google's EfficientNet-Lite, the EfficientNet-B0 variant without
//! squeeze-and-excitation and with ReLU6) with the tensor names of the lukemelas
//! EfficientNet-PyTorch code: `_conv_stem`, `_bn0`, `_blocks.N.{_expand_conv,_bn0,
//! _depthwise_conv,_bn1,_project_conv,_bn2}`, `_conv_head`, `_bn1` and `_fc`.
//!
//! Convolutions use TensorFlow "same" padding, computed for each input size, and BatchNorm uses
//! epsilon 1e-3, as the TensorFlow checkpoints were trained. Inputs are expected normalised as
//! `(pixel - 127) / 128` on 0..=255 pixels.

use tch::nn;
use tch::Tensor;

/// Length of the pooled feature vector.
pub const FEATURE_DIM: i64 = 1280;

/// Variable name prefixes of the modules that [`EfficientNetLite0::tail_t`] runs: the last
/// block, the head convolution and its BatchNorm.
pub const TAIL_PREFIXES: [&str; 3] = ["_blocks.15.", "_conv_head.", "_bn1."];

const STEM_CHANNELS: i64 = 32;
const BATCH_NORM_EPS: f64 = 1e-3;

/// One stage of MBConv blocks: (repeats, kernel size, first stride, expansion ratio, input
/// channels, output channels). EfficientNet-Lite0 keeps the EfficientNet-B0 stages.
const STAGES: [(i64, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

fn batch_norm(path: nn::Path, channels: i64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps: BATCH_NORM_EPS,
        ..Default::default()
    };
    nn::batch_norm2d(path, channels, config)
}

/// A bias-free convolution with TensorFlow "same" padding.
#[derive(Debug)]
struct SameConv {
    conv: nn::Conv2D,
    kernel: i64,
    stride: i64,
}

impl SameConv {
    fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        groups: i64,
    ) -> Self {
        let config = nn::ConvConfig {
            stride,
            padding: 0,
            groups,
            bias: false,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(path, in_channels, out_channels, kernel, config),
            kernel,
            stride,
        }
    }

    /// Pads so that the output has `ceil(input / stride)` rows and columns, putting the odd
    /// pixel at the bottom and right, as TensorFlow does.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (height, width) = (size[2], size[3]);
        let pad_height = same_padding(height, self.kernel, self.stride);
        let pad_width = same_padding(width, self.kernel, self.stride);
        if pad_height == 0 && pad_width == 0 {
            return xs.apply(&self.conv);
        }
        xs.constant_pad_nd([
            pad_width / 2,
            pad_width - pad_width / 2,
            pad_height / 2,
            pad_height - pad_height / 2,
        ])
        .apply(&self.conv)
    }
}

fn same_padding(input: i64, kernel: i64, stride: i64) -> i64 {
    let output = (input + stride - 1) / stride;
    ((output - 1) * stride + kernel - input).max(0)
}

/// Inverted-residual block: optional 1x1 expansion, depthwise convolution, 1x1 projection.
#[derive(Debug)]
struct MbConvBlock {
    expand: Option<(SameConv, nn::BatchNorm)>,
    depthwise: SameConv,
    bn1: nn::BatchNorm,
    project: SameConv,
    bn2: nn::BatchNorm,
    residual: bool,
}

impl MbConvBlock {
    fn new(
        path: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        expansion: i64,
    ) -> Self {
        let hidden = in_channels * expansion;
        let expand = (expansion != 1).then(|| {
            (
                SameConv::new(path / "_expand_conv", in_channels, hidden, 1, 1, 1),
                batch_norm(path / "_bn0", hidden),
            )
        });
        Self {
            expand,
            depthwise: SameConv::new(
                path / "_depthwise_conv",
                hidden,
                hidden,
                kernel,
                stride,
                hidden,
            ),
            bn1: batch_norm(path / "_bn1", hidden),
            project: SameConv::new(path / "_project_conv", hidden, out_channels, 1, 1, 1),
            bn2: batch_norm(path / "_bn2", out_channels),
            residual: stride == 1 && in_channels == out_channels,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut hidden = xs.shallow_clone();
        if let Some((conv, norm)) = &self.expand {
            hidden = conv.forward(&hidden).apply_t(norm, train).relu6();
        }
        let hidden = self
            .depthwise
            .forward(&hidden)
            .apply_t(&self.bn1, train)
            .relu6();
        let out = self.project.forward(&hidden).apply_t(&self.bn2, train);
        // NOTE: drop-connect on the residual branch is a training-time regulariser of the
        // original recipe and is not implemented; fine-tuning trains only the last block,
        // which has no residual branch.
        if self.residual {
            out + xs
        } else {
            out
        }
    }
}

/// EfficientNet-Lite0 image backbone.
#[derive(Debug)]
pub struct EfficientNetLite0 {
    conv_stem: SameConv,
    bn0: nn::BatchNorm,
    blocks: Vec<MbConvBlock>,
    conv_head: SameConv,
    bn1: nn::BatchNorm,
    fc: Option<nn::Linear>,
}

impl EfficientNetLite0 {
    /// Creates the network under `path`; `_fc` is created only when `num_classes` is given.
    pub fn new(path: &nn::Path, num_classes: Option<i64>) -> Self {
        let conv_stem = SameConv::new(path / "_conv_stem", 3, STEM_CHANNELS, 3, 2, 1);
        let bn0 = batch_norm(path / "_bn0", STEM_CHANNELS);

        let blocks_path = path / "_blocks";
        let mut blocks = Vec::new();
        for (repeats, kernel, stride, expansion, in_channels, out_channels) in STAGES {
            for repeat in 0..repeats {
                let (block_in, block_stride) = if repeat == 0 {
                    (in_channels, stride)
                } else {
                    (out_channels, 1)
                };
                let block_path = &blocks_path / blocks.len();
                blocks.push(MbConvBlock::new(
                    &block_path,
                    block_in,
                    out_channels,
                    kernel,
                    block_stride,
                    expansion,
                ));
            }
        }

        let last_channels = STAGES[STAGES.len() - 1].5;
        let conv_head = SameConv::new(path / "_conv_head", last_channels, FEATURE_DIM, 1, 1, 1);
        let bn1 = batch_norm(path / "_bn1", FEATURE_DIM);
        let fc = num_classes
            .map(|classes| nn::linear(path / "_fc", FEATURE_DIM, classes, Default::default()));

        Self {
            conv_stem,
            bn0,
            blocks,
            conv_head,
            bn1,
            fc,
        }
    }

    /// Computes pooled features `[N, 1280]` from normalised images `[N, 3, H, W]`.
    pub fn features_t(&self, images: &Tensor, train: bool) -> Tensor {
        self.tail_t(&self.trunk_t(images, train), train)
    }

    /// Computes the input of the last block, `[N, 192, H/32, W/32]`: everything that
    /// [`EfficientNetLite0::tail_t`] does not run.
    pub fn trunk_t(&self, images: &Tensor, train: bool) -> Tensor {
        let mut xs = self
            .conv_stem
            .forward(images)
            .apply_t(&self.bn0, train)
            .relu6();
        for block in &self.blocks[..self.blocks.len() - 1] {
            xs = block.forward_t(&xs, train);
        }
        xs
    }

    /// Runs the last block (the single-block final stage), the head convolution and the
    /// pooling on the output of [`EfficientNetLite0::trunk_t`], giving features `[N, 1280]`.
    pub fn tail_t(&self, trunk: &Tensor, train: bool) -> Tensor {
        let last = &self.blocks[self.blocks.len() - 1];
        self.conv_head
            .forward(&last.forward_t(trunk, train))
            .apply_t(&self.bn1, train)
            .relu6()
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
    }

    /// Applies the ImageNet classifier `_fc` to pooled features, or returns `None` when the
    /// network was built without one.
    pub fn logits(&self, features: &Tensor) -> Option<Tensor> {
        self.fc.as_ref().map(|fc| features.apply_t(fc, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // TensorFlow "same": output = ceil(input / stride).
        assert_eq!(same_padding(224, 3, 2), 1);
        assert_eq!(same_padding(225, 3, 2), 2);
        assert_eq!(same_padding(112, 3, 1), 2);
        assert_eq!(same_padding(7, 5, 1), 4);
        assert_eq!(same_padding(14, 5, 2), 3);
        assert_eq!(same_padding(7, 1, 1), 0);
    }

    #[test]
    fn trunk_then_tail_equals_features() {
        tch::manual_seed(2);
        let store = nn::VarStore::new(tch::Device::Cpu);
        let network = EfficientNetLite0::new(&store.root(), None);
        let images = Tensor::randn([2, 3, 96, 96], (tch::Kind::Float, tch::Device::Cpu));
        let trunk = network.trunk_t(&images, false);
        assert_eq!(trunk.size(), vec![2, 192, 3, 3]);
        let split = network.tail_t(&trunk, false);
        let whole = network.features_t(&images, false);
        let difference = (split - whole).abs().max().double_value(&[]);
        assert!(difference < 1e-5, "max difference {difference}");
    }

    #[test]
    fn tail_prefixes_name_the_last_block() {
        let store = nn::VarStore::new(tch::Device::Cpu);
        let network = EfficientNetLite0::new(&store.root(), None);
        let last = format!("_blocks.{}.", network.blocks.len() - 1);
        assert_eq!(TAIL_PREFIXES[0], last);
        let variables = store.variables();
        for prefix in TAIL_PREFIXES {
            assert!(
                variables.keys().any(|name| name.starts_with(prefix)),
                "no variable starts with {prefix}"
            );
        }
    }

    #[test]
    fn block_count_matches_checkpoint() {
        let store = nn::VarStore::new(tch::Device::Cpu);
        let network = EfficientNetLite0::new(&store.root(), None);
        assert_eq!(network.blocks.len(), 16);
        let variables = store.variables();
        assert_eq!(
            variables["_blocks.15._project_conv.weight"].size(),
            vec![320, 1152, 1, 1]
        );
        assert_eq!(
            variables["_blocks.3._depthwise_conv.weight"].size(),
            vec![144, 1, 5, 5]
        );
        assert!(!variables.contains_key("_blocks.0._expand_conv.weight"));
    }
}
