"""Packed 1-bit matmul on the CPU: a small C kernel (built with the system C compiler on first use, cached,
called through ctypes) that never expands the weights.

For every group of 8 inputs it tabulates the 256 possible signed sums ``sum_j ±x[8g+j]`` (one add each,
built from a smaller entry), then each output row is the sum of one table lookup per *byte* of its packed
weights: K/8 lookups + adds a row instead of K multiply-adds, and 1/32 of the fp32 weight bytes read.
That is for few rows of activations (decode, M <= 8); larger M unpacks tiles and uses the dense matmul.
Accumulation in fp32 in an order that differs from a dense reference (fp32 rounding).

If no C compiler is found, ``available()`` is False and callers use the PyTorch path (with one warning).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* y[m, n] = scale[n] * sum_k x[m, k] * (bit (n, k) ? +1 : -1); w rows of kb bytes, least significant bit first.
   The inputs are taken in chunks of CHUNK groups so that the chunk's table (CHUNK * 1 KiB) stays in L2. */
#define CHUNK 512
void w1_lut_matmul(const float *x, const uint8_t *w, const float *scale, float *y, float *table,
                   int64_t M, int64_t N, int64_t K, int64_t kb, int threads) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *ym = y + m * N;
        for (int64_t g0 = 0; g0 < kb; g0 += CHUNK) {
            int64_t g1 = g0 + CHUNK < kb ? g0 + CHUNK : kb;
            for (int64_t g = g0; g < g1; g++) {
                float xs[8];
                float base = 0.f;
                for (int j = 0; j < 8; j++) {
                    int64_t k = g * 8 + j;
                    xs[j] = k < K ? 2.f * xm[k] : 0.f;
                    base -= 0.5f * xs[j];
                }
                float *t = table + (g - g0) * 256;
                t[0] = base;
                for (int b = 1; b < 256; b++)
                    t[b] = t[b & (b - 1)] + xs[__builtin_ctz(b)];
            }
            #pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const uint8_t *wn = w + n * kb;
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
                int64_t g = g0;
                for (; g + 4 <= g1; g += 4) {
                    a0 += table[(g - g0 + 0) * 256 + wn[g + 0]];
                    a1 += table[(g - g0 + 1) * 256 + wn[g + 1]];
                    a2 += table[(g - g0 + 2) * 256 + wn[g + 2]];
                    a3 += table[(g - g0 + 3) * 256 + wn[g + 3]];
                }
                for (; g < g1; g++)
                    a0 += table[(g - g0) * 256 + wn[g]];
                float part = (a0 + a1) + (a2 + a3);
                ym[n] = g0 == 0 ? part : ym[n] + part;
            }
        }
        for (int64_t n = 0; n < N; n++)
            ym[n] *= scale[n];
    }
}
"""

_LIB = None
_TRIED = False
MAX_LUT_ROWS = 8


def _cache_dir() -> Path:
    base = os.environ.get("BINARYLLM_CACHE") or str(Path.home() / ".cache" / "binaryllm")
    return Path(base) / "kernels"


def _load():
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        warnings.warn("binaryllm: no C compiler found: packed CPU matmul uses the slower PyTorch path", stacklevel=3)
        return None
    tag = hashlib.sha1((SOURCE + cc).encode()).hexdigest()[:12]
    so = _cache_dir() / f"w1_lut_{tag}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        src = so.with_suffix(f".{os.getpid()}.c")
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        src.write_text(SOURCE)
        flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
        try:
            r = subprocess.run([cc, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:  # no OpenMP or -march=native: a plain build
                r = subprocess.run([cc, "-O3", "-shared", "-fPIC", str(src), "-o", str(tmp)],
                                   capture_output=True, text=True)
            if r.returncode != 0:
                warnings.warn(f"binaryllm: building the CPU 1-bit kernel failed ({r.stderr.strip()[:200]}): "
                              f"using the PyTorch path", stacklevel=3)
                return None
            os.replace(tmp, so)
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(so))
    fn = lib.w1_lut_matmul
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    _LIB = lib
    return _LIB


def available() -> bool:
    return _load() is not None


def w1_matmul_cpu(x: torch.Tensor, packed: torch.Tensor, row_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """x (..., K) on the CPU (any float dtype), packed (N, ceil(K/8)) uint8 -> (..., N) float32, row scales applied."""
    lib = _load()
    K = in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).to(torch.float32).contiguous()
    M, N = x2.shape[0], packed.shape[0]
    w = packed.contiguous()
    s = row_scale.to(torch.float32).contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    table = torch.empty(min(w.shape[1], 512) * 256, dtype=torch.float32)
    lib.w1_lut_matmul(x2.data_ptr(), w.data_ptr(), s.data_ptr(), y.data_ptr(), table.data_ptr(),
                      M, N, K, w.shape[1], torch.get_num_threads())
    return y.reshape(*lead, N)
