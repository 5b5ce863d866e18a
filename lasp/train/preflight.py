"""What a run checks before it trains: on every rank, before the first collective (except
:func:`check_same_inputs`, the one small all-gather that makes the ranks agree).

Everything here raises ``ValueError`` naming the key (and the file) at fault: the world size,
the model config, ``train.seq_len`` against the model's ``max_seq_len``, the precision against
the machine, writable output directories, the data (header, size, every token id against the
model's vocab), document packing.
"""
from __future__ import annotations

import os
import random
import tempfile
import zlib

import torch
import torch.distributed as dist

from . import checkpoint
from .config import RunConfig, check_world as _check_world
from .data import HEADER, TokenDataset, embedded_corpus


def world_size_from_env() -> int:
    """The world size this process runs in (initialised group, else launcher env, else 1)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(cfg: RunConfig, world: int) -> None:
    """ValueError unless ``parallel.sp_size`` and ``parallel.ep_size`` divide ``world``."""
    _check_world(cfg.parallel.sp_size, world, cfg.source)
    _check_world(cfg.parallel.ep_size, world, cfg.source, key="ep_size")


def check_experts(cfg: RunConfig, mcfg, init_from: str | None) -> None:
    """ValueError unless ``parallel.ep_size`` fits the model (an ``mlp: moe`` model whose experts it divides)."""
    ep = cfg.parallel.ep_size
    if ep == 1:
        return
    if mcfg.mlp != "moe":
        raise ValueError(f"{cfg.source}: parallel.ep_size={ep} needs a mixture-of-experts model (model.mlp: moe), got mlp: {mcfg.mlp}")
    if mcfg.num_experts % ep:
        raise ValueError(f"{cfg.source}: parallel.ep_size={ep} must divide model.num_experts={mcfg.num_experts}")


def resolve_data(cfg: RunConfig) -> str:
    """The dataset directory of the run (preparing the embedded corpus on first use)."""
    if cfg.data.path is not None:
        return cfg.data.path
    return embedded_corpus(cfg.data.cache_dir)


def build_model_config(cfg: RunConfig):
    """``(ModelConfig, model.init_from path or None)`` of the run (:mod:`lasp.train.init_from`)."""
    from .init_from import split_model_section

    return split_model_section(cfg.model, cfg.source)


def check_writable(path: str, key: str) -> None:
    """ValueError naming ``key`` unless ``path`` is (or can be created as) a writable directory."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{key}: cannot write {path!r} ({probe!r} is not a directory)")
    try:  # os.access says yes to root everywhere, also on /proc: try it
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"{key}: cannot write {path!r} ({probe!r} is not writable: {e.strerror})") from None


