"""Packed documents in the data pipeline (issue 15): ``lasp data prepare`` writes the document
index; packed micro-batches carry ``cu_seqlens`` from the boundaries inside each window; no label
crosses a document boundary; ``data.pack_documents`` resolves (and fails) clearly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lasp.parallel import unshard_sequence
from lasp.train import data as D
from lasp.train.packing import IGNORE_INDEX, pack_window, packed_micro_batch, window_boundaries

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """Documents of varied lengths (0 to 40 bytes), document d made of the letter d % 26 only."""
    tmp = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    lengths = [0, 1, 40, 3] + rng.integers(0, 41, size=60).tolist()
    files = []
    for d, n in enumerate(lengths):
        f = tmp / f"doc{d:03d}.txt"
        f.write_text(LETTERS[d % 26] * n)
        files.append(f)
    D.prepare([], str(tmp / "data"), "bytes", files=files)
    return D.TokenDataset(str(tmp / "data")), lengths


def test_prepare_writes_the_document_index(letters):
    ds, lengths = letters
    header = json.loads(open(os.path.join(ds.path, D.HEADER)).read())
    assert header["version"] == 2 and header["documents"] == len(lengths)
    assert header["document_index"] == "documents.bin" and header["document_index_dtype"] == "uint64"
    want = np.concatenate([[0], np.cumsum([n + 1 for n in lengths])[:-1]])  # every document ends with its NUL
    assert np.array_equal(np.fromfile(os.path.join(ds.path, "documents.bin"), dtype=np.uint64), want)
    assert ds.has_documents and np.array_equal(ds.doc_starts, want)


def test_corrupt_or_missing_index_is_an_error(letters, tmp_path):
    import shutil

    ds, _ = letters
    copy = tmp_path / "copy"
    shutil.copytree(ds.path, copy)
    with open(copy / "documents.bin", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="corrupt document index"):
        D.TokenDataset(str(copy))
    os.remove(copy / "documents.bin")
    with pytest.raises(ValueError, match="documents.bin.*is missing"):
        D.TokenDataset(str(copy))


def test_window_labels_and_cu_seqlens():
    doc_starts = np.array([0, 5, 6, 10, 16], dtype=np.int64)
    window = np.arange(4, 4 + 9)  # tokens 4 .. 12, seq_len 8: starts 5, 6, 10 inside, 12 is not one
    bounds = window_boundaries(doc_starts, 4, 8)
    assert bounds.tolist() == [1, 2, 6]
    x, y, cu = pack_window(window, bounds)
    assert cu.tolist() == [0, 1, 2, 6, 8]
    assert y.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, 11, 12]
    # a document starting right after the window's last input: that input's label is ignored too
    x, y, cu = pack_window(np.arange(8, 17), window_boundaries(doc_starts, 8, 8))
    assert cu.tolist() == [0, 2, 8] and y[-1] == IGNORE_INDEX and y[1] == IGNORE_INDEX


@pytest.mark.parametrize("layout,sp", [("contiguous", 1), ("contiguous", 4), ("zigzag", 2)])
def test_no_label_crosses_a_document_boundary(letters, layout, sp):
    ds, _ = letters
    spec = D.BatchSpec(seq_len=16, micro_batch_size=3, grad_accum=2, dp_size=2, seed=3)
    ignored = 0
    for step in range(6):
        for micro in range(2):
            for dp in range(2):
                shards = [packed_micro_batch(ds, spec, step, micro, dp, r, sp, layout) for r in range(sp)]
                cu = shards[0][2]
                assert all(torch.equal(s[2], cu) for s in shards)  # the same cu_seqlens on every SP rank
                x = unshard_sequence([s[0] for s in shards], layout)[0]
                y = unshard_sequence([s[1] for s in shards], layout)[0]
                assert x.shape == (3 * 16,) and cu[0] == 0 and cu[-1] == 48 and (cu.diff() > 0).all()
                assert set(range(0, 48, 16)) <= set(cu.tolist())  # every window starts a document
                ends = cu[1:] - 1
                window_ends = torch.arange(1, 4) * 16 - 1
                doc_ends = ends[~torch.isin(ends, window_ends)]
                assert (y[doc_ends] == IGNORE_INDEX).all()  # the last token of a document predicts nothing
                counted = y != IGNORE_INDEX
                assert torch.isin(torch.nonzero(~counted)[:, 0], ends).all()  # and nothing else is ignored
                assert (x[~counted] == 0).all()  # the ignored ones are the documents' separators
                ignored += int((~counted).sum())
                # a counted label continues the input's document: the same letter, or the document's NUL
                xs, ys = x[counted], y[counted]
                assert ((ys == xs) | ((ys == 0) & (xs != 0))).all()
                # and inside a window, input j and input j + 1 (its label) share a cu_seqlens segment
                seg = torch.searchsorted(cu, torch.arange(48), right=True)
                inside = counted[:-1] & ~torch.isin(torch.arange(47), window_ends)
                assert (seg[:-1][inside] == seg[1:][inside]).all()
    assert ignored > 0


def test_pack_documents_resolution(letters, tmp_path):
    from lasp.train.config import RunConfig
    from lasp.train.trainer import pack_documents

    ds, _ = letters
    old = tmp_path / "old"
    import shutil

    shutil.copytree(ds.path, old)
    os.remove(old / "documents.bin")
    h = json.loads((old / D.HEADER).read_text())
    for key in ("document_index", "document_index_dtype"):
        h.pop(key)
    (old / D.HEADER).write_text(json.dumps(h))
    legacy = D.TokenDataset(str(old))
    cfg = lambda v: RunConfig.from_dict({"model": {"vocab_size": 256}, "data": {"pack_documents": v}}, source="run.yaml")  # noqa: E731
    assert pack_documents(cfg(None), ds) is True and pack_documents(cfg(None), legacy) is False
    assert pack_documents(cfg(False), ds) is False and pack_documents(cfg(True), ds) is True
    with pytest.raises(ValueError, match="run.yaml: data.pack_documents is true, but the dataset .* has no document index"):
        pack_documents(cfg(True), legacy)


def test_embedded_corpus_has_one_document_per_file(tmp_path, monkeypatch):
    files = D.stdlib_sources()[:4]
    monkeypatch.setattr(D, "stdlib_sources", lambda: files)  # keep the test quick
    path = D.embedded_corpus(str(tmp_path))
    ds = D.TokenDataset(path)
    sizes = [f.stat().st_size + 1 for f in files]  # each file and its NUL
    assert ds.doc_starts.tolist() == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    # a cache written before the document index is prepared again, with the index
    os.remove(os.path.join(path, "documents.bin"))
    assert D.embedded_corpus(str(tmp_path)) == path and D.TokenDataset(path).has_documents
