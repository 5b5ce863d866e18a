"""Smoke tests of ``lasp bench layer | model | kernels | predict`` on tiny sizes: the JSON schema, the
markdown table, PNG plots, failure records, the cost model's structure. No test asserts on time."""
from __future__ import annotations

import json
import os
import time

import pytest

from lasp.bench import kernels, layer, model, predict
from lasp.bench.results import load_results, validate_results
from lasp.bench.sweep import close_pools, failure_record
from lasp.bench.timing import summarize_samples, time_steps
from lasp.spawn import Failure, RankError, SpawnedGroup
from lasp.testing import document_starts

TINY_LAYER = ["--seq-len", "64,128", "--heads", "2", "--head-dim", "8", "--warmup", "1", "--reps", "2",
              "--max-seconds-per-point", "2"]


def _assert_png(path: str) -> None:
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


def _assert_outputs(out: str, kind: str) -> dict:
    doc = load_results(out)  # validates the schema
    assert doc["kind"] == kind
    assert os.path.getsize(os.path.join(out, "results.md")) > 0
    assert doc["plots"], "no plot written"
    for name in doc["plots"]:
        _assert_png(os.path.join(out, name))
    return doc


@pytest.fixture(scope="module", autouse=True)
def _stop_pools():
    """The sweeps keep their spawned ranks for the next sweep; stop them after this module."""
    yield
    close_pools()


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("layer"))
    rc = layer.main(["--method", "lasp2,lasp1,ring,ulysses-softmax", "--sp", "1,2", "--out", out, *TINY_LAYER])
    assert rc == 0
    return out


def test_layer_schema_and_plots(layer_run):
    doc = _assert_outputs(layer_run, "layer")
    recs = doc["records"]
    assert len(recs) == 4 * 2 * 2  # methods x seq lens x SP sizes
    assert {r["status"] for r in recs} == {"ok"}, [r["reason"] for r in recs if r["status"] != "ok"]
    for key in ("torch", "triton", "device", "world", "cpu_count", "date"):
        assert key in doc["env"]
    for r in recs:
        assert len(r["samples_ms"]) == r["n_reps"] >= 1
        assert r["time_ms_min"] <= r["time_ms"] <= r["time_ms_max"]
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] >= 0


def test_layer_comm_accounting(layer_run):
    recs = {(r["method"], r["sp"], r["seq_len"]): r for r in load_results(layer_run)["records"]}
    for n in (64, 128):
        assert recs[("lasp2", 1, n)]["bytes_per_rank"] == 0 and recs[("lasp2", 1, n)]["collectives"] == 0
        lasp2 = recs[("lasp2", 2, n)]
        assert lasp2["collectives"] == 2 and lasp2["collectives_by_kind"] == {"all_gather": 2}
    # LASP-2 sends states: the same bytes at every length; ring sends K/V: twice the bytes at twice the length
    assert recs[("lasp2", 2, 64)]["bytes_per_rank"] == recs[("lasp2", 2, 128)]["bytes_per_rank"]
    assert recs[("ring", 2, 128)]["bytes_per_rank"] == 2 * recs[("ring", 2, 64)]["bytes_per_rank"]
    assert len(recs[("lasp1", 2, 64)]["bytes_by_rank"]) == 2


def test_layer_unavailable_and_skipped_points(tmp_path, monkeypatch):
    from lasp.attention import LINEAR_METHODS

    monkeypatch.setitem(layer.METHODS, "future-method", ("linear", "future"))
    assert "future" not in LINEAR_METHODS  # not in the operators' public table: unavailable, never run
    out = str(tmp_path)
    rc = layer.main(["--method", "future-method,lasp2", "--sp", "1", "--seq-len", "63", "--no-interleave", "--out", out,
                     *TINY_LAYER[2:]])
    assert rc == 0
    recs = {r["method"]: r for r in load_results(out)["records"]}
    assert recs["future-method"]["status"] == "unavailable" and "not implemented" in recs["future-method"]["reason"]
    assert recs["lasp2"]["status"] == "ok"  # 63 tokens on one rank is fine


def test_layer_group_with_a_failing_method(tmp_path):
    """Interleaved group: the method that raises (Ulysses: 3 heads over P = 2) is skipped, the others measured."""
    out = str(tmp_path)
    rc = layer.main(["--method", "lasp2,ulysses-linear", "--sp", "2", "--seq-len", "64", "--heads", "3", "--out", out,
                     *TINY_LAYER[4:]])
    assert rc == 0
    recs = {r["method"]: r for r in load_results(out)["records"]}
    assert recs["lasp2"]["status"] == "ok"
    assert recs["ulysses-linear"]["status"] == "skipped" and "divisible" in recs["ulysses-linear"]["reason"]


