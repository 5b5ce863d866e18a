"""Activation memory of one decoder layer on one rank, from what the code keeps (closed form).

For every layer kind (``linear``: the diagonal-decay family, ``gdn``: the delta rule, ``softmax``)
this gives, in bytes for the rank's ``tokens = batch * seq_len / sp``:

- ``mixer``: what the token mixer keeps for backward: the model code's tensors (projections
  after their activations, per-head norms, gates, the short convolution's padded input and
  output) plus the operator's own;
- ``mlp``: the two RMSNorms, the mid-layer residual and the SwiGLU MLP (gate, up, SiLU(gate) and
  their product: ``4 * intermediate`` elements per token);
- ``forward_transient`` / ``backward_transient``: the most the layer holds on top of its saved
  tensors while its forward / backward runs (fp32 working copies, the recompute of a LASP-2
  segment, the gradients in flight). The operator's forward runs before the MLP's tensors exist,
  its backward after the MLP's backward freed them: its working set counts against the mixer's
  saved tensors only.

The layer input (``hidden`` elements per token, the residual stream) is not included: under
activation checkpointing it is the one thing kept per layer (:mod:`lasp.train.memory` adds it).

What the operators keep (read off :mod:`lasp.ops` and ``kernels/``):

- LASP-2 (``LASP2Causal``, every Triton path and the torch path with ``sp > 1``): its inputs
  (q, k, v and the gates; the delta rule also beta) and each segment's incoming fp32 state; the
  backward REBUILDS the segments: the recomputed chunk graph (torch) or the kernels' per-chunk
  states and factors (Triton) are the layer's backward transient. The Triton delta-rule segment
  keeps fp32 per-chunk ``K x V`` and ``K x K`` states of the whole shard in backward (the chunk
  states of three trajectories, their gradients and the ``D``/``E`` terms): at ``K = V = 128``
  that is 32 KiB per token and head group, the largest transient of a long-context GDN layer.
- The torch chunk path with ``sp = 1`` (one process, the CPU): plain autograd through
  :mod:`lasp.ops.chunk` / :mod:`lasp.ops.delta_chunk`. Its coefficients below (bytes per token, in
  multiples of ``H*K``, ``H*V``, ``H*C``, ``H*K*K/C``, ``H*K*V/C`` with ``C = 64`` tokens per chunk)
  count the tensors its graph saves: e.g. the diagonal path saves the chunked q, k, v as the
  copies ``matmul`` makes of its strided operands (``16 HK + 8 HV``), the scores (``4 HC``), the
  decay matrix (``4 HC``, with gates) and the states entering each chunk (``4 HKV/C``);
  ``tests/test_memory.py`` checks them against a census of the saved tensors.
- LASP-2H (``AllGatherSoftmax``, ``sp > 1``): q, the output, the fp32 log-sum-exp and the
  GATHERED keys and values up to the rank's last query (``end`` tokens, up to the whole sequence:
  rank 0 in the zigzag layout, the last rank in the contiguous one); its backward adds an fp32
  send buffer of ``P * 2 * T_local`` key/value rows (the whole sequence) and the key/value
  gradients of each block. One process: the flash kernel keeps q, k, v, the output and the
  log-sum-exp (``sdpa`` or the per-document pieces).

Storage aliasing (a view that keeps a larger tensor alive) is counted as the tensors the code
creates; the census test bounds the difference.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import DELTA_VARIANTS, QWEN_ARCHITECTURES, ModelConfig

TORCH_CHUNK = 64
"""Tokens per chunk of the torch paths (:data:`lasp.ops.chunk.DEFAULT_CHUNK_SIZE`, the delta rule's too)."""
TRITON_CHUNK = 64
"""Tokens per chunk of the Triton kernels for 16-bit inputs (``kernels.utils.DEFAULT_CHUNK``; the delta rule uses 32 for fp32)."""
PATHS = ("torch", "triton")


@dataclass(frozen=True)
class RankShape:
    """The tokens one rank holds and how it computes them.

    ``batch`` sequences of ``seq_len`` tokens (the whole sequence, over ``sp`` ranks in ``layout``);
    ``rank``: the SP rank (the softmax layers' gathered keys depend on it); ``dtype_bytes``: 4 (fp32)
    or 2 (bf16 / fp16); ``path``: ``torch`` (the CPU) or ``triton`` (CUDA kernels);
    ``documents``: packed documents (the linear layers then get a reset gate).
    """

    batch: int
    seq_len: int
    sp: int = 1
    rank: int = 0
    layout: str = "contiguous"
    dtype_bytes: int = 2
    path: str = "triton"
    documents: bool = False

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"dtype_bytes must be 2 or 4, got {self.dtype_bytes}")
        if not 0 <= self.rank < self.sp:
            raise ValueError(f"rank must be in [0, sp={self.sp}), got {self.rank}")

    @property
    def tokens(self) -> int:
        """Tokens on this rank per micro-batch: ``batch * seq_len / sp``."""
        return self.batch * self.seq_len // self.sp

    @property
    def segments(self) -> int:
        """Segments per sequence on a rank: 1 (contiguous, or one rank), 2 (zigzag)."""
        return 2 if self.layout == "zigzag" and self.sp > 1 else 1

    @property
    def keys_end(self) -> int:
        """Gathered key tokens per sequence this rank keeps in a LASP-2H softmax layer."""
        t_local = self.seq_len // self.sp
        if self.layout == "zigzag":
            return (2 * self.sp - self.rank) * (t_local // 2)
        return (self.rank + 1) * t_local


@dataclass(frozen=True)
class LayerMemory:
    """Bytes of one decoder layer on one rank (see the module docstring)."""

    kind: str
    mixer: int
    mlp: int
    forward_transient: int
    backward_transient: int

    @property
    def saved(self) -> int:
        """What the layer keeps from its forward until its backward (without its input)."""
        return self.mixer + self.mlp


def layer_kind(cfg: ModelConfig, layer_type: str) -> str:
    """``linear`` | ``gdn`` | ``softmax`` of a layer of ``cfg.layer_types``."""
    if layer_type == "softmax":
        return "softmax"
    return "gdn" if cfg.architecture in QWEN_ARCHITECTURES or cfg.linear_variant in DELTA_VARIANTS else "linear"


def layer_kinds(cfg: ModelConfig) -> dict[str, int]:
    """How many layers of each kind the model has (in first-appearance order)."""
    out: dict[str, int] = {}
    for t in cfg.layer_types:
        k = layer_kind(cfg, t)
        out[k] = out.get(k, 0) + 1
    return out


def layer_memory(cfg: ModelConfig, kind: str, shape: RankShape) -> LayerMemory:
    """The memory of one layer of ``kind`` (``linear`` | ``gdn`` | ``softmax``) on the rank ``shape``."""
    mixer = {"linear": _linear, "gdn": _gdn, "softmax": _softmax}[kind]
    m_tok, m_layer, m_fwd, m_bwd = mixer(cfg, shape)
    e, h, n = shape.dtype_bytes, cfg.hidden_size, shape.tokens
    mlp_tok = _norm(h, e) + e * h + _norm(h, e) + 4 * e * cfg.intermediate_size  # attn_norm, residual, mlp_norm, SwiGLU
    mlp_bwd = 2 * e * cfg.intermediate_size  # gradients of the SwiGLU intermediates (net of what their backward frees)
    flow = e * h  # the gradient reaching the layer
    # the operator's forward runs before the MLP exists; its backward after the MLP's (and the
    # output side's) saved tensors are freed: the peaks above the layer's saved tensors are
    return LayerMemory(
        kind=kind,
        mixer=int(m_tok * n + m_layer),
        mlp=int(mlp_tok * n),
        forward_transient=int(max(0.0, m_fwd - mlp_tok) * n),
        backward_transient=int((flow + max(mlp_bwd, m_bwd - mlp_tok)) * n),
    )


# ----------------------------------------------------------------------------- pieces (bytes per token)


def _f32_copy(e: int) -> int:
    """Bytes per element of the fp32 copy ``x.float()`` makes of an ``e``-byte tensor (none in fp32)."""
    return 0 if e == 4 else 4


def _norm(n: int, e: int, *, out_saved: bool = True, rows: int = 1) -> float:
    """An RMSNorm over ``n`` features (computed in fp32): its input's fp32 copy, the normalised x,
    its output when the consumer (a Linear) keeps it, ``1/rms`` per row. Its input is counted by
    whoever made it."""
    return n * (_f32_copy(e) + 4 + (e if out_saved else 0)) + 4 * rows


def _diag_chunk_graph(H: int, K: int, V: int, e: int, gates: bool, gate_grad: bool) -> float:
    """What autograd keeps of :mod:`lasp.ops.chunk` on one process (see the module docstring):
    ``matmul``'s copies of the chunked q, k (twice each) and v (twice), the scores, the decay
    matrix (gates), the states entering each chunk; a learned gate adds the raw scores, the masks
    and the scan's per-chunk states."""
    C = TORCH_CHUNK
    b = 16 * H * K + 8 * H * V + 4 * H * C + 4 * H * K * V / C
    if gates:
        b += 4 * H * C
    if gate_grad:
        b += 5 * H * C + 3.5 * H * K * V / C + (8 * H * K if e != 4 else 0)
    return b


def _delta_chunk_graph(H: int, K: int, V: int, e: int, nk: int | None = None) -> float:
    """What autograd keeps of :mod:`lasp.ops.delta_chunk` on one process (q/k L2 norm, gates): the
    chunked q, k (normalised), the WY factors W and U0, the ``[C, C]`` decay, ``L`` and its solve,
    the per-chunk maps ``A_c``, ``M_c`` and the scan's states. ``nk`` q/k heads for ``H`` value heads
    (GVA, default H): the q/k tensors and their ``K K^T`` are kept once per q/k head, about
    ``(36 K + 8 C)`` bytes per token and head less for each value head beyond its q/k head (44 K
    with 16-bit inputs; fitted on a census at K = 16, 32)."""
    C = TORCH_CHUNK
    x = 0 if e == 4 else 1
    full = (40 + 8 * x) * H * K + (4 + 4 * x) * H * V + 24 * H * C + 4 * H * K * K / C + 7.5 * H * K * V / C
    return full - (H - (nk or H)) * ((36 + 8 * x) * K + 8 * C)


def _lasp2_triton_transients(H: int, K: int, V: int, e: int, delta: bool, sp: int, segments: int = 1,
                             nk: int | None = None) -> tuple[float, float]:
    """Forward / backward working set of the Triton segments (``kernels/``), bytes per token
    (``nk``: the delta rule's q/k heads, default H)."""
    if not delta:
        s = 2 if e == 2 else 4  # state snapshots: bf16 for 16-bit inputs
        C = TRITON_CHUNK
        fwd = s * H * K * V / C + 4 * H * V + 8 * H  # snapshots h, the fp32 output, gate sums
        bwd = 2 * s * H * K * V / C + e * H * V + e * (2 * H * K + H * V) + 4 * H * (K // min(K, 64)) + 12 * H
        return fwd, bwd
    C = TRITON_CHUNK if e == 2 else 32
    factors = 8 * (nk or H) * K + 4 * H * K + 4 * H * V + 8 * H  # qn, kn (per q/k head), w, u, the gate sums, fp32
    kv, kk = 4 * H * K * V / C, 4 * H * K * K / C  # one fp32 state per chunk
    fwd = factors + 2 * kv + 4 * H * V  # Ms, the outputs' pass, the fp32 output
    # backward: the rebuilt factors and passes (Ms, S_out), the fp32 dO, dh (= E) and D; then either
    # the summary's reverse passes of a segment that is not the sequence's last (dhM, dhA, P and
    # their products: one segment at a time) or the local backward's fp32 input gradients
    base = factors + 4 * H * V + 3 * kv + kk
    summary = (kv + 5 * kk) / segments if sp > 1 else 0.0
    bwd = base + max(summary, 8 * H * K + 4 * H * V + 8 * H)
    return fwd, bwd


def _linear(cfg: ModelConfig, s: RankShape):
    """The diagonal-decay linear mixer (:class:`lasp.models.mixers.LinearAttention`)."""
    e, H, D = s.dtype_bytes, cfg.num_heads, cfg.head_dim
    HD = H * D
    gate_grad = cfg.linear_variant == "simple_gla"
    gates = gate_grad or cfg.linear_variant in ("lightning", "retention") or s.documents
    tok = 0.0
    if cfg.feature_map != "identity":
        tok += 2 * e * HD  # the activation's saved inputs (q, k)
    if gate_grad:
        tok += e * cfg.gate_low_rank_dim + 8 * H + e * H  # the low-rank projection, logsigmoid's input and buffer
    tok += e * HD + (_norm(D, e, rows=1) * H if cfg.output_norm else 0)  # the operator's output (o_proj or o_norm keeps it)
    layer = 0
    if s.path == "torch" and s.sp == 1:
        op = _diag_chunk_graph(H, D, D, e, gates, gate_grad)
        fwd, bwd = (0.4 if e == 4 else 0.5) * op, 0.0
    else:
        op = 3 * e * HD + (4 * H if gates else 0)  # LASP-2 keeps q, k, v and the gates
        layer = s.segments * s.batch * H * D * D * 4  # and each segment's incoming fp32 state
        if s.path == "torch":  # the segment graph: built and dropped in forward, rebuilt in backward
            graph = _diag_chunk_graph(H, D, D, e, gates, gate_grad)
            fwd, bwd = (0.65 if e == 4 else 1.0) * graph, (1.8 if e == 4 else 2.2) * graph
        else:
            fwd, bwd = _lasp2_triton_transients(H, D, D, e, False, s.sp)
    bwd += e * 3 * HD  # dq, dk, dv
    return tok + op, layer, fwd, bwd


def _gdn_dims(cfg: ModelConfig) -> tuple[int, int, int, int, bool]:
    """``(q/k heads, value heads, key dim, value dim, Qwen3.5 layer)`` of a delta-rule layer (the
    operator takes the grouped value heads as they are: q, k are never repeated)."""
    if cfg.architecture in QWEN_ARCHITECTURES:
        nk, nv, dk, dv = cfg.linear_dims
        return nk, nv, dk, dv, True
    return cfg.num_heads, cfg.num_heads, cfg.head_dim, cfg.head_dim, False


def _gdn(cfg: ModelConfig, s: RankShape):
    """The delta-rule mixer (:class:`lasp.models.delta_mixer.GatedDeltaNet`,
    :class:`lasp.models.qwen3_5.Qwen35GatedDeltaNet`)."""
    e = s.dtype_bytes
    nk, H, K, V, qwen = _gdn_dims(cfg)
    conv = 2 * nk * K + H * V  # the [q | k | v] channels
    tok = 3 * e * conv  # the convolution's padded input, its output (SiLU's input), SiLU's output (q, k, v)
    if qwen:
        tok += e * H + _f32_copy(e) * H  # sigmoid's output, its fp32 copy (beta)
    else:
        tok += 4 * H  # beta = sigmoid(.float())
    tok += 12 * H  # g: softplus's input, its output, the product
    # the gated output norm: o, the norm's internals, its output in fp32, z in fp32, SiLU(z), the product
    tok += e * H * V + _norm(V, e, out_saved=False) * H + 4 * H * V * 3 + e * H * V
    layer = 0
    if s.path == "torch" and s.sp == 1:
        op = _delta_chunk_graph(H, K, V, e, nk)
        fwd, bwd = (0.2 if e == 4 else 0.1) * op, 0.0
    else:
        op = 0.0  # LASP-2 keeps q, k, v, beta, g: counted above (the same tensors)
        layer = s.segments * s.batch * H * K * V * 4  # each segment's incoming fp32 state
        if s.path == "torch":  # the segment graph: built and dropped in forward, rebuilt in backward
            graph = _delta_chunk_graph(H, K, V, e, nk)
            fwd, bwd = 0.65 * graph, 1.6 * graph
        else:
            fwd, bwd = _lasp2_triton_transients(H, K, V, e, True, s.sp, s.segments, nk)
    bwd += e * (conv + H * V)  # the gradients of q, k, v and the convolution's
    return tok + op, layer, fwd, bwd


def _softmax(cfg: ModelConfig, s: RankShape):
    """The softmax mixer (:class:`lasp.models.mixers.SoftmaxAttention`, :class:`lasp.models.qwen3_5.Qwen35Attention`)."""
    e, H, Hkv, D = s.dtype_bytes, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    HD, KD = H * D, Hkv * D
    qwen = cfg.architecture in QWEN_ARCHITECTURES
    # one process without documents: SDPA's output is laid out [B, T, H, D], so the reshape that
    # o_proj (or the output gate) takes is a view of it; the other paths return a transposed view
    # of a [B, H, T, D] tensor and the reshape copies
    reshape = 0 if s.sp == 1 and not s.documents else e * HD
    tok = e * HD  # q after RoPE (the operator keeps it)
    if qwen:
        # per-head q/k norms (input in fp32: a copy, or in fp32 a view of the projection), the
        # output gate: the attention output reshaped, sigmoid(gate), their product (o_proj's input)
        tok += (8 * HD if e == 4 else 4 * HD) + 4 * HD + 4 * H + 4 * KD + 4 * KD + 4 * Hkv + 2 * e * HD + reshape
    else:
        tok += reshape  # o_proj's input (the output reshaped)
    tok += e * HD + 4 * H  # the operator's output and fp32 log-sum-exp
    layer = 0
    if s.sp == 1 or cfg.softmax_method != "allgather":
        tok += 2 * e * KD  # k (after RoPE) and v
        fwd = 4 * HD + 4 * H + (e * 2 * KD if cfg.softmax_method == "ulysses" and s.sp > 1 else 0)
        bwd = 4 * HD + 8 * KD + e * (HD + 2 * KD)
        if cfg.softmax_method == "ring" and s.sp > 1:
            fwd += 2 * e * 2 * KD  # the K/V blocks in flight
            bwd += 2 * e * 2 * KD + 2 * 4 * 2 * KD
    else:
        end = s.batch * s.keys_end
        layer = 2 * e * KD * end  # the gathered keys and values [2, B, end, H_kv, D]
        gathered = 2 * e * KD * s.batch * s.seq_len  # the all-gather's receive buffer (forward)
        fwd = 4 * HD + 4 * H
        # backward: the fp32 send buffer of every rank's key/value rows, dq in fp32, the key/value
        # gradients of the largest block, the reduce-scattered result
        send = 2 * 4 * KD * s.batch * s.seq_len
        block = 2 * e * KD * end
        return tok, layer, fwd + gathered / s.tokens, 4 * HD + e * HD + (send + block) / s.tokens + 8 * KD
    return tok, layer, fwd, bwd
