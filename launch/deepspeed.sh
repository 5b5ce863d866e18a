#!/usr/bin/env bash
# Launch lasp training with the deepspeed launcher (hostfile-based multi-node, or one node).
set -euo pipefail
LASP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${LASP_ROOT}/launch/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/deepspeed.sh CONFIG [--set key=value ...] [trainer args...]

Runs `python -m lasp.train --config CONFIG ...` under the deepspeed launcher, which passes
--local_rank to every process. With HOSTFILE it starts the ranks on every host listed there
(over ssh/pdsh, from this node); without it, NPROC processes on this node.

Variables (default):
  HOSTFILE     a DeepSpeed hostfile, lines "host slots=N", the same N on every host
               (see launch/hostfile.example) ()
  NPROC        processes on this node when there is no HOSTFILE (GPU count; 2 on CPU)
  MASTER_ADDR  host of the first rank (127.0.0.1, or the first host of HOSTFILE)
  MASTER_PORT  port (one node: a free port; with HOSTFILE: 29500)
  PYTHON       interpreter with lasp installed (.venv/bin/python, else python3)
  LASP_COLLECTIVE_TIMEOUT  seconds a collective waits for a lost peer before failing (600)
  OMP_NUM_THREADS  threads per rank (this node's cores / processes per node)

The remote hosts get LASP_DIST_BACKEND, LASP_COLLECTIVE_TIMEOUT, LASP_RUN_ID and
OMP_NUM_THREADS through a DeepSpeed environment file (DS_ENV_FILE; your ~/.deepspeed_env and
./.deepspeed_env lines are kept in it, and an OMP_NUM_THREADS there wins).

Examples:
  NPROC=2 launch/deepspeed.sh configs/tiny-hybrid.yaml --set parallel.sp_size=2
  HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/linear-llama3-1b.yaml
USAGE
}

lasp_check_config_arg "$@"
CONFIG=$1
shift

PY=$(lasp_python)
BACKEND=$(lasp_backend)
export LASP_DIST_BACKEND=$BACKEND
export LASP_RUN_ID=${LASP_RUN_ID:-lasp-$(hostname)-$$-$(date +%s)}

if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "error: HOSTFILE '$HOSTFILE' not found" >&2
    exit 2
  fi
  # every host line must be "host slots=N" (DeepSpeed rejects anything else, but only later)
  BAD=$(grep -vE '^\s*(#|$)' "$HOSTFILE" | grep -vE '^\s*\S+\s+slots=[0-9]+\s*$' | head -n1 || true)
  if [[ -n "$BAD" ]]; then
    echo "error: HOSTFILE '$HOSTFILE': the line '$BAD' is not 'host slots=N'" >&2
    exit 2
  fi
  HOSTS=$(grep -cvE '^\s*(#|$)' "$HOSTFILE")
  if ((HOSTS == 0)); then
    echo "error: HOSTFILE '$HOSTFILE' lists no host" >&2
    exit 2
  fi
  SLOTS=$(grep -vE '^\s*(#|$)' "$HOSTFILE" | sed -nE 's/.*slots=([0-9]+).*/\1/p' | sort -u)
  if [[ $(wc -l <<<"$SLOTS") -ne 1 ]]; then
    echo "error: HOSTFILE '$HOSTFILE': every host needs the same slots=N, got $(tr '\n' ' ' <<<"$SLOTS")" >&2
    exit 2
  fi
  lasp_check_positive_int "slots in $HOSTFILE" "$SLOTS"
  OMP_NUM_THREADS=$(lasp_omp_threads "$SLOTS")
  export OMP_NUM_THREADS
  MASTER_ADDR=${MASTER_ADDR:-$(grep -vE '^\s*(#|$)' "$HOSTFILE" | awk 'NR==1 {print $1}')}
  MASTER_PORT=${MASTER_PORT:-29500}
  lasp_print_layout "$CONFIG" "$HOSTS" "$SLOTS" "$BACKEND" "$@"
  PLACEMENT=(--hostfile "$HOSTFILE")
  # DeepSpeed forwards to remote hosts only what its environment file lists
  DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/lasp-deepspeed-env.XXXXXX")
  FORWARD=(LASP_DIST_BACKEND LASP_COLLECTIVE_TIMEOUT LASP_RUN_ID OMP_NUM_THREADS)
  for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
    if [[ -f "$f" ]]; then
      grep -vE '^(LASP_DIST_BACKEND|LASP_COLLECTIVE_TIMEOUT|LASP_RUN_ID)=' "$f" >>"$DS_ENV_FILE" || true
      if grep -qE '^OMP_NUM_THREADS=' "$f"; then FORWARD=(LASP_DIST_BACKEND LASP_COLLECTIVE_TIMEOUT LASP_RUN_ID); fi
    fi
  done
  for var in "${FORWARD[@]}"; do
    if [[ -n "${!var:-}" ]]; then echo "${var}=${!var}" >>"$DS_ENV_FILE"; fi
  done
  export DS_ENV_FILE
else
  NPROC=${NPROC:-auto}
  [[ "$NPROC" == auto ]] && NPROC=$(lasp_default_nproc)
  lasp_check_positive_int NPROC "$NPROC"
  OMP_NUM_THREADS=$(lasp_omp_threads "$NPROC")
  export OMP_NUM_THREADS
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-$(lasp_free_port)}
  lasp_print_layout "$CONFIG" 1 "$NPROC" "$BACKEND" "$@"
  PLACEMENT=(--num_nodes 1 --num_gpus "$NPROC")
fi

exec "$PY" -m deepspeed.launcher.runner "${PLACEMENT[@]}" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module lasp.train --config "$CONFIG" "$@"
