"""Export: bit packing and the packed Hugging Face folder (GGUF export: to come)."""
from .bits import pack_signs, unpack_signs
from .packed import load_packed, pack, packed_modules, save_packed

__all__ = ["pack_signs", "unpack_signs", "load_packed", "pack", "packed_modules", "save_packed"]
