"""Per-rank memory of a training step, estimated in closed form (``lasp model-info --memory``).

    est = estimate_memory(cfg, seq_len=1 << 20, sp=8, dp=1, zero=3, dtype="bf16",
                          activation_checkpointing=True, device_memory=141 << 30)
    est.total, est.fits, est.as_dict()

The terms, per rank (``N = sp * dp`` ranks: lasp's DeepSpeed data-parallel group is the WHOLE
world, :mod:`lasp.train.ds_config`, so ZeRO partitions over SP ranks too; every rank of an SP
group otherwise holds the same replica):

- **parameters, gradients, optimizer states** (``P`` parameters, ``e`` bytes of the training
  dtype), DeepSpeed's layout (torch AdamW: fp32 ``m`` and ``v``):

  ======  ============  ============  ==================================================
  ZeRO    parameters    gradients     optimizer states
  ======  ============  ============  ==================================================
  0       ``e P``       ``e P``       ``8 P`` (+ ``4 P`` fp32 master when e < 4)
  1       ``e P``       ``e P``       ``12 P / N`` (fp32 master + m + v)
  2       ``e P``       ``e P / N``   ``12 P / N``
  3       ``e P / N``   ``e P / N``   ``12 P / N``
  ======  ============  ============  ==================================================

  plus DeepSpeed's buffers (ZeRO 1-3: the gradient reduce bucket, ``reduce_bucket_size`` = 5e8
  elements, fp32 for ZeRO-1, ``e`` bytes for 2 and 3; on the CPU only the part a model touches
  counts in RSS) and, under ZeRO-3, the largest module's gathered parameters (the embedding or the
  LM head: lasp gathers one module at a time, no prefetch).
- **saved activations** (:mod:`lasp.models.activation_memory`, per layer kind): without
  checkpointing every layer's ``saved`` plus its input; with checkpointing each layer's input
  (``hidden`` elements per token in the training dtype) only, and with offload none of that on the
  device (``host_offload`` on the host instead; on the CPU the host is the device, so the total
  does not change).
- **the largest transient** during forward and backward, on top of the above, the biggest of: one
  layer's forward or backward working set (under checkpointing its recompute too: its saved
  tensors again), the loss (one chunk
  of fp32 logits of the fused linear cross-entropy, ``default_chunk_size(V)`` = ``max(1, 256 MiB //
  (4 V))`` tokens (:mod:`lasp.ops.cross_entropy`), and its
  kept fp32 ``dweight``; the plain path: ``[T_local, V]`` logits, log-softmax and their gradient),
  and separately the optimizer step's (the fp32 gradient of the master partition and AdamW's
  temporaries), which runs after the activations are freed.
- **runtime**: CUDA: context, cuBLAS workspace and NCCL buffers, ASSUMED 2 GiB, not measured here;
  CPU: the process's resident torch + DeepSpeed + gloo, MEASURED (:data:`CPU_RUNTIME_BYTES`, the
  ``runtime`` point of ``lasp bench memory``); the CPU peak is the process's max RSS.

``total = parameters + gradients + optimizer_states + zero_buffers + max(activations + transient,
optimizer_step) + runtime``. Checked against measured peaks in ``docs/bench/memory/`` (``lasp bench memory``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..models.activation_memory import LayerMemory, RankShape, layer_kinds, layer_memory
from ..models.config import ModelConfig
from ..ops.cross_entropy import CHUNK_BYTES, default_chunk_size

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEVICES = ("cuda", "cpu")
LOSSES = ("fused", "plain")
REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` (elements); lasp does not change it."""
CUDA_RUNTIME_BYTES = 2 << 30
"""Assumed: CUDA context (~0.5 GiB), cuBLAS workspace, NCCL buffers. Not measured here (no GPU)."""
CPU_RUNTIME_BYTES = 435 << 20
"""Measured on this project's CPU machine: max RSS of a ``lasp train`` rank beyond what its tensors
need (torch, DeepSpeed, gloo, Python; ``lasp bench memory``'s ``runtime`` point)."""
PCIE_BYTES_PER_S = 25e9
"""Assumed host <-> device copy rate of the offload (pinned memory, PCIe Gen5 x16, one direction)."""


