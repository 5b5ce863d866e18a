"""The CUDA paths of the softmax blocks (lasp.ops.softmax_kernels), checked on the CPU.

The CUDA ops cannot run here, so the wrappers are driven (1) with stand-ins that keep each CUDA
op's contract (argument lists, the flash kernel's dense ``[B, H, Tq]`` LSE, the efficient kernel's
LSE padded to 32 rows and its equal-heads requirement) and compute with torch's CPU flash kernel,
end to end through the real dispatch against the float64 oracle (documents, GQA, fp32/bf16), and
(2) with the real aten ops on the meta device, which checks the argument lists and the shapes
against torch's own schemas and meta functions."""
from __future__ import annotations

import functools

import pytest
import torch

import lasp
from lasp.ops import reference, softmax_kernels
from lasp.ops.softmax_kernels import BlockKernel, cuda_kernel, cuda_kernel_name, lse_rows
from lasp.ops.softmax_local import sdpa_attention
from lasp.testing import assert_close, seed_for, softmax_inputs

aten = torch.ops.aten
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("dtype, d_qk, d_v, cap, flash, efficient, masked, expected", [
    (BF16, 128, 128, (9, 0), True, True, False, "flash"),
    (FP16, 64, 64, (8, 0), True, True, False, "flash"),
    (BF16, 256, 256, (8, 0), True, True, False, "flash"),
    (FP32, 128, 128, (9, 0), True, True, False, "efficient"),  # flash takes 16-bit only
    (BF16, 128, 128, (9, 0), False, True, False, "efficient"),  # flash switched off (sdpa_kernel)
    (BF16, 128, 128, (9, 0), False, False, False, None),
    (BF16, 20, 20, (9, 0), True, True, False, None),  # neither takes D % 8 != 0 in 16-bit
    (FP32, 20, 20, (9, 0), True, True, False, "efficient"),  # fp32: D % 4
    (BF16, 128, 64, (9, 0), True, True, False, "efficient"),  # flash needs D_qk == D_v
    (BF16, 512, 512, (9, 0), True, True, False, "efficient"),
    (BF16, 200, 200, (8, 6), True, True, False, "efficient"),  # FA2 backward: no D in (192, 224] on sm86-89
    (BF16, 200, 200, (9, 0), True, True, False, "flash"),
    (BF16, 64, 64, (7, 5), True, True, False, None),  # no flash before sm80, no bf16 efficient either
    (FP16, 64, 64, (7, 5), True, True, False, "efficient"),
    (BF16, 64, 64, (9, 0), True, True, True, None),  # a masked block: the float32 reference
])
def test_cuda_kernel_choice(dtype, d_qk, d_v, cap, flash, efficient, masked, expected):
    assert cuda_kernel_name(dtype, d_qk, d_v, cap, flash_enabled=flash, efficient_enabled=efficient, masked=masked) == expected


# ----------------------------------------------------------------------------- stand-ins for the CUDA ops


def _cpu(q, k, v, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_bwd(do, q, k, v, o, lse, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, causal, scale=scale)


def fake_flash(calls, q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    """``aten._scaled_dot_product_flash_attention``'s contract: 9 outputs, ``lse [B, H, Tq]`` dense."""
    calls.append("flash")
    assert dropout_p == 0.0 and not return_debug_mask and q.shape[1] % k.shape[1] == 0
    o, lse = _cpu(q, k, v, is_causal, scale)
    u64 = functools.partial(torch.zeros, dtype=torch.uint64)
    return o, lse.contiguous(), None, None, q.shape[2], k.shape[2], u64(2), u64(()), torch.empty(0)


def fake_flash_bwd(calls, do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, *, scale):
    calls.append("flash_bwd")
    assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2]) and dropout_p == 0.0
    assert lse.is_contiguous() and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert o.dtype == do.dtype == q.dtype
    return _cpu_bwd(do, q, k, v, o, lse, is_causal, scale)


