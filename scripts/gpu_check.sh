#!/usr/bin/env bash
# The CIFAR-10 paper table of docs/notes/paper-comparison.md on the full test set, the precision benchmark and
# the ImageNet Table 8 setting on all 1,000 sample images, on one GPU, with logs.
#
# Usage (from the repository root, the venv active, the authors' checkpoints and CIFAR-10 present):
#   OUT=/some/folder scripts/gpu_check.sh
# Environment (all optional):
#   GPU_CHECK_PARTS="cifar10 precision imagenet"   what to run (each part under its timeout;
#                            a device call of 10 minutes fits one part); also "adaptive" and
#                            "imagenet-1000" (continues the CPU run carried in studies/) and
#                            "fashion-adaptive" (BPDA on Fashion-MNIST)
#   GPU_CHECK_N=10000        CIFAR-10 test images (8 for a quick check on the CPU)
#   GPU_CHECK_ADAPTIVE_N=500 CIFAR-10 test images of the adaptive part (BPDA, relaxed, EOT)
#   GPU_CHECK_PGD_STEPS=50   PGD steps of the adaptive part (2 for a quick check on the CPU)
#   GPU_CHECK_APGD_STEPS=100 APGD steps of the adaptive part (2 for a quick check on the CPU)
#   GPU_CHECK_EOT_SAMPLES=8  noise draws per gradient of bpda+eot (2 for a quick check)
#   GPU_CHECK_IMAGENET_N=1000   ImageNet sample images (oblivious and bpda)
#   GPU_CHECK_IMAGENET_DATA= folder of the ImageNet sample (default: the first of
#                            ../shared/data/imagenet-sample and shared/data/imagenet-sample)
#   GPU_CHECK_FASHION_N=1000 Fashion-MNIST test images of the fashion-adaptive part
#   GPU_CHECK_FASHION_DATA=  folder of the Fashion-MNIST files (default: the first of
#                            /usr/share/datasets/fashion-mnist and data/fashion-mnist; a GPU
#                            machine without the Debian package needs the four .gz files there)
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
# cifar10-adaptive-N/ (the adaptive part), precision.json (benchmarks/precision.py: fp32 / tf32 /
# bf16 purification), imagenet-N/ (the Table 8 report; needs pip install ".[imagenet]"),
# imagenet-1000/ (the carried run), fashion-adaptive-N/, summary.json (seconds, images/s, exit
# codes). Exit code: the CIFAR-10 evaluation's (124 on timeout), else the adaptive one's, else
# the carried run's, else the Fashion-MNIST one's, else the ImageNet one's.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"

PARTS="${GPU_CHECK_PARTS:-cifar10 precision imagenet}"
N="${GPU_CHECK_N:-10000}"
IMAGENET_N="${GPU_CHECK_IMAGENET_N:-1000}"
ADAPTIVE_N="${GPU_CHECK_ADAPTIVE_N:-500}"
PGD_STEPS="${GPU_CHECK_PGD_STEPS:-50}"
APGD_STEPS="${GPU_CHECK_APGD_STEPS:-100}"
EOT_SAMPLES="${GPU_CHECK_EOT_SAMPLES:-8}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
TIMEOUT="${GPU_CHECK_TIMEOUT:-540}"
BATCH="${GPU_CHECK_BATCH:-}"
DATA="${GPU_CHECK_DATA:-$(first_dir ../shared/data/cifar10 shared/data/cifar10)}"
OFFICIAL="${GPU_CHECK_OFFICIAL:-$(first_dir ../shared/official shared/official)}"
IMAGENET="${GPU_CHECK_IMAGENET_DATA:-$(first_dir ../shared/data/imagenet-sample shared/data/imagenet-sample)}"
FASHION_N="${GPU_CHECK_FASHION_N:-1000}"
FASHION="${GPU_CHECK_FASHION_DATA:-$(first_dir /usr/share/datasets/fashion-mnist data/fashion-mnist)}"
has_part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
gpu_setup gpu_check gpu-check-out
REPORT="$OUT/cifar10-test-$N"

