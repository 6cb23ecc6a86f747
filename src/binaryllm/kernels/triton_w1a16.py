"""W1A16 matmul in Triton: ``y = ((x * input_scale) @ sign(W)^T) * row_scale + bias``, bf16/fp16 activations,
weights as packed sign bits.

Weight layout: int32 words, shape (N, KW = ceil(K/32)); bit j of word w of row n is weight (n, 32 w + j),
1 = +1.  That is binaryllm's on-disk layout (uint8, least significant bit first) read as little-endian int32
when K % 32 == 0 (a free view); other K are padded with zero bits (``prepare_weight``).

The trick that keeps every tile 2-D (no reshapes, no layout shuffles): the *activations* are permuted once per
call into bit-major order, ``xp[m, j, w] = x[m, 32 w + j]`` (a cheap pass over M x K values; the inputs past K
are 0).  A sum over k is a sum over (j, w) in any order, so a loaded tile of words serves all 32 bit positions:
for bit j the weights are ``((words >> j) & 1) * 2 - 1`` -- a plain elementwise op on the loaded tile -- and the
matching activations ``xp[:, j, w0:w0+WORDS]`` are contiguous.

* ``gemv`` (decode, M <= 16): CUDA cores; a program owns BLOCK_N rows, accumulates ``where(bit, x, -x)`` into
  an (M, BLOCK_N, WORDS) fp32 tile, reduces once at the end.
* ``tc`` (decode, M <= 16): tensor cores with the activations padded to 16 columns.  Words are read as int16
  (16 planes: ``xp16[m, j, w] = x[m, 16 w + j]``) and each plane becomes +-1 bf16/fp16 with two integer
  instructions per *pair* of weights: a 32-bit register holds two int16 words, ``t = r << (15 - j)`` puts bit j
  of both halves on the two sign-bit positions, and ``(t & 0x80008000) ^ (-1.0, -1.0)`` (one LOP3) gives
  -1.0 where the bit is 0 and +1.0 where it is 1.  That register is already the tensor-core operand, so there
  is no int -> float conversion at all (the ``fused`` kernel's conversion is what makes it slow).  Written
  as inline PTX (``tl.inline_asm_elementwise``, two lanes at a time); under ``TRITON_INTERPRET`` the same
  arithmetic runs as plain Triton ops.
* ``fused`` (prefill): tensor cores; per tile of WORDS words, 32 ``tl.dot``s of (BM x WORDS) x (WORDS x BN).
* ``unpack``: bits -> a dense ``sign * scale`` temporary, then cuBLAS (kept as a reference point in the bench).

``gemv`` and ``tc`` can also read x in place (config field DIRECT, ``_direct_x``): no bit-major copy, so one
kernel per matmul instead of two (in a CUDA-graph decode step every kernel node costs ~1-2 µs).  Off by default:
the H100 sweep measured it slower (each bit plane reads x at a stride; docs/RESULTS.md).

Rounding: x·(±1) products are exact; sums in fp32 (order differs from a dense reference by fp32 rounding); the
row scale is applied in fp32 and the result rounded once to the activation dtype.  An input scale is applied
to x first and rounded to the activation dtype, as the PyTorch path does.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import BinaryLLMError
from . import DECODE_KERNELS, INTERPRETED, bmma_w1a16, env_ints, mma_w1a16, silu_mul


def prepare_weight(packed_u8: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, ceil(K/8)) uint8 sign bits -> (N, ceil(K/32)) int32 words (a view when K % 32 == 0)."""
    n, nb = packed_u8.shape
    kw = (in_features + 31) // 32
    if nb * 8 == kw * 32 and packed_u8.is_contiguous():
        return packed_u8.view(torch.int32)
    out = torch.zeros(n, kw * 4, dtype=torch.uint8, device=packed_u8.device)
    out[:, :nb] = packed_u8
    return out.view(torch.int32)


