"""A bf16/fp16 GEMV for one row of activations (``y = x @ W^T``, W (N, K) dense): the decode step's output
embeddings (the lm_head, which stays in full precision in a 1-bit model), in one Triton kernel.

Why: in the Llama-7B-shaped decode step the lm_head (32000 x 4096 bf16, 262 MB) was cuBLAS's GEMM kernel at
98 us, 2.67 TB/s, a tenth of the packed step (docs/RESULTS.md, twentieth session).  Here a program takes BN rows
and walks K in BK-column chunks: fp32 products and sums (a bf16 x bf16 product is exact in fp32), rounded once to
x's dtype, as cuBLAS does (its order of summation differs: fp32 rounding).  On sm_90+ it is launched with
programmatic dependent launch: the first chunk of weights is loaded before ``griddepcontrol.wait``, x after it.

Used by ``StaticDecoder`` (``use_dense_gemv``) for the model's output embeddings in both the packed and the bf16
decode steps; every other call (more than one row, a bias, not CUDA) goes to ``torch.nn.functional.linear``.
With ``fusion.LM_HEAD_NORM`` (on by default; its history: kernels/fusion.py), in a compiled packed step
the decoder's final RMSNorm is made inside it (``norm``): the compile pass ``kernels/fusion.py`` (``fuse_norm``)
gives the last block's down projection a residual epilogue that writes the partial sums of h^2 (``w1a16_res``),
and the lm_head (``binaryllm::dense_gemv_norm``) normalizes h as it reads it, one kernel (add + RMSNorm) fewer a
token.
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
def _x_chunk(x_ptr, nw_ptr, k, cols, c_ok, rstd, NORM: tl.constexpr):
    """Columns k + cols of x in fp32; NORM: RMSNorm(x) * weight of them, rounded as transformers' Llama-style
    RMSNorm rounds (x * rstd in fp32 to x's dtype, then the weight's product, rounded to x's dtype)."""
    x = tl.load(x_ptr + k + cols, mask=c_ok, other=0.0)
    if NORM:
        dt = x_ptr.dtype.element_ty
        nw = tl.load(nw_ptr + k + cols, mask=c_ok, other=0.0).to(tl.float32)
        x = ((x.to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, stride_wn, p_ptr, nw_ptr, eps, NP, K: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr = False, NPP: tl.constexpr = 1):
    """Program pid: rows [pid BN, (pid + 1) BN).  NORM: x is h, and RMSNorm(h) * weight (nw_ptr) is used, its
    mean square from the NP partial sums of h^2 at p_ptr (a ``w1a16_res`` kernel's, ``mma_w1a16.res_parts``)."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    r_ok = rows < N
    wp = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    w = tl.load(wp, mask=r_ok[:, None] & (cols < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rstd = 1.0
    if NORM:
        j = tl.arange(0, NPP)
        ms = tl.sum(tl.load(p_ptr + j, mask=j < NP, other=0.0), 0) / K
        rstd = 1.0 / tl.sqrt(ms + eps)
    x = _x_chunk(x_ptr, nw_ptr, 0, cols, cols < K, rstd, NORM)
    acc = w.to(tl.float32) * x[None, :]
    for k in range(BK, K, BK):                    # K a constexpr: one build per width (the interpreter needs it)
        c_ok = (k + cols) < K
        w = tl.load(wp + k, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        x = _x_chunk(x_ptr, nw_ptr, k, cols, c_ok, rstd, NORM)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=r_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, tile: tuple | None = None,
         norm: tuple | None = None) -> torch.Tensor:
    """x (..., K) with one row in all, weight (N, K), both bf16 or fp16 on one CUDA device -> (..., N).
    ``norm`` = (partials, norm_weight, eps): x is h, and the product is of ``mma_w1a16.rms_norm(h, partials,
    norm_weight, eps)`` (the final RMSNorm of a decoder made as the kernel reads h; partials (1, P) fp32 sums of
    h^2, norm_weight (K,) in x's dtype)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if x.numel() != K or weight.shape[1] != K or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("dense gemv takes one row of x and a row-major weight of x's dtype")
    part, nw, eps, NP = x, x, 0.0, 1                              # unused pointers without a norm: any tensor
    if norm is not None:
        part, nw, eps = norm[0].contiguous(), norm[1].contiguous(), float(norm[2])
        NP = part.numel()
        if part.dtype != torch.float32 or nw.shape != (K,) or nw.dtype != x.dtype:
            raise ValueError("dense gemv's norm takes fp32 partial sums and a norm weight of K values in x's dtype")
    bn, bk, warps = tile or TILE
    bk = min(bk, triton.next_power_of_2(K))
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    pdl = pdl_launch(x)
    _gemv_kernel[(triton.cdiv(N, bn),)](x.contiguous(), weight, y, N, weight.stride(0), part, nw, eps, NP, K=K,
                                      BN=bn, BK=bk, PDL=pdl, NORM=norm is not None, NPP=triton.next_power_of_2(NP),
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


def gemv_or_linear(x: torch.Tensor, weight: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
    """``gemv``; if the kernel fails to build or run here, ``torch.nn.functional.linear`` (of ``rms_norm`` first
    with ``norm``) from then on on this device, said once."""
    dev = x.device.index or 0
    if dev not in _FAILED:
        try:
            return gemv(x, weight, norm=norm)
        except Exception as err:  # e.g. a Triton that cannot build it for this GPU
            from . import warn_once
            _FAILED.add(dev)
            warn_once("dense-gemv-failed", f"the Triton GEMV of the lm_head failed ({type(err).__name__}: "
                                           f"{str(err)[:200]}); it runs through torch.nn.functional.linear")
    return torch.nn.functional.linear(x if norm is None else _normed(x, norm), weight)


def _normed(h: torch.Tensor, norm: tuple) -> torch.Tensor:
    from .mma_w1a16 import rms_norm
    return rms_norm(h, *norm)


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
