#!/usr/bin/env python3
"""PyTorch eager baseline for the encoder benchmark (encoder-svc's encoder-bench).

Loads a DenseBert4Ret model directory (config.json plus safetensors files) into a
PyTorch implementation of the same network. The image backbone is EfficientNet-Lite0
with the tensor names of the lukemelas EfficientNet-PyTorch code, TensorFlow "same"
padding and BatchNorm epsilon 1e-3. The text encoder is transformers' BertModel with
mean or CLS pooling. The fusion MLP and the projection head are each followed by L2
normalisation, and the fusion MLP applies a LayerNorm to each input first when
head.input_norm is "layer_norm". The script then

  1. embeds the inputs that encoder-bench wrote (preprocessed pixels and token ids)
     and compares them with the Rust embeddings in the same directory, and
  2. times composed queries and catalog images at one batch size, in eval mode under
     torch.inference_mode(), with the given number of threads.

The last line of standard output is one JSON object with queries_per_second,
images_per_second and max_abs_difference. The script exits with status 1 when the
embeddings differ from the Rust ones by more than --tolerance.

Usage: encoder_eager_bench.py --model-dir DIR --inputs DIR [--threads 2]
       [--batch-size 32] [--items 256] [--tolerance 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel

BATCH_NORM_EPS = 1e-3
FEATURE_DIM = 1280
# (repeats, kernel, first stride, expansion, input channels, output channels), the
# EfficientNet-B0 stages that EfficientNet-Lite0 keeps.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class SameConv(nn.Conv2d):
    """Bias-free convolution with TensorFlow "same" padding (odd pixel at bottom and right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        height, width = xs.shape[-2:]
        kernel, stride = self.kernel_size[0], self.stride[0]
        pad_height = max((-(-height // stride) - 1) * stride + kernel - height, 0)
        pad_width = max((-(-width // stride) - 1) * stride + kernel - width, 0)
        if pad_height or pad_width:
            xs = F.pad(xs, [pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2])
        return super().forward(xs)


class MbConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = SameConv(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BATCH_NORM_EPS)
        self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BATCH_NORM_EPS)
        self._project_conv = SameConv(hidden, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        hidden = F.relu6(self._bn0(self._expand_conv(xs))) if self.expand else xs
        hidden = F.relu6(self._bn1(self._depthwise_conv(hidden)))
        out = self._bn2(self._project_conv(hidden))
        return out + xs if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BATCH_NORM_EPS)
        blocks = []
        for repeats, kernel, stride, expansion, in_channels, out_channels in STAGES:
            for repeat in range(repeats):
                first = repeat == 0
                blocks.append(MbConvBlock(in_channels if first else out_channels, out_channels, kernel, stride if first else 1, expansion))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(STAGES[-1][5], FEATURE_DIM, 1)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BATCH_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        xs = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            xs = block(xs)
        xs = F.relu6(self._bn1(self._conv_head(xs)))
        return F.adaptive_avg_pool2d(xs, 1).flatten(1)


class Heads(nn.Module):
    """Fusion MLP (optional per-input LayerNorm, fc1, ReLU, fc2, ReLU, fc3) and projection
    head (fc1, ReLU, fc2)."""

    def __init__(self, weights: dict[str, torch.Tensor], input_norm: str):
        super().__init__()

        def linear(name: str) -> nn.Linear:
            weight = weights[f"{name}.weight"]
            layer = nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": weights[f"{name}.bias"]})
            return layer

        def layer_norm(name: str) -> nn.LayerNorm:
            # tch's nn::layer_norm default: epsilon 1e-5, learned scale and shift.
            weight = weights[f"{name}.weight"]
            layer = nn.LayerNorm(weight.shape[0], eps=1e-5)
            layer.load_state_dict({"weight": weight, "bias": weights[f"{name}.bias"]})
            return layer

        if input_norm not in ("none", "layer_norm"):
            raise SystemExit(f"encoder_eager_bench: head.input_norm {input_norm!r} is not implemented here; expected none or layer_norm")
        self.input_norms = None
        if input_norm == "layer_norm":
            self.input_norms = nn.ModuleList([layer_norm("fusion.image_norm"), layer_norm("fusion.text_norm")])
        self.fusion = nn.ModuleList([linear(f"fusion.fc{index}") for index in (1, 2, 3)])
        self.projection = nn.ModuleList([linear(f"projection.fc{index}") for index in (1, 2)])

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        fc1, fc2, fc3 = self.fusion
        if self.input_norms is not None:
            image_norm, text_norm = self.input_norms
            image_features, text_features = image_norm(image_features), text_norm(text_features)
        joint = fc3(F.relu(fc2(F.relu(fc1(torch.cat([image_features, text_features], dim=1))))))
        return F.normalize(joint, dim=-1, eps=1e-12)

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.projection
        return F.normalize(fc2(F.relu(fc1(image_features))), dim=-1, eps=1e-12)


class DenseBert4RetEager(nn.Module):
    def __init__(self, model_dir: Path):
        super().__init__()
        config = json.loads((model_dir / "config.json").read_text())
        if config["image_backbone"]["architecture"] != "efficientnet_lite0":
            raise SystemExit(f"encoder_eager_bench: {model_dir} uses {config['image_backbone']['architecture']}; only efficientnet_lite0 is implemented here")
        self.image = EfficientNetLite0()
        state = {name: tensor for name, tensor in load_file(model_dir / config["image_backbone"]["weights"]).items() if not name.startswith("_fc.")}
        missing, unexpected = self.image.load_state_dict(state, strict=False)
        if missing or [name for name in unexpected if not name.endswith("num_batches_tracked")]:
            raise SystemExit(f"encoder_eager_bench: image backbone weights do not match: missing {missing}, unexpected {unexpected}")

        text = config["text_encoder"]
        self.pooling = text["pooling"]
        self.text = BertModel(BertConfig.from_json_file(model_dir / text["config"]), add_pooling_layer=False)
        prefix = text.get("weights_prefix", "")
        text_state = {name[len(prefix):]: tensor for name, tensor in load_file(model_dir / text["weights"]).items() if name.startswith(prefix)}
        missing, unexpected = self.text.load_state_dict(text_state, strict=False)
        if missing or [name for name in unexpected if not name.startswith(("pooler.", "embeddings.position_ids"))]:
            raise SystemExit(f"encoder_eager_bench: text encoder weights do not match: missing {missing}, unexpected {unexpected}")
        self.heads = Heads(load_file(model_dir / config["head"]["weights"]), config["head"].get("input_norm", "none"))
        self.eval()

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def embed_queries(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.heads.compose(self.image(pixels), self.text_features(input_ids, attention_mask))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.heads.project(self.image(pixels))


def pad(tokens: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(sequence) for sequence in tokens)
    ids = torch.full((len(tokens), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), length), dtype=torch.long)
    for row, sequence in enumerate(tokens):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def items_per_second(run, batch_size: int, items: int) -> float:
    run()
    passes = max(-(-items // batch_size), 2)
    started = time.perf_counter()
    for _ in range(passes):
        run()
    return passes * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="DenseBert4Ret model directory")
    parser.add_argument("--inputs", type=Path, required=True, help="directory with pixels.f32 and inputs.json from encoder-bench")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the timed forward passes")
    parser.add_argument("--items", type=int, default=256, help="items embedded per timed measurement")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed max-abs difference to the Rust embeddings")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = DenseBert4RetEager(args.model_dir)
    inputs = json.loads((args.inputs / "inputs.json").read_text())
    size = inputs["image_size"]
    pixels = torch.from_numpy(np.fromfile(args.inputs / "pixels.f32", dtype="<f4").reshape(-1, 3, size, size).copy())
    input_ids, attention_mask = pad(inputs["tokens"], inputs["pad_id"])

    with torch.inference_mode():
        queries = model.embed_queries(pixels, input_ids, attention_mask)
        images = model.embed_images(pixels)
        max_abs = max(
            (queries - torch.tensor(inputs["query_embeddings"])).abs().max().item(),
            (images - torch.tensor(inputs["image_embeddings"])).abs().max().item(),
        )

        index = torch.arange(args.batch_size) % pixels.shape[0]
        batch_pixels, batch_ids, batch_mask = pixels[index], input_ids[index], attention_mask[index]
        query_rate = items_per_second(lambda: model.embed_queries(batch_pixels, batch_ids, batch_mask), args.batch_size, args.items)
        image_rate = items_per_second(lambda: model.embed_images(batch_pixels), args.batch_size, args.items)

    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "queries_per_second": round(query_rate, 1),
        "images_per_second": round(image_rate, 1),
        "max_abs_difference": max_abs,
    }
    print(json.dumps(result))
    if max_abs > args.tolerance:
        print(f"encoder_eager_bench: embeddings differ from the Rust ones by {max_abs:.3e}, more than --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
