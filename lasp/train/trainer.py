"""The training loop: a Linear-Llama model on DeepSpeed ZeRO over an SP x DP grid.

Call :func:`train` on every rank (under torchrun / the deepspeed launcher / a spawned gloo
group). Everything that can be wrong with the input (config, data, world size) is checked on
every rank before the first collective.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import tempfile
import time
import zlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint
from .config import RunConfig
from .data import HEADER, BatchSpec, TokenDataset, embedded_corpus, load_tokenizer, micro_batch
from .packing import IGNORE_INDEX, packed_micro_batch
from .ds_config import build_deepspeed_config, make_scheduler
from .init_from import build_initial_model
from .metrics import MetricsLogger
from .resume import env_run_id, move_aside, plan_start, restart_count, schedule_settings


@dataclass
class TrainResult:
    """What a run did: ``losses[i]`` is the global mean loss of optimizer step ``start_step + i + 1``."""

    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    last_step: int = 0
    tokens_per_s: float = 0.0
    checkpoint_dir: str | None = None
    metrics_path: str | None = None
    plot_path: str | None = None
    sample: str | None = None
    #: the final fp32 weights (rank 0, when ``train(keep_weights=True)``)
    weights: dict | None = field(default=None, repr=False)


def world_size_from_env() -> int:
    """The world size this process runs in (initialised group, else launcher env, else 1)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(cfg: RunConfig, world: int) -> None:
    """ValueError unless ``parallel.sp_size`` divides ``world``."""
    sp = cfg.parallel.sp_size
    if world % sp != 0:
        raise ValueError(f"{cfg.source}: parallel.sp_size={sp} must divide the world size {world}")


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


def preflight(cfg: RunConfig, world: int) -> tuple[object, str | None, TokenDataset, bool]:
    """Every check that needs no collective: world size, model config, writable output
    directories, data (header, size, token ids against the model's vocab, document packing).
    Returns ``(model_config, init_from path or None, dataset, whether documents are packed)``."""
    check_world(cfg, world)
    mcfg, init_from = build_model_config(cfg)
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


def check_same_inputs(data: TokenDataset, ckpt_dir: str, resume_tag: str | None, run_id: str | None) -> str:
    """One small all-gather: every rank must see the same dataset (size and header checksum) and
    the same checkpoint (tag and manifest checksum); ValueError on every rank otherwise. Returns
    the run id (``run_id``, else rank 0's random one)."""
    from lasp import comm

    def crc(path: str) -> int:
        with open(path, "rb") as f:
            return zlib.crc32(f.read())

    step = -1 if resume_tag is None else int(resume_tag.removeprefix("step"))
    manifest = 0 if resume_tag is None else crc(os.path.join(ckpt_dir, resume_tag, checkpoint.MANIFEST))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([data.num_tokens, crc(os.path.join(data.path, HEADER)), step, manifest, random.getrandbits(62)],
                        dtype=torch.int64, device=device)
    every, _ = comm.all_gather(mine, None, tag="train-preflight")
    rows = every.tolist()
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


