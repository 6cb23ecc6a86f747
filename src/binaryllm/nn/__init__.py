"""Modules: the training-time BinaryLinear and the generic replace_linear."""
from .binary_linear import BinaryLinear, weight_cache
from .replace import binary_linear_names, find_blocks, replace_linear

__all__ = ["BinaryLinear", "weight_cache", "binary_linear_names", "find_blocks", "replace_linear",
           "fuse_projections", "unfuse_projections"]


def __getattr__(name):      # nn/fuse.py imports the packed layer, which imports export/: load it on first use
    if name in ("fuse_projections", "unfuse_projections"):
        from . import fuse
        return getattr(fuse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