def fake_efficient(calls, q, k, v, bias, compute_lse, dropout_p, is_causal, *, scale):
    """``aten._scaled_dot_product_efficient_attention``'s contract: equal heads, LSE padded to 32 rows."""
    calls.append("efficient")
    assert bias is None and compute_lse and dropout_p == 0.0 and q.shape[1] == k.shape[1] == v.shape[1]
    o, lse = _cpu(q, k, v, is_causal, scale)
    padded = torch.full((*lse.shape[:2], lse_rows(q.shape[2])), float("inf"))
    padded[..., : q.shape[2]] = lse
    return o, padded, torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)


def fake_efficient_bwd(calls, do, q, k, v, bias, o, lse, seed, offset, dropout_p, grad_input_mask, is_causal, *, scale):
    calls.append("efficient_bwd")
    Tq = q.shape[2]
    assert bias is None and list(grad_input_mask) == [True, True, True, False] and dropout_p == 0.0
    assert q.shape[1] == k.shape[1] == v.shape[1] and lse.shape == (*q.shape[:2], lse_rows(Tq))
    assert torch.isinf(lse[..., Tq:]).all()
    return (*_cpu_bwd(do, q, k, v, o, lse[..., :Tq], is_causal, scale), None)


def fake_kernels(calls: list) -> dict[str, BlockKernel]:
    """:data:`softmax_kernels.CUDA_KERNELS` with the real wrappers around the stand-in ops."""
    w = softmax_kernels
    return {
        "flash": BlockKernel("cuda_flash", functools.partial(w.flash_forward, op=functools.partial(fake_flash, calls)),
                             functools.partial(w.flash_backward, op=functools.partial(fake_flash_bwd, calls))),
        "efficient": BlockKernel("cuda_efficient", functools.partial(w.efficient_forward, op=functools.partial(fake_efficient, calls)),
                                 functools.partial(w.efficient_backward, op=functools.partial(fake_efficient_bwd, calls))),
    }


@pytest.fixture
def cuda_path(monkeypatch):
    """Route every block through the CUDA dispatch of an sm90 device (stand-in ops); returns
    ``(calls, use)``: the ops called, and ``use(flash=..., efficient=...)`` to switch kernels off."""
    calls: list[str] = []
    switches = {"flash_enabled": True, "efficient_enabled": True}
    monkeypatch.setattr(softmax_kernels, "CUDA_KERNELS", fake_kernels(calls))
    monkeypatch.setattr(softmax_kernels, "select_kernel", lambda q, k, v, mask: cuda_kernel(q, v, mask, (9, 0), **switches))

    def use(flash=True, efficient=True):
        switches.update(flash_enabled=flash, efficient_enabled=efficient)

    return calls, use


def document_oracle(full, do, cu, scale):
    """Each document alone through the float64 oracle: ``(o, [dq, dk, dv])``."""
    ins = [x.detach().double().requires_grad_() for x in full]
    bounds = cu.tolist()
    o = torch.cat([reference.softmax_attention_reference(*(x[:, s:f] for x in ins), causal=True, scale=scale)
                   for s, f in zip(bounds[:-1], bounds[1:])], dim=1)
    o.backward(do.double())
    return o, [x.grad for x in ins]


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype, route", [(FP32, "efficient"), (BF16, "flash"), (BF16, "efficient")],
                         ids=["fp32-efficient", "bf16-flash", "bf16-efficient"])
