"""The 1-bit kernels as torch custom ops, so that ``torch.compile`` sees each call as one opaque operator (with a
shape-only fake implementation) instead of tracing into Triton launches or ctypes calls.

Why: traced directly, a compiled step either spent minutes in the compiler around the Triton kernels or, for the
ctypes CPU kernel, broke the graph at raw data pointers (and on the CPU box corrupted the heap: the reason these
ops exist).  ``PackedBinaryLinear`` calls them only while compiling; eager calls go straight to the kernels and
skip the dispatcher's few microseconds.
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("binaryllm::w1a16", mutates_args=())
def w1a16(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
          input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
          tiles: Optional[torch.Tensor]) -> torch.Tensor:
    """CUDA: ``triton_w1a16.w1a16_matmul`` (bf16/fp16 in and out; ``tiles``: the mma decode kernel's layout)."""
    from .triton_w1a16 import w1a16_matmul
    return w1a16_matmul(x, words, row_scale, in_features, input_scale, bias, tiles=tiles)


@w1a16.register_fake
def _(x, words, row_scale, in_features, input_scale, bias, tiles):
    return x.new_empty(*x.shape[:-1], words.shape[0])


@torch.library.custom_op("binaryllm::w1_cpu", mutates_args=())
def w1_cpu(x: torch.Tensor, packed: torch.Tensor, row_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """CPU: ``cpu.w1_matmul_cpu`` (any float input, fp32 out, row scales applied)."""
    from .cpu import w1_matmul_cpu
    return w1_matmul_cpu(x, packed, row_scale, in_features)


@w1_cpu.register_fake
def _(x, packed, row_scale, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0], dtype=torch.float32)


@torch.library.custom_op("binaryllm::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: Optional[float]) -> torch.Tensor:
    """CUDA: ``attention.decode_attention`` (one query token over a KV cache; (B, 1, H, D) out)."""
    from .attention import decode_attention as run
    return run(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])
