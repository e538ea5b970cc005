"""DeepSeek-V3 / V2 model, its HF config mapping and HF checkpoint conversion."""

from megatron.core.models.deepseek.compile import compile_model
from megatron.core.models.deepseek.hf_config import config_from_hf, config_to_hf_dict
from megatron.core.models.deepseek.hf_conversion import export_hf_checkpoint, hf_to_ours, load_hf_checkpoint
from megatron.core.models.deepseek.hf_io import load_checkpoint, save_checkpoint
from megatron.core.models.deepseek.model import DeepSeekModel

__all__ = [
    "DeepSeekModel",
    "compile_model",
    "config_from_hf",
    "config_to_hf_dict",
    "export_hf_checkpoint",
    "hf_to_ours",
    "load_checkpoint",
    "load_hf_checkpoint",
    "save_checkpoint",
]