def _single_process_env() -> None:
    from lasp.spawn import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def full_state_dict(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The model's full fp32 state dict on rank 0's CPU (None on the other ranks). Collective
    under ZeRO-3 (call on every rank): parameters are gathered ONE AT A TIME, so no rank ever
    holds the whole model twice."""
    module = engine.module
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for name, p in module.named_parameters(remove_duplicate=False):
        with _gathered_one(p, zero_stage):
            if out is not None:
                out[name] = p.detach().float().cpu().clone()
    if out is not None:
        for name, b in module.named_buffers():
            out[name] = b.detach().float().cpu().clone()
        out = {k: out[k] for k in module.state_dict(keep_vars=True) if k in out}
    return out


@contextlib.contextmanager
def _gathered_one(p, zero_stage: int):
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield
    else:
        yield


def apply_schedule(engine, cfg: RunConfig, scheduler_is_ours: bool) -> None:
    """``--resume-reset-schedule``: after loading a checkpoint, make the optimizer and the LR
    schedule use the run config's lr / weight_decay instead of the checkpoint's."""
    t = cfg.train
    groups = engine.optimizer.param_groups
    for g in groups:
        g["weight_decay"] = t.weight_decay
        g["initial_lr"] = t.lr
    sched = engine.lr_scheduler
    if scheduler_is_ours and sched is not None:
        sched.base_lrs = [t.lr for _ in groups]
        for g, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * fn(sched.last_epoch)


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reset_schedule: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    sample: bool = True,
    verbose: bool = True,
    keep_weights: bool = False,
) -> TrainResult:
    """Train ``cfg`` on this rank; returns the run's :class:`TrainResult` (same losses on every rank).

    ``stop_after``: end right after that optimizer step without a final checkpoint, as if the
    job were killed there (the resume tests use it). ``keep_weights``: return the final fp32
    weights (rank 0) in ``result.weights``. ``resume`` / ``overwrite`` / ``reset_schedule``:
    ``--resume``, ``--overwrite``, ``--resume-reset-schedule`` (rules in :mod:`lasp.train.resume`);
    a torchrun elastic restart resumes its own run's checkpoint by itself.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's detection warning
    import deepspeed

    from lasp.models.info import count_params
    from lasp.parallel import DEFAULT_TIMEOUT_S, init_parallel

    t, layout = cfg.train, cfg.parallel.layout
    world = world_size_from_env()
    mcfg, init_from, data, packed = preflight(cfg, world)  # init_from: fine-tuning (lasp.train.init_from)
    ckpt_dir = cfg.checkpoint_dir
    run_id = env_run_id()
    plan = plan_start(cfg, world=world, resume=resume, overwrite=overwrite, reset_schedule=reset_schedule,
                      run_id=run_id, restarts=restart_count())
    rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
    if rank == 0 and plan.messages:
        print("\n".join(f"lasp train: {m}" for m in plan.messages), flush=True)
    if plan.done:  # at or past train.steps: touch nothing
        return TrainResult(start_step=plan.start_step, last_step=plan.start_step)

    _quiet_deepspeed()
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        _single_process_env()  # DeepSpeed needs a process group, even for one process
    state = init_parallel(cfg.parallel.sp_size, timeout_s=cfg.parallel.timeout_s or DEFAULT_TIMEOUT_S)
    rank, world = dist.get_rank(), dist.get_world_size()
    # a collective: past it, every rank has decided its plan from the files as they were
    run_id = check_same_inputs(data, ckpt_dir, plan.resume_tag, run_id)
    if plan.move_aside and rank == 0:  # the others touch out_dir only after deepspeed.initialize's collectives
        print("\n".join(f"lasp train: {m}" for m in move_aside(cfg)), flush=True)
    spec = BatchSpec(t.seq_len, t.micro_batch_size, t.grad_accum, state.dp_size, t.seed)

    def batch(step: int, micro: int):
        """``(input_ids, labels, cu_seqlens or None)`` of this rank, on the device."""
        if packed:
            ids, labels, cu = packed_micro_batch(data, spec, step, micro, state.dp_rank, state.sp_rank, state.sp_size, layout)
            return ids.to(device), labels.to(device), cu.to(device)
        ids, labels = micro_batch(data, spec, step, micro, state.dp_rank, state.sp_rank, state.sp_size, layout)
        return ids.to(device), labels.to(device), None

    torch.manual_seed(t.seed)  # same initial replica on every rank
    ds_config = build_deepspeed_config(cfg, world)
    model = build_initial_model(mcfg, init_from, t.zero_stage, ds_config, load=plan.resume_tag is None)
    if t.activation_checkpointing or t.activation_offload:
        model.set_activation_checkpointing(True, offload=t.activation_offload)
    n_params = count_params(mcfg)  # the meta-built model's count (tests/test_configs.py)
    scheduler = None if "scheduler" in ds_config else make_scheduler(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line per rank about its shm op
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config, lr_scheduler=scheduler)
    device = engine.device

    start_step, tokens_done = 0, 0
    if plan.resume_tag is not None:
        client = checkpoint.load(engine, ckpt_dir, plan.resume_tag)
        start_step, tokens_done = int(client["step"]), int(client.get("tokens", 0))
        if reset_schedule:
            apply_schedule(engine, cfg, scheduler is not None)
    last_step = min(t.steps, stop_after) if stop_after is not None else t.steps

    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        cfg.to_yaml(os.path.join(cfg.out_dir, "run.yaml"))
    if rank == 0 and verbose:
        print(
            f"training {mcfg.num_layers}-layer '{mcfg.layer_pattern}' model ({n_params / 1e6:.2f}M params) "
            f"on {world} ranks: SP={state.sp_size} x DP={state.dp_size}, {layout} layout, ZeRO-{t.zero_stage}, {t.dtype}; "
            f"steps {start_step}->{t.steps}, {spec.tokens_per_step:,} tokens/step; data {data.path} ({data.num_tokens:,} tokens"
            f"{', packed documents' if packed else ''})",
            flush=True,
        )
    logger = MetricsLogger(cfg.out_dir, rank, t.steps, start_step, tensorboard=cfg.tensorboard, progress=progress)
    extra_files = {"model.yaml": _yaml(mcfg.to_dict()), "run.yaml": _yaml(cfg.to_dict())}
    result = TrainResult(start_step=start_step, checkpoint_dir=None, metrics_path=logger.metrics_path)

    def save(step: int) -> str:
        client = {
            "step": step, "tokens": tokens_done, "seed": t.seed, "world_size": world, "sp_size": state.sp_size,
            "dp_size": state.dp_size, "run_id": run_id, "schedule": schedule_settings(cfg),
        }
        return checkpoint.save(engine, ckpt_dir, step, client, extra_files, rank)

    engine.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: NCCL reduces device tensors
    run_start = time.perf_counter()
    for step in range(start_step, last_step):
        step_start = time.perf_counter()
        lr = float(engine.get_lr()[0])  # what the optimizer uses for this step (not recomputed from the config)
        batches = [batch(step, micro) for micro in range(t.grad_accum)]
        # the loss is the mean over the counted tokens of the GLOBAL batch (every rank, every micro-step)
        scale = backward_scale([labels for _, labels, _ in batches], world, t.grad_accum)
        loss_sum.zero_()
        for input_ids, labels, cu_seqlens in batches:
            logits = engine(input_ids, group=state.sp_group, layout=layout, cu_seqlens=cu_seqlens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            engine.backward(loss * scale.to(loss.dtype))
            engine.step()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        step_loss = (loss_sum * scale).item() / (world * t.grad_accum)
        tokens_done += spec.tokens_per_step
        dt = time.perf_counter() - step_start
        result.losses.append(step_loss)
        if (step + 1) % t.log_every == 0 or step + 1 == last_step:
            logger.log(step + 1, step_loss, lr, tokens_done, spec.tokens_per_step / dt, dt)
        if not torch.isfinite(torch.tensor(step_loss)):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}")
        done = step + 1
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.steps:
            result.checkpoint_dir = save(done)
    elapsed = time.perf_counter() - run_start
    steps_run = last_step - start_step
    result.last_step = last_step
    result.tokens_per_s = steps_run * spec.tokens_per_step / elapsed if steps_run and elapsed > 0 else 0.0
    if stop_after is None or last_step == t.steps:
        result.checkpoint_dir = save(last_step)
    result.plot_path = logger.close()

    want_sample = sample and cfg.sample.max_new_tokens > 0
    if want_sample or keep_weights:
        weights = full_state_dict(engine, engine.zero_optimization_stage(), rank)  # collective under ZeRO-3: every rank
        if rank == 0:
            result.sample = generate_sample(mcfg, weights, data, cfg) if want_sample else None
            result.weights = weights if keep_weights else None
    if rank == 0 and verbose:
        print_summary(cfg, result)
    return result


def backward_scale(labels: list[torch.Tensor], world: int, grad_accum: int) -> torch.Tensor:
    """The factor that turns this rank's SUM of token losses into its share of the global mean.

    DeepSpeed's data-parallel group is the whole world (:mod:`lasp.train.ds_config`): it divides
    each micro-step's loss by ``grad_accum`` and averages gradients over the ``world`` ranks. The
    global mean is ``sum of every rank's token-loss sums / N`` with ``N`` the counted tokens
    (labels != ignore) of the whole step over SP x DP, so each rank back-propagates
    ``loss_sum * world * grad_accum / N``: exact however the counted tokens are spread over ranks
    and micro-steps. One small all-reduce (of the counts, known before any forward)."""
    count = sum((y != IGNORE_INDEX).sum() for y in labels).to(torch.float64)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return world * grad_accum / count.clamp(min=1.0)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def generate_sample(mcfg, weights: dict, data: TokenDataset, cfg: RunConfig) -> str:
    """A short continuation of ``cfg.sample.prompt`` by a single-process copy of the model."""
    from lasp.models import LinearLlamaForCausalLM

    tok = load_tokenizer(data.header.get("tokenizer", "bytes"))
    model = LinearLlamaForCausalLM(mcfg)
    model.load_state_dict(weights)
    model.eval()
    s = cfg.sample
    prompt = torch.tensor([tok.encode(s.prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, generator=gen)
    return tok.decode(out[0].tolist())


def print_summary(cfg: RunConfig, r: TrainResult) -> None:
    """The lines a user sees at the end of a run (rank 0)."""
    final = f"{r.losses[-1]:.4f}" if r.losses else "n/a"
    lines = [
        "",
        f"done: steps {r.start_step}->{r.last_step} of {cfg.train.steps}, final loss {final}, {r.tokens_per_s:,.0f} tokens/s",
    ]
    if r.checkpoint_dir:
        lines.append(f"  checkpoint  {r.checkpoint_dir}")
        lines.append(f"              export: lasp export --checkpoint {r.checkpoint_dir} --output {os.path.join(cfg.out_dir, 'export')}")
    lines.append(f"  metrics     {r.metrics_path}")
    if r.plot_path:
        lines.append(f"  loss plot   {r.plot_path}")
    if r.sample is not None:
        lines.append(f"  sample      (prompt {cfg.sample.prompt!r}, {cfg.sample.max_new_tokens} new tokens):")
        lines += ["    | " + line for line in r.sample.splitlines() or [""]]
    print("\n".join(lines), flush=True)

