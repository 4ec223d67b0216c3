"""GenSLM genome language model (GPT-NeoX over codons)."""

from .config import PRESETS, GenSLMConfig, preset
from .interop import from_hf, to_hf
from .model import CausalLMOutput, GenSLM, init_parameters, load_parameters

__all__ = ["PRESETS", "CausalLMOutput", "GenSLM", "GenSLMConfig", "from_hf", "init_parameters",
           "load_parameters", "preset", "to_hf"]
