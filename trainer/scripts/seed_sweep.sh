#!/usr/bin/env bash
# Trains every method of one dataset (Fashion-MNIST colours unless --dataset names another)
# once per training seed, with the data seed fixed so that all runs share one feature cache,
# then prints mean and standard deviation tables with aggregate_seeds.py.
#
# Usage: trainer/scripts/seed_sweep.sh [--dataset SPEC] OUT_DIR [SEED ...] [-- EXTRA TRAINER OPTIONS]
# Examples: trainer/scripts/seed_sweep.sh artifacts/benchmarks/fmnist-colours 1 2 3
#           trainer/scripts/seed_sweep.sh --dataset easyvqa-shapes artifacts/benchmarks/easyvqa-shapes 1 2 3
set -euo pipefail

USAGE="usage: seed_sweep.sh [--dataset SPEC] OUT_DIR [SEED ...] [-- EXTRA TRAINER OPTIONS]"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATASET=fmnist-colours
if [ "${1:-}" = "--dataset" ]; then
    DATASET="${2:?$USAGE}"
    shift 2
fi
OUT="${1:?$USAGE}"
shift
SEEDS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    SEEDS+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
[ ${#SEEDS[@]} -eq 0 ] && SEEDS=(1 2 3)

cd "$ROOT"
# shellcheck source=scripts/env.sh
source scripts/env.sh
TRAIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/densebert4ret-train"
mkdir -p "$OUT"
for seed in "${SEEDS[@]}"; do
    printf '==> seed %s\n' "$seed"
    started=$(date +%s)
    "$TRAIN" --dataset "$DATASET" --seed "$seed" --out "$OUT/seed-$seed" --checkpoint-dir "$OUT/checkpoints/seed-$seed" --force "$@" \
        >"$OUT/seed-$seed.log" 2>&1
    printf 'seed %s finished in %s s\n' "$seed" "$(( $(date +%s) - started ))"
done
"$ROOT/.venv/bin/python" "$ROOT/trainer/scripts/aggregate_seeds.py" "${SEEDS[@]/#/$OUT/seed-}"
