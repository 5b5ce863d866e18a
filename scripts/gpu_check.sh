#!/usr/bin/env bash
# The GPU check of lasp (README, "GPU check"): on a fresh one-GPU machine with only this checkout,
# in about 8 minutes on an H100, every section under its own time budget:
#   install   lasp from this checkout without dependencies (+ the wheels carried in .wheels/)
#   env       versions, the GPU, which optional packages import
#   compile   python -m lasp.kernels.compile_check --quick
#   kernels   every Triton kernel, fwd + bwd, vs the torch path in float64 (scripts/gpu_check.py)
#   softmax   the CUDA softmax blocks (flash / memory-efficient / reference) vs a float64 oracle; times
#   train     lasp train configs/tiny-hybrid.yaml, one process, a few bf16 steps (needs deepspeed)
#   speed     T=8192 H=16 K=V=128 bf16: lasp's Triton kernels vs fla (when its wheel is carried) vs torch
#   sanitizer compute-sanitizer memcheck of two short bf16 kernel checks
# then prints one table. Results go to $OUT (the device tool's output folder) or bench-results/gpu-check:
# gpu_check.log, summary.md, rows.jsonl, status.tsv. Exit status 1: a check failed or ran out of time.
#
#   bash scripts/gpu_wheels.sh       # here, once: fla, deepspeed and its missing dependencies -> .wheels/
#   device run: command "bash scripts/gpu_check.sh", carry [".wheels"], timeout_s 600
#   bash scripts/gpu_check.sh --smoke   # the CPU: TRITON_INTERPRET=1, tiny shapes, CUDA-only parts skipped
#
# Variables: PYTHON (default python3), OUT, GPU_CHECK_BUDGET_S (all sections together, default 450).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

SMOKE=0
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --smoke) SMOKE=1 ;;
  "") ;;
  *) usage >&2; exit 2 ;;
esac

OUT_DIR=${OUT:-bench-results/gpu-check}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/rows.jsonl" "$OUT_DIR/status.tsv" "$OUT_DIR/summary.md"
STATUS="$OUT_DIR/status.tsv"
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS

# run_section NAME MAX_SECONDS COMMAND...: run under the smaller of its budget and what is left of
# the whole one; record exit status (124: out of time) and seconds in status.tsv.
run_section() {
  local name=$1 max=$2 left
  shift 2
  left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 20)); then
    printf '%s\t\t0\tskip: out of time (%ss budget used)\n' "$name" "$BUDGET_S" >>"$STATUS"
    return
  fi
  ((max > left)) && max=$left
  echo "===== $name (at most ${max}s)"
  local t0=$SECONDS rc=0
  export GPU_CHECK_DEADLINE=$(($(date +%s) + max))  # a section may stop a subprocess before it
  timeout -k 10 "$max" "$@" || rc=$?
  printf '%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STATUS"
}

skip_section() {
  printf '%s\t\t0\tskip: %s\n' "$1" "$2" >>"$STATUS"
}

main() {
  if ((SMOKE)); then
    PY=${PYTHON:-python3}
    export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    skip_section install "smoke mode: lasp from the checkout"
    skip_section compile "smoke mode (tests/test_kernels.py runs compile_check)"
    run_section smoke 120 "$PY" scripts/gpu_check.py --smoke --out "$OUT_DIR" run env,kernels,softmax,speed,train
    skip_section sanitizer "smoke mode: needs CUDA"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
    # shellcheck source=scripts/gpu_env.sh
    source scripts/gpu_env.sh
    local t0=$SECONDS
    gpu_env_setup
    printf 'install\t0\t%s\t\n' "$((SECONDS - t0))" >>"$STATUS"
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lasp-triton-cache}  # shared by the sections
    run_section env 60 "$PY" scripts/gpu_check.py --out "$OUT_DIR" run env
    run_section compile 90 "$PY" -m lasp.kernels.compile_check --quick
    run_section kernels 150 "$PY" scripts/gpu_check.py --out "$OUT_DIR" run kernels
    run_section softmax 60 "$PY" scripts/gpu_check.py --out "$OUT_DIR" run softmax
    run_section train 120 "$PY" scripts/gpu_check.py --out "$OUT_DIR" run train
    run_section speed 120 "$PY" scripts/gpu_check.py --out "$OUT_DIR" run speed
    if command -v compute-sanitizer >/dev/null; then
      run_section sanitizer 90 compute-sanitizer --tool memcheck --print-limit 10 --error-exitcode 9 \
        "$PY" scripts/gpu_check.py --mini --out /tmp/lasp-sanitizer-rows run kernels
    else
      skip_section sanitizer "compute-sanitizer not found"
    fi
  fi
  echo "===== summary ($((SECONDS - START))s)"
  "${PY:-python3}" scripts/gpu_check.py --out "$OUT_DIR" summary
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
