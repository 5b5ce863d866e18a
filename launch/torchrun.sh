#!/usr/bin/env bash
# Launch lasp training with torchrun: one node or many, with elastic restarts.
set -euo pipefail
LASP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${LASP_ROOT}/launch/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/torchrun.sh CONFIG [--max-restarts N] [--set key=value ...] [trainer args...]

Runs `python -m lasp.train --config CONFIG ...` on NPROC processes per node under torchrun.
If a rank dies, torchrun restarts every rank (up to N times) and training resumes from the
latest checkpoint this job wrote (the job's rendezvous id is the run id in the checkpoint).

Variables (default):
  NPROC          processes per node (GPU count; 2 on a CPU-only node)
  NNODES         number of nodes (1)
  NODE_RANK      this node's index 0..NNODES-1 (0)
  MASTER_ADDR    host of node 0 (127.0.0.1)
  MASTER_PORT    port on node 0 (one node: a free port; several nodes: 29500)
  RDZV_ENDPOINT  host:port of a c10d rendezvous; replaces MASTER_ADDR/MASTER_PORT/NODE_RANK ()
  RDZV_ID        rendezvous job id, unique per job (one node: lasp-HOST-PID-TIME; several
                 nodes: lasp-MASTER_ADDR-MASTER_PORT, so give two jobs different ports)
  MAX_RESTARTS   elastic restarts before the job fails (0); --max-restarts N wins
  LASP_ARGS      more trainer arguments, split at spaces (e.g. "--set a=1 --set b=2")
  PYTHON         interpreter with lasp installed (.venv/bin/python, else python3)
  LASP_COLLECTIVE_TIMEOUT  seconds a collective waits for a lost peer before failing (600)
  OMP_NUM_THREADS  threads per rank (this node's cores / NPROC; torchrun alone would set 1)

Examples:
  NPROC=4 launch/torchrun.sh configs/tiny-hybrid.yaml --max-restarts 2
  # 2 nodes x 8 GPUs; run on node 0 and on node 1 (NODE_RANK=1):
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh configs/linear-llama3-1b.yaml
USAGE
}

lasp_check_config_arg "$@"
CONFIG=$1
shift

MAX_RESTARTS=${MAX_RESTARTS:-0}
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max-restarts)
      if [[ $# -lt 2 ]]; then
        echo "error: --max-restarts needs a value (a number of restarts)" >&2
        exit 2
      fi
      MAX_RESTARTS=$2; shift 2 ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -n "${LASP_ARGS:-}" ]]; then
  read -r -a EXTRA <<<"$LASP_ARGS"
  ARGS+=("${EXTRA[@]}")
fi
if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "error: --max-restarts / MAX_RESTARTS must be a number >= 0, got '$MAX_RESTARTS'" >&2
  exit 2
fi

PY=$(lasp_python)
BACKEND=$(lasp_backend)
NPROC=${NPROC:-auto}
[[ "$NPROC" == auto ]] && NPROC=$(lasp_default_nproc)
NNODES=${NNODES:-1}
lasp_check_positive_int NPROC "$NPROC"
lasp_check_positive_int NNODES "$NNODES"
OMP_NUM_THREADS=$(lasp_omp_threads "$NPROC")
export OMP_NUM_THREADS
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z "${MASTER_PORT:-}" ]]; then
  if ((NNODES == 1)); then MASTER_PORT=$(lasp_free_port); else MASTER_PORT=29500; fi
fi
if ((NNODES == 1)); then
  RDZV_ID=${RDZV_ID:-lasp-$(hostname)-$$-$(date +%s)}
else
  RDZV_ID=${RDZV_ID:-lasp-${MASTER_ADDR}-${MASTER_PORT}}
fi
lasp_print_layout "$CONFIG" "$NNODES" "$NPROC" "$BACKEND" ${ARGS[@]+"${ARGS[@]}"}
export LASP_DIST_BACKEND=$BACKEND

# Always the c10d rendezvous: every restart gets a fresh round (the static one reuses the
# store and the restarted ranks can read the dead ranks' addresses).
RDZV=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:-${MASTER_ADDR}:${MASTER_PORT}}" --rdzv-id "$RDZV_ID")
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
  RDZV+=(--node-rank "$NODE_RANK")
fi

exec "$PY" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" --monitor-interval 1 "${RDZV[@]}" \
  -m lasp.train --config "$CONFIG" ${ARGS[@]+"${ARGS[@]}"}
