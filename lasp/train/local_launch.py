"""``lasp train`` on N local processes: torchrun's elastic agent, run inside this process.

The agent (what ``torchrun --standalone --nproc-per-node N`` runs) lives in the ``lasp train``
process itself, so there is one process between the user and the ranks, and it is ours:

- SIGINT / SIGTERM to ``lasp train`` (Ctrl-C, ``kill``, ``timeout``) reach the agent, which
  passes the signal to every rank once: the ranks stop after the same step, save a checkpoint
  and exit (:mod:`lasp.train.preemption`); ``lasp train`` then exits with ``128 + signal``,
  without the agent's traceback;
- the ranks (torchrun puts each in its own session) die with ``lasp train`` even when it is
  killed with SIGKILL, e.g. ``kill -9`` of its process group
  (:func:`lasp.train.preemption.die_with_parent`, armed by every rank at start);
- a failed rank's error is printed by that rank (``lasp train: rank R on HOST: error: ...``);
  the agent's summary of failures is not repeated, and the exit status is the first failed
  rank's.
"""
from __future__ import annotations

import logging
import os
import signal

from .preemption import STOP_SIGNALS, signal_name

#: set for the ranks of ``lasp train --nproc N``: N
LAUNCHED_ENV = "LASP_TRAIN_LAUNCHED"


def _quiet_agent() -> None:
    """The agent's own warnings (each of its loggers has its level set): the ranks say what happens."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("torch.distributed.elastic", "torch.distributed.run",
                                                                          "torch.distributed.launcher"))]
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)


def _status(code: int) -> int:
    """A rank's exit code as a shell status (killed by signal n: 128 + n)."""
    return 128 - code if code < 0 else code


def launch(child_argv: list[str], nproc: int) -> int:
    """Run ``python -m lasp.train <child_argv>`` on ``nproc`` local processes; the exit status
    (see the module docstring)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException, _terminate_process_handler
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[LAUNCHED_ENV] = str(nproc)  # the ranks say `lasp train --nproc N ... --resume` when stopped
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    argv = ["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.5", "-m", "lasp.train", *child_argv]
    print(f"lasp train: starting {nproc} processes: torchrun {' '.join(argv)}", flush=True)
    _quiet_agent()
    old = {sig: signal.signal(sig, _terminate_process_handler) for sig in STOP_SIGNALS}  # until the agent installs its own
    try:
        run(parse_args(argv))
    except SignalException as e:
        print(f"lasp train: {signal_name(e.sigval)}: the ranks were told to stop (each saves the step it is in first)", flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        first = min(e.failures)
        return _status(e.failures[first].exitcode) or 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0
