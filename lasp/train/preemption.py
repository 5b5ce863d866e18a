"""Stopping a run on SIGINT / SIGTERM with a checkpoint, and ranks that die with their launcher.

What ``timeout``, ``kill``, Ctrl-C and cluster schedulers send is SIGTERM or SIGINT. While
:class:`StopSignals` is installed (the training loop), the first such signal only sets a flag;
at the end of every optimizer step the ranks agree on it (:meth:`StopSignals.agreed`: one tiny
all-reduce, so every rank stops after the SAME step even when only one of them got the signal),
save a checkpoint of that step and raise :class:`Preempted`. ``lasp train`` then prints how to
continue and exits with ``128 + the signal number`` (130 for SIGINT, 143 for SIGTERM), without a
traceback. A second signal while stopping restores the default action and re-sends it (stop
now, no save).

:func:`die_with_parent` makes a rank started by a launcher (torchrun, the deepspeed launcher,
``lasp train``) get SIGKILL when that launcher dies, even by SIGKILL: torchrun starts every rank
in its own session, so ``kill -9`` of the launcher's process group would otherwise leave the
ranks training in the background.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

#: the signals that stop a run with a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class Preempted(Exception):
    """The run stopped on a signal after ``step``; ``checkpoint_dir`` holds that step."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str | None):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        super().__init__(f"stopped by {signal_name(signum)} after step {step}")

    @property
    def exit_status(self) -> int:
        """``128 + signal number``, what a shell reports for a process ended by that signal."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: SIGINT / SIGTERM set :attr:`received` instead of ending the process
    (main thread only; elsewhere, e.g. a test's worker thread, it installs nothing)."""

    def __init__(self, announce: bool = True):
        self.received = 0
        self.announce = announce
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received:  # the second one: do what it would have done without us
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self.announce:
            print(f"lasp train: {signal_name(signum)} received: stopping after this step with a checkpoint "
                  f"(send it again to stop at once, without one)", file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """Collective (every rank, once per step): the signal some rank received (the largest
        number when several), 0 when none did."""
        if not dist.is_initialized():
            return self.received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([self.received], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux
    ``PR_SET_PDEATHSIG``); if the parent is already gone, die now. Returns whether it is armed."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), sig)
    return True
