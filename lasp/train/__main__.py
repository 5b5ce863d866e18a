"""``python -m lasp.train --config PATH ...``: the trainer entry point for torchrun and the
deepspeed launcher (see :mod:`lasp.train.main`)."""
import sys

from .main import main

sys.exit(main())
