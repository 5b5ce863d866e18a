"""The training loop: a Linear-Llama model on DeepSpeed ZeRO over an SP x DP grid.

Call :func:`train` on every rank (under torchrun / the deepspeed launcher / a spawned gloo
group). Everything that can be wrong with the input (config, data, world size) is checked on
every rank before the first collective (:mod:`lasp.train.preflight`). Rank 0 holds the lock
of the run's directories while it runs (:mod:`lasp.train.run_lock`); SIGINT / SIGTERM stop
the run after the current step with a checkpoint (:mod:`lasp.train.preemption`).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import checkpoint, expert_parallel, reshard
from .config import RunConfig
from .data import TOKENIZER_FILE, BatchSpec, TokenDataset, dataset_tokenizer_path, micro_batch
from .packing import IGNORE_INDEX, packed_micro_batch
from .ds_config import build_deepspeed_config, make_scheduler, trainer_clips
from .init_from import build_initial_model
from .metrics import MetricsLogger
from .preemption import Preempted, StopSignals
from .preflight import build_model_config, check_same_inputs, pack_documents, preflight, world_size_from_env  # noqa: F401 - tests import the first and third from here
from .resume import batch_settings, data_fingerprint, env_run_id, move_aside, plan_start, restart_count, schedule_settings
from .run_lock import RunLock, lock_dirs


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


def _single_process_env() -> None:
    from lasp.spawn import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def full_state_dict(engine, zero_stage: int, rank: int, ep_group=None) -> dict[str, torch.Tensor] | None:
    """The model's full fp32 state dict on rank 0's CPU (None on the other ranks). Collective
    under ZeRO-3 and expert parallelism (call on every rank): parameters are gathered ONE AT A
    TIME, so no rank ever holds the whole model twice."""
    module = engine.module
    experts = {id(p) for _, p in expert_parallel.expert_parameters(module)} if ep_group is not None else set()
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for name, p in module.named_parameters(remove_duplicate=False):
        with _gathered_one(p, zero_stage):
            value = expert_parallel.gather_expert(p, ep_group) if id(p) in experts else p
            if out is not None:
                out[name] = value.detach().float().cpu().clone()
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
    allow_data_change: bool = False,
    reshard: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    sample: bool = True,
    verbose: bool = True,
    keep_weights: bool = False,
) -> TrainResult:
    """Train ``cfg`` on this rank; returns the run's :class:`TrainResult` (same losses on every rank).

    ``stop_after``: end right after that optimizer step without a final checkpoint, as if the
    job were killed there (the resume tests use it). ``keep_weights``: return the final fp32
    weights (rank 0) in ``result.weights``. ``resume`` / ``overwrite`` / ``reset_schedule`` /
    ``allow_data_change`` / ``reshard``: ``--resume``, ``--overwrite``, ``--resume-reset-schedule``,
    ``--resume-allow-data-change``, ``--resume-reshard`` (rules in :mod:`lasp.train.resume`); a torchrun elastic
    restart resumes its own run's checkpoint by itself. Raises :class:`Preempted` (on every
    rank) when a SIGINT / SIGTERM stopped the run after a step, with that step saved.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's detection warning
    import deepspeed

    from lasp.parallel import DEFAULT_TIMEOUT_S, init_parallel

    world = world_size_from_env()
    mcfg, init_from, data, packed = preflight(cfg, world)  # init_from: fine-tuning (lasp.train.init_from)
    run_id = env_run_id()
    fingerprint = data_fingerprint(data)
    plan = plan_start(cfg, world=world, resume=resume, overwrite=overwrite, reset_schedule=reset_schedule,
                      allow_data_change=allow_data_change, reshard=reshard, run_id=run_id, restarts=restart_count(),
                      model=mcfg.to_dict(), data=fingerprint, packed=packed)
    rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
    if rank == 0 and plan.messages:
        print("\n".join(f"lasp train: {m}" for m in plan.messages), flush=True)
    if plan.done:  # at or past train.steps: touch nothing
        return TrainResult(start_step=plan.start_step, last_step=plan.start_step)

    _quiet_deepspeed()
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        _single_process_env()  # DeepSpeed needs a process group, even for one process
    timeout_s = cfg.parallel.timeout_s or DEFAULT_TIMEOUT_S
    with StopSignals(announce=rank == 0) as stop:
        state = init_parallel(cfg.parallel.sp_size, ep_size=cfg.parallel.ep_size, timeout_s=timeout_s)  # the timeout of every group, DeepSpeed's too
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line per rank about its shm op
            deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=datetime.timedelta(seconds=timeout_s))
        rank = dist.get_rank()
        lock = RunLock(lock_dirs(cfg.out_dir, cfg.checkpoint_dir))
        refusal = None
        if rank == 0:
            try:
                lock.acquire()
            except ValueError as e:
                refusal = str(e)
        try:
            # a collective: past it, every rank has decided its plan from the files as they were
            run_id = check_same_inputs(data, cfg.checkpoint_dir, plan.resume_tag, run_id, refusal, lock.dirs)
            if plan.move_aside and rank == 0:  # the others touch out_dir only after deepspeed.initialize's collectives
                print("\n".join(f"lasp train: {m}" for m in move_aside(cfg)), flush=True)
                lock.reacquire()
            return _train_locked(cfg, mcfg, init_from, data, packed, plan, state, run_id, fingerprint, stop,
                                 reset_schedule=reset_schedule, stop_after=stop_after, progress=progress, sample=sample,
                                 verbose=verbose, keep_weights=keep_weights)
        finally:
            lock.release()


