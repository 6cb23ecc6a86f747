"""Batch-1 W1A16 by table lookup on the CUDA cores (no tensor cores): can it beat the ``mma`` kernel's chain bound?

For each group of 4 inputs the 16 signed sums ``T[q][p] = sum_j (bit j of p ? +x : -x)[4q + j]`` go into shared
memory once per program; a row then needs one shared-memory load and one fp32 add per 4 weights (its 4 sign bits
are the index) instead of 4 multiply-adds.  All 32 lanes of a warp look up the same group (they own 32 rows), so
their 16 possible addresses sit in 16 different banks: no bank conflicts.  Per lookup the thread issues a shift, a
LOP3 (mask the 4 bits and OR in the table base), the load and the add: about 32 lookups (128 weights) per clock
per SM where the mma kernel gets about 51 weights -- if the loads, issue and HBM overlap.

A probe, not a package kernel: CUDA C compiled at run time by NVRTC (``torch.cuda._compile_kernel``), sizes fixed
at compile time, full K per program (the table of all K in shared memory: 16 bytes per input), N a multiple of
the rows per program.  Weights as int32 words ``wt[k4][n][4]`` (16 bytes = 128 inputs of one row per load, rows
contiguous for a warp).  Times back to back in one CUDA graph with the weights cycled past L2, against the
``mma`` kernel and cuBLAS bf16 in the same process; outputs checked against the dense reference first.

    PYTHONPATH=src OUT=. python bench/lut_probe.py [NxK:ROWS:THREADS[:MODE,PDL,ORDER] ...]   # ./lut_probe.json
"""
import ctypes
import sys

import torch

from binaryllm.bench import _gpu_time, _rel_err
from nvrtc_util import HELPERS, launch                  # bench/ (this script's folder)

SOURCE = r"""
#define KP (NT / ROWS)
#define KW4 (K_ / 128)
#define PER (KW4 / KP)
#define GROUPS (K_ / 4)
#define GPER (GROUPS / KP)

__device__ __forceinline__ float lds(unsigned a) {
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a));
  return v;
}

extern "C" __global__ void __launch_bounds__(NT, 1)
lut_gemv(const unsigned short* __restrict__ x, const uint4* __restrict__ wt, const unsigned short* __restrict__ sc,
         unsigned short* __restrict__ y, unsigned zero) {
  extern __shared__ __align__(128) float4 tbl[];
  const int t = threadIdx.x;
  const int rr = t % ROWS, kp = t / ROWS;
  const int r = blockIdx.x * ROWS + rr;
  uint4 w[PER];
#pragma unroll
  for (int j = 0; j < PER; j++) {
#if MODE == 1
    w[j] = make_uint4(t * 0x9E3779B9u + j, t * 0x85EBCA6Bu ^ j, (t + j) * 0xC2B2AE35u, t ^ (j * 0x27D4EB2Fu));
#else
    w[j] = ldw(wt + (size_t)(kp * PER + j) * N_ + r);
#endif
  }
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif

  const uint2* xv = (const uint2*)x;
  for (int g = t; g < GROUPS; g += NT) {
    uint2 v = xv[g];
    float x0 = bf(v.x & 0xffff), x1 = bf(v.x >> 16), x2 = bf(v.y & 0xffff), x3 = bf(v.y >> 16);
    float a0 = -x0 - x1, a1 = x0 - x1, b0 = -x2 - x3, b1 = x2 - x3;   // index bit j set: +x_j
    float A0 = a0, A1 = a1, A2 = -a1, A3 = -a0, B0 = b0, B1 = b1, B2 = -b1, B3 = -b0;
    tbl[g * 4 + 0] = make_float4(A0 + B0, A1 + B0, A2 + B0, A3 + B0);
    tbl[g * 4 + 1] = make_float4(A0 + B1, A1 + B1, A2 + B1, A3 + B1);
    tbl[g * 4 + 2] = make_float4(A0 + B2, A1 + B2, A2 + B2, A3 + B2);
    tbl[g * 4 + 3] = make_float4(A0 + B3, A1 + B3, A2 + B3, A3 + B3);
  }
  __syncthreads();

  const unsigned base = (unsigned)__cvta_generic_to_shared(tbl) + kp * GPER * 64;   // 64-byte aligned
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; i++) acc[i] = 0.f;
#if MODE == 2
  for (int j = 0; j < PER; j++) acc[j & 7] += __uint_as_float((w[j].x ^ w[j].y ^ w[j].z ^ w[j].w) & 0x3fffffff);
#else
  unsigned dep = 0;
#pragma unroll
  for (int j = 0; j < PER; j++) {
    // ORDER: the words of w[j] wait for the last sum of w[j - 1] (zero is 0 at run time), so the compiler cannot
    // hoist every word's lookups to the top, which would wait for the last load before the first lookup
    const unsigned ws[4] = {w[j].x ^ dep, w[j].y ^ dep, w[j].z ^ dep, w[j].w ^ dep};
#pragma unroll
    for (int h = 0; h < 4; h++) {
      const unsigned u = ws[h];
      const unsigned off = (j * 4 + h) * 8 * 64;
      acc[0] += lds((((u << 2) & 0x3C) | base) + off);
#pragma unroll
      for (int i = 1; i < 8; i++) acc[i] += lds((((u >> (4 * i - 2)) & 0x3C) | base) + off + i * 64);
    }
#if ORDER
    dep = __float_as_uint(acc[7]) & zero;
#endif
  }
#endif
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  float* red = (float*)(tbl + GROUPS * 4);
  if (KP > 1) {
    if (kp > 0) red[(kp - 1) * ROWS + rr] = s;
    __syncthreads();
  }
  if (kp == 0) {
#pragma unroll
    for (int q = 1; q < KP; q++) s += red[(q - 1) * ROWS + rr];
    float f;
    unsigned short o;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(sc[r]));
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(o) : "f"(s * f));
    y[r] = o;
  }
}
"""


