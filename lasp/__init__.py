"""lasp: LASP-2 sequence parallelism for linear-attention and hybrid Llama-style models."""
from .attention import linear_attention, softmax_attention
from .parallel import ParallelState, init_parallel

__version__ = "0.1.0"
__all__ = ["init_parallel", "ParallelState", "linear_attention", "softmax_attention", "__version__"]