say "parts=$PARTS N=$N imagenet_n=$IMAGENET_N device=$DEVICE timeout=${TIMEOUT}s batch=${BATCH:-default} data=$DATA out=$OUT"
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

# The command of docs/notes/paper-comparison.md (CIFAR-10 table), on the test split, with --resume so that a
# rerun after a timeout continues where this one stopped.
run_evaluation() {  # LABEL LOGNAME ARGS...: runs evaluate under the timeout, sets status/seconds
  local label=$1 logname=$2; shift 2
  say "${CLI[*]} $*"
  local started; started=$(date +%s.%N)
  timeout --signal=INT --kill-after=30 "$TIMEOUT" "${CLI[@]}" "$@" >"$LOGS/$logname.log" 2>&1
  status=$?
  seconds=$(python -c "import time; print(round(time.time() - $started, 1))")
  tail -n 40 "$LOGS/$logname.log"
  case $status in
    0) say "$label finished in ${seconds}s" ;;
    124|130) say "$label stopped after ${TIMEOUT}s (rerun the same command: --resume continues)" ;;
    *) say "$label failed with exit code $status (see logs/$logname.log)" ;;
  esac
}
status=0 seconds=0 imagenet_status=0 imagenet_seconds=0 cifar10_status=0 cifar10_seconds=0
if has_part cifar10; then
  # The same command as the CPU run of docs/results/cifar10-test-10000 (so either continues the
  # other's folder with --resume).
  args=(evaluate --dataset cifar10 --split test --data-dir "$DATA" --classifier resnet20-cifar10
    --defense none --defense jpeg:75 --defense "bits:5+median:2"
    --defense comdefend:runs/official-rgb.safetensors --defense comdefend:comdefend-cifar10-authors
    --defense comdefend:comdefend-cifar10 --defense comdefend:comdefend-cifar10-1_on_off
    --defense comdefend:comdefend-cifar10-1_1
    --attack fgsm,bim,mifgsm,deepfool,cw --eps 2,8,16 --threat-model oblivious --n "$N"
    --attack-param cw.steps=50 --attack-param cw.binary_search_steps=3 --attack-param cw.lr=0.05
    --device "$DEVICE" --out "$REPORT" --resume)
  [ -n "$BATCH" ] && args+=(--batch-size "$BATCH")
  run_evaluation "CIFAR-10 evaluation" evaluate "${args[@]}"
fi
cifar10_status=$status cifar10_seconds=$seconds

# The adaptive evaluation of docs/adaptive-evaluation.md on CIFAR-10: PGD (50 steps) and APGD
# with both losses at 8/255, through the defense (bpda), through its relaxed code (relaxed), and
# with expectation over the test-time noise of the randomized ComDefend (bpda+eot).
ADAPTIVE_REPORT="$OUT/cifar10-adaptive-$ADAPTIVE_N"
adaptive_status=0 adaptive_seconds=0
if has_part adaptive; then
  args=(evaluate --dataset cifar10 --split test --data-dir "$DATA" --classifier resnet20-cifar10
    --defense none --defense jpeg:75 --defense "bits:5+median:2"
    --defense comdefend:runs/official-rgb.safetensors --defense comdefend:comdefend-cifar10-authors
    --defense comdefend:comdefend-cifar10 --defense "comdefend:comdefend-cifar10@noise=1.0"
    --attack pgd,apgd-ce,apgd-dlr --eps 8 --threat-model oblivious,bpda,relaxed,bpda+eot
    --attack-param "pgd.steps=$PGD_STEPS" --attack-param "apgd-ce.steps=$APGD_STEPS"
    --attack-param "apgd-dlr.steps=$APGD_STEPS" --eot-samples "$EOT_SAMPLES" --n "$ADAPTIVE_N"
    --device "$DEVICE" --out "$ADAPTIVE_REPORT" --resume)
  [ -n "$BATCH" ] && args+=(--batch-size "$BATCH")
  run_evaluation "CIFAR-10 adaptive evaluation" adaptive "${args[@]}"
  adaptive_status=$status adaptive_seconds=$seconds
