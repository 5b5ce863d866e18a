"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without the logits.

The LM head's logits ``[N, V]`` in fp32 are the largest tensor of a training step at a real
vocabulary (Qwen3.5: V = 248,320; 8,192 tokens -> 8.1 GB, and ``F.cross_entropy`` adds a
log-softmax and a gradient of the same size). This op walks the tokens in chunks and never holds
more than one chunk of logits:

forward, per chunk of ``C`` tokens:
    1. ``logits = (h_c @ W.T).float()``  ``[C, V]`` fp32 (the matmul in the input dtype, as
       ``F.linear`` computes it, then upcast: bf16 logits are the ones ``F.cross_entropy(hidden @
       weight.T)`` sees, and ``W`` is never copied to fp32);
    2. ``lse = logsumexp(logits)``, ``loss = lse - logits[label]`` (0 at ``ignore_index``);
    3. when a gradient is wanted and the reduction is a scalar: ``dlogits = softmax - onehot`` in
       place on the chunk, times ``1`` (sum) or ``1 / count`` (mean), and the chunk's
       ``dhidden_c = dlogits @ W`` and ``dweight += dlogits.T @ h_c`` (fp32 accumulator).
backward:
    scalar reductions: the kept gradients times the incoming scalar (in place, no matmul);
    ``reduction="none"``: the incoming gradient differs per token, so the chunks are recomputed
    (steps 1-3 with ``lse`` saved from forward, rows scaled by their own gradient).

Which to keep was measured (``scripts/bench_linear_cross_entropy.py``,
docs/bench/cpu-linear-cross-entropy.md): computing the gradients in forward (as Liger-Kernel's
fused linear cross-entropy does) costs three matmul passes instead of four (1.5x faster than
recomputing at N = 1,024, V = 248,320, H = 256 on the CPU), and its peak is the recompute's (505
MiB both): each holds the fp32 ``dweight`` and one chunk at once, one in forward, the other in
backward. In a model the loss's backward is the first one, when every saved activation is still
alive, so keeping ``dweight`` from the end of forward to the start of backward adds nothing to
the step's peak. It also needs no ``weight`` in backward (under ZeRO-3 the LM head is not
gathered again).

Memory beyond the inputs and the returned gradients: one chunk of fp32 logits (plus its bf16
copy for bf16 inputs), the fp32 ``dweight`` accumulator (for bf16 inputs: plus one bf16
``[V, H]`` block product of at most :data:`CHUNK_BYTES`), ``lse`` and the per-token losses
``[N]``. Nothing waits on the device (no host sync): the count of labelled tokens stays a tensor.
"""
from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy", "default_chunk_size", "CHUNK_BYTES", "REDUCTIONS", "IGNORE_INDEX"]

#: The default bound on one chunk of fp32 logits (bytes).
CHUNK_BYTES = 256 << 20
REDUCTIONS = ("sum", "mean", "none")
#: The label of a token without one (``F.cross_entropy``'s default, the trainer's)
IGNORE_INDEX = -100


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of fp32 logits ``[C, vocab_size]`` is at most
    :data:`CHUNK_BYTES` (256 MiB): ``max(1, CHUNK_BYTES // (4 * vocab_size))``; 270 for V = 248,320."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def check_inputs(hidden, weight, labels, ignore_index, reduction, chunk_size) -> None:
    """ValueError naming the argument unless the inputs are what :func:`linear_cross_entropy` takes."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor [N, H], got {_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be a tensor [V, H] with H = hidden's {hidden.shape[1]}, got {_describe(weight)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (vocabulary entry), got V = 0")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) or labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be an int64/int32 tensor [N] = [{hidden.shape[0]}], got {_describe(labels)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on hidden's device {hidden.device}, got {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _describe(x) -> str:
    return f"{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[C, V]`` fp32 logits of one chunk: the matmul in the input dtype, then upcast (a new
    tensor either way, so the caller may overwrite it)."""
    logits = h @ weight.T
    return logits if logits.dtype == torch.float32 else logits.float()


def chunk_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [C], lse [C])`` of one chunk; ``logits`` is left holding ``exp(logits - max)`` (it
    is overwritten in place: no second ``[C, V]`` buffer)."""
    valid = labels != ignore_index
    picked = logits.gather(1, torch.where(valid, labels, 0).long()[:, None]).squeeze(1)
    top = logits.amax(1, keepdim=True)
    lse = logits.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
    return torch.where(valid, lse - picked, 0.0), lse


