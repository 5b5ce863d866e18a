"""Input validation shared by the operators. Every check is local: it raises the same
ValueError on every rank before any collective starts (a hang is never an error message)."""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from ..parallel import LAYOUTS, group_rank_size

#: Method names accepted by the operators (``lasp.attention.LINEAR_METHODS`` /
#: ``SOFTMAX_METHODS`` map them to their implementations; a test keeps the two in step).
LINEAR_METHOD_NAMES = ("lasp2", "lasp1", "ulysses")
SOFTMAX_METHOD_NAMES = ("allgather", "ring", "ulysses")
BACKENDS = ("auto", "torch", "triton")
CONV_ACTIVATIONS = (None, "silu")


def _check_4d(name: str, x, expected: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {expected}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_common(q, k, v, *, group, layout: str, method: str, methods: tuple[str, ...], gva: bool = False) -> None:
    """Shapes shared by linear and softmax attention, layout, method and group. ``gva``: v may have
    a multiple of k's heads (the delta rule's grouped value heads), else exactly k's."""
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_4d("q", q, "[B, T_local, H, K]")
    _check_4d("k", k, "[B, T_local, H_k, K]")
    _check_4d("v", v, "[B, T_local, HV, V]" if gva else "[B, T_local, H_k, V]")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")
        if x.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} must have q's [B, T_local] = {list(q.shape[:2])}, got {list(x.shape[:2])}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    if gva and (v.shape[2] == 0 or v.shape[2] % k.shape[2]):
        raise ValueError(f"v's heads HV={v.shape[2]} must be a multiple of q/k's heads H={k.shape[2]} (GVA)")
    if not gva and v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's number of heads ({k.shape[2]}), got {v.shape[2]}")
    if q.shape[1] == 0:
        raise ValueError("q must hold at least one token (T_local >= 1)")
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(f"T_local={q.shape[1]} must be even for layout='zigzag' (two equal chunks per rank)")
    if group is not None and not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised; call lasp.init_parallel first")


def _check_recurrent(q, k, v, per_token: dict, *, scale, group, layout: str, method: str, backend: str, gva: bool = False) -> None:
    """What the linear operators share: the common checks, the backend, k's heads equal to q's (no
    GQA in the operators), every ``per_token`` tensor (None allowed) ``[B, T_local, HV]`` (v's heads)
    floating point on q's device, the scale. ``gva``: v may have a multiple of q/k's heads."""
    check_common(q, k, v, group=group, layout=layout, method=method, methods=LINEAR_METHOD_NAMES, gva=gva)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    B, T, H, _ = q.shape
    if k.shape[2] != H:
        raise ValueError(f"k must have q's number of heads H={H} (linear attention has no GQA), got {k.shape[2]}")
    HV = v.shape[2]
    label = "HV" if gva else "H"
    for name, x in per_token.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T, HV):
            raise ValueError(f"{name} must have shape [B, T_local, {label}] = {[B, T, HV]} (v's heads), got {_shape(x)}")
        if not x.is_floating_point() or x.device != q.device:
            raise ValueError(f"{name} must be a floating-point tensor on {q.device}, got {x.dtype} on {x.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")


def check_linear(q, k, v, g, g_gamma, *, scale, causal: bool, group, layout: str, method: str, backend: str) -> None:
    """Validate the arguments of :func:`lasp.linear_attention`."""
    _check_recurrent(q, k, v, {"g": g}, scale=scale, group=group, layout=layout, method=method, backend=backend)
    H = q.shape[2]
    if g_gamma is not None:
        if not isinstance(g_gamma, torch.Tensor) or tuple(g_gamma.shape) != (H,):
            raise ValueError(f"g_gamma must have shape [H] = [{H}], got {_shape(g_gamma)}")
        if not g_gamma.is_floating_point() or g_gamma.device != q.device:
            raise ValueError(f"g_gamma must be a floating-point tensor on {q.device}, got {g_gamma.dtype} on {g_gamma.device}")
    if not causal and (g is not None or g_gamma is not None):
        raise ValueError("g and g_gamma must be None when causal=False (non-causal linear attention has no decay)")


