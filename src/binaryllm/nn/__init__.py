"""Modules: the training-time BinaryLinear and the generic replace_linear."""
from .binary_linear import BinaryLinear, weight_cache
from .replace import binary_linear_names, find_blocks, replace_linear

__all__ = ["BinaryLinear", "weight_cache", "binary_linear_names", "find_blocks", "replace_linear"]
