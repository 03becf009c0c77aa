#!/usr/bin/env bash
# The one command for a lent GPU session: benchmarks + CUDA tests (gpu_check.sh), then the
# PBC training (gpu_train_pbc.sh) in the time left, then everything packed into
# $OUT/gpu_out.tgz (the device tool returns at most 8 files).
# Device tool: carry [".gpu-wheels", ".gpu-data"] (made by gpu_prepare.sh), timeout_s 600,
# command `bash benchmarks/gpu_session.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GPU_OUT=${GPU_OUT:-/tmp/gpu_out}
start=$SECONDS
bash benchmarks/gpu_check.sh
left=$(( ${SESSION_S:-560} - (SECONDS - start) ))
budget=$(( left < 240 ? left : 240 ))
echo "== PBC training, budget ${budget} s"
if [ "$budget" -gt 60 ]; then
  PYTHONPATH=/tmp/site BUDGET_S=$budget PBC_OUT=$GPU_OUT/pbc bash benchmarks/gpu_train_pbc.sh
fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_out.tgz" -C "$GPU_OUT" . && ls -la "$OUT"
fi
