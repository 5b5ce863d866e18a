"""The ``lasp`` command: ``lasp <command> [args...]``.

Each command lives in its own module with a ``main(argv)`` function and is imported only when
it runs (so ``lasp bench`` does not pay for DeepSpeed's import, and vice versa).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lasp.train.main", "train a model (DeepSpeed ZeRO, SP x DP) from a run config"),
    "data": ("lasp.train.data_cli", "prepare a token memmap: lasp data prepare --input ... --output DIR"),
    "export": ("lasp.train.export", "export a checkpoint to safetensors shards plus the model config (lasp or Hugging Face)"),
    "convert": ("lasp.models.convert_cli", "Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoints to lasp and back: lasp convert --from-hf DIR --output DIR"),
    "generate": ("lasp.models.generate_cli", "generate text from a checkpoint"),
    "model-info": ("lasp.models.info", "parameter and FLOP counts of a model config"),
    "bench": ("lasp.bench.cli", "benchmarks: lasp bench kernels | layer | model | predict"),
}


def run_module_main(module: str, argv: list[str], label: str) -> int:
    """Import ``module`` and return ``module.main(argv)``; exit status 2 if it is not there."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            print(f"{label}: not available ({module} is missing)", file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv) or 0)


def dispatch(commands: dict[str, tuple[str, str]], argv: list[str], prog: str) -> int:
    """``prog <command> [args...]``: run the command's module ``main(args)``; the usage text on
    ``-h`` or no command (status 0) and on an unknown one (status 2). ``commands``: as :data:`COMMANDS`."""
    if argv and argv[0] in commands:
        return run_module_main(commands[argv[0]][0], argv[1:], f"{prog} {argv[0]}")
    width = max(map(len, commands))
    usage = "\n".join([f"usage: {prog} <command> [args...]", "", "commands:"]
                      + [f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items()])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    print(f"{prog}: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(COMMANDS, sys.argv[1:] if argv is None else argv, "lasp")


if __name__ == "__main__":
    sys.exit(main())
