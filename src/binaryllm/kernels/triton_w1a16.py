"""W1A16 matmul in Triton: ``y = ((x * input_scale) @ sign(W)^T) * row_scale + bias``, bf16/fp16 activations,
weights as packed sign bits.

Weight layout for the kernel: int32 words, shape (N, ceil(K/32)), bit k % 32 of word k // 32 of row n is
weight (n, k), 1 = +1.  That is exactly binaryllm's on-disk layout (uint8, least significant bit first) read
as little-endian int32 when K % 32 == 0 (a free view); other K are padded with zero bits at load
(``prepare_weight``) and the padded inputs are masked to 0.

One kernel serves decode and prefill: a tile of BLOCK_K packed words is expanded to ±1 in registers
(shift + and), converted to the activation dtype and multiplied on the tensor cores (``tl.dot``, fp32
accumulation).  Small M (decode) uses 16-row tiles and splits K over several programs (fp32 atomics) so that a
narrow layer still fills the GPU.  Rounding: the products x·(±1) are exact, sums are fp32 (order differs from
a dense reference by fp32 rounding), the row scale is applied in fp32 and the result rounded once to the
activation dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w1a16_kernel(x_ptr, w_ptr, s_ptr, is_ptr, b_ptr, y_ptr, M, N, K, KW,
                  stride_xm, stride_wn, stride_ym, K_PER_SPLIT: tl.constexpr,
                  HAS_IS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if HAS_IS:
            s_in = tl.load(is_ptr + offs_k, mask=offs_k < K, other=0.0)
            x = (x.to(tl.float32) * s_in.to(tl.float32)[None, :]).to(x.dtype)
        # each (k, n) loads its word (32 neighbours share it: L1 hits) and picks its bit: no reshapes, so no
        # layout shuffles before the tensor-core dot
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // 32),
                        mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0)       # (BLOCK_K, BLOCK_N)
        bits = (words >> (offs_k[:, None] % 32)) & 1
        w = (bits * 2 - 1).to(x.dtype)
        acc += tl.dot(x, w)
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w1_gemv_kernel(x_ptr, w_ptr, s_ptr, is_ptr, b_ptr, y_ptr, N, K, KW, stride_xm, stride_wn, stride_ym,
                    M: tl.constexpr, HAS_IS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, WORDS: tl.constexpr, K_ITERS: tl.constexpr):
    """Decode (M <= 16 rows of activations): CUDA cores, no tensor-core padding.  A program owns BLOCK_N rows
    and walks K in chunks of WORDS packed words: bits -> ±x selected per element, summed over the chunk."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    shifts = tl.arange(0, 32)
    n_ok = offs_n < N
    for m in tl.static_range(M):
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for it in range(K_ITERS):
            w0 = it * WORDS
            words = tl.load(w_ptr + offs_n[:, None] * stride_wn + (w0 + offs_w)[None, :],
                            mask=n_ok[:, None] & ((w0 + offs_w)[None, :] < KW), other=0)      # (BLOCK_N, WORDS)
            offs_k = (w0 + offs_w)[:, None] * 32 + shifts[None, :]                              # (WORDS, 32)
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0)
            if HAS_IS:   # x * input_scale rounded to the activation dtype, as the other paths do
                s_in = tl.load(is_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) * s_in).to(x.dtype)
            x = x.to(tl.float32)
            bit = (words[:, :, None] >> shifts[None, None, :]) & 1                             # (BLOCK_N, WORDS, 32)
            acc += tl.sum(tl.sum(tl.where(bit != 0, x[None, :, :], -x[None, :, :]), axis=2), axis=1)
        y = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _unpack_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed bits -> dense sign(W) * row scale (for prefill through cuBLAS)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 32, mask=mask, other=0)
    bit = (words >> (offs_k[None, :] % 32)) & 1
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    v = tl.where(bit != 0, s[:, None], -s[:, None])
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


def unpack_dense(words: torch.Tensor, row_scale: torch.Tensor, in_features: int, dtype) -> torch.Tensor:
    """(N, K) dense ``sign(W) * row_scale`` in ``dtype`` (a temporary for the prefill path)."""
    N, K = words.shape[0], in_features
    out = torch.empty(N, K, device=words.device, dtype=dtype)
    _unpack_kernel[(triton.cdiv(N, 64), triton.cdiv(K, 128))](words, row_scale, out, N, K, words.stride(0),
                                                                out.stride(0), BLOCK_N=64, BLOCK_K=128)
    return out


