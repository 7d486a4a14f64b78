#!/usr/bin/env bash
# Every check that needs a CUDA device, in a few minutes, for the day a GPU machine is lent.
# Needs a CUDA build of torch (the lent machine's python3 has one; our venv pins the CPU wheel):
#   PY=python3 bash scripts/gpu_checks.sh
# 1. the tests marked `gpu` (tiers on CUDA: pinned host rows, side-stream prefetch; DeepSeek-V4.1's
#    loaded module on device and host tiers against the spec's reference);
# 2. benchmarks/peers.py on CUDA: our Engram layer vs transformers' Qwen4-Exp PLE layer (needs a
#    transformers that has qwen4_exp; outputs and gradients are checked before timing);
# 3. benchmarks/tiers.py prefetch: host-pinned + prefetched tables vs on-device (SPEC §5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: scripts/gpu_checks.sh is for a GPU machine"
print("torch", torch.__version__, "on", torch.cuda.get_device_name())
PYEOF
status=0
echo "== 1. tests marked gpu"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_tables.py tests/test_deepseek_v41.py || status=1
echo "== 2. Engram layer vs the Qwen4-Exp PLE layer, CUDA"
"$PY" benchmarks/peers.py --device cuda || status=1
echo "== 3. host-pinned + prefetch vs on-device tables"
"$PY" benchmarks/tiers.py prefetch || status=1
exit $status
