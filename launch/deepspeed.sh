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
  HOSTFILE     a DeepSpeed hostfile, lines "host slots=N" (see launch/hostfile.example) ()
  NPROC        processes on this node when there is no HOSTFILE (GPU count; 2 on CPU)
  MASTER_ADDR  host of the first rank (127.0.0.1, or the first host of HOSTFILE)
  MASTER_PORT  port (29500)
  PYTHON       interpreter with lasp installed (.venv/bin/python, else python3)

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
MASTER_PORT=${MASTER_PORT:-29500}
SP=$(lasp_sp_size "$CONFIG" "$@")
export LASP_DIST_BACKEND=$BACKEND

if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "error: HOSTFILE '$HOSTFILE' not found" >&2
    exit 2
  fi
  HOSTS=$(grep -cvE '^\s*(#|$)' "$HOSTFILE")
  SLOTS=$(grep -vE '^\s*(#|$)' "$HOSTFILE" | sed -nE 's/.*slots=([0-9]+).*/\1/p' | head -n1)
  MASTER_ADDR=${MASTER_ADDR:-$(grep -vE '^\s*(#|$)' "$HOSTFILE" | awk 'NR==1 {print $1}')}
  lasp_print_layout "$HOSTS" "$SLOTS" "$SP" "$BACKEND"
  PLACEMENT=(--hostfile "$HOSTFILE")
else
  NPROC=${NPROC:-auto}
  [[ "$NPROC" == auto ]] && NPROC=$(lasp_default_nproc)
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  lasp_print_layout 1 "$NPROC" "$SP" "$BACKEND"
  PLACEMENT=(--num_nodes 1 --num_gpus "$NPROC")
fi

exec "$PY" -m deepspeed.launcher.runner "${PLACEMENT[@]}" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module lasp.train --config "$CONFIG" "$@"