def logit_grad_(probs: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``(softmax - onehot(labels)) * row_scale`` in place on ``probs`` (the softmax ``[C, V]``);
    rows at ``ignore_index`` become 0. ``row_scale``: ``[C]`` or a scalar tensor."""
    valid = labels != ignore_index
    probs.scatter_add_(1, torch.where(valid, labels, 0).long()[:, None], -valid.to(probs.dtype)[:, None])
    return probs.mul_((valid * row_scale)[:, None])


def accumulate_grads(dlogits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dhidden: torch.Tensor | None,
                     dweight: torch.Tensor | None) -> None:
    """One chunk's ``dhidden_c = dlogits @ W`` (written into ``dhidden``, the chunk's rows) and
    ``dweight += dlogits.T @ h_c`` (fp32 ``dweight``). For bf16/fp16 inputs the products run in
    the input dtype; the ``[V, H]`` product is taken in vocabulary blocks of at most
    :data:`CHUNK_BYTES` before its fp32 accumulation."""
    d = dlogits if dlogits.dtype == h.dtype else dlogits.to(h.dtype)
    if dhidden is not None:
        torch.mm(d, weight, out=dhidden)
    if dweight is None:
        return
    if h.dtype == torch.float32:
        dweight.addmm_(d.T, h)
        return
    block = max(1, CHUNK_BYTES // (h.shape[1] * h.element_size()))
    for v in range(0, dweight.shape[0], block):
        dweight[v:v + block] += d[:, v:v + block].T @ h


def _chunks(n: int, chunk: int):
    return ((s, min(s + chunk, n)) for s in range(0, n, chunk))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward: the per-token losses chunk by chunk (and, for ``sum`` / ``mean`` under autograd,
    the gradients); backward: those gradients scaled, or for ``none`` a recompute of the chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, reduction: str, chunk: int, grad_mode: bool):
        n = hidden.shape[0]  # grad_mode: the caller's torch.is_grad_enabled() (off in here)
        want_h, want_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        grads_now = reduction != "none" and (want_h or want_w)
        count = (labels != ignore_index).sum()
        scale = 1.0 / count.clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones((), device=hidden.device)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device) if reduction == "none" else None
        dhidden = torch.empty_like(hidden) if grads_now and want_h else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads_now and want_w else None
        for s, e in _chunks(n, chunk):
            logits = chunk_logits(hidden[s:e], weight)
            loss_c, lse_c = chunk_loss(logits, labels[s:e], ignore_index)
            losses[s:e] = loss_c
            if lse is not None:
                lse[s:e] = lse_c
            if grads_now:  # logits holds exp(logits - max): the softmax, then dlogits, in place
                logit_grad_(logits.div_(logits.sum(1, keepdim=True)), labels[s:e], scale, ignore_index)
                accumulate_grads(logits, hidden[s:e], weight, None if dhidden is None else dhidden[s:e], dweight)
            del logits  # before the next chunk's logits exist
        ctx.ignore_index, ctx.reduction, ctx.chunk = ignore_index, reduction, chunk
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, labels, lse)
            return losses
        # kept as attributes, not saved tensors: backward hands them on as the only reference, so
        # autograd's gradient accumulation takes them without a copy
        ctx.kept = (dhidden, dweight, weight.dtype)
        total = losses.sum()
        return total if reduction == "sum" else total / count

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":  # the kept gradients, scaled in place (no second [V, H])
            if ctx.kept is None:
                raise RuntimeError("linear_cross_entropy: a second backward through the same graph (retain_graph=True) "
                                   "is not supported with reduction='sum'/'mean' (the gradients are computed in forward "
                                   "and handed on once); use reduction='none' and sum it")
            dhidden, dweight, weight_dtype = ctx.kept
            ctx.kept = None
            dh = None if dhidden is None else dhidden.mul_(grad)
            dw = None if dweight is None else dweight.mul_(grad).to(weight_dtype)
            del dhidden, dweight
            return dh, dw, None, None, None, None, None
        return recompute_backward(ctx, grad)


def recompute_backward(ctx, grad):
    """``reduction="none"``: each chunk's logits again, ``softmax = exp(logits - lse)``, rows
    scaled by their incoming gradient."""
    hidden, weight, labels, lse = ctx.saved_tensors
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dhidden = torch.empty_like(hidden) if want_h else None
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    for s, e in _chunks(hidden.shape[0], ctx.chunk):
        probs = chunk_logits(hidden[s:e], weight).sub_(lse[s:e, None]).exp_()
        logit_grad_(probs, labels[s:e], grad[s:e].float(), ctx.ignore_index)
        accumulate_grads(probs, hidden[s:e], weight, None if dhidden is None else dhidden[s:e], dweight)
        del probs
    return dhidden, None if dweight is None else dweight.to(weight.dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction=...)`` in fp32,
    never holding more than one chunk of logits.

    Args:
        hidden: ``[N, H]`` float (fp32, bf16 or fp16), e.g. the final normed hidden states.
        weight: ``[V, H]`` the LM head (tied: the embedding matrix), hidden's dtype and device.
            Its gradient is accumulated in fp32 and returned in its dtype (a tied weight gets the
            embedding's gradient added by autograd).
        labels: ``[N]`` int64/int32 class ids in ``[0, V)`` or ``ignore_index`` (not checked on
            the host: that would wait on the device).
        ignore_index: rows with this label contribute no loss and no gradient.
        reduction: ``sum`` (default: what the trainer scales), ``mean`` (over the non-ignored
            rows, F.cross_entropy's definition: NaN when every row is ignored, gradients 0), or
            ``none`` (``[N]``, 0 at ignored rows).
        chunk_size: tokens per chunk; default :func:`default_chunk_size` (one chunk of fp32
            logits <= 256 MiB).
    Returns:
        fp32: a scalar (``sum`` / ``mean``) or ``[N]`` (``none``). Gradients come back in the
        inputs' dtypes. Logits are the input-dtype matmul upcast to fp32 (module docstring).
    """
    check_inputs(hidden, weight, labels, ignore_index, reduction, chunk_size)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, reduction, chunk, torch.is_grad_enabled())