def parse_size(text: str | int, *, binary: bool = True) -> int:
    """``1M`` / ``256K`` / ``8192`` tokens, or ``141GiB`` / ``80GB`` / ``2GiB`` bytes -> int.

    ``K``, ``M``, ``G``, ``T`` (and ``Ki``... ``GiB``) are powers of 1024; ``KB``, ``MB``, ``GB``,
    ``TB`` powers of 1000 (``binary=False``: plain ``K``, ``M``, ``G`` too)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size like 8192, 256K, 1M, 80GB or 141GiB, got {text!r}")
    number, unit, i, b = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1024 if (i or not b) and (binary or i) else 1000
    return int(float(number) * base**power)


@dataclass
class MemoryEstimate:
    """Bytes per rank (see the module docstring); ``as_dict()`` for JSON."""

    setup: dict
    parameters: int
    gradients: int
    optimizer_states: int
    zero_buffers: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    transient: int
    transient_source: str
    optimizer_step: int
    runtime: int
    host_offload: int
    #: seconds per micro-step the offload's copies take (device -> host in forward, back in backward)
    offload_copy_seconds: float
    layers: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    device_memory: int | None = None

    @property
    def states(self) -> int:
        """Parameters, gradients, optimizer states and ZeRO's buffers."""
        return self.parameters + self.gradients + self.optimizer_states + self.zero_buffers

    @property
    def total(self) -> int:
        """The peak: the states, the larger of (saved activations + the largest transient) and the
        optimizer step's transient (activations are freed by then), the runtime."""
        return self.states + max(self.activations + self.transient, self.optimizer_step) + self.runtime

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(states=self.states, total=self.total, fits=self.fits)
        return d


def zero_states(n_params: int, zero: int, e: int, world: int, device: str, largest_module: int) -> dict[str, int]:
    """``parameters``, ``gradients``, ``optimizer_states``, ``zero_buffers`` and ``step`` (the optimizer
    step's transient) in bytes per rank (the table of the module docstring)."""
    P, N = n_params, world
    shard = P / N
    params = e * (P if zero < 3 else shard)
    grads = e * (P if zero < 2 else shard)
    if zero == 0:
        optim = 8 * P + (0 if e == 4 else 4 * P)
        step = (0 if e == 4 else 4 * P) + 4 * (P if device == "cuda" else largest_module)  # fp32 grads; AdamW's temporaries
    else:
        optim = 12 * shard
        step = 4 * shard + 4 * shard  # the fp32 gradient of the partition; AdamW's temporaries (one flat tensor)
    buffers = 0
    if zero >= 1:
        touched = REDUCE_BUCKET if device == "cuda" else min(REDUCE_BUCKET, P)
        buffers += touched * (4 if zero == 1 else e)
    if zero == 3:
        buffers += e * largest_module  # one module's parameters, gathered
    return dict(parameters=int(params), gradients=int(grads), optimizer_states=int(optim), zero_buffers=int(buffers), step=int(step))


def loss_memory(cfg: ModelConfig, tokens: int, e: int, loss: str) -> dict[str, int]:
    """The LM head and loss: ``kept`` (from the end of forward to the start of backward) and
    ``transient`` (on top, while the loss runs), bytes.

    fused (:func:`lasp.linear_cross_entropy`, what the model computes when given labels, and so
    ``lasp train``): gradients computed in forward and kept: ``dhidden``
    (``e h`` per token) and the fp32 ``dweight [V, h]``; one chunk of fp32 logits (+ its bf16 source
    and gradient copy) at a time, and for 16-bit inputs one ``[V-block, h]`` product of at most 256 MiB;
    the backward's ``dweight`` cast. plain (a caller that builds the logits, as ``lasp train`` did
    before the fused loss): the fp32 logits ``[T_local, V]`` (held by the caller), the log-softmax,
    in backward their two gradients."""
    V, h = cfg.vocab_size, cfg.hidden_size
    if loss == "plain":
        kept = 4 * V * tokens + 4 * V * tokens
        return dict(kept=kept, transient=8 * V * tokens + (e * V * tokens if e != 4 else 0), chunk_tokens=tokens)
    chunk = min(tokens, default_chunk_size(V))
    kept = e * h * tokens + 4 * V * h + 4 * tokens
    transient = 4 * V * chunk + (2 * e * V * chunk if e != 4 else 0) + (min(CHUNK_BYTES, e * V * h) if e != 4 else 0)
    return dict(kept=kept, transient=max(transient, e * V * h), chunk_tokens=chunk)


def _f32(e: int) -> int:
    return 0 if e == 4 else 4


def _worst_rank(cfg: ModelConfig, sp: int, layout: str) -> int:
    """The SP rank that keeps the most gathered keys (softmax layers): 0 (zigzag), P-1 (contiguous)."""
    if "softmax" not in cfg.layer_types:
        return 0
    return 0 if layout == "zigzag" else sp - 1


