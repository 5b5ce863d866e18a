"""lasp: LASP-2 sequence parallelism for linear-attention and hybrid Llama-style models."""
import os as _os

from ._checkout import map_checkout_kernels as _map_checkout_kernels

_map_checkout_kernels(_os.path.dirname(__file__))  # `lasp.kernels` from a checkout on PYTHONPATH
from .attention import linear_attention, softmax_attention
from .ops.cross_entropy import linear_cross_entropy
from .parallel import ParallelState, init_parallel
from .recurrent import causal_conv1d, gated_delta_rule

__version__ = "0.1.0"
__all__ = ["init_parallel", "ParallelState", "linear_attention", "softmax_attention", "gated_delta_rule", "causal_conv1d",
           "linear_cross_entropy", "__version__"]
