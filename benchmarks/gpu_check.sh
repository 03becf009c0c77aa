#!/usr/bin/env bash
# One prepared script for a lent NVIDIA GPU (H100/H200): installs the carried wheels,
# runs the CUDA tests and the GPU benchmarks, prints one short table.
# Usage (device tool): carry [".gpu-wheels"], command `bash benchmarks/gpu_check.sh`,
# timeout_s 540. Results land in $GPU_OUT (default /tmp/gpu_out); gpu_session.sh packs them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .gpu-wheels ]; then
  $PY -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site \
    .gpu-wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site
fi
# pycuda (the lean TensorRT runtime) is an sdist: build it where the CUDA headers are
if ls .gpu-wheels/pycuda-*.tar.gz >/dev/null 2>&1 && [ -f /usr/local/cuda/include/cuda.h ]; then
  CUDA_ROOT=/usr/local/cuda $PY -m pip install --quiet --no-index --no-deps \
    --no-build-isolation --target /tmp/site .gpu-wheels/pycuda-*.tar.gz 2>&1 | tail -2
fi
# the project installs as one namespace (leukoflow.*); build it into /tmp/site (no network:
# --no-deps --no-build-isolation uses the interpreter's own setuptools)
$PY -m pip install --quiet --no-deps --no-build-isolation --no-compile --target /tmp/site . \
  2>&1 | tail -2
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
OUTDIR=${GPU_OUT:-/tmp/gpu_out}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

status=0
run() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="a b"
  echo "== $name"
  if ! timeout "$t" "$@" --json > "$OUTDIR/$name.json" 2> "$OUTDIR/$name.err"; then
    echo "   FAILED (see $name.err)"; tail -5 "$OUTDIR/$name.err"; status=1
  fi
}
run gpu_reconstruct 120 $PY benchmarks/gpu_reconstruct.py --device cuda
# the whole acquisition in device batches at 1.5 objects/field (target >= 2,000 frames/s)
run gpu_acquire     150 $PY benchmarks/gpu_acquire.py --device cuda
run gpu_models      150 $PY benchmarks/gpu_models.py
run gpu_infer       150 $PY benchmarks/gpu_infer.py --device cuda
run gpu_explain     120 $PY benchmarks/gpu_explain.py
# TensorRT through pycuda alone vs through torch CUDA, same engine, side by side
run gpu_trt_paths   150 $PY benchmarks/gpu_trt_paths.py
echo "== pytest -m gpu"
timeout 120 $PY -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/test_cuda.py tests/test_infer_backends.py tests/test_reconstruct_gpu_script.py 2>&1 | tail -40 || status=1

$PY - "$OUTDIR" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows, merged = [], {}
for f in sorted(out.glob("gpu_*.json")):
    try:
        res = json.loads(f.read_text())
    except json.JSONDecodeError:
        continue
    merged[f.stem] = res
    if "rows" not in res:  # named values: show the numeric ones
        for k, v in res.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((f.stem, k, f"{v:.4g}", "", ""))
    for r in res.get("rows", []):
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        rows.append((f.stem, r["stage"], f"{r['value']:.4g} {r.get('unit','')}", ratio,
                     str(r.get("target", ""))))
print(f"{'bench':<16} {'stage':<44} {'value':>22} {'ratio':>8}  target")
for b, s, v, ra, t in rows:
    print(f"{b:<16} {s:<44} {v:>22} {ra:>8}  {t}")
(out / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))
PYEOF
exit $status