def test_layer_memory_guard_skips(tmp_path):
    out = str(tmp_path)
    rc = layer.main(["--method", "ring", "--sp", "2", "--seq-len", "64", "--max-memory-gb", "1e-9", "--out", out, *TINY_LAYER[2:]])
    assert rc == 0
    (rec,) = load_results(out)["records"]
    assert rec["status"] == "skipped" and "estimated memory" in rec["reason"]


def test_failure_classification():
    f = Failure("exception", "ValueError", "q must have shape [B, T, H, K]")
    assert failure_record({"method": "m"}, f) == {"method": "m", "status": "skipped", "reason": "q must have shape [B, T, H, K]"}
    assert failure_record({}, Failure("exception", "NotImplementedError", "not yet"))["status"] == "unavailable"
    assert failure_record({}, Failure("exception", "RuntimeError", "boom")) == {"status": "error", "reason": "RuntimeError: boom"}
    rec = failure_record({}, Failure("oom", "OutOfMemoryError", "CUDA out of memory"))
    assert rec["status"] == "error" and rec["reason"].startswith("out of memory")
    assert failure_record({}, Failure("timeout", "", "ranks [1] did not finish"))["reason"] == "ranks [1] did not finish"


def _raise_on_rank(rank: int, world: int, kind: str) -> None:
    if kind == "hang":
        time.sleep(30)
    elif rank == 1:
        raise {"value": ValueError, "oom": MemoryError}[kind](f"{kind} on rank 1")


def test_spawned_group_failure_kinds():
    """Structured failures: the exception's class and message, out of memory, timeout."""
    with SpawnedGroup(2, timeout=60) as pool:
        with pytest.raises(RankError) as err:
            pool.run(_raise_on_rank, "value")
        assert err.value.kind == "exception" and err.value.failure.exc_type == "ValueError"
        assert err.value.failure.message == "value on rank 1" and err.value.failure.rank == 1
        with pytest.raises(RankError) as err:
            pool.run(_raise_on_rank, "oom")
        assert err.value.kind == "oom"
        with pytest.raises(RankError) as err:
            pool.run(_raise_on_rank, "hang", timeout=2)
        assert err.value.kind == "timeout" and "did not finish" in err.value.failure.message


def test_schema_rejects_missing_fields():
    with pytest.raises(ValueError, match="missing key 'records'"):
        validate_results({"schema": "lasp-bench/1", "kind": "layer", "env": {}, "config": {}})
    bad = {"schema": "lasp-bench/1", "kind": "layer", "config": {}, "records": [{"method": "lasp2"}],
           "env": {k: 1 for k in ("torch", "triton", "device", "world", "cpu_count", "date")}}
    with pytest.raises(ValueError, match="record 0 is missing 'seq_len'"):
        validate_results(bad)


def test_time_steps_respects_budget():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.02)

    (out,) = time_steps([step], group=None, device=__import__("torch").device("cpu"), warmup=1, reps=100, max_seconds=0.1)
    assert len(out["warmup_s"]) == 1
    assert 1 <= len(out["samples_s"]) <= 5 and len(calls) == 1 + len(out["samples_s"])
    stats = summarize_samples(out["samples_s"])
    assert stats["n_reps"] == len(out["samples_s"]) and stats["time_ms_min"] <= stats["time_ms"]
    assert summarize_samples([0.001, 0.002, 0.003, 0.010])["time_ms_p25"] == pytest.approx(1.75)  # numpy's linear percentile


def test_kernels_bench_on_cpu(tmp_path):
    """`lasp bench kernels` on the CPU: torch path only, tiny sizes, the shared results files."""
    rc = kernels.main(["--device", "cpu", "--B", "1", "--H", "1", "--T", "64", "--dims", "16", "--reps", "1", "--warmup", "0",
                       "--out", str(tmp_path)])
    assert rc == 0
    doc = _assert_outputs(str(tmp_path), "kernels")
    assert {r["provider"] for r in doc["records"]} == {"torch"}
    assert {r["mode"] for r in doc["records"]} == {"fwd", "fwdbwd"}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["tflops"] > 0 for r in doc["records"])
    assert "| torch | fwdbwd | 64 | 16 | ok |" in (tmp_path / "results.md").read_text()
    # the FLOP count of the chunked algorithm (module docstring), per (batch, head)
    assert kernels.chunked_flops(1, 1, 64, 16, 32, "fwd") == 2 * 64 * 64 * 48 + 4 * 64 * 16 * 32


