"""Analytic cost model of sequence-parallel attention and of a training step (the math behind
``lasp bench predict``).

Notation: ``P`` devices in one SP group (DP = 1), ``G`` GPUs per node, total sequence ``T``,
``T_l = T / P`` tokens per device, batch ``B``, ``L`` layers, ``H`` heads of ``D`` (``h = H D``),
``e`` bytes per activation element (2 for bf16), states fp32 (4 bytes).

Hardware: per-device matmul rate ``F = peak * mfu`` (FLOP/s); links ``bw_intra`` (NVLink, per
direction per GPU) and ``bw_inter`` (the node's InfiniBand shared by its ``G`` GPUs, per
direction per GPU), latencies ``a_intra``/``a_inter`` per message, ``a_launch`` per dependent
step of a sequential algorithm (kernel launch + stream sync + framework). A group spanning
nodes (``P > G``) runs at ``bw = bw_inter``, ``a = a_inter``; inside a node at the intra values.

Collectives (ring algorithms, as NCCL on these sizes), ``n`` = bytes per rank:

    all-gather(n)      = a_launch + (P-1) a + (P-1) n / bw
    reduce-scatter(n)  = same, n = one output slot
    all-to-all(n)      = a_launch + (P-1) a + (P-1)/P n / bw
    all-reduce(n)      = a_launch + 2 (P-1) a + 2 (P-1)/P n / bw
    ring step(n)       = a_launch + a + n / bw               (all ranks shift at once)
    chain hop(n, link) = 2 a_launch + a_link + n / bw_link  (receive, state update kernel, send)

A chain of P-1 dependent hops (LASP-1) crosses node boundaries ``ceil(P/G) - 1`` times; a ring
step (ring attention) is as slow as its slowest link (inter as soon as P > G).

Per layer, forward + backward (``x3`` FLOPs = forward + 2x backward), on the slowest rank:

- linear attention compute: ``3 * B * T_l * H * (4 D^2 + 2 C D)`` FLOPs (state update
  ``k^T v`` and read-out ``q S``: ``4 D^2``; the masked intra-chunk ``Q K^T V`` of chunk ``C``:
  ``2 C D`` per token on average), split into ``intra`` (overlappable) and the rest.
- softmax attention compute: ``3 * 4 * B * H * D * pairs`` with ``pairs`` the visible
  (query, key) pairs of the slowest rank: ``T_l (T - T_l / 2)`` (contiguous: the last rank),
  ``T^2 / (2P)`` (zigzag, or head-sharded all-to-all).
- ``lasp2``: ONE all-gather of the state ``n = B H D^2 4`` forward and one backward, each
  overlapped with the intra-chunk compute: exposed ``max(0, t_ag - t_intra)``.
- ``lasp1``: a chain of P-1 hops of ``n = B H D^2 4`` forward and backward; the last rank's
  intra compute overlaps its wait: exposed ``max(0, chain - t_intra)``.
- ``ring`` (softmax) and ``ring-linear`` (the LASP-2 paper's ring baseline on a linear model):
  P-1 ring steps of the K/V block ``2 B T_l h_kv e`` forward; backward P-1 K/V steps plus P
  steps of the fp32 dK/dV accumulator ``2 B T_l h_kv 4``; each step overlaps one block of
  compute: exposed ``sum max(0, t_step - t_block)``. On a linear model every received block
  costs its ``K_j^T V_j`` (``3 * 2 B T_l H D^2`` FLOPs with backward) on every rank: P-1
  blocks of redundant state work that LASP-1/2 do once.
- ``allgather`` (LASP-2H, softmax): all-gather K/V ``2 B T_l h_kv e`` forward, reduce-scatter
  of the same slot size backward (not overlapped).
- ``ulysses`` (all-to-all): forward all-to-all of q,k,v ``B T_l (h + 2 h_kv) e`` and of o
  ``B T_l h e``; backward the same two; needs ``H % P == 0`` (flagged infeasible otherwise).

A training step = dense matmuls (``6 * params_in_matrices`` FLOPs per token, LM head included)
``/ F`` + per layer (attention compute + exposed communication) + one all-reduce of the bf16
gradients over the group (the same for every method).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LINEAR_SP = ("lasp2", "lasp1", "ring", "ulysses")
LAYER_METHODS = ("lasp2", "lasp1", "ulysses-linear", "allgather", "ring", "ulysses-softmax")


@dataclass
class Hardware:
    """One device type and its interconnect. Defaults: A100-80GB SXM nodes of 8 (see predict.py)."""

    peak_flops: float = 312e12  # dense bf16 tensor-core peak, FLOP/s
    mfu: float = 0.40  # achieved fraction of peak for matmuls (and attention kernels)
    gpus_per_node: int = 8
    bw_intra: float = 300e9  # NVLink (A100: 600 GB/s bidirectional), bytes/s per direction per GPU
    bw_inter: float = 25e9  # 8 x 200 Gb/s HDR InfiniBand per node = 200 GB/s per node = 25 GB/s per GPU
    lat_intra: float = 5e-6  # per message, s
    lat_inter: float = 10e-6
    lat_launch: float = 50e-6  # per call / dependent step: kernel launch, stream sync, NCCL + Python dispatch

    @property
    def flops(self) -> float:
        return self.peak_flops * self.mfu

    def link(self, P: int) -> tuple[float, float]:
        """(bandwidth, latency) of a group of P ranks (contiguous ranks, nodes of G)."""
        return (self.bw_inter, self.lat_inter) if P > self.gpus_per_node else (self.bw_intra, self.lat_intra)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Shape:
    """One attention layer's shape on the SP group."""

    seq_len: int
    P: int
    batch: int = 1
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 128
    elem_bytes: int = 2
    chunk: int = 64
    layout: str = "contiguous"

    @property
    def T_l(self) -> float:
        return self.seq_len / self.P


