"""Packed documents: a micro-batch's windows as one row with ``cu_seqlens`` and boundary-aware labels.

Windows are cut from the token stream exactly as without documents (:func:`lasp.train.data.micro_batch_windows`).
Inside a window of ``seq_len + 1`` tokens starting at offset ``s``, the document starts ``d`` of the
dataset's index with ``s < d <= s + seq_len`` split it into documents; the window start is a
document start for the window's purposes (its first tokens continue a document whose beginning
is outside the window, and attend to nothing before it). So for the window's inputs
``tokens[s : s + seq_len]``:

- ``cu_seqlens = [0, d_1 - s, ..., seq_len]`` (the starts with ``d < s + seq_len``);
- the label of input ``j`` is ``tokens[s + j + 1]``, except when ``s + j + 1`` is a document start
  (input ``j`` is the last token of a document, its separator): then it is :data:`IGNORE_INDEX`,
  so no label crosses a document boundary.

A micro-batch of ``B`` windows becomes ONE row of ``B * seq_len`` tokens (the operators take
``cu_seqlens`` with batch size 1): the windows back to back, each window's documents offset by
``b * seq_len``, then sharded over the SP group in the run's layout like any sequence.
"""
from __future__ import annotations

import numpy as np

from .data import BatchSpec, TokenDataset, micro_batch_windows

#: the label of a token whose next token starts another document (``F.cross_entropy``'s default)
IGNORE_INDEX = -100


def window_boundaries(doc_starts: np.ndarray, start: int, seq_len: int) -> np.ndarray:
    """Offsets ``d - start`` (in ``1 .. seq_len``, rising) of the document starts ``d`` with
    ``start < d <= start + seq_len``. ``doc_starts [D]`` int64, strictly increasing."""
    lo = np.searchsorted(doc_starts, start, side="right")
    hi = np.searchsorted(doc_starts, start + seq_len, side="right")
    return np.asarray(doc_starts[lo:hi], dtype=np.int64) - start


def pack_window(window: np.ndarray, boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs [T], labels [T], cu_seqlens [N+1])`` int64 of one window ``[T + 1]`` whose
    document starts inside it are ``boundaries`` (from :func:`window_boundaries`)."""
    T = len(window) - 1
    inputs, labels = window[:-1].astype(np.int64), window[1:].astype(np.int64)
    labels[boundaries - 1] = IGNORE_INDEX  # the last token of a document predicts nothing
    cu = np.concatenate([[0], boundaries[boundaries < T], [T]]).astype(np.int64)
    return inputs, labels, cu


def packed_micro_batch(
    data: TokenDataset, spec: BatchSpec, step: int, micro_step: int, dp_rank: int, sp_rank: int, sp_size: int, layout: str
):
    """``(input_ids, labels, cu_seqlens)`` of this rank for ``(step, micro_step)`` with packed documents.

    ``input_ids``, ``labels``: ``[1, micro_batch_size * seq_len / sp_size]`` int64, this rank's SP
    shard (in ``layout`` order) of its DP rank's windows back to back (the same windows as
    :func:`lasp.train.data.micro_batch`); ``cu_seqlens``: ``[N+1]`` int64 global document starts of
    that row, the same on every SP rank.
    """
    import torch

    from lasp.parallel import shard_sequence

    if data.doc_starts is None:
        raise ValueError(f"data.pack_documents: {data.path!r} has no document index ({data.header.get('document_index')})")
    inputs, labels, cus = [], [], [np.zeros(1, dtype=np.int64)]
    for b, (s, window) in enumerate(micro_batch_windows(data, spec, step, micro_step, dp_rank)):
        x, y, cu = pack_window(window, window_boundaries(data.doc_starts, s, spec.seq_len))
        inputs.append(x)
        labels.append(y)
        cus.append(cu[1:] + b * spec.seq_len)
    row = lambda parts: torch.from_numpy(np.concatenate(parts))[None]  # noqa: E731
    return (
        shard_sequence(row(inputs), sp_rank, sp_size, layout).contiguous(),
        shard_sequence(row(labels), sp_rank, sp_size, layout).contiguous(),
        torch.from_numpy(np.concatenate(cus)),
    )
