#!/usr/bin/env bash
# Train the PBC real-data models (issue #4, acceptance "PBC real data") on a lent GPU: several
# AlexNet/LeNet5 configurations at once on one card, each a plain `leukoflow train` command
# (cards only, --no-weights: PBC models are evidence, not shipped defaults). Prints one row
# per configuration: test accuracy, ECE before/after T, platelet AUROC, epochs, seconds.
# Usage (device tool): carry [".gpu-wheels", ".gpu-data"] (gpu_prepare.sh copies pbc64.npz
# there), command `bash benchmarks/gpu_train_pbc.sh`. CPU: `DEVICE=cpu EPOCHS=1
# CONFIGS=lenet5-lr2e-3` smoke-runs one configuration.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${DATA:-.gpu-data/pbc64.npz}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-80}
OUTDIR=${PBC_OUT:-/tmp/gpu_out/pbc}
BUDGET_S=${BUDGET_S:-240}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=2
mkdir -p "$OUTDIR"
declare -A CFG
if [ "${SET:-final}" = sweep ]; then  # the first sweep (2026-11-26, H100): see models/README.md
  CFG=(
    [alexnet-w1-h4096-lr2e-3]="--arch alexnet --lr 0.002 --seed 0"
    [alexnet-w1-h4096-lr5e-4]="--arch alexnet --lr 0.0005 --seed 0"
    [alexnet-w1-h1024-lr1e-3]="--arch alexnet --arch-kwarg hidden=1024 --lr 0.001 --seed 0"
    [alexnet-w1-h4096-lr1e-3-noshift]="--arch alexnet --lr 0.001 --max-shift 0 --seed 0"
    [alexnet-w05-h1024-lr1e-3]="--arch alexnet --arch-kwarg width=0.5 --arch-kwarg hidden=1024 --lr 0.001 --seed 0"
    [lenet5-lr2e-3]="--arch lenet5 --lr 0.002 --seed 0"
  )
else  # the reported configurations (alexnet-pbc / lenet5-pbc cards) and two more seeds
  CFG=(
    [alexnet-pbc]="--arch alexnet --lr 0.0005 --ood rmds --seed 0"
    [alexnet-pbc-seed1]="--arch alexnet --lr 0.0005 --ood rmds --seed 1"
    [alexnet-pbc-seed2]="--arch alexnet --lr 0.0005 --ood rmds --seed 2"
    [lenet5-pbc]="--arch lenet5 --lr 0.001 --ood mahalanobis --seed 0"
    [lenet5-pbc-seed1]="--arch lenet5 --lr 0.001 --ood mahalanobis --seed 1"
    [lenet5-pbc-lr2e-3]="--arch lenet5 --lr 0.002 --ood mahalanobis --seed 0"
  )
fi
pids=()
for name in ${CONFIGS:-"${!CFG[@]}"}; do
  # shellcheck disable=SC2086
  timeout "$BUDGET_S" $PY -c "from leukoflow.cli import main; main()" train --data "$DATA" \
    ${CFG[$name]} --epochs "$EPOCHS" --patience 15 --device "$DEVICE" --no-weights \
    --no-progress --json --out "$OUTDIR/$name" > "$OUTDIR/$name.json" 2> "$OUTDIR/$name.err" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
$PY - "$OUTDIR" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'config':<36} {'test acc':>9} {'ECE pre':>8} {'ECE T':>7} {'T':>6} {'platelet':>9} "
      f"{'epochs':>6} {'s':>6}")
for f in sorted(out.glob("*.json")):
    try:
        c = json.loads(f.read_text())
    except json.JSONDecodeError:
        err = f.with_suffix(".err").read_text()[-300:]
        print(f"{f.stem:<36} FAILED {err!r}")
        continue
    m, h = c["metrics"], c["training"].get("history", {})
    cal = m["calibration"]
    det = c["ood"]["detector"]
    pl = m["ood"]["detectors"].get(det, {}).get("per_kind", {}).get("platelet", {}).get("auroc")
    best = max((d["per_kind"].get("platelet", {}).get("auroc", 0), k)
               for k, d in m["ood"]["detectors"].items())
    print(f"{f.stem:<36} {cal['after_T']['accuracy']['value']:>9.4f} "
          f"{cal['before_T']['ece']['value']:>8.4f} {cal['after_T']['ece']['value']:>7.4f} "
          f"{c['temperature']:>6.3f} {pl if pl is not None else float('nan'):>9.3f} "
          f"{h.get('epochs_run', ''):>6} {h.get('seconds', 0):>6.0f}  best OOD {best[1]} {best[0]:.3f}")
PYEOF