fi

# Purification precision (fp32, tf32, bf16 on CUDA): speed, code bits, PSNR, robust accuracy.
if has_part precision; then
  say "benchmarks/precision.py on $N images"
  timeout 300 python benchmarks/precision.py --images "$N" --device "$DEVICE" --data-dir "$DATA" \
    --json "$OUT/precision.json" >"$LOGS/precision.log" 2>&1 || say "precision benchmark failed"
  tail -n 6 "$LOGS/precision.log" | tee -a "$LOGS/gpu_check.log"
fi

# The paper's Table 8 setting on the ImageNet sample (docs/notes/imagenet.md), oblivious and
# bpda, with C&W: EfficientNet-Lite0, the authors' RGB model in patch mode, our CIFAR-10 models.
IMAGENET_REPORT="$OUT/imagenet-$IMAGENET_N"
if has_part imagenet; then
  args=(evaluate --dataset imagenet --classifier efficientnet-lite0 --data-dir "$IMAGENET"
    --eps 8 --eps 16 --n "$IMAGENET_N" --batch-size "${BATCH:-50}"
    --defense none --defense jpeg:75 --defense "bits:5+median:2"
    --defense comdefend:runs/official-rgb.safetensors --defense comdefend:comdefend-cifar10-authors
    --defense comdefend:comdefend-cifar10
    --attack fgsm,bim,mifgsm,pgd,deepfool,cw --attack-param deepfool.num_classes=10
    --attack-param cw.steps=50 --attack-param cw.binary_search_steps=3 --attack-param cw.lr=0.05
    --threat-model oblivious,bpda --device "$DEVICE" --out "$IMAGENET_REPORT" --resume)
  run_evaluation "ImageNet evaluation" imagenet "${args[@]}"
  imagenet_status=$status imagenet_seconds=$seconds
fi

# The ImageNet-1000 evaluation started on a CPU (studies/README.md), continued here: its progress
# (studies/imagenet-1000) is copied into $OUT/imagenet-1000 unless a rerun finds it there, and its
# command goes on with --resume (the device is not a setting a resume must repeat; the run's
# results.json then names both machines).
CARRIED_REPORT="$OUT/imagenet-1000"
carried_status=0 carried_seconds=0
if has_part imagenet-1000; then
  if [ ! -e "$CARRIED_REPORT/progress.safetensors" ] && [ -e studies/imagenet-1000/progress.safetensors ]; then
    mkdir -p "$CARRIED_REPORT" && cp -r studies/imagenet-1000/. "$CARRIED_REPORT/"
    say "continuing the ImageNet-1000 evaluation from studies/imagenet-1000"
  fi
  args=(evaluate --dataset imagenet --classifier efficientnet-lite0 --data-dir "$IMAGENET"
    --defense none --defense jpeg:75 --defense "bits:5+median:2"
    --defense comdefend:runs/official-rgb.safetensors --defense comdefend:comdefend-cifar10-authors
    --attack fgsm,bim,mifgsm,deepfool,cw --eps 8,16 --threat-model oblivious
    --attack-param deepfool.num_classes=10 --attack-param cw.steps=50
    --attack-param cw.binary_search_steps=3 --attack-param cw.lr=0.05 --images 1000
    --batch-size 10 --device "$DEVICE" --out "$CARRIED_REPORT" --resume)
  run_evaluation "ImageNet-1000 evaluation" imagenet-1000 "${args[@]}"
  carried_status=$status carried_seconds=$seconds
fi

