# Shared by scripts/gpu_check.sh and scripts/gpu_kernel_bench.sh (sourced, not run): the Python of a
# bare GPU machine (its own torch and triton), lasp installed from this checkout without
# dependencies, and the wheels carried in .wheels/ (scripts/gpu_wheels.sh fetches them).
# shellcheck shell=bash

# Sets PY and PYTHONPATH. lasp goes to $LASP_SITE with pip (setup.py maps kernels/ to lasp.kernels);
# if pip cannot build it, the checkout itself is used (lasp/_checkout.py maps lasp.kernels then).
gpu_env_setup() {
  PY=${PYTHON:-python3}
  unset TRITON_INTERPRET
  export PYTHONUNBUFFERED=1
  local site=${LASP_SITE:-/tmp/lasp-site} wheels=${LASP_WHEELS_SITE:-/tmp/lasp-wheels}
  if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target "$site" . >/tmp/lasp-pip.log 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "lasp installed into $site (no dependencies)"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip could not install lasp (tail of /tmp/lasp-pip.log below): running it from the checkout"
    tail -3 /tmp/lasp-pip.log
  fi
  if compgen -G ".wheels/*.whl" >/dev/null; then
    local pip=("$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$wheels") w
    if ! "${pip[@]}" .wheels/*.whl 2>/dev/null; then  # one bad wheel stops the batch: then one by one
      for w in .wheels/*.whl; do "${pip[@]}" "$w" 2>/dev/null || echo "carried wheel not installed: $w"; done
    fi
    export PYTHONPATH="$PYTHONPATH:$wheels"
    echo "carried wheels installed into $wheels"
  fi
}
