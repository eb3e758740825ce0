#!/usr/bin/env bash
# Runs the whole test suite against real components: set-up (without the
# full training run), a quick training run when no trained model exists yet,
# then every workspace test in release mode.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh --skip-train
# shellcheck source=scripts/env.sh
source scripts/env.sh

MODEL_DIR="$DB4R_ARTIFACTS/models/fmnist-colours"
if [ ! -f "$MODEL_DIR/config.json" ]; then
    MODEL_DIR="$DB4R_ARTIFACTS/models/fmnist-colours-quick"
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        printf '\n==> Quick training run for the end-to-end tests\n'
        "${CARGO_TARGET_DIR:-$ROOT/target}/release/densebert4ret-train" --quick --out "$MODEL_DIR"
    fi
fi
export DB4R_MODEL_DIR="$MODEL_DIR"

printf '\n==> cargo test (model %s)\n' "$DB4R_MODEL_DIR"
cargo test --release --workspace "$@"
