"""A bf16/fp16 GEMV for one row of activations (``y = x @ W^T``, W (N, K) dense): the decode step's output
embeddings (the lm_head, which stays in full precision in a 1-bit model), in one Triton kernel.

Why: in the Llama-7B-shaped decode step the lm_head (32000 x 4096 bf16, 262 MB) was cuBLAS's GEMM kernel at
98 us, 2.67 TB/s, a tenth of the packed step (docs/RESULTS.md, twentieth session).  Here a program takes BN rows
and walks K in BK-column chunks: fp32 products and sums (a bf16 x bf16 product is exact in fp32), rounded once to
x's dtype, as cuBLAS does (its order of summation differs: fp32 rounding).  On sm_90+ it is launched with
programmatic dependent launch: the first chunk of weights is loaded before ``griddepcontrol.wait``, x after it.

Used by ``StaticDecoder`` (``use_dense_gemv``) for the model's output embeddings in both the packed and the bf16
decode steps; every other call (more than one row, a bias, not CUDA) goes to ``torch.nn.functional.linear``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl_launch

# (BN rows, BK columns, warps) a program.  H100 sweep, back to back (bench/dense_gemv.py; docs/RESULTS.md,
# twentieth session): 32000x4096 85.1 us against cuBLAS 97.6 (best 4x4096x8 84.8), 49152x576 19.9 against 22.8
TILE = (4, 1024, 4)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, stride_wn, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    r_ok = rows < N
    wp = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    w = tl.load(wp, mask=r_ok[:, None] & (cols < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k in range(BK, K, BK):                    # K a constexpr: one build per width (the interpreter needs it)
        c_ok = (k + cols) < K
        w = tl.load(wp + k, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k + cols, mask=c_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=r_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, tile: tuple | None = None) -> torch.Tensor:
    """x (..., K) with one row in all, weight (N, K), both bf16 or fp16 on one CUDA device -> (..., N)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if x.numel() != K or weight.shape[1] != K or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("dense gemv takes one row of x and a row-major weight of x's dtype")
    bn, bk, warps = tile or TILE
    bk = min(bk, triton.next_power_of_2(K))
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    pdl = pdl_launch(x)
    _gemv_kernel[(triton.cdiv(N, bn),)](x.contiguous(), weight, y, N, weight.stride(0), K=K, BN=bn, BK=bk, PDL=pdl,
                                      num_warps=warps, launch_pdl=pdl)
    return y


class DenseGEMVLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose one-row calls on CUDA (no bias, x and weight of one half-precision dtype) go to
    ``gemv``; every other call is ``nn.Linear``'s.  Only ever made by ``use_dense_gemv``, which swaps the class of an
    existing ``nn.Linear`` (same parameters, same state dict, tied weights stay tied) and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.bias is None and x.is_cuda and x.numel() == w.shape[1] and x.dtype == w.dtype
                and x.dtype in (torch.bfloat16, torch.float16) and w.stride(1) == 1 and usable(x.device.index or 0)):
            if torch.compiler.is_compiling():          # one opaque op for torch.compile (kernels/ops.py)
                from . import ops
                return ops.dense_gemv(x, w)
            return gemv_or_linear(x, w)
        return torch.nn.functional.linear(x, w, self.bias)


_FAILED: set[int] = set()


def usable(device_index: int) -> bool:
    """Triton runs on this GPU (``kernels.triton_usable``) and the kernel has not failed on it."""
    from . import triton_usable
    return device_index not in _FAILED and triton_usable(device_index)


def gemv_or_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gemv``; if the kernel fails to build or run here, ``torch.nn.functional.linear`` from then on on this
    device, said once."""
    dev = x.device.index or 0
    if dev not in _FAILED:
        try:
            return gemv(x, weight)
        except Exception as err:  # e.g. a Triton that cannot build it for this GPU
            from . import warn_once
            _FAILED.add(dev)
            warn_once("dense-gemv-failed", f"the Triton GEMV of the lm_head failed ({type(err).__name__}: "
                                           f"{str(err)[:200]}); it runs through torch.nn.functional.linear")
    return torch.nn.functional.linear(x, weight)


def use_dense_gemv(model, on: bool = True) -> bool:
    """Switch ``model``'s output embeddings (``get_output_embeddings()``, the lm_head) to ``DenseGEMVLinear``
    (``on``) or back to ``nn.Linear``; returns whether it uses the kernel now.  A model whose output embeddings are
    not exactly an ``nn.Linear`` (or one already switched) is left alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return False
    if on and type(head) is torch.nn.Linear:
        head.__class__ = DenseGEMVLinear
    elif not on and type(head) is DenseGEMVLinear:
        head.__class__ = torch.nn.Linear
    return type(head) is DenseGEMVLinear