def test_kernels_fla_wrapper(monkeypatch):
    """The one fla wrapper (fla is not installed here: stub modules): q, k, v positional, the other
    inputs by name (None ones left out), the op's keywords; an input the function lacks is an error."""
    import sys
    import types

    import torch

    seen = {}

    def chunk_gated_delta_rule(q, k, v, g=None, beta=None, scale=None, use_qk_l2norm_in_kernel=False, head_first=True):
        seen.update(g=g, beta=beta, scale=scale, l2=use_qk_l2norm_in_kernel, head_first=head_first)
        return q + 1, None

    def chunk_simple_gla(q, k, v, g=None, scale=None):
        return q

    for name, fn in (("gated_delta_rule", chunk_gated_delta_rule), ("simple_gla", chunk_simple_gla)):
        monkeypatch.setitem(sys.modules, f"fla.ops.{name}", types.SimpleNamespace(**{fn.__name__: fn}))
    q, k, v, g, beta = (torch.randn(1, 4, 1, 2) for _ in range(5))
    assert torch.equal(kernels.fla_fn("gated_delta")([q, k, v, g, beta], 0.5), q + 1)
    assert seen == dict(g=g, beta=beta, scale=0.5, l2=True, head_first=False)
    assert kernels.fla_fn("linear")([q, k, v, g, None], 0.5) is q
    with pytest.raises(RuntimeError, match="no g_gamma"):
        kernels.fla_fn("linear")([q, k, v, None, g], 0.5)


def test_model_bench(tmp_path):
    out = str(tmp_path)
    rc = model.main(["--models", "linear,hybrid,llama-ring", "--sp", "2", "--seq-len", "64", "--warmup", "1",
                     "--reps", "2", "--max-seconds-per-point", "2", "--out", out])
    assert rc == 0
    doc = _assert_outputs(out, "model")
    recs = {(r["model"], r["sp"]): r for r in doc["records"]}
    assert {r["status"] for r in recs.values()} == {"ok"}, [r.get("reason") for r in recs.values()]
    sizes = [r["parameters"] for r in recs.values()]
    assert max(sizes) / min(sizes) < 1.0001  # the same model size (linear layers add a D-sized output norm)
    assert recs[("linear", 2)]["bytes_per_rank_attention"] < recs[("llama-ring", 2)]["bytes_per_rank_attention"]
    assert recs[("linear", 2)]["bytes_per_rank"] > recs[("linear", 2)]["bytes_per_rank_attention"]  # + gradients
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 for r in recs.values())


def test_predict_paper_setting_and_calibration(tmp_path, layer_run, capsys):
    out = str(tmp_path)
    rc = predict.main(["--seq-len", "512K,2048K", "--calibrate", layer_run, "--out", out])
    assert rc == 0
    text = capsys.readouterr().out
    assert "+36.6%" in text and "+15.2%" in text and "arXiv 2502.07563" in text
    with open(os.path.join(out, "results.json")) as fh:
        doc = json.load(fh)
    validate_results(doc)
    assert {(c["versus"], c["seq_len"]) for c in doc["paper_comparison"]} == set(predict.PAPER)
    assert {"linear", "softmax"} <= set(doc["calibration"]["fits"])
    assert len(doc["calibration"]["points"]) == 16
    _assert_png(os.path.join(out, doc["plots"][0]))


def test_predict_lists_infeasible_points_but_never_plots_them(tmp_path, capsys):
    """Ulysses needs heads % P == 0 (16 heads on 64 devices: no): the point is in the table as
    infeasible, a skipped record, so the plot (ok records only) draws no line through it."""
    assert predict.main(["--seq-len", "64K,128K", "--methods", "lasp2,ulysses", "--out", str(tmp_path)]) == 0
    assert "no (needs heads % P == 0" in capsys.readouterr().out
    with open(tmp_path / "results.json") as fh:
        doc = json.load(fh)
    validate_results(doc)
    status = {(r["method"], r["seq_len"]): r["status"] for r in doc["records"]}
    assert set(status.values()) == {"ok", "skipped"} and all(s == "skipped" for (m, _), s in status.items() if m == "ulysses")
    assert all("infeasible" in r["reason"] for r in doc["records"] if r["status"] == "skipped")


def test_cost_model_structure():
    hw = predict.Hardware()
    lasp2 = [predict.layer_cost("lasp2", predict.Shape(n, 64), hw)["comm_s"] for n in (2**19, 2**21)]
    ring = [predict.layer_cost("ring-linear", predict.Shape(n, 64), hw)["comm_s"] for n in (2**19, 2**21)]
    assert lasp2[0] == lasp2[1]  # states: independent of the sequence length
    assert ring[1] > 3 * ring[0]  # K/V blocks: linear in it
    assert predict.layer_cost("lasp1", predict.Shape(2**21, 64), hw)["comm_s"] > lasp2[0]  # 63 dependent hops
    assert not predict.layer_cost("ulysses-linear", predict.Shape(2**21, 64), hw)["feasible"]  # 16 heads < 64
    assert predict.layer_cost("lasp2", predict.Shape(4096, 1), hw)["comm_s"] == 0.0


