#!/usr/bin/env bash
# One prepared GPU run for the Triton kernels (issue 3): accuracy on CUDA vs the float64 oracle,
# then `lasp bench kernels` at B=8, H=16, T in {2K, 8K, 32K}, K=V in {64, 128}, bf16, for our
# Triton path, our torch chunk path and flash-linear-attention's chunk_simple_gla; then the gated
# delta rule (issue 17): accuracy vs the float64 oracle and `lasp bench kernels --op gated_delta` at
# B=4, H=16, T=8192, K=V=128, bf16, fwd and fwd+bwd, ours (Triton, torch) vs fla's chunk_gated_delta_rule
# (results under $OUT/gated_delta). Speed target: no slower than fla's chunk_gated_delta_rule there.
#
# Runs on a bare CUDA machine with the image's python3 (its torch and triton): lasp is installed from
# this checkout without dependencies and the wheels carried in .wheels/ beside it (scripts/gpu_env.sh).
# fla is not on the GPU image and the GPU machine reaches no registry: fetch its wheels here first
# (scripts/gpu_wheels.sh: fla, and deepspeed for scripts/gpu_check.sh) and carry them along:
#   bash scripts/gpu_wheels.sh
#   device run: command "bash scripts/gpu_kernel_bench.sh", carry [".wheels"], timeout_s 600
# Results (results.json [schema lasp-bench/1], results.md, kernels.png, log.txt) go to $OUT (the device tool's
# output folder) or bench-results/gpu-kernels. Extra arguments are passed to `lasp bench kernels`
# (e.g. --T 8192 --dims 128 for the speed target alone). Exit status 1: the accuracy check failed.
# The shorter all-round check (correctness of every kernel and of the softmax path, a training step)
# is scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench-results/gpu-kernels}
mkdir -p "$OUT_DIR"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  gpu_env_setup
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "$PY" -c 'from lasp.bench.kernels import fla_fn; print("fla chunk_simple_gla available:", fla_fn() is not None)'
  "$PY" -c 'from lasp.bench.kernels import fla_fn; print("fla chunk_gated_delta_rule available:", fla_fn("gated_delta") is not None)'
  "$PY" -m lasp.kernels.compile_check --quick || echo "compile_check failed (see above)"
  rc=0
  "$PY" -m lasp.cli bench kernels --check --out "$OUT_DIR" "$@" || rc=$?
  "$PY" -m lasp.cli bench kernels --op gated_delta --check --B 4 --H 16 --T 8192 --dims 128 --dtype bf16 \
    --out "$OUT_DIR/gated_delta" || rc=$?
  exit $rc
} 2>&1 | tee "$OUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