def w1_gemv(x2: torch.Tensor, words: torch.Tensor, row_scale, K: int, input_scale=None, bias=None,
            block_n: int = 16, words_per_iter: int = 4) -> torch.Tensor:
    M, N = x2.shape[0], words.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    kw = words.shape[1]
    _w1_gemv_kernel[(triton.cdiv(N, block_n),)](
        x2, words, row_scale, input_scale if input_scale is not None else row_scale,
        bias if bias is not None else row_scale, y, N, K, kw, x2.stride(0), words.stride(0), y.stride(0),
        M=M, HAS_IS=input_scale is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n, WORDS=words_per_iter,
        K_ITERS=triton.cdiv(kw, words_per_iter), num_warps=4)
    return y


def prepare_weight(packed_u8: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, ceil(K/8)) uint8 sign bits -> (N, ceil(K/32)) int32 words (a view when K % 32 == 0)."""
    n, nb = packed_u8.shape
    kw = (in_features + 31) // 32
    if nb * 8 == kw * 32 and packed_u8.is_contiguous():
        return packed_u8.view(torch.int32)
    out = torch.zeros(n, kw * 4, dtype=torch.uint8, device=packed_u8.device)
    out[:, :nb] = packed_u8
    return out.view(torch.int32)


def _config(M: int, N: int, K: int, sm_count: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps, num_stages) by problem size."""
    if M <= 16:   # decode: memory bound; wide K tiles, enough programs to cover the SMs
        bm, bn, bk = 16, 64, 256
        tiles = triton.cdiv(N, bn)
        split = 1
        while tiles * split < 2 * sm_count and K // (split * 2) >= bk:
            split *= 2
        return bm, bn, bk, split, 4, 3
    if M <= 64:
        return 64, 64, 128, 1, 4, 3
    return 128, 128, 64, 1, 8, 3


_SM: dict[int, int] = {}


def w1a16_matmul(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
                 input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 config: tuple | None = None, mode: str = "auto") -> torch.Tensor:
    """x (..., K) bf16/fp16 on CUDA; words from ``prepare_weight``; returns (..., N) in x's dtype.

    mode: ``gemv`` (CUDA cores, M <= 16), ``fused`` (tensor cores, bits unpacked in registers), ``unpack``
    (bits -> a dense temporary, then cuBLAS: prefill of many tokens), ``auto`` (gemv for M <= 16, fused up to
    M < PREFILL_M, unpack above; see bench kernels)."""
    K = in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], words.shape[0]
    if mode == "auto":
        mode = "gemv" if M <= 16 else ("fused" if M < PREFILL_M else "unpack")
    if mode == "gemv":
        return w1_gemv(x2, words, row_scale, K, input_scale, bias).reshape(*lead, N)
    if mode == "unpack":
        if input_scale is not None:
            x2 = x2 * input_scale.to(x2.dtype)
        y = torch.nn.functional.linear(x2, unpack_dense(words, row_scale, K, x2.dtype),
                                       bias.to(x2.dtype) if bias is not None else None)
        return y.reshape(*lead, N)
    dev = x.device.index or 0
    if dev not in _SM:
        _SM[dev] = torch.cuda.get_device_properties(dev).multi_processor_count if x.is_cuda else 4
    bm, bn, bk, split, warps, stages = config or _config(M, N, K, _SM[dev])
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)(M, N, device=x.device, dtype=torch.float32 if atomic else x.dtype)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    _w1a16_kernel[grid](x2, words, row_scale, input_scale if input_scale is not None else row_scale,
                        bias if bias is not None else row_scale, y, M, N, K, words.shape[1],
                        x2.stride(0), words.stride(0), y.stride(0), k_per,
                        HAS_IS=input_scale is not None, HAS_BIAS=bias is not None, ATOMIC=atomic,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if atomic:
        if bias is not None:
            y += bias.float()
        y = y.to(x.dtype)
    return y.reshape(*lead, N)


PREFILL_M = 256
