"""The Linear-Llama3 model family (and the Qwen3.5 text architecture): config, model, generation,
save/load, Hugging Face checkpoints in and out, parameter/FLOP counts."""
from .config import FEATURE_MAPS, LINEAR_VARIANTS, ModelConfig
from .hf import from_hf, to_hf
from .io import load_pretrained, save_pretrained
from .model import LinearLlamaForCausalLM

__all__ = [
    "ModelConfig",
    "LinearLlamaForCausalLM",
    "load_pretrained",
    "save_pretrained",
    "from_hf",
    "to_hf",
    "LINEAR_VARIANTS",
    "FEATURE_MAPS",
]