def _train_locked(cfg: RunConfig, mcfg, init_from, data: TokenDataset, packed: bool, plan, state, run_id: str, fingerprint: dict,
                  stop: StopSignals, *, reset_schedule: bool, stop_after: int | None, progress: bool, sample: bool, verbose: bool,
                  keep_weights: bool) -> TrainResult:
    """:func:`train` once the ranks agree and rank 0 holds the run's lock."""
    import deepspeed

    from lasp.models.info import count_params
    from lasp.models.moe import router_losses

    t, layout = cfg.train, cfg.parallel.layout
    ckpt_dir = cfg.checkpoint_dir
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = BatchSpec(t.seq_len, t.micro_batch_size, t.grad_accum, state.dp_size, t.seed)

    def batch(step: int, micro: int):
        """``(input_ids, labels, cu_seqlens or None)`` of this rank, on the device."""
        if packed:
            ids, labels, cu = packed_micro_batch(data, spec, step, micro, state.dp_rank, state.sp_rank, state.sp_size, layout)
            return ids.to(device), labels.to(device), cu.to(device)
        ids, labels = micro_batch(data, spec, step, micro, state.dp_rank, state.sp_rank, state.sp_size, layout)
        return ids.to(device), labels.to(device), None

    load_tag = plan.resume_tag
    if plan.reshard:  # rank 0 converts, every rank loads the universal checkpoint
        load_tag = _converted(ckpt_dir, plan.resume_tag, rank)
    torch.manual_seed(t.seed)  # same initial replica on every rank
    ds_config = build_deepspeed_config(cfg, world)
    if plan.reshard:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    model = build_initial_model(mcfg, init_from, t.zero_stage, ds_config, load=plan.resume_tag is None, ep_group=state.ep_group)
    if t.activation_checkpointing or t.activation_offload:
        model.set_activation_checkpointing(True, offload=t.activation_offload)
    if state.ep_size > 1:  # experts as DeepSpeed expert parameters (reduced over their EDP group)
        expert_parallel.prepare(model, state, mcfg.num_experts)
    moe, clip_experts = mcfg.mlp == "moe", trainer_clips(cfg)
    n_params = count_params(mcfg)  # the meta-built model's count (tests/test_configs.py)
    scheduler = None if "scheduler" in ds_config else make_scheduler(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line per rank about its shm op
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config,
                                               lr_scheduler=scheduler)
    device = engine.device

    start_step, tokens_done = 0, 0
    if plan.resume_tag is not None:
        client = checkpoint.load(engine, ckpt_dir, load_tag)
        if state.ep_size > 1:
            expert_parallel.load_experts(engine.module, os.path.join(ckpt_dir, load_tag), state)
        start_step, tokens_done = int(client["step"]), int(client.get("tokens", 0))
        if plan.reshard:
            dist.barrier()
            if rank == 0:
                reshard.remove(ckpt_dir, plan.resume_tag)
        if reset_schedule:
            apply_schedule(engine, cfg, scheduler is not None)
    last_step = min(t.steps, stop_after) if stop_after is not None else t.steps

    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        cfg.to_yaml(os.path.join(cfg.out_dir, "run.yaml"))
    if rank == 0 and verbose:
        print(
            f"training {mcfg.num_layers}-layer '{mcfg.layer_pattern}' model ({n_params / 1e6:.2f}M params) "
            f"on {world} ranks: SP={state.sp_size} x DP={state.dp_size}{f' (EP={state.ep_size})' if state.ep_size > 1 else ''}, "
            f"{layout} layout, ZeRO-{t.zero_stage}, {t.dtype}; "
            f"steps {start_step}->{t.steps}, {spec.tokens_per_step:,} tokens/step; data {data.path} ({data.num_tokens:,} tokens"
            f"{', packed documents' if packed else ''})",
            flush=True,
        )
    logger = MetricsLogger(cfg.out_dir, rank, t.steps, start_step, tensorboard=cfg.tensorboard, progress=progress)
    extra_files = {"model.yaml": _yaml(mcfg.to_dict()), "run.yaml": _yaml(cfg.to_dict())}
    if rank == 0:  # the model's tokenizer travels with its checkpoints
        extra_files.update(_tokenizer_file(data))
    result = TrainResult(start_step=start_step, checkpoint_dir=None, metrics_path=logger.metrics_path)

    def save(step: int) -> str:
        client = {
            "step": step, "tokens": tokens_done, "seed": t.seed, "world_size": world, "sp_size": state.sp_size,
            "dp_size": state.dp_size, "ep_size": state.ep_size, "run_id": run_id, "schedule": schedule_settings(cfg),
            "batch": batch_settings(cfg, world, packed), "data": fingerprint,
        }
        more = (lambda tag_dir: expert_parallel.save_experts(engine.module, tag_dir, state)) if state.ep_size > 1 else None
        return checkpoint.save(engine, ckpt_dir, step, client, extra_files, rank, keep_last=cfg.checkpoint.keep_last, write_more=more)

    engine.train()
    loss_sum = torch.zeros(3, dtype=torch.float64, device=device)  # loss, aux, z; on the device: NCCL reduces device tensors
    run_start = time.perf_counter()
    signum = 0
    for step in range(start_step, last_step):
        step_start = time.perf_counter()
        lr = float(engine.get_lr()[0])  # what the optimizer uses for this step (not recomputed from the config)
        batches = [batch(step, micro) for micro in range(t.grad_accum)]
        # the loss is the mean over the counted tokens of the GLOBAL batch (every rank, every micro-step)
        scale = backward_scale([labels for _, labels, _ in batches], world, t.grad_accum)
        loss_sum.zero_()
        for micro, (input_ids, labels, cu_seqlens) in enumerate(batches):
            stats = [] if moe else None
            # the sum of this rank's token losses (labels IGNORE_INDEX = none), fused: no logits
            loss = engine(input_ids, group=state.sp_group, layout=layout, cu_seqlens=cu_seqlens, labels=labels, router_stats=stats)
            objective = loss * scale.to(loss.dtype)
            if moe:  # the router losses of the micro-step's global batch: this rank's share (lasp.models.moe)
                router = router_losses(stats, dist.group.WORLD)
                objective = objective + world * (mcfg.router_aux_loss_coef * router.aux_share + mcfg.router_z_loss_coef * router.z_share)
                loss_sum[1:] += torch.stack([router.aux, router.z]) / world  # every rank holds the global values
            engine.backward(objective)
            if clip_experts and micro == t.grad_accum - 1:  # the gradients are reduced at the last micro-step
                expert_parallel.clip_grad_norm_(engine.module, t.grad_clip, state.ep_group)
            engine.step()
            loss_sum[0] += loss.detach().double()
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        step_loss = (loss_sum[0] * scale).item() / (world * t.grad_accum)
        router_logs = {"aux_loss": loss_sum[1].item() / t.grad_accum, "z_loss": loss_sum[2].item() / t.grad_accum} if moe else None
        tokens_done += spec.tokens_per_step
        dt = time.perf_counter() - step_start
        result.losses.append(step_loss)
        if (step + 1) % t.log_every == 0 or step + 1 == last_step:
            logger.log(step + 1, step_loss, lr, tokens_done, spec.tokens_per_step / dt, dt, extra=router_logs)
        if not torch.isfinite(torch.tensor(step_loss)):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}")
        done = step + 1
        saved = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.steps
        if saved:
            result.checkpoint_dir = save(done)
        signum = stop.agreed()  # one tiny all-reduce: every rank stops after the same step
        if signum and done < last_step:
            if not saved:
                result.checkpoint_dir = save(done)
            logger.close()
            raise Preempted(signum, done, result.checkpoint_dir)
    elapsed = time.perf_counter() - run_start
    steps_run = last_step - start_step
    result.last_step = last_step
    result.tokens_per_s = steps_run * spec.tokens_per_step / elapsed if steps_run and elapsed > 0 else 0.0
    if stop_after is None or last_step == t.steps:
        result.checkpoint_dir = save(last_step)
    result.plot_path = logger.close()

    want_sample = sample and cfg.sample.max_new_tokens > 0 and not signum  # asked to stop in the last step: no sample
    if want_sample or keep_weights:
        weights = full_state_dict(engine, engine.zero_optimization_stage(), rank, state.ep_group)  # collective under ZeRO-3 / EP
        if rank == 0:
            result.sample = sample_or_warn(mcfg, weights, data, cfg) if want_sample else None
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


