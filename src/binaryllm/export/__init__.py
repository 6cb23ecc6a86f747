"""Export: bit packing and the packed Hugging Face folder (GGUF export: to come)."""
from .bits import pack_signs, unpack_signs
from .hf import register as _register_with_transformers
from .packed import load_packed, pack, packed_modules, save_packed

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(packed folder) after import binaryllm

__all__ = ["pack_signs", "unpack_signs", "load_packed", "pack", "packed_modules", "save_packed"]
