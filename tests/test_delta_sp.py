"""The gated delta rule and the GDN model under sequence parallelism vs one process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.ops.delta_reference import naive_gated_delta_rule
from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close, delta_inputs, seed_for

from test_delta import NAMES


def run_delta(rank, world, xs, do, dF, method, layout, l2, final):
    group = dist.group.WORLD
    local = [None if x is None else shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in xs[:5]]
    s0 = None if xs[5] is None else xs[5].clone().requires_grad_()
    with comm.record() as log:
        res = lasp.gated_delta_rule(*local, initial_state=s0, output_final_state=final, use_qk_l2norm_in_kernel=l2,
                                    group=group, method=method, layout=layout)
        n_fwd = len(log.events)
        o, S = res if final else (res, None)
        loss = (o.float() * shard_sequence(do, rank, world, layout)).sum()
        if final:  # the final state's gradient is the sum over ranks of what each feeds in: all on rank 0
            loss = loss + (S * (dF if rank == 0 else torch.zeros_like(dF))).sum()
        loss.backward()
    grads = [None if x is None else x.grad for x in local] + [None if s0 is None else s0.grad]
    return o.detach(), None if S is None else S.detach(), grads, log.events[:n_fwd], log.events[n_fwd:]


CASES = [  # id, P, method, layout, gates, init, final, l2, dtype[, HV (GVA: value heads, H = 2)]
    ("lasp2-P2-contig-g-init-final", 2, "lasp2", "contiguous", "g", True, True, True, torch.float32),
    ("lasp2-P4-zigzag-reset", 4, "lasp2", "zigzag", "reset", False, False, False, torch.float32),
    ("lasp2-P2-zigzag-deltanet-bf16", 2, "lasp2", "zigzag", "none", True, True, True, torch.bfloat16),
    ("lasp1-P4-contig-g-final", 4, "lasp1", "contiguous", "g", True, True, False, torch.float32),
    ("lasp1-P2-zigzag-g", 2, "lasp1", "zigzag", "g", False, False, True, torch.float32),
    ("ulysses-P2-zigzag-g-init-final", 2, "ulysses", "zigzag", "g", True, True, True, torch.float32),
    # GVA: v, g, beta and the states on HV = 4 value heads, q and k on H = 2 (never repeated)
    ("gva-lasp2-P2-contig-g-init-final", 2, "lasp2", "contiguous", "g", True, True, True, torch.float32, 4),
    ("gva-lasp1-P2-zigzag-reset-final", 2, "lasp1", "zigzag", "reset", True, True, False, torch.float32, 4),
    ("gva-ulysses-P2-contig-g-init-final", 2, "ulysses", "contiguous", "g", True, True, True, torch.float32, 4),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gated_delta_rule_sp_matches_oracle(spawn, case):
    name, P, method, layout, gates, init, final, l2, dtype, *hv = case
    B, T, H, K, V = 1, 16 * P, 2, 6, 5
    HV = hv[0] if hv else H
    xs = delta_inputs(B, T, H, K, V, gates=gates, dtype=dtype, l2norm=l2, init=init, seed=seed_for("sp", name), hv=HV)
    gen = torch.Generator().manual_seed(1)
    do, dF = torch.randn(B, T, HV, V, generator=gen), torch.randn(B, HV, K, V, generator=gen)
    ys = [None if x is None else x.detach().double().requires_grad_() for x in xs]
    o_ref, S_ref = naive_gated_delta_rule(*ys[:5], initial_state=ys[5], output_final_state=True, use_qk_l2norm=l2)
    ((o_ref * do.double()).sum() + ((S_ref * dF.double()).sum() if final else 0)).backward()
    results = spawn(P).run(run_delta, xs, do, dF, method, layout, l2, final)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(o_ref, unshard_sequence([r[0] for r in results], layout), name="o")
    if final:
        for r in results:
            assert_close(S_ref, r[1], rtol=tol, name="final_state")
    for i, nm in enumerate(NAMES):
        ref = ys[i].grad if ys[i] is not None else None
        if ref is None:
            assert all(r[2][i] is None for r in results), nm
            continue
        got = sum(r[2][i] for r in results) if nm == "initial_state" else unshard_sequence([r[2][i] for r in results], layout)
        assert_close(ref, got, rtol=tol, name=f"d{nm}")
    if method == "lasp2":  # one all-gather each way; forward bytes: the packed (A, M) per segment
        n_seg = 2 if layout == "zigzag" else 1
        for _, _, _, fwd, bwd in results:
            assert [e.kind for e in fwd] == ["all_gather"] and [e.kind for e in bwd] == ["all_gather"]
            assert fwd[0].bytes == n_seg * B * HV * (K * K + K * V) * 4  # per value head


def gva_head_errors(rank, world):
    """Bad GVA head counts are a ValueError naming them, on every rank, before any collective."""
    from lasp.testing import value_error_and_collectives

    group = dist.group.WORLD
    q, k, v, g, beta, _ = delta_inputs(1, 4, 1, 4, 3, hv=2, seed=rank)  # Ulysses splits H = 1 q/k head over P = 2
    out = [value_error_and_collectives(lambda: lasp.gated_delta_rule(q, k, v, g, beta, group=group, method="ulysses"))[0]]
    q, k, v, g, beta, _ = delta_inputs(1, 4, 2, 4, 3, hv=3, seed=rank)  # HV = 3 not a multiple of H = 2
    out.append(value_error_and_collectives(lambda: lasp.gated_delta_rule(q, k, v, g, beta, group=group))[0])
    return out


def test_gva_head_errors(spawn):
    for ulysses, multiple in spawn(2).run(gva_head_errors):
        assert "H=1" in ulysses and "P=2" in ulysses, ulysses
        assert "HV=3" in multiple and "H=2" in multiple and "multiple" in multiple, multiple


def run_model(rank, world, cfg_dict, ids, layout):
    from lasp.models import LinearLlamaForCausalLM, ModelConfig

    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(ModelConfig(**cfg_dict))
    logits = model(shard_sequence(ids, rank, world, layout), group=dist.group.WORLD, layout=layout)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("P,layout", [(2, "zigzag"), (4, "contiguous")])
def test_gdn_hybrid_model_sp_equals_sp1(spawn, P, layout):
    from lasp.models import LinearLlamaForCausalLM, ModelConfig

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=1, num_layers=2,
               layer_pattern="LS", linear_variant="gated_deltanet", conv_size=3, initializer_range=0.15)
    ids = torch.randint(0, 64, (1, 8 * P), generator=torch.Generator().manual_seed(P))
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(ModelConfig(**cfg))
    ref = model(ids)
    ref.float().pow(2).mean().backward()
    results = spawn(P).run(run_model, cfg, ids, layout)
    assert_close(ref, unshard_sequence([r[0] for r in results], layout), name="logits")
    for n, p in model.named_parameters():  # per-rank losses are means over local tokens: scale by 1/P
        assert_close(p.grad, sum(r[1][n] for r in results) / P, name=f"d{n}")
