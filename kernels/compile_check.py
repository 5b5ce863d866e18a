"""Compile every kernel variant for a GPU target without a GPU (``python -m lasp.kernels.compile_check``).

Catches what the interpreter cannot: code that only fails in Triton's compiler (types of
loop-carried values, dot shapes, layouts) and shared-memory use per kernel. Needs Triton's
NVIDIA backend (shipped with the triton wheel) and TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

#: Pointers in the input dtype.
INPUT_PTRS = {"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
#: The chunk-state snapshots: bf16 for 16-bit inputs, else fp32 (``simple_gla.fwd.snapshot_dtype``).
SNAPSHOT_PTRS = {"h_ptr", "dh_ptr"}
#: Hopper's opt-in shared memory per block.
SMEM_LIMIT = 227 * 1024


def signature(fn, input_type: str, constexprs: dict, input_ptrs=INPUT_PTRS, snapshot_ptrs=SNAPSHOT_PTRS) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in snapshot_ptrs:
            sig[name] = "*bf16" if input_type in ("*bf16", "*fp16") else "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = input_type if name in input_ptrs else "*fp32"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(quick: bool):
    """(kernel name, JITFunction, input pointer type, constexprs, num_warps, num_stages)."""
    from .simple_gla import bwd, fwd

    def jit(f):
        return getattr(f, "fn", f) if type(f).__name__ == "Autotuner" else f

    main = [fwd.chunk_fwd_h_kernel, fwd.chunk_fwd_o_kernel, fwd.chunk_fwd_inter_kernel, bwd.chunk_bwd_dh_kernel,
            bwd.chunk_bwd_dqk_kernel, bwd.chunk_bwd_dv_kernel, bwd.summary_bwd_kernel]
    dtypes = [("*bf16", True)] if quick else [("*bf16", True), ("*fp16", True), ("*fp32", False)]
    gates = [True] if quick else [True, False]
    dims = [(32, 64)] if quick else [(128, 128), (256, 64), (16, 32), (64, 16)]  # K != V: tiles differ
    for f, (dt, lowp), use_g, (K, V) in itertools.product(main, dtypes, gates, dims):
        w, s = 8, 2  # the heaviest of utils.GPU_CONFIGS
        c = dict(H=16, K=K, V=V, BT=64, BK=min(K, 64), BV=min(V, 64), USE_G=use_g, HAS_S=True, LOWP=lowp)
        c = {name: value for name, value in c.items() if name in jit(f).arg_names}
        yield f"{jit(f).__name__}[{dt[1:]} K{K} V{V} g={use_g} w{w}s{s}]", jit(f), dt, c, w, s
    c = dict(H=16, NK=2, BT=64)
    yield "chunk_bwd_dg_kernel[NK2]", bwd.chunk_bwd_dg_kernel, "*fp32", c, 4, 2
    for hg, hgg in ((True, True), (True, False), (False, True)):
        c = dict(H=16, BT=64, HAS_G=hg, HAS_GG=hgg)
        yield f"chunk_gates_kernel[g={hg} gg={hgg}]", fwd.chunk_gates_kernel, "*bf16", c, 4, 2


#: Pointers in the input dtype in the gated delta kernels (their intermediates and dO are fp32).
DELTA_INPUT_PTRS = {"q_ptr", "k_ptr", "v_ptr", "beta_ptr"}


def delta_variants(quick: bool):
    """The gated delta rule kernels (:mod:`lasp.kernels.gated_delta`), same tuple as :func:`variants`."""
    import torch

    from .delta_segment import FP32_CHUNK, unsupported_head_dims
    from .gated_delta import bwd, fwd
    from .gated_delta.common import col_block
    from .gated_delta.local_bwd import local_bwd_kernel
    from .utils import DEFAULT_CHUNK

    dtypes = [("*bf16", True)] if quick else [("*bf16", True), ("*fp16", True), ("*fp32", False)]
    torch_dtype = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
    dims = [(32, 64)] if quick else [(128, 128), (64, 256), (256, 64), (16, 32)]
    for (dt, lowp), (K, V) in itertools.product(dtypes, dims):
        if unsupported_head_dims(K, V, torch_dtype[dt]):
            continue  # TritonDeltaSegment refuses these (local backward's shared memory)
        bv = col_block(K, V)
        bt = FP32_CHUNK if dt == "*fp32" else DEFAULT_CHUNK  # TritonDeltaSegment's default chunk
        for use_g, l2 in ([(True, True)] if quick else [(True, True), (False, False)]):
            c = dict(H=16, K=K, V=V, BT=bt, BK=min(K, 64), BV=min(V, 64), USE_G=use_g, L2=l2, LOWP=lowp)
            yield f"wy_fwd_kernel[{dt[1:]} K{K} V{V} g={use_g} l2={l2}]", fwd.wy_fwd_kernel, dt, c, 4, 1
        for init, has_u in ((1, True), (2, False)) if not quick else ((1, True),):
            c = dict(K=K, BT=bt, BV=bv, INIT=init, HAS_U=has_u, STORE=has_u, LOWP=lowp)
            yield f"state_fwd_kernel[{dt[1:]} K{K} V{V} init={init}]", fwd.state_fwd_kernel, dt, c, 4, 1
        c = dict(H=16, K=K, V=V, BT=bt, BV=bv, LOWP=lowp)
        yield f"output_fwd_kernel[{dt[1:]} K{K} V{V}]", fwd.output_fwd_kernel, dt, c, 4, 1
        for has_do in (True, False) if not quick else (True,):
            c = dict(H=16, K=K, BT=bt, BV=bv, HAS_DO=has_do, HAS_T=not has_do, LOWP=lowp)
            yield f"state_bwd_kernel[{dt[1:]} K{K} V{V} dO={has_do}]", bwd.state_bwd_kernel, dt, c, 4, 1
        for use_g, l2, has_do in ((True, True, True),) if quick else ((True, True, True), (False, False, False)):
            c = dict(H=16, K=K, V=V, BT=bt, USE_G=use_g, L2=l2, HAS_DO=has_do, LOWP=lowp)
            yield (f"local_bwd_kernel[{dt[1:]} K{K} V{V} g={use_g} l2={l2} dO={has_do}]", local_bwd_kernel,
                   dt, c, 8, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lasp.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80 (A100)")
    p.add_argument("--quick", action="store_true", help="one variant per kernel (bf16, gated, K=32, V=64)")
    p.add_argument("--op", choices=("all", "simple_gla", "gated_delta"), default="all", help="which kernel family")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    todo = [(v, INPUT_PTRS) for v in variants(args.quick)] if args.op in ("all", "simple_gla") else []
    todo += [(v, DELTA_INPUT_PTRS) for v in delta_variants(args.quick)] if args.op in ("all", "gated_delta") else []
    for (name, fn, dt, consts, w, s), input_ptrs in todo:
        t0 = time.perf_counter()
        try:
            sig = signature(fn, dt, consts, input_ptrs, SNAPSHOT_PTRS if input_ptrs is INPUT_PTRS else set())
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            kernel = triton.compile(src, target=target, options={"num_warps": w, "num_stages": s})
            smem = kernel.metadata.shared
            status = "OK  " if smem <= SMEM_LIMIT else "SMEM"
            failures += smem > SMEM_LIMIT
            print(f"{status} {name}: shared {smem / 1024:.1f} KiB, {time.perf_counter() - t0:.1f}s")
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{failures} failing variant(s) for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
