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

train: $(STAMP)
	$(PY) -m lasp.cli train --config configs/tiny-hybrid.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

bench: $(STAMP)
	$(PY) -m lasp.cli bench layer --method lasp2,lasp1,ring --seq-len 8192,32768 --sp 2 --out bench-results/cpu-p2 $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
