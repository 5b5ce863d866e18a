"""Analytic cost model of sequence-parallel attention and of a training step (the math behind
``lasp bench predict``).

``P`` devices in one SP group (DP = 1), ``G`` GPUs per node, total sequence ``T``, ``T_l = T/P``,
batch ``B``, ``H`` heads of ``D``, ``e`` bytes per activation element, states fp32. Hardware:
``F = peak * mfu`` FLOP/s; links ``bw_intra`` / ``bw_inter`` per direction per GPU; latency ``a``
per message, ``a_launch`` per dependent step; a group spanning nodes (``P > G``) runs at the
inter values. Collectives (ring algorithms, as NCCL), ``n`` = bytes per rank:

    all-gather(n) = reduce-scatter(n) = a_launch + (P-1) a + (P-1) n / bw
    all-to-all(n)      = a_launch + (P-1) a + (P-1)/P n / bw
    all-reduce(n)      = a_launch + 2 (P-1) a + 2 (P-1)/P n / bw
    ring step(n)       = a_launch + a + n / bw               (all ranks shift at once)
    chain hop(n, link) = 2 a_launch + a_link + n / bw_link  (receive, state update, send)

Per layer, forward + backward (3x forward FLOPs), on the slowest rank. Linear compute
``3 B T_l H (4 D^2 + 2 C D)`` (state update and read-out; intra-chunk ``Q K^T V`` of chunk C, the
overlappable part); softmax ``3 * 4 B H D pairs``, ``pairs`` = ``T_l (T - T_l / 2)`` (contiguous,
last rank) or ``T^2 / (2P)`` (zigzag, all-to-all). ``lasp2``: one all-gather of the state
``B H D^2 4`` forward and one backward, each hidden behind the intra compute; ``lasp1``: a
chain of P-1 such hops (``ceil(P/G) - 1`` of them inter-node) each way; ``ring`` /
``ring-linear`` (the paper's ring baseline on a linear model): P-1 ring steps of the K/V block
``2 B T_l h_kv e`` forward, P-1 plus P of the fp32 dK/dV accumulator backward, each hidden behind
one block of compute (on a linear model every received block also costs its ``K_j^T V_j`` on
every rank); ``allgather`` (LASP-2H): all-gather K/V forward, reduce-scatter backward;
``ulysses``: all-to-all of q, k, v and of o each way, needs ``H % P == 0``. A training step =
dense matmuls (``6 * params_in_matrices`` FLOPs per token) / F + per layer (compute + exposed
communication) + one all-reduce of the bf16 gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LINEAR_SP = ("lasp2", "lasp1", "ring", "ulysses")
LAYER_METHODS = ("lasp2", "lasp1", "ulysses-linear", "ring-linear", "allgather", "ring", "ulysses-softmax")


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


def collective_s(kind: str, n: float, P: int, hw: Hardware) -> float:
    """Seconds of one ``all_gather`` | ``all_to_all`` | ``all_reduce`` of ``n`` bytes per rank."""
    if P == 1:
        return 0.0
    bw, a = hw.link(P)
    steps, volume = {"all_gather": (1, P - 1), "all_to_all": (1, (P - 1) / P), "all_reduce": (2, 2 * (P - 1) / P)}[kind]
    return hw.lat_launch + steps * (P - 1) * a + volume * n / bw


def chain_s(n: float, P: int, hw: Hardware) -> float:
    """P-1 dependent hops along contiguous ranks; ``ceil(P/G) - 1`` of them cross nodes."""
    if P == 1:
        return 0.0
    inter = math.ceil(P / hw.gpus_per_node) - 1
    return ((P - 1 - inter) * (2 * hw.lat_launch + hw.lat_intra + n / hw.bw_intra)
            + inter * (2 * hw.lat_launch + hw.lat_inter + n / hw.bw_inter))


def ring_s(kv: float, block_s: float, s: Shape, hw: Hardware) -> tuple[float, float]:
    """(comm, exposed) of a K/V ring: P-1 steps of ``kv`` bytes forward and backward, P steps of
    the fp32 dK/dV accumulator backward, each overlapping one block (``block_s``, fwd + bwd)."""
    bw, a = hw.link(s.P)
    step, acc = hw.lat_launch + a + kv / bw, hw.lat_launch + a + kv * 4 / s.elem_bytes / bw
    t_fwd, t_bwd = block_s / 3, 2 * block_s / 3
    comm = 2 * (s.P - 1) * step + s.P * acc
    return comm, (s.P - 1) * (max(0.0, step - t_fwd) + max(0.0, step - t_bwd)) + s.P * max(0.0, acc - t_bwd)


def layer_cost(method: str, s: Shape, hw: Hardware) -> dict:
    """Seconds of one attention layer fwd+bwd on the slowest rank: compute, comm, exposed, total.
    ``method``: one of :data:`LAYER_METHODS`."""
    if method not in LAYER_METHODS:
        raise ValueError(f"method must be one of {LAYER_METHODS}, got {method!r}")
    P, F, B, H, D = s.P, hw.flops, s.batch, s.heads, s.head_dim
    state = B * H * D**2 * 4
    kv = 2 * B * s.T_l * s.kv_heads * D * s.elem_bytes
    heads_ok = H % P == 0 and (method == "ulysses-linear" or s.kv_heads % P == 0)
    if method in ("lasp2", "lasp1", "ulysses-linear", "ring-linear"):
        t_intra = 3 * B * s.T_l * 2 * s.chunk * D * H / F
        compute = t_intra + 3 * B * s.T_l * 4 * D**2 * H / F
        if method in ("lasp2", "lasp1"):
            one = collective_s("all_gather", state, P, hw) if method == "lasp2" else chain_s(state, P, hw)
            comm, exposed = 2 * one, 2 * max(0.0, one - t_intra / 2)
        elif method == "ring-linear":
            f_block = 3 * 2 * B * s.T_l * H * D**2  # every received K/V block's K_j^T V_j, with backward
            compute += (P - 1) * f_block / F
            comm, exposed = ring_s(kv, f_block / F, s, hw)
        else:
            qkv = B * s.T_l * H * D * 3 * s.elem_bytes
            comm = exposed = 2 * (collective_s("all_to_all", qkv, P, hw) + collective_s("all_to_all", qkv / 3, P, hw))
    else:
        T, T_l = s.seq_len, s.T_l
        pairs = T * T / (2 * P) if method == "ulysses-softmax" or s.layout == "zigzag" else T_l * (T - T_l / 2)
        compute = 3 * 4 * B * H * D * pairs / F
        if method == "allgather":
            comm = exposed = 2 * collective_s("all_gather", kv, P, hw)  # reduce-scatter: same volume
        elif method == "ring":
            comm, exposed = ring_s(kv, compute / P, s, hw)
        else:
            qkv, o = B * T_l * (H + 2 * s.kv_heads) * D * s.elem_bytes, B * T_l * H * D * s.elem_bytes
            comm = exposed = 2 * (collective_s("all_to_all", qkv, P, hw) + collective_s("all_to_all", o, P, hw))
    ulysses = method.startswith("ulysses")
    note = "" if heads_ok or not ulysses else (
        f"needs heads % P == 0 (H={H}, P={P})" if method == "ulysses-linear"
        else f"needs heads and kv_heads % P == 0 (H={H}, H_kv={s.kv_heads}, P={P})")
    if P == 1:
        comm = exposed = 0.0
    return {"compute_s": compute, "comm_s": comm, "exposed_comm_s": exposed, "total_s": compute + exposed,
            "feasible": not note, "note": note}


def step_cost(cfg, seq_len: int, P: int, method: str, hw: Hardware, *, batch: int = 1, grad_bytes: int = 2,
              softmax_method: str = "allgather", chunk: int = 64, layout: str = "contiguous") -> dict:
    """One training step of ``cfg`` (a ModelConfig) on P devices with linear SP ``method``
    (lasp2 | lasp1 | ring | ulysses); softmax layers (hybrids) use ``softmax_method``.

    Returns seconds by part and ``tokens_per_s = batch * seq_len / total``.
    """
    from ..models.info import count_params, flop_breakdown

    if method not in LINEAR_SP:
        raise ValueError(f"method must be one of {LINEAR_SP}, got {method!r}")
    dense = flop_breakdown(cfg, seq_len)["matmul"] * batch * seq_len / P / hw.flops
    lin = layer_cost({"ring": "ring-linear", "ulysses": "ulysses-linear"}.get(method, method),
                     Shape(seq_len, P, batch, cfg.num_heads, cfg.num_heads, cfg.head_dim, 2, chunk, layout), hw)
    soft = layer_cost({"ring": "ring", "ulysses": "ulysses-softmax"}.get(method, softmax_method),
                      Shape(seq_len, P, batch, cfg.num_heads, cfg.kv_heads, cfg.head_dim, 2, chunk, layout), hw)
    n_soft = cfg.layer_types.count("softmax")
    n_lin = cfg.num_layers - n_soft
    grads = collective_s("all_reduce", count_params(cfg) * grad_bytes, P, hw)
    part = {k: n_lin * lin[k] + n_soft * soft[k] for k in ("compute_s", "exposed_comm_s", "comm_s")}
    total = dense + part["compute_s"] + part["exposed_comm_s"] + grads
    return {
        "method": method, "seq_len": seq_len, "devices": P, "dense_s": dense, "attention_compute_s": part["compute_s"],
        "exposed_comm_s": part["exposed_comm_s"], "attention_comm_s": part["comm_s"], "grad_allreduce_s": grads,
        "time_ms": total * 1e3, "tokens_per_s": batch * seq_len / total,
        "feasible": (n_lin == 0 or lin["feasible"]) and (n_soft == 0 or soft["feasible"]),
        "note": "; ".join(x for x in {lin["note"] if n_lin else "", soft["note"] if n_soft else ""} if x),
    }