def cpu_supports_fp16() -> bool:
    """Whether this CPU runs fp16 kernels (DeepSpeed's CPU accelerator refuses fp16 otherwise)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(cfg: RunConfig) -> None:
    """ValueError unless this machine can train in ``train.dtype`` (fp16 needs CPU support;
    bf16 on a GPU needs one that has it)."""
    dtype, src = cfg.train.dtype, cfg.source
    if torch.cuda.is_available():
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{src}: train.dtype=bf16: this GPU has no bf16 support; use train.dtype=fp16 or fp32")
        return
    if dtype == "fp16" and not cpu_supports_fp16():
        raise ValueError(
            f"{src}: train.dtype=fp16: this CPU has no fp16 support (torch.ops.mkldnn._is_mkldnn_fp16_supported() is false; "
            "DeepSpeed would stop with 'Type fp16 is not supported on your device'): use train.dtype=bf16 or fp32"
        )


def check_seq_len(cfg: RunConfig, mcfg) -> None:
    """ValueError when ``train.seq_len`` exceeds the model's ``max_seq_len`` (the context it is
    made for: ``max_position_embeddings`` of a Hugging Face model)."""
    if cfg.train.seq_len > mcfg.max_seq_len:
        raise ValueError(
            f"{cfg.source}: train.seq_len={cfg.train.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len} (the context it "
            f"is made for): lower train.seq_len, or raise model.max_seq_len (RoPE computes any position, so a longer context is "
            "a deliberate choice, e.g. context extension of a pretrained model)"
        )


def preflight(cfg: RunConfig, world: int) -> tuple[object, str | None, TokenDataset, bool]:
    """Every check that needs no collective: world size, model config, sequence length,
    precision, writable output directories, data (header, size, token ids against the model's
    vocab, document packing). Returns ``(model_config, init_from path or None, dataset, whether
    documents are packed)``."""
    check_world(cfg, world)
    mcfg, init_from = build_model_config(cfg)
    check_experts(cfg, mcfg, init_from)
    check_seq_len(cfg, mcfg)
    check_precision(cfg)
    check_writable(cfg.out_dir, "out_dir")
    check_writable(cfg.checkpoint_dir, "checkpoint.dir")
    data = TokenDataset(resolve_data(cfg))
    data.check_fits(cfg.train.seq_len, mcfg.vocab_size)
    return mcfg, init_from, data, pack_documents(cfg, data)


def pack_documents(cfg: RunConfig, data: TokenDataset) -> bool:
    """Whether the run packs documents: ``data.pack_documents``, default (null) = the dataset has
    a document index. ValueError when it is true and the dataset has no index."""
    want = cfg.data.pack_documents
    if want and not data.has_documents:
        raise ValueError(
            f"{cfg.source}: data.pack_documents is true, but the dataset {data.path!r} has no document index "
            f"(documents.bin; it was prepared before lasp recorded documents): prepare it again with `lasp data prepare`, "
            "or set data.pack_documents: false to train on it as one token stream"
        )
    return data.has_documents if want is None else bool(want)


def check_same_inputs(data: TokenDataset, ckpt_dir: str, resume_tag: str | None, run_id: str | None,
                      refusal: str | None = None, lock_dirs: list[str] = ()) -> str:
    """One small all-gather: every rank must see the same dataset (size and header checksum) and
    the same checkpoint (tag and manifest checksum), and rank 0 must hold the run's lock on
    ``lock_dirs`` (``refusal``: rank 0's reason when it does not, see :mod:`lasp.train.run_lock`);
    ValueError on every rank otherwise. Returns the run id (``run_id``, else rank 0's random one)."""
    from .run_lock import check_unlocked

    from lasp import comm

    def crc(path: str) -> int:
        with open(path, "rb") as f:
            return zlib.crc32(f.read())

    step = -1 if resume_tag is None else int(resume_tag.removeprefix("step"))
    manifest = 0 if resume_tag is None else crc(os.path.join(ckpt_dir, resume_tag, checkpoint.MANIFEST))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([data.num_tokens, crc(os.path.join(data.path, HEADER)), step, manifest, random.getrandbits(62),
                         int(refusal is not None)], dtype=torch.int64, device=device)
    every, _ = comm.all_gather(mine, None, tag="train-preflight")
    rows = every.tolist()
    if rows[0][5]:
        if refusal is None:  # the other ranks name the holder too (they read the same lock file)
            check_unlocked(list(lock_dirs))
        raise ValueError(refusal or "out_dir: rank 0 could not lock the run's directories: another run is using them (see rank 0's error)")
    for r, row in enumerate(rows):
        if row[:2] != rows[0][:2]:
            raise ValueError(
                f"data.path: rank {r} sees a different dataset than rank 0 ({row[0]:,} vs {rows[0][0]:,} tokens, header "
                f"checksum {row[1]:08x} vs {rows[0][1]:08x}); every rank must read the same data ({data.path})"
            )
        if row[2:4] != rows[0][2:4]:
            raise ValueError(
                f"checkpoint.dir: rank {r} sees a different checkpoint than rank 0 (step {row[2]} vs {rows[0][2]}, manifest "
                f"checksum {row[3]:08x} vs {rows[0][3]:08x}); every rank must read the same checkpoint directory ({ckpt_dir})"
            )
    return run_id or f"{rows[0][4]:016x}"