def bit_major(x2: torch.Tensor, K: int, input_scale: torch.Tensor | None = None, planes: int = 32) -> torch.Tensor:
    """(M, K) -> (M, planes, KW) with xp[m, j, w] = x[m, planes * w + j] (0 past K, K padded to whole 32-bit
    words), after the input scale if any."""
    if input_scale is not None:
        x2 = x2 * input_scale.to(x2.dtype)
    M = x2.shape[0]
    kp = (K + 31) // 32 * 32
    if kp != K:
        x2 = torch.nn.functional.pad(x2, (0, kp - K))
    return x2.view(M, kp // planes, planes).transpose(1, 2).contiguous()


@triton.jit
def _direct_x(x_ptr, si_ptr, m, k, M, K, stride_xm, HAS_IN_SCALE: tl.constexpr, EVEN_K: tl.constexpr):
    """x[m, k] (0 where m >= M or k >= K), times the input scale rounded to x's dtype first, product rounded to
    x's dtype: the same values bit_major writes.  m, k: broadcastable index tensors.  EVEN_K: K is a multiple of
    32 and the word tiles divide the row, so every k the kernel reads is < K and that mask is left out."""
    if EVEN_K:
        ok = (m < M) & (k >= 0)
        k_ok = k >= 0
    else:
        ok = (m < M) & (k < K)
        k_ok = k < K
    xv = tl.load(x_ptr + m * stride_xm + k, mask=ok, other=0.0)
    if HAS_IN_SCALE:
        sv = tl.load(si_ptr + k, mask=k_ok, other=0.0).to(xv.dtype)
        xv = (xv.to(tl.float32) * sv.to(tl.float32)).to(xv.dtype)
    return xv


@triton.jit
def _gemv_kernel(xp_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KW: tl.constexpr, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                 DIRECT: tl.constexpr = False, K=0, si_ptr=None, HAS_IN_SCALE: tl.constexpr = False,
                 EVEN_K: tl.constexpr = False):
    """DIRECT: xp_ptr is x itself, (M, K) row-major, read at k = 32 w + j (and times the input scale si_ptr when
    HAS_IN_SCALE, rounded to x's dtype as bit_major does) instead of the pre-permuted bit-major copy: one kernel
    per matmul instead of two."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, MP)
    offs_w = tl.arange(0, WORDS)
    n_ok = offs_n < N
    acc = tl.zeros((MP, BLOCK_N, WORDS), dtype=tl.float32)
    for w0 in range(0, KW, WORDS):
        w_ok = (w0 + offs_w) < KW
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + (w0 + offs_w)[None, :],
                        mask=n_ok[:, None] & w_ok[None, :], other=0)                     # (BLOCK_N, WORDS)
        for j in tl.static_range(32):
            if DIRECT:
                xv = _direct_x(xp_ptr, si_ptr, offs_m[:, None], (w0 + offs_w)[None, :] * 32 + j, M, K, stride_xm,
                               HAS_IN_SCALE, EVEN_K).to(tl.float32)                         # (MP, WORDS)
            else:
                xv = tl.load(xp_ptr + offs_m[:, None] * stride_xm + j * KW + (w0 + offs_w)[None, :],
                             mask=(offs_m[:, None] < M) & w_ok[None, :], other=0.0).to(tl.float32)   # (MP, WORDS)
            bit = ((words >> j) & 1) != 0
            acc += tl.where(bit[None, :, :], xv[:, None, :], -xv[:, None, :])
    out = tl.sum(acc, axis=2) * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & n_ok[None, :])


def _plane_asm(minus_one: int) -> tuple:
    pair = minus_one * 0x10001
    return tuple(f"{{ .reg .b32 t; shl.b32 t, $1, {15 - j}; lop3.b32 $0, t, 0x80008000, {pair:#x}, 0x6a; }}"
                 for j in range(16))


_PLANE_BF16 = tl.constexpr(_plane_asm(0xBF80))     # lop3 0x6a: (a & b) ^ c
_PLANE_FP16 = tl.constexpr(_plane_asm(0xBC00))


@triton.jit
def _gemv_tc_kernel(xp_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KW: tl.constexpr, stride_xm, stride_wn, stride_ym,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, BF16: tl.constexpr,
                    ASM: tl.constexpr, SPLIT: tl.constexpr, DIRECT: tl.constexpr = False, K=0, si_ptr=None,
                    HAS_IN_SCALE: tl.constexpr = False, EVEN_K: tl.constexpr = False):
    """KW, WORDS: int16 words.  acc (BLOCK_N, 16) += plane_j (BLOCK_N, WORDS) @ x_j (WORDS, 16), j = 0..15.
    SPLIT > 1: program (pid, s) takes the s-th of SPLIT word ranges and atomically adds its scaled partial sums
    to a zeroed fp32 y (the caller rounds it to the activation dtype): more programs per SM to hide latency."""
    pid = tl.program_id(0)
    CHUNK: tl.constexpr = (KW + SPLIT * WORDS - 1) // (SPLIT * WORDS) * WORDS
    if SPLIT == 1:
        part = 0                  # a constant start: the unsplit loop compiles as before (fewer address ops)
    else:
        part = tl.program_id(1)
    k_lo = part * CHUNK
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, 16)
    offs_w = tl.arange(0, WORDS)
    n_ok = offs_n < N
    m_ok = offs_m < M
    MINUS_ONE: tl.constexpr = 0xBF80 if BF16 else 0xBC00
    DT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for i in range(0, CHUNK, WORDS):
        w0 = k_lo + i
        w_ok = (w0 + offs_w) < KW
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + (w0 + offs_w)[None, :],
                        mask=n_ok[:, None] & w_ok[None, :], other=0)                     # (BLOCK_N, WORDS) int16
        for j in tl.static_range(16):
            if ASM:
                if BF16:
                    wj = tl.inline_asm_elementwise(_PLANE_BF16[j], "=r,r", [words], dtype=tl.bfloat16,
                                                   is_pure=True, pack=2)
                else:
                    wj = tl.inline_asm_elementwise(_PLANE_FP16[j], "=r,r", [words], dtype=tl.float16,
                                                   is_pure=True, pack=2)
            else:
                wj = (((words.to(tl.int32) << (15 - j)) & 0x8000) ^ MINUS_ONE).to(tl.int16).to(DT, bitcast=True)
            if DIRECT:   # x read in place at k = 16 w + j (see _gemv_kernel)
                xv = _direct_x(xp_ptr, si_ptr, offs_m[None, :], (w0 + offs_w)[:, None] * 16 + j, M, K, stride_xm,
                               HAS_IN_SCALE, EVEN_K)                                          # (WORDS, 16)
            else:
                xv = tl.load(xp_ptr + offs_m[None, :] * stride_xm + j * KW + (w0 + offs_w)[:, None],
                             mask=m_ok[None, :] & w_ok[:, None], other=0.0)                   # (WORDS, 16)
            acc = tl.dot(wj, xv, acc)
    out = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok & (part == 0), other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    if SPLIT == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])
    else:
        tl.atomic_add(y_ptrs, out, mask=m_ok[None, :] & n_ok[:, None])


@triton.jit
def _gemm_kernel(xp_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KW: tl.constexpr, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n                       # grouped ordering: neighbouring programs share weight tiles
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, KW, WORDS):
        w_ok = (w0 + offs_w) < KW
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (w0 + offs_w)[:, None],
                        mask=n_ok[None, :] & w_ok[:, None], other=0)                     # (WORDS, BLOCK_N)
        for j in tl.static_range(32):
            a = tl.load(xp_ptr + offs_m[:, None] * stride_xm + j * KW + (w0 + offs_w)[None, :],
                        mask=m_ok[:, None] & w_ok[None, :], other=0.0)                    # (BLOCK_M, WORDS)
            b = (((words >> j) & 1) * 2 - 1).to(a.dtype)
            acc += tl.dot(a, b)
    acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _unpack_kernel(w_ptr, s_ptr, out_ptr, N, K, KW, stride_wn, stride_on, BLOCK_N: tl.constexpr,
                   WORDS: tl.constexpr):
    """Packed bits -> dense sign(W) * row scale; 3-D pointers (row, word, bit) so stores stay contiguous."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    bits_j = tl.arange(0, 32)
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                    mask=(offs_n[:, None] < N) & (offs_w[None, :] < KW), other=0)
    bit = (words[:, :, None] >> bits_j[None, None, :]) & 1
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None, None]
    k = offs_w[None, :, None] * 32 + bits_j[None, None, :]
    tl.store(out_ptr + offs_n[:, None, None] * stride_on + k, tl.where(bit != 0, s, -s).to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None, None] < N) & (k < K))


