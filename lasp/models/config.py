"""``ModelConfig``: the Linear-Llama3 model family as a typed dataclass <-> YAML.

Every field has a default, so a YAML file lists only what differs. Loading is strict: an
unknown key, a wrong type or an inconsistent shape is a ``ValueError`` that names the key and
the file (``source``) it came from.

The depth is ``layer_pattern`` repeated: ``"L"`` = pure linear, ``"S"`` = plain Llama,
``"LLLS"`` = 1/4 softmax, ``"LLLLLLLS"`` = 1/8, ``"LS"`` = 1/2. ``num_layers`` must be a
multiple of the pattern's length (a full-depth pattern is allowed too).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import yaml

from ..config_loader import build, coerce_fields, read_yaml
from ..ops.checks import BACKENDS, LINEAR_METHOD_NAMES, SOFTMAX_METHOD_NAMES
from .rope import check_rope_scaling

LINEAR_VARIANTS = ("basic", "lightning", "retention", "simple_gla")
DELTA_VARIANTS = ("gated_deltanet", "deltanet")  # delta-rule linear layers (lasp.models.delta_mixer)
FEATURE_MAPS = ("identity", "elu+1", "silu", "relu")
LAYER_KINDS = {"L": "linear", "S": "softmax"}
ARCHITECTURES = ("linear_llama", "qwen3_5", "qwen3_next")
#: the Qwen decoders built from :mod:`lasp.models.qwen3_5`'s layers (Qwen3-Next's are the same math;
#: its Hugging Face checkpoints fuse the GDN input projections: :mod:`lasp.models.hf_tensors`)
QWEN_ARCHITECTURES = ("qwen3_5", "qwen3_next")
# per-layer names accepted in ``layer_types`` (Hugging Face's names too) -> kind
LAYER_TYPE_NAMES = {"linear": "linear", "softmax": "softmax", "linear_attention": "linear", "full_attention": "softmax"}
MLP_KINDS = ("dense", "moe")
# the sparse-MoE keys (transformers' Qwen3.5-MoE / Qwen3-Next names); with mlp: dense they must keep their defaults
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
            "router_aux_loss_coef", "router_z_loss_coef", "decoder_sparse_step", "mlp_only_layers")


@dataclass
class ModelConfig:
    """Shape and flavour of a Linear-Llama3 model (Llama-3 decoder, linear/softmax token mixers).

    Linear layers use ``num_heads`` heads for q, k and v (linear attention has no GQA);
    softmax layers use ``num_kv_heads`` key/value heads (GQA). ``head_dim = hidden_size // num_heads``
    unless ``attention_head_dim`` is given.

    ``architecture: qwen3_5`` is the Qwen3.5 text decoder (:mod:`lasp.models.qwen3_5`): Gated
    DeltaNet linear layers with ``linear_num_key_heads`` q/k heads of ``linear_key_head_dim`` and
    ``linear_num_value_heads`` value heads of ``linear_value_head_dim``; gated softmax attention
    with per-head q/k norms, GQA and partial RoPE (``partial_rotary_factor``); RMSNorms stored as
    offsets from 1. ``layer_types`` (per layer ``linear``/``softmax``, or Hugging Face's
    ``linear_attention``/``full_attention``) may replace ``layer_pattern``; after construction
    ``layer_types`` always holds the ``linear``/``softmax`` kind of every layer and
    ``layer_pattern`` the matching letters. ``architecture: qwen3_next`` is Qwen3-Next's decoder:
    the same layers and parameters (its Hugging Face checkpoints store the GDN input projections
    fused, ``in_proj_qkvz`` / ``in_proj_ba``, which :mod:`lasp.models.hf_tensors` splits and re-fuses).

    ``rope_scaling`` (None: plain RoPE of base ``rope_theta``) takes Hugging Face's keys:
    ``{rope_type: yarn, factor, original_max_position_embeddings, ...}`` or ``{rope_type: linear,
    factor}`` (:mod:`lasp.models.rope`; ``type`` is read as ``rope_type``).

    ``mlp: moe`` makes the MLP of every layer a sparse mixture of experts
    (:class:`lasp.models.moe.SparseMoeBlock`) except the layers in ``mlp_only_layers`` and those
    ``decoder_sparse_step`` skips (transformers' rule: layer ``i`` is sparse when
    ``(i + 1) % decoder_sparse_step == 0``); the others keep the dense SwiGLU of ``intermediate_size``.
    """

    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None -> num_heads (softmax layers only)
    layer_pattern: str = "L"
    layer_types: list[str] | None = None  # per-layer kinds; overrides layer_pattern when given
    architecture: str = "linear_llama"  # linear_llama | qwen3_5 | qwen3_next
    attention_head_dim: int | None = None  # None -> hidden_size // num_heads
    partial_rotary_factor: float = 1.0  # fraction of head_dim rotated by RoPE (softmax layers)
    linear_num_key_heads: int | None = None  # qwen3_5: q/k heads of the GDN layers (None -> num_heads)
    linear_num_value_heads: int | None = None  # qwen3_5: value heads of the GDN layers (None -> num_heads)
    linear_key_head_dim: int | None = None  # qwen3_5 (None -> head_dim)
    linear_value_head_dim: int | None = None  # qwen3_5 (None -> head_dim)
    # linear layers
    linear_variant: str = "basic"
    feature_map: str = "identity"
    output_norm: bool = True  # RMSNorm over each head's output before o_proj (TransNormerLLM / LASP-2)
    linear_rope: bool = False  # also rotate q/k of linear layers (global positions)
    gate_low_rank_dim: int = 16  # simple_gla: hidden -> rank -> heads gate projection
    gate_logit_normalizer: float = 16.0  # simple_gla: g = logsigmoid(gate) / normalizer
    conv_size: int = 4  # gated_deltanet / deltanet: width of the short causal convolution over q, k, v
    linear_method: str = "lasp2"
    linear_backend: str = "auto"
    # softmax layers
    softmax_method: str = "allgather"
    # mixture of experts (mlp: moe; transformers' Qwen3.5-MoE / Qwen3-Next names)
    mlp: str = "dense"  # dense | moe
    num_experts: int = 8
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: int | None = None  # each routed expert's SwiGLU width (None -> intermediate_size)
    shared_expert_intermediate_size: int = 0  # the sigmoid-gated shared expert's width (0 = no shared expert)
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum 1
    router_aux_loss_coef: float = 0.001  # load-balancing loss weight in the training objective
    router_z_loss_coef: float = 0.0  # router z-loss weight (0 = off)
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)  # layers that keep the dense MLP
    # shared
    rope_theta: float = 500000.0
    # None: plain RoPE; or Hugging Face's keys, e.g. {rope_type: yarn, factor: 4.0,
    # original_max_position_embeddings: 262144} (lasp.models.rope: linear, yarn)
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    max_seq_len: int = 2048  # context the model is meant for (model-info's default seq len)
    description: str = field(default="", metadata={"doc": "free text, ignored by the model"})

    def __post_init__(self) -> None:
        if self.layer_types is not None and isinstance(self.layer_types, (list, tuple)):
            bad = [t for t in self.layer_types if t not in LAYER_TYPE_NAMES]
            if bad or not self.layer_types:
                raise ValueError(f"ModelConfig: layer_types must be a non-empty list of {sorted(LAYER_TYPE_NAMES)}, got {bad or self.layer_types!r}")
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"ModelConfig: layer_types has {len(self.layer_types)} entries, num_layers={self.num_layers}")
            kinds = [LAYER_TYPE_NAMES[t] for t in self.layer_types]
            self.layer_pattern = "".join("L" if k == "linear" else "S" for k in kinds)
        self.validate()
        reps = self.num_layers // len(self.layer_pattern)
        self.layer_types = [LAYER_KINDS[c] for c in self.layer_pattern * reps]

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """Head size of the softmax layers (and of every linear_llama linear layer)."""
        return self.attention_head_dim if self.attention_head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (``head_dim * partial_rotary_factor``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_dims(self) -> tuple[int, int, int, int]:
        """``(key heads, value heads, key head dim, value head dim)`` of a qwen3_5 GDN layer."""
        nk = self.num_heads if self.linear_num_key_heads is None else self.linear_num_key_heads
        nv = self.num_heads if self.linear_num_value_heads is None else self.linear_num_value_heads
        dk = self.head_dim if self.linear_key_head_dim is None else self.linear_key_head_dim
        dv = self.head_dim if self.linear_value_head_dim is None else self.linear_value_head_dim
        return nk, nv, dk, dv

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one routed expert's SwiGLU (``moe_intermediate_size``, default ``intermediate_size``)."""
        return self.intermediate_size if self.moe_intermediate_size is None else self.moe_intermediate_size

    @property
    def moe_layers(self) -> list[bool]:
        """Per layer: whether its MLP is the sparse MoE block (transformers' ``decoder_sparse_step`` /
        ``mlp_only_layers`` rule)."""
        moe = self.mlp == "moe"
        return [moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0 for i in range(self.num_layers)]

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the softmax layers."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def softmax_fraction(self) -> float:
        return self.layer_pattern.count("S") / len(self.layer_pattern)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "ModelConfig") -> None:
        """Raise ``ValueError("<source>: <key> ...")`` on the first inconsistent field."""

        def fail(key: str, msg: str) -> None:
            raise ValueError(f"{source}: {key} {msg}")

        try:
            coerce_fields(self)  # types from the annotations (lasp.config_loader)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "gate_low_rank_dim", "max_seq_len", "conv_size"):
            if getattr(self, key) < 1:
                fail(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.attention_head_dim is None and self.hidden_size % self.num_heads != 0:
            fail("num_heads", f"={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.head_dim % 2 != 0:
            fail("num_heads", f"gives an odd head_dim={self.head_dim} (hidden_size / num_heads); RoPE needs it even")
        if self.architecture not in ARCHITECTURES:
            fail("architecture", f"must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for key in ("attention_head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                fail(key, f"must be a positive integer or null, got {getattr(self, key)}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rope_dim % 2 != 0 or self.rope_dim < 2:
            fail("partial_rotary_factor", f"={self.partial_rotary_factor} must be in (0, 1] and rotate an even number of dims (head_dim={self.head_dim})")
        nk, nv, _, _ = self.linear_dims
        if nv % nk != 0:
            fail("linear_num_value_heads", f"={nv} must be a multiple of linear_num_key_heads={nk}")
        if self.architecture in QWEN_ARCHITECTURES and self.linear_variant != "gated_deltanet":
            fail("linear_variant", f"must be 'gated_deltanet' for architecture={self.architecture!r}, got {self.linear_variant!r}")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads != 0):
            fail("num_kv_heads", f"={self.num_kv_heads} must be a positive divisor of num_heads={self.num_heads}")
        if not self.layer_pattern or set(self.layer_pattern) - set(LAYER_KINDS):
            fail("layer_pattern", f"must be a non-empty string of the letters L (linear) and S (softmax), got {self.layer_pattern!r}")
        if self.num_layers % len(self.layer_pattern) != 0:
            fail("layer_pattern", f"{self.layer_pattern!r} (length {len(self.layer_pattern)}) must divide num_layers={self.num_layers}")
        choices = {
            "linear_variant": LINEAR_VARIANTS + DELTA_VARIANTS,
            "feature_map": FEATURE_MAPS,
            "linear_method": LINEAR_METHOD_NAMES,
            "linear_backend": BACKENDS,
            "softmax_method": SOFTMAX_METHOD_NAMES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                fail(key, f"must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("rope_theta", "rms_norm_eps", "initializer_range", "gate_logit_normalizer"):
            if not getattr(self, key) > 0:
                fail(key, f"must be > 0, got {getattr(self, key)}")
        try:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        self._validate_moe(fail)

    def _validate_moe(self, fail) -> None:
        if self.mlp not in MLP_KINDS:
            fail("mlp", f"must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.mlp == "dense":
            defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(self) if f.name in MOE_KEYS}
            for key in MOE_KEYS:
                if getattr(self, key) != defaults[key]:
                    fail(key, f"is a mixture-of-experts key, but mlp is 'dense' (set mlp: moe), got {getattr(self, key)!r}")
            return
        for key in ("num_experts", "num_experts_per_tok", "decoder_sparse_step"):
            if getattr(self, key) < 1:
                fail(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"={self.num_experts_per_tok} must be <= num_experts={self.num_experts}")
        if self.moe_intermediate_size is not None and self.moe_intermediate_size < 1:
            fail("moe_intermediate_size", f"must be a positive integer or null, got {self.moe_intermediate_size}")
        if self.shared_expert_intermediate_size < 0:
            fail("shared_expert_intermediate_size", f"must be >= 0 (0 = no shared expert), got {self.shared_expert_intermediate_size}")
        for key in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                fail(key, f"must be finite and >= 0 (0 = off), got {getattr(self, key)}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            fail("mlp_only_layers", f"must list layer indices in [0, num_layers={self.num_layers}), got {bad}")
        if not any(self.moe_layers):
            fail("mlp_only_layers", "and decoder_sparse_step leave no MoE layer (mlp: moe needs at least one)")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ModelConfig":
        """Build from a mapping; unknown keys and bad values raise ``ValueError`` naming ``source``."""
        return build(cls, d, source=source, what="model config")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
        """Load a YAML file of ``key: value`` pairs (errors name the key and the file)."""
        return cls.from_dict(read_yaml(path, "model config"), source=str(path))

    def to_dict(self) -> dict:
        """Every field; ``layer_types`` is left out (``layer_pattern`` carries the same layers), and the
        MoE keys when ``mlp`` is ``dense``."""
        d = dataclasses.asdict(self)
        d.pop("layer_types")
        if self.mlp == "dense":  # a dense model's file lists no MoE keys
            for key in MOE_KEYS + ("mlp",):
                d.pop(key)
        return d

    def to_yaml(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)
