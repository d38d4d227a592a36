#!/usr/bin/env bash
# The CIFAR-10 paper table of docs/RESULTS.md on the full test set, on one GPU, with logs.
#
# Usage (from the repository root, the venv active, the authors' checkpoints and CIFAR-10 present):
#   OUT=/some/folder scripts/gpu_check.sh
# Environment (all optional):
#   GPU_CHECK_N=10000        test images (8 for a quick check on the CPU)
#   GPU_CHECK_DEVICE=cuda    cuda, cuda:N or cpu
#   GPU_CHECK_TIMEOUT=540    seconds for the evaluation before it is stopped (rerun: --resume
#                            continues from the finished (attack, eps) groups)
#   GPU_CHECK_BATCH=         images per attack / forward call (default: evaluate's own, 100,
#                            which keeps PGD's random starts identical to the CPU tables)
#   GPU_CHECK_DATA=          folder holding cifar-10-batches-py (default: the first of
#                            ../shared/data/cifar10 and shared/data/cifar10 that exists)
#   GPU_CHECK_OFFICIAL=      folder holding enc20_0.0001.npy and dec20_0.0001.npy (default: the
#                            first of ../shared/official and shared/official that exists)
# Writes under $OUT (default gpu-check-out): logs/*.log, cifar10-test-N/ (results.json, report),
# precision.json (benchmarks/precision.py: fp32 / tf32 / bf16 purification), summary.json
# (seconds, images/s, exit codes). Exit code: the evaluation's (124 on timeout).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"

N="${GPU_CHECK_N:-10000}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
TIMEOUT="${GPU_CHECK_TIMEOUT:-540}"
BATCH="${GPU_CHECK_BATCH:-}"
DATA="${GPU_CHECK_DATA:-$(first_dir ../shared/data/cifar10 shared/data/cifar10)}"
OFFICIAL="${GPU_CHECK_OFFICIAL:-$(first_dir ../shared/official shared/official)}"
gpu_setup gpu_check gpu-check-out
REPORT="$OUT/cifar10-test-$N"

say "N=$N device=$DEVICE timeout=${TIMEOUT}s batch=${BATCH:-default} data=$DATA out=$OUT"
{
  command -v nvidia-smi >/dev/null && nvidia-smi
  timeout 300 python -c "import torch, comdefend; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} >"$LOGS/environment.log" 2>&1
cat "$LOGS/environment.log" | tee -a "$LOGS/gpu_check.log"

# The authors' RGB checkpoint, imported once (the table's last column).
mkdir -p runs
if [ ! -f runs/official-rgb.safetensors ]; then
  say "importing the authors' RGB checkpoint from $OFFICIAL"
  if ! timeout 300 "${CLI[@]}" import-official "$OFFICIAL/enc20_0.0001.npy" \
      "$OFFICIAL/dec20_0.0001.npy" -o runs/official-rgb.safetensors >"$LOGS/import.log" 2>&1; then
    say "import-official failed (see logs/import.log)"; cat "$LOGS/import.log"; exit 1
  fi
fi

# The command of docs/RESULTS.md (CIFAR-10 table), on the test split, with --resume so that a
# rerun after a timeout continues where this one stopped.
args=(evaluate --dataset cifar10 --split test --data-dir "$DATA" --classifier resnet20-cifar10
  --defense none --defense jpeg:75 --defense "bits:5+median:2" --defense comdefend:comdefend-cifar10
  --defense comdefend:comdefend-cifar10-1_on_off --defense comdefend:comdefend-cifar10-1_1
  --defense comdefend:runs/official-rgb.safetensors
  --attack fgsm,bim,mifgsm,deepfool,cw,pgd --eps 2,8,16 --threat-model oblivious --n "$N"
  --attack-param cw.steps=50 --attack-param cw.binary_search_steps=3 --attack-param cw.lr=0.05
  --device "$DEVICE" --out "$REPORT" --resume)
[ -n "$BATCH" ] && args+=(--batch-size "$BATCH")
say "${CLI[*]} ${args[*]}"
started=$(date +%s.%N)
timeout --signal=INT --kill-after=30 "$TIMEOUT" "${CLI[@]}" "${args[@]}" >"$LOGS/evaluate.log" 2>&1
status=$?
seconds=$(python -c "import time; print(round(time.time() - $started, 1))")
tail -n 40 "$LOGS/evaluate.log"
case $status in
  0) say "evaluation finished in ${seconds}s" ;;
  124|130) say "evaluation stopped after ${TIMEOUT}s (rerun the same command: --resume continues)" ;;
  *) say "evaluation failed with exit code $status (see logs/evaluate.log)" ;;
esac

# Purification precision (fp32, tf32, bf16 on CUDA): speed, code bits, PSNR, robust accuracy.
say "benchmarks/precision.py on $N images"
timeout 300 python benchmarks/precision.py --images "$N" --device "$DEVICE" --data-dir "$DATA" \
  --json "$OUT/precision.json" >"$LOGS/precision.log" 2>&1 || say "precision benchmark failed"
tail -n 6 "$LOGS/precision.log" | tee -a "$LOGS/gpu_check.log"

python - "$REPORT" "$N" "$seconds" "$status" "$DEVICE" >"$OUT/summary.json" <<'PY'
import json, sys
from pathlib import Path

report, n, seconds, status, device = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
summary = {"images": n, "device": device, "seconds": seconds, "exit_code": status,
           "images_per_second": round(n / seconds, 2) if seconds else None,
           "results_json": str(report / "results.json") if (report / "results.json").is_file() else None}
if summary["results_json"]:
    results = json.loads((report / "results.json").read_text())
    cells = [cell for cell in results.get("cells", []) if isinstance(cell, dict)]
    summary["cells"] = len(cells)
    summary["cell_seconds"] = round(sum(float(cell.get("seconds", 0)) for cell in cells), 1)
print(json.dumps(summary, indent=2))
PY
cat "$OUT/summary.json" | tee -a "$LOGS/gpu_check.log"
exit $status