def unpack_dense(words: torch.Tensor, row_scale: torch.Tensor, in_features: int, dtype) -> torch.Tensor:
    """(N, K) dense ``sign(W) * row_scale`` in ``dtype`` (a temporary for the ``unpack`` path)."""
    N, K = words.shape[0], in_features
    out = torch.empty(N, K, device=words.device, dtype=dtype)
    _unpack_kernel[(triton.cdiv(N, 32), triton.cdiv(words.shape[1], 8))](
        words, row_scale, out, N, K, words.shape[1], words.stride(0), out.stride(0), BLOCK_N=32, WORDS=8)
    return out


def _env_config(name: str, default: tuple) -> tuple:
    """A tile config from the environment ("64,32,2" -> (64, 32, 2)), else ``default``; a malformed value is an
    error naming the variable."""
    cfg = env_ints(name, ",".join(map(str, default)))
    if cfg is None:
        return default
    if len(cfg) < 3:
        raise BinaryLLMError(f"{name}={','.join(map(str, cfg))!r} needs at least 3 fields (BLOCK_N, WORDS, warps); "
                             "fix or unset it")
    return cfg


# BLOCK_N, WORDS, warps[, DIRECT]: fastest or within 3% of it in the H100 sweep (RESULTS).  DIRECT = 1: the kernel
# reads x in place instead of a bit-major copy made by a separate kernel (measured slower on the H100: off by default)
GEMV_CONFIG = _env_config("BINARYLLM_GEMV_CONFIG", (4, 32, 4))
# BLOCK_N, int16 WORDS, warps[, SPLIT over K[, DIRECT]] of the tensor-core decode kernel.  Triton lowers the dot to Hopper's
# asynchronous wgmma when BLOCK_N >= 64 with 4 warps (it then waits after each of the 16 plane dots), and to the
# synchronous mma.sync otherwise (BLOCK_N 16-32, or 1-2 warps): the sweep in bench.py tries both.
TC_CONFIG = _env_config("BINARYLLM_TC_CONFIG", (64, 64, 4))
DECODE_MODE = os.environ.get("BINARYLLM_DECODE_MODE", "auto")   # below PREFILL_M rows: mma, gemv, tc, or auto
if DECODE_MODE not in ("auto",) + DECODE_KERNELS:
    raise BinaryLLMError(f"BINARYLLM_DECODE_MODE={DECODE_MODE!r} is not one of "
                         f"{', '.join(('auto',) + DECODE_KERNELS)}; fix or unset it")