def source(N: int, K: int, rows: int, threads: int, mode: int = 0, pdl: int = 1, order: int = 1) -> str:
    """mode 0: the kernel; 1: weights made in registers, no loads (the lookups alone); 2: the loads and no lookups."""
    assert N % rows == 0 and threads % rows == 0 and K % (128 * (threads // rows)) == 0, (N, K, rows, threads)
    head = f"#define N_ {N}\n#define K_ {K}\n#define ROWS {rows}\n#define NT {threads}\n"
    return head + f"#define MODE {mode}\n#define PDL {pdl}\n#define ORDER {order}\n" + HELPERS + SOURCE


def smem_bytes(K: int, rows: int, threads: int) -> int:
    return K // 4 * 64 + (threads // rows - 1) * rows * 4


def layout(bits: torch.Tensor) -> torch.Tensor:
    """(N, K/8) uint8 sign bits (binaryllm's layout) -> (K/128, N, 4) int32: 16 bytes of one row per load."""
    N = bits.shape[0]
    return bits.contiguous().view(torch.int32).view(N, -1, 4).permute(1, 0, 2).contiguous()


def compiled(N: int, K: int, rows: int, threads: int, **flags):
    """A launcher for one compiled size: (x, wt, sc, y) -> y, launched with programmatic dependent launch allowed
    when flags["pdl"] (the default)."""
    kern = torch.cuda._compile_kernel(source(N, K, rows, threads, **flags), "lut_gemv")
    smem = smem_bytes(K, rows, threads)
    kern.set_shared_memory_config(smem)

    def call(x, wt, sc, y):
        launch(kern.func, N // rows, threads, smem, [x, wt, sc, y, ctypes.c_uint(0)], bool(flags.get("pdl", 1)))
        return y
    return call


def measure(N: int, K: int, tile, flags: dict, case, row: dict):
    ts, sc, x, ref, g, bits = case
    rows, threads = tile
    f = compiled(N, K, rows, threads, **flags)
    wts = [layout(b) for b in bits]
    ys = [torch.empty(N, device="cuda", dtype=torch.bfloat16) for _ in ts]
    f(x, wts[0], sc, ys[0])
    torch.cuda.synchronize()
    err = _rel_err(ys[0][None].float(), ref)
    if flags.get("mode", 0) == 0 and err > 1e-2:               # modes 1 and 2 compute no product: not checked
        return f"WRONG {err:.3g}"
    t = [round(_gpu_time([lambda: [f(x, w, sc, yy) for w, yy in zip(wts, ys)]], 5, 7) * 1e6 / len(ts), 2)
         for _ in range(2)]
    return {"err": err, "us": t, "x_bf16": round(row["bf16"] / min(t), 2),
            "hbm": round(N * K / 8 / min(t) / 1e6 / 3.35, 3)}


def main() -> None:
    from mma_xs import probe_specs                         # bench/ (this script's folder)
    probe_specs("lut", sys.argv[1:] or ["8192x8192:64:256", "8192x8192:64:512", "4096x4096:32:256",
                                        "11008x4096:64:256", "22016x4096:128:256", "12288x4096:64:256"],
                2, ("mode", "pdl", "order"), measure)


if __name__ == "__main__":
    main()
