"""Bad input: a ValueError naming the argument, on every rank, before any collective."""
import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.testing import linear_inputs


def _bad_cases():
    q, k, v, g, gg = linear_inputs(1, 8, 2, 4, 4, gates="both")
    return {
        "q-shape": (dict(q=q[0], k=k, v=v), "q must have shape"),
        "kv-T": (dict(q=q, k=k[:, :4], v=v), "k must have q's"),
        "dtype": (dict(q=q, k=k.double(), v=v), "k.dtype"),
        "v-heads": (dict(q=q, k=k, v=v[:, :, :1]), "v must have"),
        "g-shape": (dict(q=q, k=k, v=v, g=g[:, :, :1]), "g must have shape"),
        "g_gamma-shape": (dict(q=q, k=k, v=v, g_gamma=gg[:1]), "g_gamma must have shape"),
        "gates-noncausal": (dict(q=q, k=k, v=v, g=g, causal=False), "causal=False"),
        "zigzag-odd": (dict(q=q[:, :7], k=k[:, :7], v=v[:, :7], layout="zigzag"), "must be even"),
        "layout": (dict(q=q, k=k, v=v, layout="spiral"), "layout must be"),
        "method": (dict(q=q, k=k, v=v, method="lasp3"), "method must be"),
        "backend": (dict(q=q, k=k, v=v, backend="cuda"), "backend must be"),
    }


BAD = _bad_cases()


def bad_input_worker(rank, world, case):
    kwargs, _ = BAD[case]
    try:
        lasp.linear_attention(**kwargs, group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("case", BAD.keys())
def test_bad_input_raises_on_every_rank(spawn, case):
    msgs = spawn(2).run(bad_input_worker, case, timeout=60)
    assert all(m is not None and BAD[case][1] in m for m in msgs), msgs


def test_group_without_distributed():
    assert not dist.is_initialized()
    q, k, v, _, _ = linear_inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        lasp.linear_attention(q, k, v, group=object())


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _, _ = linear_inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        lasp.linear_attention(q, k, v, backend="triton")


def test_scale_and_dtype_preserved():
    q, k, v, g, gg = linear_inputs(1, 16, 2, 8, 8, gates="both", dtype=torch.bfloat16)
    o = lasp.linear_attention(q, k, v, g, gg, scale=0.5)
    assert o.dtype == torch.bfloat16 and o.shape == (1, 16, 2, 8)