TC_MIN_WEIGHTS = 8192 * 8192    # from this many weights on, tc beats gemv at one row too (H100, RESULTS)


def decode_mode(M: int, N: int, K: int) -> str:
    """The decode kernel measured faster on the H100 (docs/RESULTS.md): at 2-16 rows tc (2.7-5x bf16, while
    gemv falls below bf16); at one row gemv on Llama-7B-sized matrices (7.3-12.6 us against tc's 9.5-13.4),
    tc from 8192 x 8192 on (16.6 vs 18.4 us; 36.8 vs 55.5 at 16384^2)."""
    if DECODE_MODE not in ("auto", "mma"):
        return DECODE_MODE
    return "tc" if M > 1 or N * K >= TC_MIN_WEIGHTS else "gemv"
GEMM_CONFIG = (128, 128, 32, 8, 1)   # BLOCK_M, BLOCK_N, WORDS, num_warps, num_stages (32 dots a tile: 1 stage)
PREFILL_M = 17                  # from this many rows on: unpack + cuBLAS (faster than "fused" on the H100)


def w1a16_matmul(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
                 input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 mode: str = "auto", config: tuple | None = None, tiles: torch.Tensor | None = None,
                 pairs: int = 0) -> torch.Tensor:
    """x (..., K) bf16/fp16 on CUDA; words from ``prepare_weight``; returns (..., N) in x's dtype.
    mode: ``mma`` (needs ``tiles`` from ``mma_w1a16.prepare_tiles``), ``bmma`` (one row, the same tiles:
    ``bmma_w1a16``), ``gemv``, ``tc``, ``fused``, ``unpack`` or
    ``auto``: below PREFILL_M rows ``mma`` when tiles are given (the fastest decode kernel, docs/RESULTS.md), else
    DECODE_MODE; from PREFILL_M rows on unpack + cuBLAS (on the H100 the tensor-core kernel ran at 0.2-0.5x
    cuBLAS, unpack + cuBLAS at 0.82-0.95x).  ``pairs``: ``tiles`` were made with ``prepare_tiles(pairs=...)``
    (the output is the same; only the mma kernel reads tiles)."""
    K = in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], words.shape[0]
    if mode == "auto":
        if M >= PREFILL_M:
            mode = "unpack"
        else:
            y = _auto_mma(x, tiles, row_scale, N, K, input_scale, bias, pairs)
            if y is not None:
                return y
            mode = decode_mode(M, N, K)
    if mode == "bmma":
        if tiles is None:
            raise ValueError("mode bmma needs the tile layout (mma_w1a16.prepare_tiles)")
        return bmma_w1a16.bmma_matmul(x, tiles, row_scale, N, K, input_scale, bias, pairs=pairs, config=config)
    if mode == "mma":
        if tiles is None:
            raise ValueError("mode mma needs the tile layout (mma_w1a16.prepare_tiles)")
        return mma_w1a16.mma_matmul(x, tiles, row_scale, N, K, input_scale, bias, config, pairs=pairs)
    if mode == "unpack":
        if input_scale is not None:
            x2 = x2 * input_scale.to(x2.dtype)
        y = torch.nn.functional.linear(x2, unpack_dense(words, row_scale, K, x2.dtype),
                                       bias.to(x2.dtype) if bias is not None else None)
        return y.reshape(*lead, N)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    b = bias.to(x.dtype) if bias is not None else row_scale
    if mode == "tc":
        if M > 16:
            raise ValueError("tc takes at most 16 rows of activations")
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("tc takes bf16 or fp16 activations")
        w16 = words.view(torch.int16)              # little-endian: int16 word w holds bits 16 w .. 16 w + 15
        bn, wds, warps, *rest = config or TC_CONFIG
        split = rest[0] if rest else 1
        direct = bool(rest[1]) if len(rest) > 1 else False
        xp = x2.contiguous() if direct else bit_major(x2, K, input_scale, planes=16)
        out = y if split == 1 else torch.zeros(M, N, device=x.device, dtype=torch.float32)
        _gemv_tc_kernel[(triton.cdiv(N, bn), split)](xp, w16, row_scale, b, out, M, N, w16.shape[1], xp.stride(0),
                                                     w16.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                                     BLOCK_N=bn, WORDS=wds, BF16=x.dtype == torch.bfloat16,
                                                     ASM=not INTERPRETED, SPLIT=split, DIRECT=direct, K=K,
                                                     si_ptr=input_scale if direct else None,
                                                     HAS_IN_SCALE=direct and input_scale is not None,
                                                     EVEN_K=K % 32 == 0 and w16.shape[1] % (wds * split) == 0,
                                                     num_warps=warps)
        if split > 1:
            y.copy_(out)
        return y.reshape(*lead, N)
    kw = words.shape[1]
    if mode == "gemv":
        if M > 16:
            raise ValueError("gemv takes at most 16 rows of activations")
        bn, wds, *rest = config or GEMV_CONFIG
        warps = rest[0] if rest else 4
        direct = bool(rest[1]) if len(rest) > 1 else False
        xp = x2.contiguous() if direct else bit_major(x2, K, input_scale)
        mp = max(1, triton.next_power_of_2(M))
        _gemv_kernel[(triton.cdiv(N, bn),)](xp, words, row_scale, b, y, M, N, kw, xp.stride(0), words.stride(0),
                                            y.stride(0), HAS_BIAS=bias is not None, MP=mp, BLOCK_N=bn, WORDS=wds,
                                            DIRECT=direct, K=K, si_ptr=input_scale if direct else None,
                                            HAS_IN_SCALE=direct and input_scale is not None,
                                            EVEN_K=K % 32 == 0 and kw % wds == 0, num_warps=warps)
    else:
        xp = bit_major(x2, K, input_scale)
        bm, bn, wds, warps, stages = config or GEMM_CONFIG
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _gemm_kernel[grid](xp, words, row_scale, b, y, M, N, kw, xp.stride(0), words.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, WORDS=wds, GROUP_M=8,
                           num_warps=warps, num_stages=stages)
    return y.reshape(*lead, N)


