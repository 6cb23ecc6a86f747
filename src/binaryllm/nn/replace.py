"""Find the decoder blocks of any causal LM and swap their linear layers for BinaryLinear.

Blocks are found by structure, not by name: the longest ``nn.ModuleList`` whose members all share one
class and each hold at least one linear layer.  Every ``nn.Linear`` (and GPT-2 style ``Conv1D``) inside
those blocks is binarized unless a skip pattern matches its name; embeddings, final norm and lm_head are
outside the blocks and stay as they are.
"""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from ..errors import BinaryLLMError
from .binary_linear import BinaryLinear


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: weight (in, out), forward x @ W + b.
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _is_linear(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) and not isinstance(m, BinaryLinear)) or _is_conv1d(m)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        types = {type(m) for m in mod}
        if len(types) != 1:
            continue
        if not all(any(_is_linear(s) or isinstance(s, BinaryLinear) for s in m.modules()) for m in mod):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise BinaryLLMError(f"{type(model).__name__} has no list of decoder blocks holding linear "
                             "layers (nn.Linear or Conv1D); this architecture cannot be binarized")
    return best


def binary_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BinaryLinear)]


def replace_linear(model: nn.Module, skip: list[str] | tuple = (), **kw) -> list[str]:
    """Replace the linear layers of the decoder blocks in place; returns the replaced module names."""
    blocks_name, blocks = find_blocks(model)
    replaced: list[str] = []
    unsupported: list[str] = []
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}" if blocks_name else str(i)
        for name, child_parent in list(block.named_modules()):
            for cname, child in list(child_parent.named_children()):
                full = ".".join(p for p in (prefix, name, cname) if p)
                if not _is_linear(child):
                    if type(child).__name__ in ("Linear8bitLt", "Linear4bit", "QuantLinear"):
                        unsupported.append(f"{full} ({type(child).__name__})")
                    continue
                if any(fnmatch.fnmatch(full, p) for p in skip):
                    continue
                new = BinaryLinear.from_linear(child, transposed=_is_conv1d(child), **kw)
                setattr(child_parent, cname, new)
                replaced.append(full)
    if unsupported:
        raise BinaryLLMError(f"already-quantized layers cannot be binarized: {unsupported[0]}; load the "
                             "model in full precision")
    if not replaced:
        raise BinaryLLMError(f"no linear layers to binarize inside {blocks_name or 'the blocks'} "
                             "(all skipped?); check --skip")
    return replaced
