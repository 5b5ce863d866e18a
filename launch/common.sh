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

# The SP size the run will use: parallel.sp_size from the config, or a parallel.sp_size=N override.
lasp_sp_size() {
  local config=$1
  shift
  "$(lasp_python)" - "$config" "$@" <<'PY'
import sys
import yaml
with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f) or {}
sp = (cfg.get("parallel") or {}).get("sp_size", 1)
for arg in sys.argv[2:]:
    arg = arg.removeprefix("--set=")
    if arg.startswith("parallel.sp_size="):
        sp = int(arg.split("=", 1)[1])
print(sp)
PY
}

# Print "world: NNODES node(s) x NPROC process(es) = W ranks; SP=s x DP=d; backend b"; fail if s does not divide W.
lasp_print_layout() {
  local nnodes=$1 nproc=$2 sp=$3 backend=$4
  local world=$((nnodes * nproc))
  if ((sp < 1 || world % sp != 0)); then
    echo "error: parallel.sp_size=${sp} must divide the world size ${world} (${nnodes} nodes x ${nproc} processes)" >&2
    return 1
  fi
  echo "world: ${nnodes} node(s) x ${nproc} process(es) = ${world} ranks; SP=${sp} x DP=$((world / sp)); backend ${backend}"
}