def choose_backend(backend: str, *, on_cuda: bool, interpreting: bool, K: int, V: int) -> str:
    """The backend that runs (``torch`` or ``triton``) for a requested one; a ValueError where
    ``triton`` cannot run. ``auto`` is ``triton`` on CUDA when the kernels take the head dims
    ``K, V``, else ``torch`` (with a warning on CUDA: the kernels would be faster)."""
    if backend == "torch":
        return "torch"
    if backend == "auto" and not on_cuda:
        return "torch"
    if backend == "triton" and not on_cuda and not interpreting:
        raise ValueError(
            "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            "triton is imported (the Triton interpreter); use backend='torch' on the CPU"
        )
    from ..kernels.utils import HEAD_DIMS  # imports triton: only when the kernels may run

    bad = [f"{name}={d}" for name, d in (("K (q/k head dim)", K), ("V (v head dim)", V)) if d not in HEAD_DIMS]
    if not bad:
        return "triton"
    if backend == "triton":
        raise ValueError(f"{', '.join(bad)}: backend='triton' needs head dims that are a power of two in {HEAD_DIMS}")
    warnings.warn(
        f"backend='auto': the Triton kernels take head dims in {HEAD_DIMS}, got {', '.join(bad)}; "
        "using the (slower) torch chunk path",
        stacklevel=3,
    )
    return "torch"


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """:func:`choose_backend` for the operator's ``q [.., K]``, ``v [.., V]`` (before any collective)."""
    return choose_backend(
        backend, on_cuda=q.is_cuda, interpreting=os.environ.get("TRITON_INTERPRET") == "1",
        K=q.shape[-1], V=v.shape[-1],
    )
def check_states(q, v, initial_state, output_final_state, *, causal: bool, cu_seqlens=None) -> None:
    """Validate ``initial_state`` (``[B, H, K, V]`` with v's heads H, float, on q's device) and
    ``output_final_state``. With ``cu_seqlens`` (``[N+1]``, B = 1): fla's per-document ``[N, H, K,
    V]``, or lasp's single state ``[1, H, K, V]`` (the first document's)."""
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if not causal and (initial_state is not None or output_final_state):
        raise ValueError("initial_state and output_final_state need causal=True (non-causal attention has no state order)")
    if initial_state is None:
        return
    B, K = q.shape[0], q.shape[-1]
    want = (B, v.shape[2], K, v.shape[-1])
    n_docs = cu_seqlens.shape[0] - 1 if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 else None
    if n_docs is not None and B == 1:
        ok = isinstance(initial_state, torch.Tensor) and initial_state.dim() == 4 and tuple(initial_state.shape[1:]) == want[1:]
        if not ok or initial_state.shape[0] not in (1, n_docs):
            raise ValueError(
                f"initial_state must have shape [N, H, K, V] = {[n_docs, *want[1:]]} with cu_seqlens (one state per "
                f"document, fla's varlen form) or [1, H, K, V] (the first document's), got {_shape(initial_state)}"
            )
    elif not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state must have shape [B, H, K, V] = {list(want)}, got {_shape(initial_state)}")
    if not initial_state.is_floating_point() or initial_state.device != q.device:
        raise ValueError(f"initial_state must be a floating-point tensor on {q.device}, got {initial_state.dtype} on {initial_state.device}")


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_gated_delta(q, k, v, g, beta, initial_state, output_final_state=False, *, scale, group, layout: str, method: str, backend: str,
                      cu_seqlens=None) -> None:
    """Validate the arguments of :func:`lasp.gated_delta_rule`."""
    _check_recurrent(q, k, v, {"g": g, "beta": beta}, scale=scale, group=group, layout=layout, method=method, backend=backend, gva=True)
    if beta is None:
        raise ValueError(f"beta must have shape [B, T_local, HV] = {[*q.shape[:2], v.shape[2]]}, got NoneType")
    check_states(q, v, initial_state, output_final_state, causal=True, cu_seqlens=cu_seqlens)


def check_conv(x, weight, bias, *, activation, group, layout: str) -> None:
    """Validate :func:`causal_conv1d`'s arguments (local checks, the same on every rank)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor [B, T_local, D], got {got}")
    D = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape [D, W] = [{D}, W] (D = x.shape[-1], W >= 1), got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (D,)):
        got = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or have shape [D] = [{D}], got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if x.shape[1] == 0:
        raise ValueError("x must hold at least one token (T_local >= 1)")
    if group is not None and not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised; call lasp.init_parallel first")
    _, size = group_rank_size(group)
    if size > 1:
        if layout == "zigzag" and x.shape[1] % 2:
            raise ValueError(f"x's T_local={x.shape[1]} must be even for layout='zigzag' (two equal chunks per rank)")
        t_seg = x.shape[1] // (2 if layout == "zigzag" else 1)
        if weight.shape[1] - 1 > t_seg:
            raise ValueError(
                f"weight's width W={weight.shape[1]} needs W-1 <= tokens per segment ({t_seg}); "
                "the halo would span more than one rank"
            )
