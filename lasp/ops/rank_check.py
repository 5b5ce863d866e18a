"""The ranks of a group called an operator with the same shapes: a ValueError, never a gloo abort or a hang.

Each rank validates its own arguments locally (:mod:`lasp.ops.checks`); what no rank can see alone is
whether the OTHERS passed the same batch size, heads, head dims, dtype (and, where the layout or the
method needs it, the same number of tokens). A mismatch makes the operator's collectives differ in
size (gloo aborts with ``EnforceNotMet``, NCCL may hang) or, for zigzag shards of different lengths,
run with a wrong sequence silently.

:func:`check_same_on_ranks` compares a fixed-length fingerprint of those fields in ONE small
all-gather (``FIELDS`` int64 per rank, tag ``rank_check``) the FIRST time a rank sees a (group,
fingerprint) pair, and caches the pair when every rank agrees: later calls with the same shapes
communicate nothing and read nothing on the host (the check's one host read happens on first use
only). On a mismatch every rank gets the same ValueError, which names each field that differs and
its value on every rank.

Limit (the price of no collective per call): a rank is checked when its fingerprint is new to it. A
group that agreed on shapes X and then sees one rank move to new shapes Y while the others repeat X
is not caught: that rank's handshake all-gather meets the others' first operator collective instead
(gloo aborts on the size mismatch, NCCL may hang), as without the check; the first call of every new
shape on every rank, where misconfigurations show, is caught. Likewise a rank that fails its LOCAL
validation (:mod:`lasp.ops.checks`) raises before the handshake while the others enter it: bad
arguments that differ between ranks are only caught here when they pass each rank's local checks.
"""
from __future__ import annotations

import zlib

import torch

from .. import comm
from ..parallel import group_rank_size

__all__ = ["check_same_on_ranks", "token_field_ignored", "FIELDS"]

#: Slots of the fingerprint (the same on every rank whatever the operator: op name, then fields).
FIELDS = 16
_VERIFIED: set = set()


#: Names a fingerprint carries by index (shown back by name in the message); others by a crc32.
_KNOWN = ("None", "torch.float32", "torch.float16", "torch.bfloat16", "torch.float64", "lasp2", "lasp1", "ulysses",
          "allgather", "ring", "contiguous", "zigzag")


def _code(x) -> int:
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    name = str(x)  # strings, dtypes, None
    return _KNOWN.index(name) + 1 if name in _KNOWN else zlib.crc32(name.encode()) | (1 << 40)


def token_field_ignored(method: str, layout: str) -> tuple[str, ...]:
    """``("T_local",)`` where the ranks may hold different numbers of tokens (a contiguous layout under
    LASP-2 / LASP-1, whose collectives do not depend on it), else ``()`` (zigzag: equal shards;
    Ulysses: all-to-all of equal pieces)."""
    return () if layout == "zigzag" or method == "ulysses" else ("T_local",)


def check_same_on_ranks(op: str, fields: dict[str, object], group, device, *, ignore: tuple[str, ...] = ()) -> None:
    """ValueError on every rank unless every rank of ``group`` passed the same ``fields``.

    Args:
        op: the operator's name (part of the fingerprint and of the message).
        fields: ``name -> value`` (ints, bools, strings, dtypes, None), at most ``FIELDS - 1``, in the
            same order on every rank.
        group: the SP group (None or one rank: nothing to do).
        device: where the small all-gather runs (the operator's device).
        ignore: field names that may differ (they travel, the fingerprint keeps its length; e.g.
            ``T_local`` on a contiguous layout, :func:`token_field_ignored`).
    """
    _, size = group_rank_size(group)
    if size == 1:
        return
    names = list(fields)
    if len(names) >= FIELDS:
        raise ValueError(f"check_same_on_ranks takes at most {FIELDS - 1} fields, got {len(names)}")
    wanted = [n for n in names if n not in ignore]
    key = (group, op, tuple((n, _code(fields[n])) for n in wanted))
    if key in _VERIFIED:
        return
    codes = [_code(op)] + [_code(fields[n]) for n in names]
    mine = torch.tensor(codes + [0] * (FIELDS - len(codes)), dtype=torch.int64, device=device)
    gathered, _ = comm.all_gather(mine, group, tag="rank_check")
    rows = gathered.cpu().tolist()  # on first use of this fingerprint only
    if any(row[0] != rows[0][0] for row in rows):
        raise ValueError(f"{op}: the ranks of the group called different operators at the same point")
    bad = [n for i, n in enumerate(names, start=1) if n in wanted and any(row[i] != rows[0][i] for row in rows)]
    if bad:
        values = {n: fields[n] for n in bad}
        detail = "; ".join(f"{n}: " + ", ".join(f"rank {r}: {_shown(row[names.index(n) + 1], values[n])}"
                                                for r, row in enumerate(rows)) for n in bad)
        raise ValueError(f"{op}: every rank of the group must pass the same {', '.join(bad)} ({detail})")
    _VERIFIED.add(key)


def _shown(code: int, mine) -> str:
    """A field's value from its code (``mine``: this rank's value, which tells the kind)."""
    if isinstance(mine, bool):
        return str(bool(code))
    if isinstance(mine, int):
        return str(code)
    return _KNOWN[code - 1] if 1 <= code <= len(_KNOWN) else f"#{code:x}"
