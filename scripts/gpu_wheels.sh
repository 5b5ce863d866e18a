#!/usr/bin/env bash
# Fetch, here, the wheels a bare GPU machine lacks for the GPU check (scripts/gpu_check.sh) and the
# kernel benchmark (scripts/gpu_kernel_bench.sh), into .wheels/ (git-ignored); the device run carries
# them with carry [".wheels"] and the scripts install them with pip --no-index --target.
#   flash-linear-attention + fla-core   the speed comparison (pure Python: Triton kernels)
#   deepspeed + hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection,
#   typing-extensions)                  `lasp train` (the training step); the rest of deepspeed's
#                                       needs (numpy, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm,
#                                       packaging) are on the GPU image
# The GPU image runs CPython 3.12 on x86-64 (pydantic-core is the one compiled wheel). deepspeed is
# published as a source archive: its pure-Python wheel is built here (against this venv's torch; its
# CUDA ops are compiled on first use, and lasp uses none of them).
#
# Variables: PYTHON (default .venv/bin/python), GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .wheels
"$PY" -m pip download -q --no-deps -d .wheels --only-binary=:all: --implementation cp \
  --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 \
  flash-linear-attention==0.6.0 fla-core==0.6.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .wheels deepspeed==0.19.8
ls -l .wheels
du -sh .wheels