# Fashion-MNIST, adaptive: BPDA with PGD-50 and APGD-CE/DLR at 8 and 25/255 (the budgets of the
# oblivious table) through every defense, the same command as the CPU plan in studies/README.md.
FASHION_REPORT="$OUT/fashion-adaptive-$FASHION_N"
fashion_status=0 fashion_seconds=0
if has_part fashion-adaptive; then
  if [ ! -f runs/official-fm.safetensors ]; then
    say "importing the authors' grayscale checkpoint from $OFFICIAL"
    timeout 300 "${CLI[@]}" import-official "$OFFICIAL/enc_mnist.npy" "$OFFICIAL/dec_mnist.npy" \
      -o runs/official-fm.safetensors >"$LOGS/import-fm.log" 2>&1 || say "import failed (logs/import-fm.log)"
  fi
  args=(evaluate --dataset fashion-mnist --split test --data-dir "$FASHION" --classifier fashion-cnn
    --defense none --defense jpeg:75 --defense "bits:3+median:2"
    --defense comdefend:comdefend-fashion-mnist --defense comdefend:comdefend-fashion-mnist-stabilized
    --defense comdefend:runs/official-fm.safetensors
    --attack pgd,apgd-ce,apgd-dlr --eps 8,25 --threat-model bpda
    --attack-param "pgd.steps=$PGD_STEPS" --attack-param "apgd-ce.steps=$APGD_STEPS"
    --attack-param "apgd-dlr.steps=$APGD_STEPS" --attack-param pgd.stop_when_fooled=true
    --attack-param apgd-ce.stop_when_fooled=true --attack-param apgd-dlr.stop_when_fooled=true
    --images "$FASHION_N" --batch-size 50 --device "$DEVICE" --out "$FASHION_REPORT" --resume)
  run_evaluation "Fashion-MNIST adaptive evaluation" fashion-adaptive "${args[@]}"
  fashion_status=$status fashion_seconds=$seconds
fi

python - "$PARTS" "$DEVICE" "$REPORT" "$N" "$cifar10_seconds" "$cifar10_status" \
  "$IMAGENET_REPORT" "$IMAGENET_N" "$imagenet_seconds" "$imagenet_status" \
  "$ADAPTIVE_REPORT" "$ADAPTIVE_N" "$adaptive_seconds" "$adaptive_status" \
  "$CARRIED_REPORT" 1000 "$carried_seconds" "$carried_status" \
  "$FASHION_REPORT" "$FASHION_N" "$fashion_seconds" "$fashion_status" >"$OUT/summary.json" <<'PY'
import json, sys
from pathlib import Path

parts, device = sys.argv[1].split(), sys.argv[2]


def part(report: str, n: str, seconds: str, status: str) -> dict:
    folder, n, seconds = Path(report), int(n), float(seconds)
    summary = {"images": n, "seconds": seconds, "exit_code": int(status),
               "images_per_second": round(n / seconds, 2) if seconds else None,
               "results_json": str(folder / "results.json") if (folder / "results.json").is_file() else None}
    if summary["results_json"]:
        results = json.loads((folder / "results.json").read_text())
        cells = [cell for cell in results.get("cells", []) if isinstance(cell, dict)]
        summary["cells"] = len(cells)
        summary["cell_seconds"] = round(sum(float(cell.get("seconds", 0)) for cell in cells), 1)
    return summary


summary = {"device": device, "parts": parts}
if "cifar10" in parts:
    summary["cifar10"] = part(*sys.argv[3:7])
if "imagenet" in parts:
    summary["imagenet"] = part(*sys.argv[7:11])
if "adaptive" in parts:
    summary["adaptive"] = part(*sys.argv[11:15])
if "imagenet-1000" in parts:
    summary["imagenet-1000"] = part(*sys.argv[15:19])
if "fashion-adaptive" in parts:
    summary["fashion-adaptive"] = part(*sys.argv[19:23])
print(json.dumps(summary, indent=2))
PY
cat "$OUT/summary.json" | tee -a "$LOGS/gpu_check.log"
[ "$cifar10_status" -ne 0 ] && exit "$cifar10_status"
[ "$adaptive_status" -ne 0 ] && exit "$adaptive_status"
[ "$carried_status" -ne 0 ] && exit "$carried_status"
[ "$fashion_status" -ne 0 ] && exit "$fashion_status"
exit "$imagenet_status"
