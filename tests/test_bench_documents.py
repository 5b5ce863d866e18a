"""``lasp bench layer --documents``: records carry ``documents``; LASP-2's bytes do not change."""
from __future__ import annotations

import pytest

from lasp.bench import layer
from lasp.bench.results import load_results
from lasp.bench.sweep import close_pools


@pytest.fixture(scope="module", autouse=True)
def _stop_pools():
    yield
    close_pools()


def test_document_starts_seeded_and_valid():
    a, b = layer.document_starts(64, 16), layer.document_starts(64, 16)
    assert a.tolist() == b.tolist() and len(a) == 17 and a[0] == 0 and a[-1] == 64
    assert bool((a[1:] > a[:-1]).all())
    assert layer.document_starts(8, 1).tolist() == [0, 8]


def test_layer_documents_records(tmp_path):
    out = str(tmp_path)
    rc = layer.main(["--method", "lasp2,ulysses-linear", "--sp", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "8",
                     "--documents", "0,1,16,100", "--warmup", "1", "--reps", "2", "--max-seconds-per-point", "2", "--out", out])
    assert rc == 0
    recs = {(r["method"], r["documents"]): r for r in load_results(out)["records"]}
    assert recs[("lasp2", 100)]["status"] == "skipped"  # more documents than tokens
    for m in ("lasp2", "ulysses-linear"):
        assert all(recs[(m, n)]["status"] == "ok" for n in (None, 1, 16))
    assert recs[("lasp2", 1)]["bytes_per_rank"] == recs[("lasp2", None)]["bytes_per_rank"] + 3 * 8  # the check: 3 int64 sent
    # LASP-2: the operator's bytes do not depend on the documents (+ the 24-byte cu_seqlens check)
    assert recs[("lasp2", 1)]["bytes_per_rank"] == recs[("lasp2", 16)]["bytes_per_rank"]
    with open(f"{out}/results.md") as fh:
        assert "docs" in fh.read()
