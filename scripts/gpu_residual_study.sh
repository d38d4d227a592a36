#!/usr/bin/env bash
# The residual study on one GPU: the presets trained side by side with a snapshot every 100
# iterations, measured on ImageNet while they train; resumable from one call to the next.
#
# Usage (from the repository root, the venv active with the imagenet extra, data present):
#   OUT=/some/folder scripts/gpu_residual_study.sh      # again with the same OUT to continue
# Environment (all optional):
#   STUDY_PRESETS=all          comma-separated presets (comdefend presets), or all
#   STUDY_ITERATIONS=7500      training iterations (the study's 3 CIFAR-10 epochs)
#   STUDY_EVAL_EVERY=100       snapshot and measure every N iterations
#   STUDY_CLEAN_EVERY=500      defended clean accuracy every N iterations
#   STUDY_N=200                first N ImageNet images attacked (the fooling set is drawn there)
#   STUDY_IMAGE_SIZE=          ImageNet crop (default 224)
#   STUDY_EVAL_IMAGES=500      CIFAR-10 held-out images for the PSNR
#   STUDY_SEED=0               training seed
#   STUDY_PRECISION=fp32       training arithmetic: fp32, bf16, fp16 or tf32 (snapshots are
#                              measured in fp32); one precision per OUT
#   STUDY_TIMEOUT=540          seconds before every process still going is stopped (SIGTERM:
#                              training checkpoints, measuring keeps every point; rerun to go on)
#   STUDY_MEASURERS=2          measuring processes (presets dealt among them)
#   STUDY_DEVICE=cuda          cuda or cpu
#   STUDY_THREADS=             CPU threads per process (default: torch's)
#   STUDY_IMAGENET=            ImageNet folder (default ../shared/data/imagenet-sample)
#   STUDY_CIFAR10=             folder holding cifar-10-batches-py (default ../shared/data/cifar10)
# Writes under $OUT (default gpu-residual-study-out): the study folder (runs/, points/,
# fooling_set.safetensors, results.json, points.csv, table.md, the charts) and logs/.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"

PRESETS="${STUDY_PRESETS:-all}"
ITERATIONS="${STUDY_ITERATIONS:-7500}"
EVAL_EVERY="${STUDY_EVAL_EVERY:-100}"
CLEAN_EVERY="${STUDY_CLEAN_EVERY:-500}"
N="${STUDY_N:-200}"
EVAL_IMAGES="${STUDY_EVAL_IMAGES:-500}"
SEED="${STUDY_SEED:-0}"
PRECISION="${STUDY_PRECISION:-fp32}"
TIMEOUT="${STUDY_TIMEOUT:-540}"
MEASURERS="${STUDY_MEASURERS:-2}"
DEVICE="${STUDY_DEVICE:-cuda}"
IMAGENET="${STUDY_IMAGENET:-$(first_dir ../shared/data/imagenet-sample shared/data/imagenet-sample)}"
CIFAR10="${STUDY_CIFAR10:-$(first_dir ../shared/data/cifar10 shared/data/cifar10)}"
gpu_setup gpu_residual_study gpu-residual-study-out
started=$(date +%s)
deadline=$((started + TIMEOUT))

if [ "$PRESETS" = all ]; then
  PRESETS=$(python -c "from comdefend.models.presets import PRESETS; print(','.join(PRESETS.names()))")
fi
say "presets=$PRESETS iterations=$ITERATIONS eval_every=$EVAL_EVERY n=$N device=$DEVICE precision=$PRECISION"
say "timeout=${TIMEOUT}s measurers=$MEASURERS imagenet=$IMAGENET cifar10=$CIFAR10 out=$OUT"

# Every process is the same study (same settings); only --stage and --presets differ.
study=(residual-study --dataset imagenet --classifier efficientnet-lite0 --data-dir "$IMAGENET"
       --train-dataset cifar10 --train-data-dir "$CIFAR10" --iterations "$ITERATIONS"
       --eval-every "$EVAL_EVERY" --clean-every "$CLEAN_EVERY" --n "$N"
       --eval-images "$EVAL_IMAGES" --seed "$SEED" --precision "$PRECISION" --device "$DEVICE"
       --out "$OUT" --resume
       --no-progress)
[ -n "${STUDY_IMAGE_SIZE:-}" ] && study+=(--image-size "$STUDY_IMAGE_SIZE")
[ -n "${STUDY_THREADS:-}" ] && study+=(--threads "$STUDY_THREADS")

left() { echo $((deadline - $(date +%s))); }
bounded() {  # bounded LOG ARGS...: the command line, stopped with SIGTERM at the deadline
  local log=$1; shift
  local seconds; seconds=$(left)
  [ "$seconds" -gt 5 ] || { echo "no time left" >>"$LOGS/$log.log"; return 124; }
  timeout --signal=TERM --kill-after=60 "$seconds" "${CLI[@]}" "$@" >>"$LOGS/$log.log" 2>&1
}

# 1. The fooling set, once (the measurers would otherwise race to make it).
say "fooling set"
bounded fooling-set "${study[@]}" --stage measure --presets "${PRESETS%%,*}" \
  || say "making the fooling set ended with $? (see logs/fooling-set.log)"

# 2. Every preset's training, side by side; 3. measurers following them, presets dealt out.
pids=()
for preset in ${PRESETS//,/ }; do
  bounded "train-$preset" "${study[@]}" --stage train --presets "$preset" &
  pids+=($!)
done
IFS=, read -r -a all_presets <<<"$PRESETS"
for ((m = 0; m < MEASURERS; m++)); do
  share=()
  for ((i = m; i < ${#all_presets[@]}; i += MEASURERS)); do share+=("${all_presets[$i]}"); done
  [ ${#share[@]} -gt 0 ] || continue
  list=$(IFS=,; echo "${share[*]}")
  bounded "measure-$m" "${study[@]}" --stage measure --follow --presets "$list" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
say "training and measuring ended after $(($(date +%s) - started))s"

# 4. One report over everything measured (no training, nothing measured twice).
"${CLI[@]}" "${study[@]}" --stage measure --presets "$PRESETS" >>"$LOGS/report.log" 2>&1 \
  || say "final report ended with $? (see logs/report.log)"
python - "$OUT" <<'PY' | tee -a "$LOGS/gpu_residual_study.log"
import json, sys
from pathlib import Path
results = json.loads((Path(sys.argv[1]) / "results.json").read_text())
for name, entry in results["presets"].items():
    points = entry["evaluations"]
    last = points[-1] if points else None
    print(f"{name}: trained {entry['training']['iterations_done']}, {len(points)} points"
          + (f", last {last['iteration']}: {last['accuracy_after_defense']:.3f}" if last else ""))
print("complete" if results["complete"] else "not complete: run the script again to continue")
PY
