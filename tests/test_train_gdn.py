"""Training a Gated DeltaNet hybrid with SP = 2 (zigzag: LASP-2 for the delta-rule layers, the
convolution's halo exchange, LASP-2H for the softmax layer) follows the SP = 1 loss curve."""
from __future__ import annotations

import os

from test_train import _train, assert_follows, run_dict
from lasp.train.data import prepare, stdlib_sources

GDN_MODEL = {"linear_variant": "gated_deltanet", "conv_size": 4}


def _gdn_job(rank: int, world: int, tmp: str, sp: int, layout: str, zero: int) -> list[float]:
    d = run_dict(tmp, f"gdn-sp{sp}", sp, layout, zero, world)
    d["model"].update(GDN_MODEL)
    d["train"]["micro_batch_size"] = 2
    return _train(d).losses


def test_gdn_hybrid_sp2_follows_sp1(tmp_path, spawn):
    tmp = str(tmp_path)
    prepare([], os.path.join(tmp, "data"), "bytes", files=stdlib_sources()[:20])
    ref = spawn(1).run(_gdn_job, tmp, 1, "contiguous", 0, timeout=300)[0]
    out = spawn(2).run(_gdn_job, tmp, 2, "zigzag", 2, timeout=300)[0]
    assert_follows(ref, out, "SP=2")