def _auto_mma(x, tiles, row_scale, N: int, K: int, input_scale, bias, pairs: int, gated: bool = False, **kw):
    """The ``mma`` kernel's output where ``auto`` dispatch takes it (tiles given, DECODE_MODE allows it, the
    kernel usable here), else None; for one row of a layer of ``bmma_w1a16.AUTO_MIN`` weights or more that
    ``bmma_w1a16.takes`` (plain, residual, gated or norm epilogues) the binary tensor-core kernels' instead; a kernel
    that fails (a Triton whose Gluon differs from the one this was written for) is disabled with one warning and
    None returned."""
    if tiles is None or DECODE_MODE not in ("auto", "mma") or not mma_w1a16.usable(x.device.index or 0):
        return None
    if (set(kw) <= {"residual", "norm"} and (input_scale is None or "norm" not in kw)
            and bmma_w1a16.takes(x, N, K, "residual" in kw, gated, "norm" in kw)):
        try:
            return bmma_w1a16.bmma_matmul(x, tiles, row_scale, N, K, input_scale, bias, pairs=pairs, gated=gated,
                                          **kw)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            bmma_w1a16.disable(x.device.index or 0, e)
    try:
        return mma_w1a16.mma_matmul(x, tiles, row_scale, N, K, input_scale, bias, pairs=pairs, gated=gated, **kw)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        mma_w1a16.disable(x.device.index or 0, e)
        return None


