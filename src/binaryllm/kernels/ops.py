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

from . import INTERPRETED


@torch.library.custom_op("binaryllm::w1a16", mutates_args=())
def w1a16(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
          input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
          tiles: Optional[torch.Tensor], pairs: int = 0) -> torch.Tensor:
    """CUDA: ``triton_w1a16.w1a16_matmul`` (bf16/fp16 in and out; ``tiles``: the mma decode kernel's layout, made
    with ``pairs``); CPU: the same arithmetic in PyTorch (``_reference``)."""
    from .triton_w1a16 import w1a16_matmul
    return w1a16_matmul(x, words, row_scale, in_features, input_scale, bias, tiles=tiles, pairs=pairs)


@w1a16.register_fake
def _(x, words, row_scale, in_features, input_scale, bias, tiles, pairs=0):
    return x.new_empty(*x.shape[:-1], words.shape[0])


def _reference(x, words, row_scale, in_features, input_scale, bias):
    """The packed layer's arithmetic in PyTorch (fp32 sums and scales, rounded once to x's dtype)."""
    from ..export.bits import unpack_signs
    if input_scale is not None:
        x = x * input_scale.to(x.dtype)
    w = unpack_signs(words.contiguous().view(torch.uint8), in_features)
    y = (x.float() @ w.T) * row_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@w1a16.register_kernel("cpu")
def _(x, words, row_scale, in_features, input_scale, bias, tiles, pairs=0):
    return _reference(x, words, row_scale, in_features, input_scale, bias)


@torch.library.custom_op("binaryllm::w1a16_gated", mutates_args=())
def w1a16_gated(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
                input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], tiles: Optional[torch.Tensor],
                pairs: int) -> torch.Tensor:
    """silu(y[..., :pairs]) * y[..., pairs:] of ``y = w1a16(x, ...)``, a stacked [gate | up] layer: put in by the
    compile pass ``kernels/fusion.py``.  CUDA: ``triton_w1a16.w1a16_gated_matmul``; CPU: in PyTorch."""
    from .triton_w1a16 import w1a16_gated_matmul
    return w1a16_gated_matmul(x, words, row_scale, in_features, input_scale, bias, tiles, pairs)


@w1a16_gated.register_fake
def _(x, words, row_scale, in_features, input_scale, bias, tiles, pairs):
    return x.new_empty(*x.shape[:-1], pairs)


@w1a16_gated.register_kernel("cpu")
def _(x, words, row_scale, in_features, input_scale, bias, tiles, pairs):
    from . import silu_mul
    return silu_mul(_reference(x, words, row_scale, in_features, input_scale, bias), pairs)