def test_layer_gated_delta_methods(tmp_path):
    """`gdn-*` methods: lasp.gated_delta_rule per method; LASP-2 sends the same bytes at every length."""
    out = str(tmp_path)
    rc = layer.main(["--method", "gdn-lasp2,gdn-lasp1,gdn-ulysses", "--sp", "2", "--out", out, *TINY_LAYER])
    assert rc == 0
    doc = _assert_outputs(out, "layer")
    recs = {(r["method"], r["seq_len"]): r for r in doc["records"]}
    assert {r["status"] for r in recs.values()} == {"ok"}, [r["reason"] for r in recs.values()]
    lasp2 = [recs[("gdn-lasp2", n)] for n in (64, 128)]
    assert lasp2[0]["bytes_per_rank"] == lasp2[1]["bytes_per_rank"] > 0
    assert lasp2[0]["collectives_by_kind"] == {"all_gather": 2}
    assert recs[("gdn-ulysses", 128)]["bytes_per_rank"] == 2 * recs[("gdn-ulysses", 64)]["bytes_per_rank"]
    assert "gdn_lasp2_speedup.png" in doc["plots"] and "lasp2_speedup.png" not in doc["plots"]


def test_model_bench_activation_checkpointing(tmp_path):
    out = str(tmp_path)
    rc = model.main(["--models", "hybrid", "--sp", "1", "--seq-len", "64", "--activation-checkpointing", "both",
                     "--warmup", "1", "--reps", "1", "--max-seconds-per-point", "2", "--out", out])
    assert rc == 0
    recs = _assert_outputs(out, "model")["records"]
    assert [(r["label"], r["activation_checkpointing"], r["status"]) for r in recs] == [
        ("hybrid", False, "ok"), ("hybrid+ckpt", True, "ok")]
    assert "| ckpt |" in (tmp_path / "results.md").read_text()


def test_document_starts_seeded_and_valid():
    a, b = document_starts(64, 16), document_starts(64, 16)
    assert a.tolist() == b.tolist() and len(a) == 17 and a[0] == 0 and a[-1] == 64
    assert bool((a[1:] > a[:-1]).all())
    assert document_starts(8, 1).tolist() == [0, 8]


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


def test_model_bench_expert_parallel(tmp_path):
    """--ep: the MoE model's experts over 1 or 2 ranks; all-to-all bytes per rank (the busiest rank's:
    at least the EP formula's average); a dense model with --ep 2 is skipped."""
    from lasp.ops.expert_parallel import ep_bytes_per_layer

    out = str(tmp_path)
    rc = model.main(["--models", "moe-hybrid,hybrid", "--ep", "1,2", "--sp", "2", "--seq-len", "64", "--warmup", "1", "--reps", "1",
                     "--max-seconds-per-point", "2", "--out", out])
    assert rc == 0
    recs = {r["label"]: r for r in _assert_outputs(out, "model")["records"]}
    assert recs["hybrid+ep2"]["status"] == "skipped" and "mixture-of-experts" in recs["hybrid+ep2"]["reason"]
    assert recs["moe-hybrid"]["bytes_per_rank_a2a"] == 0 and recs["moe-hybrid+ep2"]["status"] == "ok"
    cfg = model.model_config(recs["moe-hybrid+ep2"] | {"_base_config": model.SMALL})
    average = ep_bytes_per_layer(32, cfg.num_experts_per_tok, cfg.hidden_size, cfg.num_experts, 4, 2) * cfg.num_layers
    assert recs["moe-hybrid+ep2"]["bytes_per_rank_a2a"] >= average
    assert recs["moe-hybrid+ep2"]["parameters"] < recs["moe-hybrid"]["parameters"]  # half the experts per rank


def test_cost_model_moe_all_to_all():
    """MoE all-to-all time: linear in the sequence length, over NVLink while EP fits a node, none for a dense model."""
    from lasp.models import ModelConfig

    moe = ModelConfig.from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", "models", "qwen3_5-moe-35b-a3b.yaml"))
    hw = predict.Hardware()
    a2a = {(n, ep): predict.step_cost(moe, n, 16, "lasp2", hw, ep=ep)["moe_a2a_s"] for n in (2**16, 2**18) for ep in (8, 16)}
    assert a2a[(2**18, 8)] > 3 * a2a[(2**16, 8)]
    assert a2a[(2**16, 16)] > 5 * a2a[(2**16, 8)]  # 16 ranks cross nodes of 8: InfiniBand
    dense = ModelConfig.from_yaml(os.path.join(os.path.dirname(__file__), "..", "configs", "models", "linear-llama3-1b.yaml"))
    assert predict.step_cost(dense, 2**16, 16, "lasp2", hw)["moe_a2a_s"] == 0.0