def test_cuda_path_documents_match_oracle(cuda_path, dtype, route, heads):
    """Packed documents (long ones: fully visible + diagonal pieces merged by LSE; a run of tiny
    ones: one masked block, which takes the float32 reference on CUDA) through the CUDA dispatch:
    outputs and dq/dk/dv against each document alone in float64. fp32 always takes the efficient
    kernel (flash is 16-bit only); bf16 takes flash unless it is switched off."""
    calls, use = cuda_path
    use(flash=route == "flash")
    H, H_kv = heads
    T, scale = 120, 0.3
    cu = torch.tensor([0, 37, 40, 42, 45, 47, 80, 120])  # 37 and 33: not multiples of 32 (LSE padding)
    full, do = softmax_inputs(1, T, H, H_kv, 16, dtype, seed=seed_for("cuda-docs", str(dtype), H_kv, route))
    ins = [x.clone().requires_grad_() for x in full]
    o = lasp.softmax_attention(*ins, scale=scale, cu_seqlens=cu)
    o.backward(do)
    ref, grads = document_oracle(full, do, cu, scale)
    rtol = 1e-5 if dtype == FP32 else 1e-2
    assert_close(ref, o, rtol=rtol, name="o")
    for g_ref, x, n in zip(grads, ins, "qkv"):
        assert_close(g_ref, x.grad, rtol=rtol, name=f"d{n}")
    assert set(calls) == {route, route + "_bwd"}, calls


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_cuda_path_lower_right_gqa(cuda_path, dtype):
    """More keys than queries (a decoding cache, LASP-2H spans): the fully visible prefix and the
    square diagonal through the CUDA kernels, GQA, against the float64 oracle."""
    calls, _ = cuda_path
    Tq, Tk = 21, 70
    (_, k, v), _ = softmax_inputs(2, Tk, 4, 1, 8, dtype, seed=seed_for("cuda-lr-k", str(dtype)))
    (q, _, _), do = softmax_inputs(2, Tq, 4, 1, 8, dtype, seed=seed_for("cuda-lr-q", str(dtype)))
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sdpa_attention(*ins, causal=True, scale=0.4)
    o.backward(do)
    ref_ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    q_pad = torch.cat([torch.zeros(2, Tk - Tq, 4, 8, dtype=torch.float64), ref_ins[0]], 1)
    ref = reference.softmax_attention_reference(q_pad, ref_ins[1], ref_ins[2], causal=True, scale=0.4)[:, Tk - Tq:]
    ref.backward(do.double())
    rtol = 1e-5 if dtype == FP32 else 1e-2
    assert_close(ref, o, rtol=rtol, name="o")
    for x, g, n in zip(ref_ins, ins, "qkv"):
        assert_close(x.grad, g.grad, rtol=rtol, name=f"d{n}")
    assert calls.count("flash" if dtype == BF16 else "efficient") == 2  # prefix + diagonal


def test_cuda_wrappers_match_real_op_schemas():
    """The wrappers call the real aten CUDA ops (on meta tensors: torch's meta functions, no GPU)
    with arguments their schemas accept, and return ``o`` like q, ``lse [B, H, Tq]`` float32 (the
    efficient op's padded LSE cut), dK/dV like k (GQA summed back)."""
    w = softmax_kernels
    B, H, H_kv, Tq, D = 2, 4, 2, 40, 64
    for dtype, fwd, bwd in ((BF16, w.flash_forward, w.flash_backward), (FP32, w.efficient_forward, w.efficient_backward)):
        q, do = (torch.empty(B, H, Tq, D, device="meta", dtype=dtype) for _ in range(2))
        k, v = (torch.empty(B, H_kv, Tq, D, device="meta", dtype=dtype) for _ in range(2))
        o, lse = fwd(q, k, v, 0.125, True)
        assert o.shape == q.shape and o.dtype == dtype and lse.shape == (B, H, Tq) and lse.dtype == torch.float32
        dq, dk, dv = bwd(do, q, k, v, o, lse, 0.125, True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert lse_rows(40) == 64 and lse_rows(64) == 64
    assert softmax_kernels.select_kernel(q, k, v, None) is None  # neither CPU nor CUDA: the reference
    cpu = torch.empty(1, 1, 1, 8)
    assert softmax_kernels.select_kernel(cpu, cpu, cpu, None) is softmax_kernels.CPU_FLASH
