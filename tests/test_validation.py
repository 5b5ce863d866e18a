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


def test_method_tables_match_the_accepted_names():
    from lasp import attention
    from lasp.ops import checks

    assert tuple(attention.LINEAR_METHODS) == checks.LINEAR_METHOD_NAMES
    assert tuple(attention.SOFTMAX_METHODS) == checks.SOFTMAX_METHOD_NAMES
    assert all(callable(f) for f in (*attention.LINEAR_METHODS.values(), *attention.SOFTMAX_METHODS.values()))


def triton_head_dim_worker(rank, world, method):
    from lasp import comm

    q, k, v, g, _ = linear_inputs(1, 8, 2, 24, 32, gates="g", seed=rank)  # K=24: no kernel takes it
    with comm.record() as log:
        try:
            lasp.linear_attention(q, k, v, g, group=dist.group.WORLD, method=method, backend="triton")
        except ValueError as e:
            return str(e), log.collectives
    return None, log.collectives


@pytest.mark.parametrize("method", ["ulysses", "lasp2"])
def test_triton_unsupported_head_dim_raises_before_any_collective(spawn, method):
    for msg, collectives in spawn(2).run(triton_head_dim_worker, method, timeout=60):
        assert msg is not None and "K (q/k head dim)=24" in msg, msg
        assert collectives == 0


@pytest.mark.parametrize(
    "backend,on_cuda,K,V,expected",
    [
        ("auto", False, 64, 64, "torch"),
        ("auto", False, 24, 64, "torch"),  # CPU: torch anyway, no warning
        ("auto", True, 64, 128, "triton"),
        ("torch", True, 64, 64, "torch"),
        ("triton", True, 64, 64, "triton"),
    ],
)
def test_choose_backend(backend, on_cuda, K, V, expected, recwarn):
    from lasp.ops.checks import choose_backend

    assert choose_backend(backend, on_cuda=on_cuda, interpreting=False, K=K, V=V) == expected
    assert not [w for w in recwarn if "backend='auto'" in str(w.message)]


def test_auto_backend_falls_back_to_torch_with_one_warning_for_unsupported_head_dims():
    from lasp.ops.checks import choose_backend

    with pytest.warns(UserWarning, match=r"V \(v head dim\)=48.*torch chunk path") as record:
        assert choose_backend("auto", on_cuda=True, interpreting=False, K=64, V=48) == "torch"
    assert len(record) == 1
    with pytest.raises(ValueError, match=r"V \(v head dim\)=48: backend='triton' needs head dims"):
        choose_backend("triton", on_cuda=True, interpreting=False, K=64, V=48)
