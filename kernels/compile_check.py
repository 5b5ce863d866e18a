"""Compile every kernel launch of lasp's Triton paths for a GPU without a GPU, and check it fits
(``python -m lasp.kernels.compile_check``).

The launches are not listed by hand: the segments (``TritonSegment``, ``TritonDeltaSegment``) are
driven through the LASP-2 protocol on CPU tensors (:mod:`lasp.kernels.launches`) while
``JITFunction.run`` and ``Autotuner.run`` only record what they are given (every candidate of an
autotune list). Each recorded launch is specialised the way Triton's runtime does it (its own
binder: the divisibility-by-16 hints of pointers and integer arguments, the launcher's
constexprs and ``num_warps`` / ``num_stages``), compiled for each architecture with the ptxas
inside the triton wheel, and checked:

* shared memory (``metadata.shared``) against the opt-in limit per block of the architecture
  (:data:`SMEM_LIMIT`: sm_80 163 KiB, sm_90 227 KiB);
* registers, stack and spills from ``ptxas -v`` (Triton's own run); spill stores above
  :data:`SPILL_BUDGET` bytes per thread (by arch and input dtype) fail;
* a launch that leaves ``num_warps`` / ``num_stages`` to Triton's defaults fails (the defaults are
  arch-blind: ``num_stages=3`` is what made the old ``state_bwd_kernel`` need 276 KiB).

Exit status 1 on any violation. Needs Triton's NVIDIA backend (in the triton wheel) and
TRITON_INTERPRET unset. Kernels compiled once are cached by Triton (``~/.triton/cache``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

#: Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100/H200.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: Spill stores allowed per thread, bytes, by (arch, inputs): 16-bit inputs on sm_90 (H100/H200, the
#: fast path): none. On sm_80 the same tiles need more registers (mma.sync operands): a few backward
#: kernels spill up to 440 B (listed in the README); fp32 inputs (the accuracy path, 3xTF32 dots,
#: 32-wide tiles) up to 804 B. The budgets are what the launchers meet today, so any growth fails.
SPILL_BUDGET = {(90, "16-bit"): 0, (80, "16-bit"): 512, (90, "fp32"): 1024, (80, "fp32"): 1024}


def spill_budget(arch: int, dtype: str) -> int:
    """The budget of :data:`SPILL_BUDGET` for inputs of ``dtype`` (``bf16``, ``fp16``, ``fp32``)."""
    return SPILL_BUDGET[(arch, "fp32" if dtype == "fp32" else "16-bit")]


@dataclass
class Launch:
    """One recorded kernel launch: the JITFunction, its arguments and launch options."""

    fn: object
    args: tuple
    kwargs: dict
    explicit: bool  # num_warps and num_stages given by the launcher or an autotune config
    label: str = ""


@dataclass
class Result:
    name: str
    arch: int
    dtype: str
    num_warps: int
    num_stages: int
    shared: int = 0
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    seconds: float = 0.0
    violations: list = field(default_factory=list)


def _jit(fn):
    while not hasattr(fn, "arg_names") or type(fn).__name__ != "JITFunction":
        fn = fn.fn
    return fn


@contextlib.contextmanager
def recording():
    """Within the block no kernel runs: ``kernel[grid](...)`` appends a :class:`Launch` to the
    yielded list; an autotuned kernel appends one per (pruned) candidate config."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def record(self, *args, grid, warmup, **kwargs):
        explicit = "num_warps" in kwargs and "num_stages" in kwargs
        launches.append(Launch(self, args, dict(kwargs), explicit))

    def record_all(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run, Autotuner.run = record, record_all
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def specialise(launch: Launch, arch: int):
    """``(ASTSource, options dict)`` exactly as ``JITFunction.run`` builds them for this launch."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def describe(launch: Launch, src) -> str:
    """``kernel[dtype K=.. V=.. FLAG=..]``: the inputs' dtype (of the variant that launched it, or
    the first pointer's) and the constexprs."""
    ptrs = [t for t in src.signature.values() if isinstance(t, str) and t.startswith("*")]
    dtype = launch.label.split()[1] if len(launch.label.split()) > 1 else (ptrs[0][1:] if ptrs else "")
    consts = {launch.fn.arg_names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
    shown = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items() if k not in ("H",))
    return f"{launch.fn.__name__}[{dtype} {shown}]"


PTXAS_RE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
    r".*?Used (?P<regs>\d+) registers", re.S)


def _parse_usage(log: str) -> tuple[int, int, int, int] | None:
    m = PTXAS_RE.search(log)
    return None if m is None else (int(m["regs"]), int(m["stack"]), int(m["st"]), int(m["ld"]))


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """``(registers, stack bytes, spill store bytes, spill load bytes)`` per thread from
    ``ptxas -v`` (the wheel's ptxas, Triton's own flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    usage = _parse_usage(log)
    if usage is None:
        raise RuntimeError(f"cannot parse ptxas -v output:\n{log}")
    return usage


def _usage_file(kernel_hash: str) -> str:
    from triton import knobs

    return os.path.join(knobs.cache.dir, "lasp_ptxas_usage", f"{kernel_hash}.txt")


def compile_launch(launch: Launch, arch: int) -> Result:
    """Compile one launch for ``sm_<arch>`` and check it (:func:`violations`). ptxas' ``-v`` log is
    taken from Triton's own ptxas run (kept next to Triton's cache, by kernel hash, for the
    kernels it does not compile again)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    src, options = specialise(launch, arch)
    name = describe(launch, src)
    res = Result(name, arch, name.split("[")[1].split()[0], options["num_warps"], options["num_stages"])
    log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    res.shared = kernel.metadata.shared
    path = _usage_file(kernel.hash)
    usage = _parse_usage(log.getvalue())
    if usage is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(" ".join(map(str, usage)))
    elif os.path.exists(path):
        with open(path) as f:
            usage = tuple(int(x) for x in f.read().split())
    else:
        usage = ptxas_usage(kernel.asm["ptx"], arch)
    res.regs, res.stack, res.spill_stores, res.spill_loads = usage
    res.seconds = time.perf_counter() - t0
    res.violations = violations(res, launch.explicit, spill_budget(arch, res.dtype))
    return res


