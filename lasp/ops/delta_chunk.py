"""The chunked (WY / UT-transform) gated delta rule in plain torch: any device, autograd, fp32.

Per (batch, head) and chunk of ``C`` tokens entering with state ``S_0`` (``K x V``), write the
recurrence ``S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T`` as
``S_t = exp(g_t) S_{t-1} + k_t u_t^T`` with ``u_t = b_t (v_t - exp(g_t) S_{t-1}^T k_t)``. With
``G_i`` the chunk's cumulative log-gate and ``Gam_ij = G_i - G_j`` (j <= i)::

    (I + L) U = diag(b) V - diag(b e^G) K S_0,     L_ij = b_i e^{Gam_ij} k_i.k_j  (j < i)
    U = U0 - W S_0,   U0 = (I+L)^-1 diag(b) V,   W = (I+L)^-1 diag(b e^G) K      (the WY factors)
    O = scale [(Q K^T o e^Gam) U0] + Qeff S_0,  Qeff = scale [diag(e^G) Q - (Q K^T o e^Gam) W]
    S_C = A_c S_0 + M_c,  A_c = e^{G_C} I - Kd^T W,  M_c = Kd^T U0,  Kd_j = e^{G_C - G_j} k_j

Everything but the chunk-to-chunk scan ``S_{c+1} = A_c S_c + M_c`` is computed for all chunks
at once. ``Gam`` comes from a masked cumulative sum of the gates (never a difference of two
running sums), so a hard reset ``g = -inf`` gives exact zeros, never ``inf - inf``.

Layout: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g, beta ``[B, T, HV]`` (GVA when ``HV > H``: a
multiple, value head j reads q/k head ``j // (HV // H)``); states ``[B, HV, K, V]``. Argument order
``(q, k, v, g, beta)`` everywhere, as fla's ``chunk_gated_delta_rule``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .affine import segment_sums
from .delta_reference import l2norm

DEFAULT_CHUNK_SIZE = 64


@dataclass
class DeltaChunks:
    """Per-chunk quantities of a sequence, heads first, fp32 (``N`` chunks of ``C`` tokens).

    ``A [B, HV, N, K, K]``, ``M [B, HV, N, K, V]``: each value head's chunk maps; ``T``: real tokens
    (the tail of the last chunk is padding). The rest is kept for :func:`chunk_output_maps`: ``q [B,
    H, 1, N, C, K]`` (L2-normalised if asked; one per q/k head, broadcast over the ``G = HV // H``
    value heads that read it, never repeated), ``k`` (the same), ``decay [.., C, C]`` (``e^Gam`` on
    and below the diagonal, per value head or ``[C, C]`` without gates), ``d_in [B, HV, N, C]``
    (``e^G``, None without gates) and the WY factors ``W``, ``U0`` (per value head).
    """

    A: torch.Tensor
    M: torch.Tensor
    T: int
    q: torch.Tensor
    k: torch.Tensor
    decay: torch.Tensor
    d_in: torch.Tensor | None
    W: torch.Tensor
    U0: torch.Tensor
    G: int = 1


def _to_chunks(x: torch.Tensor | None, C: int, N: int) -> torch.Tensor | None:
    """``[B, T, H, *rest]`` -> ``[B, H, N, C, *rest]`` fp32, zero-padded to ``N * C`` tokens."""
    if x is None:
        return None
    x = x.float().transpose(1, 2)  # [B, H, T, ...]
    pad = N * C - x.shape[2]
    if pad:
        widths = [0, 0] * (x.dim() - 3) + [0, pad]
        x = F.pad(x, widths)
    return x.reshape(*x.shape[:2], N, C, *x.shape[3:])


def grouped(x: torch.Tensor | None, G: int) -> torch.Tensor | None:
    """A value-head tensor ``[B, HV, ...]`` as ``[B, H, G, ...]`` (GVA: value head ``h * G + j`` reads
    q/k head ``h``, transformers' ``repeat_interleave``), so it broadcasts against a q/k tensor
    ``[B, H, 1, ...]``; a ``[C, C]`` constant is returned as is."""
    if x is None or x.dim() == 2:
        return x
    return x.unflatten(1, (x.shape[1] // G, G))


def chunk_factors(q, k, v, g, beta, chunk_size: int = DEFAULT_CHUNK_SIZE, use_qk_l2norm: bool = False) -> DeltaChunks:
    """The WY factors and per-chunk maps ``(A_c, M_c)`` of a whole segment (the module docstring).

    Inputs in the operator layout (any float dtype; q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g,
    beta ``[B, T, HV]``, ``HV`` a multiple of ``H``); differentiable w.r.t. all of them. The q/k
    products (``K K^T``) are formed once per q/k head and broadcast over its value heads. This is
    what a segment's summary needs; the outputs' maps come from :func:`chunk_output_maps`.
    """
    B, T, H, K = q.shape
    G = v.shape[2] // H
    C = min(chunk_size, T)
    N = -(-T // C)
    qc, kc, vc, bc, gc = (_to_chunks(x, C, N) for x in (q, k, v, beta, g))
    if use_qk_l2norm:
        qc, kc = l2norm(qc), l2norm(kc)
    qc, kc = qc[:, :, None], kc[:, :, None]  # [B, H, 1, N, C, K]
    vc, bc, gc = (grouped(x, G) for x in (vc, bc, gc))  # [B, H, G, N, C, ...]
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if gc is None:
        decay = incl.to(qc.dtype)  # e^Gam on and below the diagonal
        d_in = d_out = None
    else:
        gam = segment_sums(gc)
        decay = gam.exp()
        d_in = (gc[..., :1] + gam[..., :, 0]).exp()  # e^{G_i}  [B, H, G, N, C]
        d_out = gam[..., -1, :].exp()  # e^{G_C - G_j}
    L = (bc[..., :, None] * decay * (kc @ kc.transpose(-1, -2))).tril(-1)
    kb = kc * bc[..., None] if d_in is None else kc * (bc * d_in)[..., None]
    rhs = torch.cat([vc * bc[..., None], kb], dim=-1)
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # (I + L)^-1 rhs
    U0, W = sol[..., : vc.shape[-1]], sol[..., vc.shape[-1] :]
    kd = kc if d_out is None else kc * d_out[..., None]
    eye = torch.eye(K, dtype=qc.dtype, device=q.device)
    A = (eye if gc is None else d_in[..., -1, None, None] * eye) - kd.transpose(-1, -2) @ W
    M = kd.transpose(-1, -2) @ U0
    flat = lambda x: None if x is None or x.dim() == 2 else x.flatten(1, 2)  # noqa: E731  [B, HV, ...]
    return DeltaChunks(flat(A), flat(M), T, qc, kc, decay if gc is None else flat(decay), flat(d_in), flat(W), flat(U0), G)


def chunk_output_maps(ch: DeltaChunks, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Qeff [B, HV, N, C, K], O_loc [B, HV, N, C, V])``: a chunk's outputs are
    ``O_loc + Qeff S_c`` for its incoming state ``S_c`` (independent of every state)."""
    G = ch.G
    qk = (ch.q @ ch.k.transpose(-1, -2)) * grouped(ch.decay, G)  # one Q K^T per q/k head
    qd = ch.q if ch.d_in is None else ch.q * grouped(ch.d_in, G)[..., None]
    Qeff = scale * (qd - qk @ grouped(ch.W, G))
    O_loc = scale * (qk @ grouped(ch.U0, G))
    return Qeff.flatten(1, 2), O_loc.flatten(1, 2)


def scan_states(A: torch.Tensor, M: torch.Tensor, S0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_{c+1} = A_c S_c + M_c`` over chunks: ``A [B,H,N,K,K]``, ``M [B,H,N,K,X]``, ``S0 [B,H,K,X]``.

    Returns the states entering each chunk ``[B, H, N, K, X]`` and the final state ``[B, H, K, X]``.
    """
    states, S = [], S0
    for a, m in zip(A.unbind(2), M.unbind(2)):  # unbind: backward is one stack, not N zero-fills
        states.append(S)
        S = torch.baddbmm(m.flatten(0, 1), a.flatten(0, 1), S.flatten(0, 1)).view_as(m)
    return torch.stack(states, dim=2), S


def chunk_outputs(Qeff: torch.Tensor, O_loc: torch.Tensor | None, states: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, T, X]``: ``O_loc + Qeff S_c`` per chunk (``states [B, H, N, K, X]``), padding cut."""
    o = Qeff @ states if O_loc is None else O_loc + Qeff @ states
    return o.flatten(2, 3)[:, :, :T]


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """The gated delta rule over a whole sequence in one process (chunked WY form, fp32).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV]`` or None; beta: ``[B, T, HV]``
            (``HV`` a multiple of ``H``: GVA, value head j reads q/k head ``j // (HV // H)``).
        scale: default ``K ** -0.5``. initial_state: ``[B, HV, K, V]`` or None (zeros).
        use_qk_l2norm: L2-normalise q and k per head first.
    Returns:
        ``o [B, T, H, V]`` in q's dtype; with ``output_final_state`` also the fp32 final state.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    ch = chunk_factors(q, k, v, g, beta, chunk_size, use_qk_l2norm)
    S0 = q.new_zeros(B, HV, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    states, final = scan_states(ch.A, ch.M, S0)
    o = chunk_outputs(*chunk_output_maps(ch, scale), states, T).transpose(1, 2).to(q.dtype)
    return (o, final) if output_final_state else o


def recurrent_gated_delta_step(q, k, v, g, beta, state: torch.Tensor, scale: float | None = None, use_qk_l2norm: bool = False):
    """One decoding step: ``q, k [B, 1, H, K]``, ``v [B, 1, HV, V]``, ``g, beta [B, 1, HV]`` (g may be
    None), ``state [B, HV, K, V]`` float32. Returns ``(o [B, 1, HV, V] in q's dtype, new state)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf, bf = q[:, 0].float(), k[:, 0].float(), v[:, 0].float(), beta[:, 0].float()
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    rep = v.shape[2] // q.shape[2]
    qf, kf = qf.repeat_interleave(rep, dim=1), kf.repeat_interleave(rep, dim=1)  # one token: [B, HV, K]
    if g is not None:
        state = g[:, 0].float().exp()[..., None, None] * state
    u = bf[..., None] * (vf - torch.einsum("bhk,bhkv->bhv", kf, state))
    state = state + kf[..., :, None] * u[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", qf, state) * scale
    return o[:, None].to(q.dtype), state


def gated_delta_rule_decode(q, k, v, g, beta, cache: dict, *, use_qk_l2norm: bool = False) -> torch.Tensor:
    """Decoding with a recurrent state in ``cache["state"]`` (``[B, HV, K, V]`` fp32 or absent):
    one token by the recurrent step, a prompt (prefill) by the chunked path from that state.
    Updates ``cache["state"]``; returns ``o [B, T, HV, V]``."""
    if q.shape[1] == 1 and cache.get("state") is not None:
        o, cache["state"] = recurrent_gated_delta_step(q, k, v, g, beta, cache["state"], use_qk_l2norm=use_qk_l2norm)
    else:
        o, cache["state"] = chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=cache.get("state"), output_final_state=True, use_qk_l2norm=use_qk_l2norm
        )
    return o
