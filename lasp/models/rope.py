"""RoPE frequencies: plain, linearly scaled, or YaRN, with the numbers transformers uses.

``ModelConfig.rope_scaling`` is None (plain RoPE: ``1 / theta^(2i/d)``) or a mapping with Hugging
Face's keys (``transformers.modeling_rope_utils``):

- ``{rope_type: linear, factor}``: every frequency divided by ``factor``;
- ``{rope_type: yarn, factor, original_max_position_embeddings}`` and optionally ``beta_fast``
  (default 32), ``beta_slow`` (1), ``attention_factor`` (default ``0.1 ln(factor) + 1``, or
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set), ``mscale``,
  ``mscale_all_dim``, ``truncate`` (default true): YaRN ("NTK-by-parts", arXiv 2309.00071). A
  frequency that turns fewer than ``beta_slow`` times over ``original_max_position_embeddings``
  positions is interpolated (divided by ``factor``), one that turns more than ``beta_fast`` times
  is kept, those between are blended linearly; cos and sin are multiplied by ``attention_factor``
  (so q.k by its square). Qwen's documented 1M-token recipe for Qwen3.5 is
  ``{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 262144}``.

``type`` is accepted as an alias of ``rope_type`` (the legacy spelling); ``rope_type: default``
means no scaling (stored as None). Every other rope type is refused by name.
"""
from __future__ import annotations

import math

import torch

from ..config_loader import coerce

#: rope types lasp implements beside ``default`` -> {key: (type, required)}
ROPE_SCALING_KEYS: dict[str, dict[str, tuple[object, bool]]] = {
    "linear": {"factor": (float, True)},
    "yarn": {
        "factor": (float, True),
        "original_max_position_embeddings": (int, True),
        "attention_factor": (float | None, False),
        "beta_fast": (float | None, False),
        "beta_slow": (float | None, False),
        "mscale": (float | None, False),
        "mscale_all_dim": (float | None, False),
        "truncate": (bool | None, False),
    },
}
ROPE_TYPES = ("default", *ROPE_SCALING_KEYS)
#: every key of a Hugging Face rope_parameters mapping that describes the rotation (others, e.g.
#: Qwen3.5's ``mrope_section`` / ``mrope_interleaved``, describe the multimodal position layout)
HF_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
                          "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "short_factor",
                          "long_factor", "low_freq_factor", "high_freq_factor"})


def check_rope_scaling(value, key: str = "rope_scaling") -> dict | None:
    """The validated, normalised form of a ``rope_scaling`` value: None (plain RoPE) or
    ``{"rope_type": ..., <its keys>}`` (``type`` renamed ``rope_type``, values coerced).

    ``ValueError`` naming ``key`` (and the sub-key) on an unknown rope type, an unknown or
    missing key, or a bad value."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping (e.g. {{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 262144}}) or null, got {value!r}")
    d = dict(value)
    if "type" in d:
        alias = d.pop("type")
        d.setdefault("rope_type", alias)
    rope_type = d.pop("rope_type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{key}.rope_type must be one of {list(ROPE_TYPES)} (lasp implements these), got {rope_type!r}")
    spec = ROPE_SCALING_KEYS.get(rope_type, {})
    unknown = sorted(set(d) - set(spec))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a key of rope_type {rope_type!r} (its keys: {', '.join(spec) or 'none'})")
    if rope_type == "default":
        return None
    out: dict = {"rope_type": rope_type}
    for name, (tp, required) in spec.items():
        if name not in d:
            if required:
                raise ValueError(f"{key}.{name} is required for rope_type {rope_type!r}")
            continue
        v = coerce(d[name], tp, f"{key}.{name}")
        positive = name in ("factor", "original_max_position_embeddings", "attention_factor")
        if positive and v is not None and not v > 0:
            raise ValueError(f"{key}.{name} must be > 0, got {v}")
        out[name] = v
    return out


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None = None, device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim // 2] float64, attention_factor)`` of RoPE over ``dim`` rotated dims with
    base ``theta`` and ``scaling`` (a :func:`check_rope_scaling` mapping or None)."""
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim
    base = theta**exponents  # the wavelength / 2 pi of each rotated pair
    if scaling is None:
        return 1.0 / base, 1.0
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return 1.0 / (base * factor), 1.0
    # YaRN, as transformers' _compute_yarn_parameters
    attention = scaling.get("attention_factor")
    if attention is None:
        ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = _mscale(factor, ms) / _mscale(factor, ms_all) if ms and ms_all else _mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dim whose pair turns `rotations` times over `original` positions
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency unchanged), 0: interpolate (divided by factor)
    inv_freq = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv_freq, float(attention)