# ----------------------------------------------------------------------------- communication


def all_gather_s(n: float, P: int, hw: Hardware) -> float:
    if P == 1:
        return 0.0
    bw, a = hw.link(P)
    return hw.lat_launch + (P - 1) * a + (P - 1) * n / bw


def all_to_all_s(n: float, P: int, hw: Hardware) -> float:
    if P == 1:
        return 0.0
    bw, a = hw.link(P)
    return hw.lat_launch + (P - 1) * a + (P - 1) / P * n / bw


def all_reduce_s(n: float, P: int, hw: Hardware) -> float:
    if P == 1:
        return 0.0
    bw, a = hw.link(P)
    return hw.lat_launch + 2 * (P - 1) * a + 2 * (P - 1) / P * n / bw


def chain_s(n: float, P: int, hw: Hardware) -> float:
    """P-1 dependent hops along contiguous ranks; ``ceil(P/G) - 1`` of them cross nodes."""
    if P == 1:
        return 0.0
    inter = math.ceil(P / hw.gpus_per_node) - 1
    intra = (P - 1) - inter
    hop_intra = 2 * hw.lat_launch + hw.lat_intra + n / hw.bw_intra
    hop_inter = 2 * hw.lat_launch + hw.lat_inter + n / hw.bw_inter
    return intra * hop_intra + inter * hop_inter


def ring_step_s(n: float, P: int, hw: Hardware) -> float:
    """One simultaneous ring shift of n bytes per rank (the slowest link sets the pace)."""
    bw, a = hw.link(P)
    return hw.lat_launch + a + n / bw


# ----------------------------------------------------------------------------- one layer


def linear_flops(s: Shape) -> tuple[float, float]:
    """(intra-chunk, state) FLOPs of one linear layer fwd+bwd on one rank."""
    per_token_intra = 2 * s.chunk * s.head_dim * s.heads
    per_token_state = 4 * s.head_dim**2 * s.heads
    return 3 * s.batch * s.T_l * per_token_intra, 3 * s.batch * s.T_l * per_token_state


def softmax_pairs(s: Shape, method: str) -> float:
    """Visible (query, key) pairs of the slowest rank, per head."""
    T, T_l = s.seq_len, s.T_l
    if method.startswith("ulysses") or s.layout == "zigzag":
        return T * T / (2 * s.P)
    return T_l * (T - T_l / 2)


