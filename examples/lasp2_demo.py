"""LASP-2 on P processes vs the single-process oracle on the whole sequence.

    torchrun --nproc-per-node 2 examples/lasp2_demo.py
"""
import torch
import torch.distributed as dist

import lasp
from lasp.ops.reference import naive_recurrent_linear_attention
from lasp.parallel import gather_sequence, shard_sequence
from lasp.testing import rel_error

state = lasp.init_parallel(sp_size=dist.get_world_size() if dist.is_initialized() else 2)
B, T, H, K, V = 2, 1024, 4, 64, 64
torch.manual_seed(0)  # every rank draws the same full sequence, then keeps its shard
q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
g = torch.nn.functional.logsigmoid(torch.randn(B, T, H)) / 16  # data-dependent log-gates <= 0

layout = "zigzag"
shard = lambda x: shard_sequence(x, state.sp_rank, state.sp_size, layout)  # noqa: E731
o_local = lasp.linear_attention(shard(q), shard(k), shard(v), shard(g), group=state.sp_group, layout=layout)
o = gather_sequence(o_local, state.sp_group, layout)

if state.rank == 0:
    ref = naive_recurrent_linear_attention(q.double(), k.double(), v.double(), g.double())
    print(f"P={state.sp_size} layout={layout} T={T}: o_local {tuple(o_local.shape)}, "
          f"relative error vs oracle {rel_error(ref, o):.2e}")
dist.destroy_process_group()