def violations(res: Result, explicit: bool = True, budget: int = 0) -> list[str]:
    """What makes a compiled launch unfit for its architecture (empty: fits); ``budget``: spill
    store bytes per thread allowed."""
    out = []
    if res.shared > SMEM_LIMIT[res.arch]:
        out.append(f"shared memory {res.shared / 1024:.1f} KiB > {SMEM_LIMIT[res.arch] // 1024} KiB (sm_{res.arch})")
    if res.spill_stores > budget:
        out.append(f"spills {res.spill_stores} B/thread > budget {budget} B")
    if not explicit:
        out.append("launched without explicit num_warps/num_stages (Triton's arch-blind defaults)")
    return out


def check_config(fn, args: tuple, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                 dtype: str = "bf16") -> list[str]:
    """Violations of one kernel at one config: ``fn`` a JITFunction (or autotuned), ``args`` its
    runtime arguments (tensors, ints, floats, in order), ``constexprs`` by name, ``dtype`` the
    inputs' (for the spill budget). For tests and for trying a config before putting it in a
    launcher."""
    launch = Launch(_jit(fn), tuple(args), dict(constexprs, num_warps=num_warps, num_stages=num_stages), True,
                    label=f"check {dtype}")
    return compile_launch(launch, arch).violations


def unique(launches: list[Launch], arch: int) -> list[Launch]:
    """One launch per distinct compilation (kernel, signature, constexprs, attrs, options)."""
    seen, out = set(), []
    for launch in launches:
        src, options = specialise(launch, arch)
        key = (launch.fn, repr(sorted(src.signature.items())), repr(sorted(src.constants.items())),
               repr(sorted(src.attrs.items())), repr(sorted((k, repr(v)) for k, v in options.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


_TODO: list = []


def _compile_one(args):
    """Worker: compile ``_TODO[i]`` for ``arch`` (a forked process inherits the recorded launches)."""
    i, arch = args
    try:
        return i, compile_launch(_TODO[i], arch), None
    except Exception as e:  # noqa: BLE001 - report every failing compilation
        return i, None, f"{type(e).__name__}: {str(e)[:2000]}"


def run(launches: list[Launch], archs: list[int], jobs: int = 1):
    """Compile every distinct launch per arch; yields ``(arch, launch, Result or None, error or None)``
    in order (``jobs`` > 1: forked worker processes)."""
    global _TODO
    for arch in archs:
        _TODO = unique(launches, arch)
        work = [(i, arch) for i in range(len(_TODO))]
        if jobs > 1 and len(work) > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
                done = pool.imap(_compile_one, work)
                for i, res, err in done:
                    yield arch, _TODO[i], res, err
        else:
            for w in work:
                i, res, err = _compile_one(w)
                yield arch, _TODO[i], res, err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lasp.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (default 80,90: A100, H100/H200)")
    p.add_argument("--quick", action="store_true",
                   help="a representative subset: the 16-bit K=V=128 variants (both families) and fp32 K=V=64")
    p.add_argument("--op", choices=("all", "simple_gla", "gated_delta"), default="all", help="which kernel family")
    p.add_argument("--kernels", default="", help="only these kernels (comma-separated names, e.g. state_bwd_kernel)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations (default: CPU count)")
    args = p.parse_args(argv)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # one row per compilation, as it finishes
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    from .launches import capture

    archs = [int(a) for a in args.arch.split(",")]
    t0 = time.perf_counter()
    launches = capture(args.op, args.quick)
    if args.kernels:
        launches = [x for x in launches if x.fn.__name__ in args.kernels.split(",")]
    smem = ", ".join(f"sm_{a} {SMEM_LIMIT[a] // 1024} KiB" for a in archs)
    spills = ", ".join(f"sm_{a} {spill_budget(a, 'bf16')} / {spill_budget(a, 'fp32')} B" for a in archs)
    print(f"{len(launches)} launches recorded ({'quick' if args.quick else 'full'}, {args.op}); limits: shared {smem} "
          f"per block; spill stores per thread (16-bit / fp32 inputs) {spills}")
    failures = {a: 0 for a in archs}
    current = None
    for arch, launch, r, err in run(launches, archs, args.jobs):
        if arch != current:
            if current is not None:
                print(f"{failures[current]} failing variant(s) for sm_{current}")
            current = arch
            print(f"\nsm_{arch}:")
            print(f"{'':4} {'kernel [first pointer dtype, constexprs]':<76} {'w':>2} {'s':>2} {'smem KiB':>8} "
                  f"{'regs':>4} {'stack':>5} {'spill':>5}")
        if err is not None:
            failures[arch] += 1
            print(f"FAIL {launch.fn.__name__} ({launch.label}): {err}")
            continue
        failures[arch] += bool(r.violations)
        print(f"{'OK' if not r.violations else 'BAD':<4} {r.name:<76} {r.num_warps:>2} {r.num_stages:>2} "
              f"{r.shared / 1024:>8.1f} {r.regs:>4} {r.stack:>5} {r.spill_stores:>5}"
              + (f"  <- {'; '.join(r.violations)}" if r.violations else ""))
    if current is not None:
        print(f"{failures[current]} failing variant(s) for sm_{current}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
