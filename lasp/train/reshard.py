"""``--resume --resume-reshard``: continue a checkpoint on another number of ranks, optimizer
state included, through DeepSpeed's universal checkpoint.

ZeRO partitions the optimizer state (and under ZeRO-3 the weights) per rank, so a checkpoint of
4 ranks does not load on 2. DeepSpeed's ``ds_to_universal`` rewrites one as a universal
checkpoint (every parameter's fp32 weights and Adam moments, whole, one folder each), which
DeepSpeed loads on any number of ranks when its config says ``checkpoint.load_universal``.

Rank 0 converts the checkpoint into ``<checkpoint.dir>/.universal-stepN`` (a hidden name: never
taken for a checkpoint, removed once loaded), in a child process (the converter forks worker
pools, which a process holding communication threads should not do); every rank then loads it.
The ZeRO stage must stay the same (ZeRO-1 and -2 count as one); the windows per step usually
change with the world size (``dp_size``): keep them with ``train.micro_batch_size`` /
``train.grad_accum``, or pass ``--resume-allow-data-change``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

UNIVERSAL_PREFIX = ".universal-"


def universal_tag(tag: str) -> str:
    return UNIVERSAL_PREFIX + tag


def convert(ckpt_dir: str, tag: str) -> str:
    """Write the universal checkpoint of ``ckpt_dir/tag`` (replacing an older one); returns its
    tag. ValueError with the converter's last lines when it fails."""
    out_tag = universal_tag(tag)
    out = os.path.join(ckpt_dir, out_tag)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(ckpt_dir, tag),
           "--output_folder", out, "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "1"]
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # a plain process, not a rank
        env.pop(key, None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        raise ValueError(f"--resume-reshard: DeepSpeed could not convert {os.path.join(ckpt_dir, tag)} to a universal checkpoint: {tail}")
    return out_tag


def remove(ckpt_dir: str, tag: str) -> None:
    shutil.rmtree(os.path.join(ckpt_dir, universal_tag(tag)), ignore_errors=True)
