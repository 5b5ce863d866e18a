# Shared by the launch scripts (sourced, not run): interpreter, backend, world-layout print.
# shellcheck shell=bash

# The run config from the first argument: -h/--help or no argument prints the caller's usage()
# (exit 0 / 2); a missing file is an error. The caller then takes CONFIG=$1 and shifts.
lasp_check_config_arg() {
  if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    usage
    if [[ $# -ge 1 ]]; then exit 0; else exit 2; fi
  fi
  if [[ ! -f "$1" ]]; then
    echo "error: run config '$1' not found" >&2
    exit 2
  fi
}

# The Python that has lasp installed: $PYTHON, else the repo's .venv, else python3.
lasp_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "${LASP_ROOT}/.venv/bin/python" ]]; then
    echo "${LASP_ROOT}/.venv/bin/python"
  else
    echo python3
  fi
}

# nccl when this node has NVIDIA GPUs, gloo otherwise (exported for lasp.init_parallel).
lasp_backend() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo nccl
  else
    echo gloo
  fi
}

# Processes per node by default: the GPU count, or 2 on a CPU-only node.
lasp_default_nproc() {
  if [[ "$(lasp_backend)" == nccl ]]; then
    nvidia-smi -L | wc -l
  else
    echo 2
  fi
}

# Check the run config (as `lasp train` loads it: the YAML plus --set overrides) and print
# "world: NNODES node(s) x NPROC process(es) = W ranks; SP=s x DP=d; backend b"; fails with the
# config's error, or when parallel.sp_size does not divide W. Python answers: no YAML in shell.
# usage: lasp_print_layout CONFIG NNODES NPROC BACKEND [trainer args...]
lasp_print_layout() {
  local config=$1 nnodes=$2 nproc=$3 backend=$4
  shift 4
  "$(lasp_python)" -m lasp.train.layout --config "$config" --nnodes "$nnodes" --nproc "$nproc" --backend "$backend" "$@"
}

# Fail unless $2 (the value of variable $1) is a positive integer.
lasp_check_positive_int() {
  if [[ ! "$2" =~ ^[0-9]+$ ]] || ((10#$2 < 1)); then
    echo "error: $1 must be a positive integer, got '$2'" >&2
    exit 2
  fi
}

# OMP_NUM_THREADS for $1 processes on this node: the caller's own value when it set one, else
# this node's cores / $1 (at least 1), as `lasp train` does. Unset, the deepspeed launcher lets
# every rank start a thread per core (on 2 cores and 2 ranks: 3,230 vs 11,613 tokens/s).
lasp_omp_threads() {
  local cores
  cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    echo "$OMP_NUM_THREADS"
  elif ((cores / $1 > 0)); then
    echo $((cores / $1))
  else
    echo 1
  fi
}

# A free TCP port on this host (for a one-node job that was not given MASTER_PORT).
lasp_free_port() {
  "$(lasp_python)" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