def _converted(ckpt_dir: str, tag: str, rank: int) -> str:
    """The universal checkpoint of ``tag`` (rank 0 converts it; ValueError on every rank when it could not)."""
    error = None
    if rank == 0:
        try:
            reshard.convert(ckpt_dir, tag)
        except ValueError as e:
            error = str(e)
    if checkpoint.any_rank(error is not None):
        raise ValueError(error or "--resume-reshard: rank 0 could not convert the checkpoint (see its error)")
    return reshard.universal_tag(tag)


def _tokenizer_file(data: TokenDataset) -> dict[str, str]:
    """``{"tokenizer.json": text}`` of the dataset's tokenizers file ({} for bytes, or with a
    warning when the file is gone: the checkpoints then carry none)."""
    if data.header.get("tokenizer", "bytes") == "bytes":
        return {}
    try:
        with open(dataset_tokenizer_path(data.path, data.header), encoding="utf-8") as f:
            return {TOKENIZER_FILE: f.read()}
    except (OSError, ValueError) as e:
        print(f"lasp train: warning: the checkpoints will carry no tokenizer: {e}", file=sys.stderr, flush=True)
        return {}


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def sample_or_warn(mcfg, weights: dict, data: TokenDataset, cfg: RunConfig) -> str | None:
    """:func:`generate_sample`, or None with a warning on stderr: the sample is a courtesy, it
    never fails a finished run (e.g. a dataset whose tokenizer file is gone)."""
    try:
        return generate_sample(mcfg, weights, data, cfg)
    except Exception as e:  # noqa: BLE001 - whatever it is, the run itself is complete
        print(f"lasp train: warning: no end-of-run sample ({type(e).__name__}: {e}); the run itself is complete",
              file=sys.stderr, flush=True)
        return None


def generate_sample(mcfg, weights: dict, data: TokenDataset, cfg: RunConfig) -> str:
    """A short continuation of ``cfg.sample.prompt`` by a single-process copy of the model, in
    the dataset's tokenizer."""
    from lasp.models import LinearLlamaForCausalLM

    tok = data.tokenizer()
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

