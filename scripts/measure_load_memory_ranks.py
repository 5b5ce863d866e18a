"""Per-rank functions of ``measure_load_memory.py`` (run in ``lasp.spawn`` pools, so importable)."""
from __future__ import annotations

import os


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _ds_config(zero: int, world: int, dtype: str = "bf16") -> dict:
    from lasp.train.config import RunConfig
    from lasp.train.ds_config import build_deepspeed_config

    run = RunConfig.from_dict({"model": {"hidden_size": 64}, "train": {"zero_stage": zero, "dtype": dtype, "micro_batch_size": 1, "grad_accum": 1}},
                              source="measure")
    return build_deepspeed_config(run, world)


def zero3_load(rank: int, world: int, path: str, tiny: str, load: bool = True) -> dict:
    """``model.init_from`` under ZeRO-3 (fresh processes: also the issue-23 F1 path); ``tiny`` (a
    tiny model's directory) is loaded first, so the measurement sees this load only. ``load=False``:
    the construction under ``deepspeed.zero.Init`` alone."""
    import threading
    import time

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lasp.models.weights import source_config
    from lasp.train.init_from import build_initial_model

    ds = _ds_config(3, world)
    build_initial_model(source_config(tiny), tiny, 3, ds)
    cfg = source_config(path)
    before = _status()
    peak = [before["RssAnon"]]

    def sample():
        while True:
            peak[0] = max(peak[0], _status()["RssAnon"])
            time.sleep(0.002)

    _reset_peak()
    threading.Thread(target=sample, daemon=True).start()
    model = build_initial_model(cfg, path, 3, ds, load=load)
    after = _status()
    part = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    return {"peak_mb": (after["VmHWM"] - before["VmRSS"]) / 1e6, "anon_peak_mb": (max(peak[0], after["RssAnon"]) - before["RssAnon"]) / 1e6,
            "anon_after_mb": (after["RssAnon"] - before["RssAnon"]) / 1e6, "partition_mb": part / 1e6}


def _save(rank: int, world: int, hf_dir: str, ckpt: str, zero: int) -> None:
    import contextlib
    import io

    import deepspeed
    import yaml

    from lasp.models.weights import source_config
    from lasp.train import checkpoint
    from lasp.train.init_from import build_initial_model

    cfg = source_config(hf_dir)
    ds = _ds_config(zero, world)
    model = build_initial_model(cfg, hf_dir, zero, ds)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    run = {"model": {"init_from": hf_dir}, "train": {"dtype": "bf16", "zero_stage": zero}}
    extra = {"model.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False), "run.yaml": yaml.safe_dump(run, sort_keys=False)}
    checkpoint.save(engine, ckpt, 1, {"step": 1}, extra, rank)


def make_checkpoint(cfg, hf_dir: str, ckpt: str, zero: int, world: int) -> None:
    """A bf16 DeepSpeed checkpoint of ``hf_dir``'s weights under ZeRO ``zero`` on ``world`` ranks
    (saved before any step: the fp32 master copy exists, Adam's moments do not yet)."""
    from lasp.spawn import SpawnedGroup

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with SpawnedGroup(world, timeout=1800) as pool:
        pool.run(_save, hf_dir, ckpt, zero)
