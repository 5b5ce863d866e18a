"""The Linear-Llama3 model family: config, model, generation, save/load, parameter/FLOP counts."""
from .config import FEATURE_MAPS, LINEAR_VARIANTS, ModelConfig
from .io import load_pretrained, save_pretrained
from .model import LinearLlamaForCausalLM

__all__ = [
    "ModelConfig",
    "LinearLlamaForCausalLM",
    "load_pretrained",
    "save_pretrained",
    "LINEAR_VARIANTS",
    "FEATURE_MAPS",
]
