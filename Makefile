# lasp: `make train` runs the main job, `make test` the test suite. Both bootstrap .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU stack. torch==2.13.0 is the CPU build on local disk; triton 3.7.1 is the pair it was built with.
TORCH_PIN  ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1
STAMP  := $(VENV)/.installed

.PHONY: venv train test test-fast bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PIN) $(TRITON_PIN)
	# --no-build-isolation: deepspeed's setup imports torch; isolation would pull an unpinned (CUDA) torch.
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# A fresh run each time (the previous one is moved aside, never deleted) unless ARGS holds --resume.
train: $(STAMP)
	$(PY) -m lasp.cli train --config configs/tiny-hybrid.yaml $(if $(findstring --resume,$(ARGS)),,--overwrite) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# The README's CPU table: one attention layer fwd+bwd, B=1 H=8 D=64 fp32, P=2 and P=4 spawned gloo
# ranks (one thread each), then the cluster prediction calibrated from it. About 15 min on 2 cores.
BENCH_OUT ?= bench-results/cpu
bench: $(STAMP)
	$(PY) -m lasp.cli bench layer --method lasp2,lasp1,ulysses-linear,allgather,ring --seq-len 2K,8K,32K --sp 2,4 \
		--batch 1 --heads 8 --head-dim 64 --dtype fp32 --warmup 2 --reps 10 --max-seconds-per-point 30 \
		--out $(BENCH_OUT)/layer $(ARGS)
	$(PY) -m lasp.cli bench predict --calibrate $(BENCH_OUT)/layer --out $(BENCH_OUT)/predict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