def estimate_memory(
    cfg: ModelConfig,
    *,
    seq_len: int,
    sp: int = 1,
    dp: int = 1,
    zero: int = 1,
    dtype: str = "bf16",
    micro_batch: int = 1,
    activation_checkpointing: bool = False,
    activation_offload: bool = False,
    layout: str = "zigzag",
    device: str = "cuda",
    rank: int | None = None,
    documents: bool = False,
    loss: str = "fused",
    device_memory: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one training step on one rank (bytes; see the module docstring).

    Args:
        cfg: the model. seq_len: tokens per sequence (the whole sequence, over ``sp`` ranks).
        sp, dp: sequence- and data-parallel sizes (world = sp * dp). zero: ZeRO stage 0-3.
        dtype: ``fp32`` | ``bf16`` | ``fp16``. micro_batch: sequences per rank per micro-step.
        activation_checkpointing: recompute each decoder layer in backward; activation_offload:
            also keep the checkpointed layer inputs in host memory (implies checkpointing).
        layout: ``zigzag`` | ``contiguous``. device: ``cuda`` (Triton kernels, the allocator's
            peak) or ``cpu`` (the torch path, the process's max RSS). rank: the SP rank (default:
            the one with the most memory). documents: packed documents. loss: ``fused`` (what
            ``lasp train`` uses) | ``plain``. device_memory: bytes, for ``fits``.
    """
    for name, value in (("seq_len", seq_len), ("sp", sp), ("dp", dp), ("micro_batch", micro_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero!r}")
    if cfg.mlp != "dense":
        raise ValueError(f"the memory estimate models dense MLPs; mlp={cfg.mlp!r} (mixture of experts) is not modelled yet")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    from ..parallel import check_shardable

    check_shardable(seq_len, sp, layout, name="seq_len")
    rank = _worst_rank(cfg, sp, layout) if rank is None else rank
    ckpt = activation_checkpointing or activation_offload
    e = DTYPE_BYTES[dtype]
    shape = RankShape(micro_batch, seq_len, sp, rank, layout, e, "triton" if device == "cuda" else "torch", documents)
    n = shape.tokens
    from ..models.info import count_params

    P = count_params(cfg)
    largest = cfg.vocab_size * cfg.hidden_size
    states = zero_states(P, zero, e, sp * dp, device, largest)

    kinds = layer_kinds(cfg)
    per_kind: dict[str, LayerMemory] = {k: layer_memory(cfg, k, shape) for k in kinds}
    x = e * cfg.hidden_size * n  # one layer's input (the residual stream)
    rope = 2 * 4 * (cfg.rope_dim // 2) * n  # cos, sin (fp32, shared by the layers)
    # the final norm: its input (the last layer's output), fp32 copy, normalised x; the plain LM head
    # also keeps its input (the fused loss keeps its gradients instead: ``loss_memory``)
    head = e * cfg.hidden_size * n + (_f32(e) + 4) * cfg.hidden_size * n + (e * cfg.hidden_size * n if loss == "plain" else 0)
    lossm = loss_memory(cfg, n, e, loss)
    embed = 8 * n  # the token ids the embedding's backward keeps
    full = sum(count * (x + per_kind[k].saved) for k, count in kinds.items()) + rope + head + embed
    kept_ckpt = cfg.num_layers * x + rope + head + embed
    # offloaded inputs leave the device; on the CPU the host is the device (the RSS holds them)
    on_device = (rope + head + embed) if activation_offload and device == "cuda" else kept_ckpt
    activations = on_device if ckpt else full

    candidates = {"loss": lossm["transient"] + lossm["kept"]}
    for k, lm in per_kind.items():
        if ckpt:  # the recompute keeps the layer's saved tensors while its backward runs; its output,
            # and with offload its input back on the device
            candidates[f"{k} layer recompute + backward"] = (lm.saved + max(lm.forward_transient, lm.backward_transient)
                                                             + x * (2 if activation_offload else 1))
        else:
            candidates[f"{k} layer forward"] = lm.forward_transient
            candidates[f"{k} layer backward"] = lm.backward_transient
    source = max(candidates, key=candidates.get)
    step = states.pop("step")
    host = cfg.num_layers * x + rope * cfg.num_layers if activation_offload else 0
    est = MemoryEstimate(
        setup=dict(seq_len=seq_len, sp=sp, dp=dp, zero=zero, dtype=dtype, micro_batch=micro_batch,
                   activation_checkpointing=ckpt, activation_offload=activation_offload, layout=layout, device=device,
                   rank=rank, documents=documents, loss=loss, tokens_per_rank=n, parameters=P),
        **states,
        activations=int(activations),
        activations_no_checkpointing=int(full),
        activations_checkpointing=int(on_device if activation_offload else kept_ckpt),
        transient=int(candidates[source]),
        transient_source=source,
        optimizer_step=int(step),
        runtime=CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
        host_offload=int(host),
        offload_copy_seconds=2 * host / PCIE_BYTES_PER_S if device == "cuda" else 0.0,
        layers={k: dict(count=c, **dataclasses.asdict(per_kind[k]), saved=per_kind[k].saved, input=x) for k, c in kinds.items()},
        loss=dict(kind=loss, **lossm),
        device_memory=device_memory,
    )
    return est


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.50 KiB`` (powers of 1024)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def describe_estimate(est: MemoryEstimate) -> str:
    """The text ``lasp model-info --memory`` prints for one estimate."""
    s = est.setup
    world = s["sp"] * s["dp"]
    mode = "offload of the checkpointed inputs" if s["activation_offload"] else (
        "activation checkpointing" if s["activation_checkpointing"] else "no checkpointing")
    zero_over = "" if s["zero"] == 0 else f", ZeRO over all {world} ranks"
    lines = [
        f"memory per rank (SP rank {s['rank']}): seq_len {s['seq_len']:,} x micro-batch {s['micro_batch']} = "
        f"{s['tokens_per_rank']:,} tokens per rank; SP {s['sp']} x DP {s['dp']}, ZeRO-{s['zero']}{zero_over}, {s['dtype']}, "
        f"{s['layout']}, {mode}, {s['device']} ({'Triton kernels, allocator peak' if s['device'] == 'cuda' else 'torch path, max RSS'})",
        f"  {'parameters':<22}{fmt_bytes(est.parameters):>12}   {s['parameters']:,} parameters",
        f"  {'gradients':<22}{fmt_bytes(est.gradients):>12}",
        f"  {'optimizer states':<22}{fmt_bytes(est.optimizer_states):>12}   AdamW m, v fp32"
        + ("" if s["dtype"] == "fp32" and s["zero"] == 0 else " + fp32 master"),
        f"  {'ZeRO buffers':<22}{fmt_bytes(est.zero_buffers):>12}   gradient reduce bucket" + (", one gathered module" if s["zero"] == 3 else ""),
        f"  {'saved activations':<22}{fmt_bytes(est.activations):>12}   without checkpointing {fmt_bytes(est.activations_no_checkpointing)}, "
        f"with {fmt_bytes(est.activations_checkpointing)}" + (" (offload: what stays on the device)" if s["activation_offload"] else ""),
    ]
    for kind, lm in est.layers.items():
        lines.append(
            f"    {kind:<8} x{lm['count']:<3} per layer {fmt_bytes(lm['saved']):>11} (mixer {fmt_bytes(lm['mixer'])}, norms + MLP "
            f"{fmt_bytes(lm['mlp'])}; input {fmt_bytes(lm['input'])}); peak above that in forward {fmt_bytes(lm['forward_transient'])}, "
            f"in backward {fmt_bytes(lm['backward_transient'])}"
        )
    loss = est.loss
    lines += [
        f"    {'loss':<8} {loss['kind']}: kept {fmt_bytes(loss['kept'])}, transient {fmt_bytes(loss['transient'])} "
        f"({loss['chunk_tokens']:,}-token chunks of fp32 logits)" if loss["kind"] == "fused" else
        f"    {'loss':<8} plain: kept {fmt_bytes(loss['kept'])} (fp32 logits, log-softmax), transient {fmt_bytes(loss['transient'])}",
        f"  {'largest transient':<22}{fmt_bytes(est.transient):>12}   {est.transient_source}",
        f"  {'optimizer step':<22}{fmt_bytes(est.optimizer_step):>12}   after backward (activations freed)",
        f"  {'runtime':<22}{fmt_bytes(est.runtime):>12}   "
        + ("CUDA context, cuBLAS, NCCL (assumed)" if s["device"] == "cuda" else "torch + DeepSpeed + gloo resident (measured)"),
    ]
    fit = ""
    if est.device_memory is not None:
        fit = f"   {'fits' if est.fits else 'does NOT fit'} in {fmt_bytes(est.device_memory)}"
    lines.append(f"  {'total':<22}{fmt_bytes(est.total):>12}{fit}")
    if s["activation_offload"]:
        rate = ""
        if s["device"] == "cuda":
            rate = f"; about {est.offload_copy_seconds:.2f} s of copies per micro-step at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s each way"
        lines.append(f"  {'host (offload)':<22}{fmt_bytes(est.host_offload):>12}   pinned host memory for the checkpointed inputs{rate}")
    return "\n".join(lines)
