# Shared by scripts/gpu_check.sh and scripts/gpu_presets.sh (sourced, not run): finds the data,
# the command and the output folder, and defines `say`.
#
#   gpu_setup NAME DEFAULT_OUT   sets CLI (array), OUT, LOGS (absolute) and SAY_NAME
#   first_dir DIR...             the first DIR that exists (else the first one)
#   say TEXT...                  a time-stamped line on stdout and in $LOGS/NAME.log

first_dir() { for dir in "$@"; do [ -d "$dir" ] && { echo "$dir"; return; }; done; echo "$1"; }

gpu_setup() {
  SAY_NAME=$1
  # The installed command, else the package from this checkout's src/.
  if command -v comdefend >/dev/null; then CLI=(comdefend); else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; CLI=(python -m comdefend); fi
  OUT="${OUT:-$2}"
  mkdir -p "$OUT/logs"
  LOGS="$(cd "$OUT/logs" && pwd)"
  export PYTHONUNBUFFERED=1
}

say() { echo "[$SAY_NAME $(date -u +%H:%M:%S)] $*" | tee -a "$LOGS/$SAY_NAME.log"; }
