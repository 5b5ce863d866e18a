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
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint
from .config import RunConfig
from .data import BatchSpec, TokenDataset, embedded_corpus, load_tokenizer, micro_batch
from .ds_config import build_deepspeed_config, lr_at, make_scheduler
from .metrics import MetricsLogger


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
    from lasp.models import ModelConfig

    return ModelConfig.from_dict(cfg.model, source=f"{cfg.source}:model")


def preflight(cfg: RunConfig, world: int) -> tuple[object, TokenDataset]:
    """Every check that needs no collective: world size, model config, data (header, size,
    vocab). Returns ``(model_config, dataset)``."""
    check_world(cfg, world)
    mcfg = build_model_config(cfg)
    data = TokenDataset(resolve_data(cfg))
    data.check_fits(cfg.train.seq_len, mcfg.vocab_size)
    return mcfg, data


def _single_process_env() -> None:
    from lasp.spawn import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def _gathered(engine, zero_stage: int):
    """Full parameters visible on every rank inside the block (ZeRO-3 gathers them)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict on every rank (collective under ZeRO-3: call on all)."""
    with _gathered(engine, zero_stage):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    sample: bool = True,
    verbose: bool = True,
    keep_weights: bool = False,
) -> TrainResult:
    """Train ``cfg`` on this rank; returns the run's :class:`TrainResult` (same losses on every rank).

    ``stop_after``: end right after that optimizer step without a final checkpoint, as if the
    job were killed there (the resume tests use it). ``keep_weights``: return the final fp32
    weights (rank 0) in ``result.weights``.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's detection warning
    import deepspeed

    from lasp.models import LinearLlamaForCausalLM
    from lasp.parallel import DEFAULT_TIMEOUT_S, init_parallel

    t, layout = cfg.train, cfg.parallel.layout
    world = world_size_from_env()
    mcfg, data = preflight(cfg, world)
    ckpt_dir = cfg.checkpoint_dir
    if resume:
        checkpoint.check_resumable(ckpt_dir, world, t.seed)

    _quiet_deepspeed()
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        _single_process_env()  # DeepSpeed needs a process group, even for one process
    state = init_parallel(cfg.parallel.sp_size, timeout_s=cfg.parallel.timeout_s or DEFAULT_TIMEOUT_S)
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = BatchSpec(t.seq_len, t.micro_batch_size, t.grad_accum, state.dp_size, t.seed)

    torch.manual_seed(t.seed)  # same initial replica on every rank
    model = LinearLlamaForCausalLM(mcfg)
    if t.activation_checkpointing:
        model.set_activation_checkpointing(True)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    ds_config = build_deepspeed_config(cfg, world)
    scheduler = None if "scheduler" in ds_config else make_scheduler(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line per rank about its shm op
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config, lr_scheduler=scheduler)
    device = engine.device

    start_step, tokens_done = 0, 0
    if resume:
        client = checkpoint.load(engine, ckpt_dir)
        start_step, tokens_done = int(client["step"]), int(client.get("tokens", 0))
    last_step = min(t.steps, stop_after) if stop_after is not None else t.steps

    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        cfg.to_yaml(os.path.join(cfg.out_dir, "run.yaml"))
    if rank == 0 and verbose:
        print(
            f"training {mcfg.num_layers}-layer '{mcfg.layer_pattern}' model ({n_params / 1e6:.2f}M params) "
            f"on {world} ranks: SP={state.sp_size} x DP={state.dp_size}, {layout} layout, ZeRO-{t.zero_stage}, {t.dtype}; "
            f"steps {start_step}->{t.steps}, {spec.tokens_per_step:,} tokens/step; data {data.path} ({data.num_tokens:,} tokens)",
            flush=True,
        )
    logger = MetricsLogger(cfg.out_dir, rank, t.steps, start_step, tensorboard=cfg.tensorboard, progress=progress)
    extra_files = {"model.yaml": _yaml(mcfg.to_dict()), "run.yaml": _yaml(cfg.to_dict())}
    result = TrainResult(start_step=start_step, checkpoint_dir=None, metrics_path=logger.metrics_path)

    def save(step: int) -> str:
        client = {"step": step, "tokens": tokens_done, "seed": t.seed, "world_size": world, "sp_size": state.sp_size, "dp_size": state.dp_size}
        return checkpoint.save(engine, ckpt_dir, step, client, extra_files, rank)

    engine.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: NCCL reduces device tensors
    run_start = time.perf_counter()
    for step in range(start_step, last_step):
        step_start = time.perf_counter()
        lr = lr_at(cfg, step) if scheduler is not None else engine.get_lr()[0]
        loss_sum.zero_()
        for micro in range(t.grad_accum):
            input_ids, labels = micro_batch(data, spec, step, micro, state.dp_rank, state.sp_rank, state.sp_size, layout)
            logits = engine(input_ids.to(device), group=state.sp_group, layout=layout)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten())
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double()
        # the global batch's mean token loss: every rank holds the same number of tokens
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        step_loss = loss_sum.item() / (world * t.grad_accum)
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
        weights = full_state_dict(engine, engine.zero_optimization_stage())  # collective under ZeRO-3: every rank
        if rank == 0:
            result.sample = generate_sample(mcfg, weights, data, cfg) if want_sample else None
            result.weights = weights if keep_weights else None
    if rank == 0 and verbose:
        print_summary(cfg, result)
    return result


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

