#!/usr/bin/env bash
# The ten presets at the residual study's schedule, with and without a stabilizer, on one GPU.
#
# Usage (from the repository root, the venv active, CIFAR-10 present):
#   OUT=/some/folder scripts/gpu_presets.sh
# Environment (all optional):
#   PRESETS_ITERATIONS=7500     iterations per run (the study's 3 epochs)
#   PRESETS_EVAL_EVERY=100      held-out PSNR every N iterations
#   PRESETS_EVAL_IMAGES=500     held-out test images per evaluation
#   PRESETS_STABILIZE="none rollback"  the arms: each preset is trained once per arm
#   PRESETS_PRESETS=all         comma-separated preset names (comdefend presets), or all
#   PRESETS_PARALLEL=10         runs at once on the device (they share it)
#   PRESETS_TIMEOUT=540         seconds before every run still going is stopped (SIGTERM: it
#                               checkpoints; rerunning this script resumes every run)
#   PRESETS_DEVICE=cuda         cuda, cuda:N or cpu
#   PRESETS_PRECISION=fp32      fp32, bf16, fp16 or tf32 (comdefend train --precision); a run
#                               folder keeps the precision it started with
#   PRESETS_DATA=               folder holding cifar-10-batches-py (default ../shared/data/cifar10
#                               or shared/data/cifar10)
# Writes under $OUT (default gpu-presets-out): runs/PRESET-ARM/ (log.jsonl, checkpoints, weights),
# logs/*.log, presets-ARM.md/.png (scripts/preset_table.py), stabilizers.md/.png
# (scripts/stabilizer_curves.py), summary.json (iterations reached per run).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"

ITERATIONS="${PRESETS_ITERATIONS:-7500}"
EVAL_EVERY="${PRESETS_EVAL_EVERY:-100}"
EVAL_IMAGES="${PRESETS_EVAL_IMAGES:-500}"
ARMS="${PRESETS_STABILIZE:-none rollback}"
PRESETS="${PRESETS_PRESETS:-all}"
PARALLEL="${PRESETS_PARALLEL:-10}"
TIMEOUT="${PRESETS_TIMEOUT:-540}"
DEVICE="${PRESETS_DEVICE:-cuda}"
PRECISION="${PRESETS_PRECISION:-fp32}"
DATA="${PRESETS_DATA:-$(first_dir ../shared/data/cifar10 shared/data/cifar10)}"
gpu_setup gpu_presets gpu-presets-out
mkdir -p "$OUT/runs"

if [ "$PRESETS" = all ]; then
  PRESETS=$(python -c "from comdefend.models.presets import PRESETS; print(','.join(PRESETS.names()))")
fi
say "presets=$PRESETS arms=$ARMS iterations=$ITERATIONS eval_every=$EVAL_EVERY device=$DEVICE precision=$PRECISION"
say "parallel=$PARALLEL timeout=${TIMEOUT}s data=$DATA out=$OUT"

jobs=()
for preset in ${PRESETS//,/ }; do
  for arm in $ARMS; do
    jobs+=("$preset $arm")
  done
done

run_one() {
  local preset=$1 arm=$2 folder="$OUT/runs/$1-$2" resume=()
  [ -f "$folder/checkpoint.safetensors" ] && resume=(--resume)
  if [ -f "$folder/summary.json" ]; then echo "skip $preset $arm (finished)"; return 0; fi
  timeout --signal=TERM --kill-after=60 "$TIMEOUT" "${CLI[@]}" --quiet train \
    --recipe residual-study --dataset cifar10 --data-dir "$DATA" --preset "$preset" \
    --iterations "$ITERATIONS" --eval-every "$EVAL_EVERY" --eval-images "$EVAL_IMAGES" \
    --checkpoint-every "$EVAL_EVERY" --stabilize "$arm" --seed 0 --device "$DEVICE" \
    --precision "$PRECISION" --out "$folder" "${resume[@]}" >"$LOGS/$preset-$arm.log" 2>&1
  echo "$preset $arm exit $?"
}
export -f run_one
export OUT LOGS TIMEOUT ITERATIONS EVAL_EVERY EVAL_IMAGES DATA DEVICE PRECISION
export CLI_TEXT="${CLI[*]}"
started=$(date +%s)
printf '%s\n' "${jobs[@]}" | xargs -P "$PARALLEL" -L 1 bash -c 'CLI=($CLI_TEXT); run_one $0 $1' \
  | tee -a "$LOGS/gpu_presets.log"
say "all runs ended after $(( $(date +%s) - started ))s"

for arm in $ARMS; do
  logs=("$OUT"/runs/*-"$arm"/log.jsonl)
  [ -e "${logs[0]}" ] && python scripts/preset_table.py "${logs[@]}" --out "$OUT/presets-$arm" \
    >"$LOGS/table-$arm.log" 2>&1 || say "preset table for $arm failed (see logs/table-$arm.log)"
done
python scripts/stabilizer_curves.py "$OUT"/runs/*/log.jsonl --out "$OUT/stabilizers" \
  >"$LOGS/stabilizers.log" 2>&1 || say "stabilizer table failed (see logs/stabilizers.log)"
python - "$OUT" >"$OUT/summary.json" <<'PY'
import json, sys
from pathlib import Path
from comdefend.errors import UsageError
from comdefend.training.logs import read_training_log
runs = {}
for log in sorted(Path(sys.argv[1]).glob("runs/*/log.jsonl")):
    try:
        run = read_training_log(log)
    except UsageError as error:  # a run stopped before its first evaluation
        runs[log.parent.name] = {"error": str(error)}
        continue
    runs[log.parent.name] = {"iterations": run.last_iteration,
                             "last_psnr_db": run.psnr[run.last_evaluation],
                             "best_psnr_db": run.psnr[run.best_iteration],
                             "collapsed_at": run.collapsed_at(), "rollbacks": run.rollbacks,
                             "finished": (log.parent / "summary.json").is_file()}
print(json.dumps(runs, indent=2))
PY
cat "$OUT/summary.json" | tee -a "$LOGS/gpu_presets.log"
