#!/usr/bin/env bash
# The main comparison (`make demo`: MoE vs iso-parameter Engram vs iso-FLOP dense) at the
# paper's four residual streams (mHC, hc_mult=4) instead of the demo's one. Every model gets the
# hyper-connections; Engram gates each stream (SPEC §2.8). ~40% slower per step than M = 1.
#   bash recipes/compare_mhc4.sh [--steps N] [--train.seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/engramlm compare --moe.hc_mult=4 --out runs/compare_mhc4 "$@"