def layer_cost(method: str, s: Shape, hw: Hardware) -> dict:
    """Seconds of one attention layer fwd+bwd on the slowest rank: compute, comm, exposed, total.

    ``method``: lasp2 | lasp1 | ulysses-linear | ring-linear (the paper's ring baseline on a
    linear model) | allgather | ring | ulysses-softmax.
    """
    P, F = s.P, hw.flops
    state = s.batch * s.heads * s.head_dim**2 * 4
    kv = 2 * s.batch * s.T_l * s.kv_heads * s.head_dim * s.elem_bytes
    feasible, note = True, ""
    if method in ("lasp2", "lasp1", "ulysses-linear", "ring-linear"):
        f_intra, f_state = linear_flops(s)
        compute = (f_intra + f_state) / F
        t_intra = f_intra / F
        if method == "lasp2":
            comm = 2 * all_gather_s(state, P, hw)
            exposed = 2 * max(0.0, all_gather_s(state, P, hw) - t_intra / 2)
        elif method == "lasp1":
            comm = 2 * chain_s(state, P, hw)
            exposed = 2 * max(0.0, chain_s(state, P, hw) - t_intra / 2)
        elif method == "ring-linear":
            # every received K/V block j costs K_j^T V_j (+ its backward) on this rank: 3 * 2 B T_l H D^2
            f_block = 3 * 2 * s.batch * s.T_l * s.heads * s.head_dim**2
            compute += (P - 1) * f_block / F
            step, acc = ring_step_s(kv, P, hw), ring_step_s(kv * 4 / s.elem_bytes, P, hw)
            t_fwd, t_bwd = f_block / F / 3, 2 * f_block / F / 3
            comm = 2 * (P - 1) * step + P * acc
            exposed = (P - 1) * (max(0.0, step - t_fwd) + max(0.0, step - t_bwd)) + P * max(0.0, acc - t_bwd)
        else:  # ulysses-linear
            qkv = s.batch * s.T_l * s.heads * s.head_dim * 3 * s.elem_bytes
            o = qkv / 3
            comm = exposed = 2 * (all_to_all_s(qkv, P, hw) + all_to_all_s(o, P, hw))
            feasible, note = s.heads % P == 0, ("" if s.heads % P == 0 else f"needs heads % P == 0 (H={s.heads}, P={P})")
    else:
        pairs = softmax_pairs(s, method)
        compute = 3 * 4 * s.batch * s.heads * s.head_dim * pairs / F
        if method == "allgather":
            comm = exposed = all_gather_s(kv, P, hw) + all_gather_s(kv, P, hw)  # reduce-scatter: same volume
        elif method == "ring":
            block = compute / P  # one K/V block of work (fwd + bwd) on the slowest rank
            step, acc = ring_step_s(kv, P, hw), ring_step_s(kv * 4 / s.elem_bytes, P, hw)
            t_fwd, t_bwd = block / 3, 2 * block / 3
            comm = 2 * (P - 1) * step + P * acc
            exposed = (P - 1) * (max(0.0, step - t_fwd) + max(0.0, step - t_bwd)) + P * max(0.0, acc - t_bwd)
        elif method == "ulysses-softmax":
            qkv = s.batch * s.T_l * (s.heads + 2 * s.kv_heads) * s.head_dim * s.elem_bytes
            o = s.batch * s.T_l * s.heads * s.head_dim * s.elem_bytes
            comm = exposed = 2 * (all_to_all_s(qkv, P, hw) + all_to_all_s(o, P, hw))
            ok = s.heads % P == 0 and s.kv_heads % P == 0
            feasible, note = ok, ("" if ok else f"needs heads and kv_heads % P == 0 (H={s.heads}, H_kv={s.kv_heads}, P={P})")
        else:
            raise ValueError(f"method must be one of {LAYER_METHODS + ('ring-linear',)}, got {method!r}")
    if P == 1:
        comm = exposed = 0.0
    return {"compute_s": compute, "comm_s": comm, "exposed_comm_s": exposed, "total_s": compute + exposed,
            "feasible": feasible, "note": note}


# ----------------------------------------------------------------------------- training step


def step_cost(cfg, seq_len: int, P: int, method: str, hw: Hardware, *, batch: int = 1, grad_bytes: int = 2,
              softmax_method: str = "allgather", chunk: int = 64, layout: str = "contiguous") -> dict:
    """One training step of ``cfg`` (a ModelConfig) on P devices with linear SP ``method``
    (lasp2 | lasp1 | ring | ulysses); softmax layers (hybrids) use ``softmax_method``.

    Returns seconds by part and ``tokens_per_s = batch * seq_len / total``.
    """
    from ..models.info import flop_breakdown

    if method not in LINEAR_SP:
        raise ValueError(f"method must be one of {LINEAR_SP}, got {method!r}")
    parts = flop_breakdown(cfg, seq_len)
    dense = parts["matmul"] * batch * seq_len / P / hw.flops
    lin = Shape(seq_len, P, batch, cfg.num_heads, cfg.num_heads, cfg.head_dim, 2, chunk, layout)
    soft = Shape(seq_len, P, batch, cfg.num_heads, cfg.kv_heads, cfg.head_dim, 2, chunk, layout)
    lin_method = {"lasp2": "lasp2", "lasp1": "lasp1", "ring": "ring-linear", "ulysses": "ulysses-linear"}[method]
    soft_method = {"ring": "ring", "ulysses": "ulysses-softmax"}.get(method, softmax_method)
    per_lin, per_soft = layer_cost(lin_method, lin, hw), layer_cost(soft_method, soft, hw)
    n_soft = cfg.layer_types.count("softmax")
    n_lin = cfg.num_layers - n_soft
    from ..models.info import count_params

    grads = all_reduce_s(count_params(cfg) * grad_bytes, P, hw)
    attn_compute = n_lin * per_lin["compute_s"] + n_soft * per_soft["compute_s"]
    exposed = n_lin * per_lin["exposed_comm_s"] + n_soft * per_soft["exposed_comm_s"]
    total = dense + attn_compute + exposed + grads
    feasible = (n_lin == 0 or per_lin["feasible"]) and (n_soft == 0 or per_soft["feasible"])
    note = "; ".join(x for x in {per_lin["note"] if n_lin else "", per_soft["note"] if n_soft else ""} if x)
    return {
        "method": method, "seq_len": seq_len, "devices": P, "dense_s": dense, "attention_compute_s": attn_compute,
        "exposed_comm_s": exposed, "attention_comm_s": n_lin * per_lin["comm_s"] + n_soft * per_soft["comm_s"],
        "grad_allreduce_s": grads, "time_ms": total * 1e3, "tokens_per_s": batch * seq_len / total,
        "feasible": feasible, "note": note,
    }