@torch.library.custom_op("binaryllm::w1a16_res", mutates_args=())
def w1a16_res(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
              input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], tiles: Optional[torch.Tensor],
              residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, partials): h = residual + w1a16(x, ...) (rounded as eager: the product, then the sum) and the (M,
    parts) fp32 partial sums of h^2 (``mma_w1a16.res_parts``) that ``w1a16_norm`` reads: put in by the compile
    pass ``kernels/fusion.py``.  CUDA: ``triton_w1a16.w1a16_res_matmul``; CPU: in PyTorch."""
    from .triton_w1a16 import w1a16_res_matmul
    return w1a16_res_matmul(x, words, row_scale, in_features, input_scale, bias, tiles, residual)


def _parts(x, words, in_features):
    from .mma_w1a16 import res_parts
    return res_parts(x.numel() // in_features, words.shape[0], in_features)


@w1a16_res.register_fake
def _(x, words, row_scale, in_features, input_scale, bias, tiles, residual):
    return (residual.new_empty(residual.shape),
            x.new_empty(x.numel() // in_features, _parts(x, words, in_features)[0], dtype=torch.float32))


@w1a16_res.register_kernel("cpu")
def _(x, words, row_scale, in_features, input_scale, bias, tiles, residual):
    from .mma_w1a16 import res_partials
    h = residual + _reference(x, words, row_scale, in_features, input_scale, bias)
    return h, res_partials(h, *_parts(x, words, in_features))


@torch.library.custom_op("binaryllm::w1a16_norm", mutates_args=())
def w1a16_norm(h: torch.Tensor, partials: torch.Tensor, norm_weight: torch.Tensor, eps: float, words: torch.Tensor,
               row_scale: torch.Tensor, in_features: int, bias: Optional[torch.Tensor], tiles: Optional[torch.Tensor],
               pairs: int, gated: bool) -> torch.Tensor:
    """w1a16 (``gated``: w1a16_gated) of ``mma_w1a16.rms_norm(h, partials, norm_weight, eps)``, the partials from
    ``w1a16_res``: put in by the compile pass ``kernels/fusion.py``.  CUDA: ``triton_w1a16.w1a16_norm_matmul``;
    CPU: in PyTorch."""
    from .triton_w1a16 import w1a16_norm_matmul
    return w1a16_norm_matmul(h, partials, norm_weight, eps, words, row_scale, in_features, bias, tiles, pairs,
                             gated)


@w1a16_norm.register_fake
def _(h, partials, norm_weight, eps, words, row_scale, in_features, bias, tiles, pairs, gated):
    return h.new_empty(*h.shape[:-1], pairs if gated else words.shape[0])


@w1a16_norm.register_kernel("cpu")
def _(h, partials, norm_weight, eps, words, row_scale, in_features, bias, tiles, pairs, gated):
    from . import silu_mul
    from .mma_w1a16 import rms_norm
    y = _reference(rms_norm(h, partials, norm_weight, eps), words, row_scale, in_features, None, bias)
    return silu_mul(y, pairs) if gated else y


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
    """``attention.decode_attention`` (one query token over a KV cache; (B, 1, H, D) out) on CUDA or in Triton's
    interpreter; elsewhere the same in PyTorch (``attention.reference``)."""
    from . import attention as at
    if q.is_cuda or INTERPRETED:
        return at.decode_attention(q, k, v, mask, scale)
    return at.reference(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


@torch.library.custom_op("binaryllm::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def decode_attention_rope(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          mask: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
    """``attention.decode_attention_rope``: the rotary embedding of q and the token's key, the key and value
    written into the caches at ``pos``, and the attention, in one kernel (CUDA, or Triton's interpreter); elsewhere
    the same in PyTorch.  (B, 1, H, D) out.  ``kernels/fusion.py`` (``fuse_rope``) puts it into compiled steps."""
    from . import attention as at
    if q.is_cuda or INTERPRETED:
        return at.decode_attention_rope(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale)
    k_cache.index_copy_(2, pos, at.rope_reference(k_new, cos, sin))
    v_cache.index_copy_(2, pos, v_new)
    return at.reference(at.rope_reference(q, cos, sin), k_cache, v_cache, mask, scale)


@decode_attention_rope.register_fake
def _(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


@torch.library.custom_op("binaryllm::dense_gemv", mutates_args=())
def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dense.gemv``: one row of x times a dense bf16/fp16 weight (N, K), (..., N) out, on CUDA or in Triton's
    interpreter (``torch.nn.functional.linear`` if the kernel fails there); elsewhere ``linear``."""
    from . import dense
    if x.is_cuda or INTERPRETED:
        return dense.gemv_or_linear(x, weight)
    return torch.nn.functional.linear(x, weight)


@dense_gemv.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("binaryllm::dense_gemv_norm", mutates_args=())
def dense_gemv_norm(h: torch.Tensor, partials: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor) -> torch.Tensor:
    """``dense_gemv`` of ``mma_w1a16.rms_norm(h, partials, norm_weight, eps)``, the partials from ``w1a16_res``
    (a decoder's final RMSNorm and its lm_head): put in by the compile pass ``kernels/fusion.py``.  CUDA or Triton's
    interpreter: ``dense.gemv`` with the norm made as it reads h; elsewhere in PyTorch."""
    from . import dense
    if h.is_cuda or INTERPRETED:
        return dense.gemv_or_linear(h, weight, (partials, norm_weight, eps))
    return torch.nn.functional.linear(dense._normed(h, (partials, norm_weight, eps)), weight)


@dense_gemv_norm.register_fake
def _(h, partials, norm_weight, eps, weight):
    return h.new_empty(*h.shape[:-1], weight.shape[0])


def all_ops() -> list:
    """Every op of this module, as the OpOverload inductor keys its lowerings by."""
    return [v._opoverload for v in globals().values() if isinstance(v, torch._library.custom_ops.CustomOpDef)]


def register_lowerings() -> int:
    """Give inductor each of these ops' fallback lowering now, the one it would make itself on first meeting the op
    (its layout constraint from the op's tags); returns how many it registered.  Why: torch 2.11's inductor, making
    that implicit fallback, formats the op's arguments for a log line whether or not the line is shown, and the
    string of an argument made by a chain of fallback kernels prints the chain, every shared input again: it grows
    twice a layer.  The lm_head's GEMV with the final norm (``fusion.LM_HEAD_NORM``) is first met behind the whole
    network of fused packed kernels, and the packed Llama-7B step's compile sat in that string on the H100 (more
    than 460 s; on the CPU under torch 2.11, bench/compile_cpu.py stopped with a RecursionError after 202 s;
    docs/RESULTS.md).  torch 2.13 formats the line lazily.  Where inductor's internals differ from these names
    nothing is registered and inductor does as it would have."""
    try:
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:
        return 0
    if not all(hasattr(lowering, n) for n in ("lowerings", "make_fallback", "tag_to_layout_constraint")):
        return 0
    done = 0
    for op in all_ops():
        if op in lowering.lowerings:
            continue
        tag = get_layout_constraint_tag(op, with_default=True)
        lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag), warn=False)
        done += 1
    return done
