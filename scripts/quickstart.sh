#!/usr/bin/env bash
# Sets everything up, then starts the local cluster (encoder, two index
# shards, gateway on 127.0.0.1:50051), ingests the 10,000 Fashion-MNIST test
# images and keeps serving until Ctrl-C. Extra arguments go to
# `densebert4ret cluster`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/densebert4ret" cluster "$@"