def w1a16_gated_matmul(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
                       input_scale: torch.Tensor | None, bias: torch.Tensor | None, tiles: torch.Tensor | None,
                       pairs: int) -> torch.Tensor:
    """``silu_mul(w1a16_matmul(x, ...), pairs)`` for a stacked [gate | up] layer of 2 pairs rows: below PREFILL_M
    rows with paired ``mma`` tiles the gating is the kernel's epilogue (no elementwise kernel after it),
    otherwise it runs in PyTorch after the matmul."""
    K = in_features
    if x.numel() // K < PREFILL_M:
        y = _auto_mma(x, tiles, row_scale, words.shape[0], K, input_scale, bias, pairs, gated=True)
        if y is not None:
            return y
    return silu_mul(w1a16_matmul(x, words, row_scale, K, input_scale, bias, tiles=tiles, pairs=pairs), pairs)


def w1a16_res_matmul(x: torch.Tensor, words: torch.Tensor, row_scale: torch.Tensor, in_features: int,
                     input_scale: torch.Tensor | None, bias: torch.Tensor | None, tiles: torch.Tensor | None,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, partials): h = residual + ``w1a16_matmul(x, ...)`` and the (M, parts) fp32 partial sums of h^2 that an
    RMSNorm of h needs (``mma_w1a16.res_parts``).  With ``mma`` tiles both are made in the kernel's epilogue (no
    add + RMSNorm kernel after it); otherwise in PyTorch after the matmul."""
    K, N = in_features, words.shape[0]
    M = x.numel() // K
    if M < PREFILL_M:
        out = _auto_mma(x, tiles, row_scale, N, K, input_scale, bias, 0, residual=residual)
        if out is not None:
            return out
    h = residual + w1a16_matmul(x, words, row_scale, K, input_scale, bias, tiles=tiles)
    return h, mma_w1a16.res_partials(h, *mma_w1a16.res_parts(M, N, K))


def w1a16_norm_matmul(h: torch.Tensor, partials: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      words: torch.Tensor, row_scale: torch.Tensor, in_features: int, bias: torch.Tensor | None,
                      tiles: torch.Tensor | None, pairs: int, gated: bool) -> torch.Tensor:
    """The packed layer (gated with ``gated``) of ``mma_w1a16.rms_norm(h, partials, norm_weight, eps)``: for one
    row with ``mma`` tiles the norm is made as the kernel reads h (no RMSNorm kernel before it); otherwise in
    PyTorch first."""
    K = in_features
    if h.numel() == K:
        y = _auto_mma(h, tiles, row_scale, words.shape[0], K, None, bias, pairs, gated=gated,
                      norm=(partials, norm_weight, eps))
        if y is not None:
            return y
    x = mma_w1a16.rms_norm(h, partials, norm_weight, eps)
    if gated:
        return w1a16_gated_matmul(x, words, row_scale, K, None, bias, tiles, pairs)
    return w1a16_matmul(x, words, row_scale, K, None, bias, tiles=tiles, pairs=pairs)
