#!/usr/bin/env bash
# Builds encoder-svc and compares its CUDA embeddings (fp32 and fp16) with
# the CPU ones, printing differences and throughput per batch size. Exits
# non-zero when fp32 on CUDA differs from the CPU by more than the
# tolerance. On a machine without an NVIDIA GPU it runs the CPU part and
# prints that no CUDA device is present.
#
# Usage: scripts/gpu_check.sh [--model-dir DIR] [--tolerance 1e-3] [--batch-sizes 1,8,32,128]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
    echo "gpu_check: nvidia-smi not found; expecting no CUDA device" >&2
fi

cargo build --release -p encoder-svc --bin encoder-gpu-check
exec target/release/encoder-gpu-check "$@"
