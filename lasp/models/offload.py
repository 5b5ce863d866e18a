"""Host offload of the checkpointed decoder layers' inputs (``train.activation_offload``).

Under activation checkpointing a decoder layer keeps only its inputs for backward (the residual
stream ``[B, T_local, hidden]`` and the RoPE tables); everything else is recomputed.
:class:`HostOffload` is a ``saved_tensors_hooks`` context: entered around each checkpointed
layer call, it catches the tensors the checkpoint saves as its inputs, copies them to host memory
(pinned on CUDA, so the copy back can be asynchronous) and drops the device copy; backward copies
each back when the layer's recompute needs it. The device then holds no layer input between
forward and backward: at any time one layer's recompute and backward, plus what the loss keeps.

The tensors the recompute saves are not touched (the checkpoint's own hooks are innermost there).
On the CPU the host is the device: the copy is made all the same (the code path a GPU takes), and
memory does not change. ``packed_bytes`` counts what went to the host (reset it between steps).
"""
from __future__ import annotations

import torch


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors packed while active live in host memory until backward unpacks them."""

    def __init__(self, pin_memory: bool | None = None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.packed_bytes = 0

        def pack(t: torch.Tensor):
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory and t.device.type != "cpu")
            host.copy_(t)
            self.packed_bytes += host.numel() * host.element_size()
            return t.device, host

        def unpack(packed) -> torch.Tensor:
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)
