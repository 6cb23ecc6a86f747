"""Batch-1 W1A16 on the binary tensor cores (``mma ... .b1.and.popc``, SASS ``BMMA.168256``): no bit conversion.

The ``mma`` kernel turns every sign bit into a bf16 operand and spends 16 ``m16n8k16`` ops on 16 rows x 256
inputs; its chain of tensor-core ops alone takes 5.66 µs at 8192^2 (docs/RESULTS.md, seventeenth session).  Here
the activation row is written once as P two's-complement bit planes of a fixed-point copy, and the packed sign
bits are the tensor-core operand as they lie in memory: one ``m16n8k256`` takes 16 rows x 256 inputs x 8 planes,
so P = 24 needs 3 ops where ``mma`` needs 16, and no conversion instruction at all.

The arithmetic, exact in integers.  ``q = rint(x * 2^sh)`` with one power-of-two scale a row of x chosen so that
``|q| < 2^(P-1)`` (``sh = P - 1 - e``, ``max|x| < 2^e``); for bf16 x every element within 2^-(P-9) of the row's
largest is represented exactly (P = 24: down to 2^-15 of it), smaller ones round to the nearest 2^-sh.  With sign
bits ``b`` (1 = +1): ``sum_k w_k q_k = 2 * sum_j c_j popc(b & plane_j) - sum_k q_k``, ``c_j = 2^j`` and
``c_(P-1) = -2^(P-1)``, summed in int64; then ``y = bf16(fp32(fp64(that) * 2^-sh * scale))``.  So the kernel's
output is bit-identical to ``exact_reference`` below; against the dense fp32 product it differs only by the
rounding of x to the 2^-sh grid.

Three kernels (CUDA C through NVRTC, launched with PDL through ``nvrtc_util.launch``):
- ``bmma_prep``: max|x| (every program, redundantly), then the planes of its 256-input chunks by warp ballots, in
  the B-fragment order of ``m16n8k256`` (lane ``4g + t`` holds plane ``8h + g``, inputs ``32t..`` and
  ``128 + 32t..`` of a chunk); the group-0 warps also write their chunk's ``sum q``, program 0 writes ``sh``.  In
  a decode step the kernel that makes x could write the planes instead.
- ``bmma_gemv``: a program of WK x WR warps; warp (wk, wr) owns RT row tiles of 16 and the wk-th slice of the
  chunks.  It loads all its weight fragments (16 bytes a lane, 512 contiguous bytes a warp) before
  ``griddepcontrol.wait``, then the planes, then RT x chunks x P/8 ``BMMA``s; the int64 row sums are reduced
  over the quad by shuffles and over the K slices in shared memory.
- ``bmma_fused``: both in one launch, from bf16 x: its first programs make the planes after the wait while every
  program's weights stream in; the others spin on a counter (``gemv_body``'s comment).  Measured slower than the
  two kernels (docs/RESULTS.md, thirty-second session).

Weights are re-laid once from binaryllm's (N, K/8) sign bytes (``layout``).  N and K need not be multiples of
16 and 256 (padded with zero planes and zero rows).  Times back to back in one CUDA graph with the weights cycled
past L2, against the ``mma`` kernel and cuBLAS bf16 in the same process; outputs checked first.

    PYTHONPATH=src OUT=. python bench/bmma_probe.py [NxK:RT:WK:WR[:P,MODE,PDL,PW,REP,NC,PE] ...]   # ./bmma_probe.json

P planes (24); MODE 1 makes the weight fragments in registers (no weight loads: the tensor-core work alone), MODE 2
replaces each BMMA by four popc (wrong values: the loads without the tensor cores); PDL (1); PW warps a prep
program (4); REP: every BMMA issued REP times (wrong values unless 1: the tensor-core rate); NC 1: the weights
through ld.global.nc, which lets ptxas hoist griddepcontrol.wait above them (as in the first runs; 0); PE 1: the
prep lets the gemv launch before its own wait (0).
"""
import sys

import torch

from nvrtc_util import HELPERS, launch                  # bench/ (this script's folder)

SOURCE = r"""
#define G_ (P_ / 8)
#define NCH ((K_ + 255) / 256)
#define NTILES ((N_ + 15) / 16)
#define CPW ((NCH + WK - 1) / WK)
#define ROWS (16 * RT * WR)
#define NT (32 * WK * WR)

__device__ __forceinline__ void bmma(int* c, const uint4 a, const uint2 b) {
  asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y));
}

template <int NTH>
__device__ __forceinline__ float row_max(const uint4* __restrict__ x8, float* red) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < (K_ / 8 + NTH - 1) / NTH; j++) {            // unrolled: all loads in flight at once
    const int k = threadIdx.x + j * NTH;
    const uint4 v = k < K_ / 8 ? x8[k] : make_uint4(0u, 0u, 0u, 0u);
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int h = 0; h < 4; h++) m = fmaxf(m, fmaxf(fabsf(bf(u[h] & 0xffff)), fabsf(bf(u[h] >> 16))));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = red[0];
#pragma unroll
  for (int w = 1; w < NTH / 32; w++) m = fmaxf(m, red[w]);
  return m;
}

__device__ __forceinline__ int q1(float v, int sh) { return __float2int_rn(v * __int_as_float((127 + sh) << 23)); }

__device__ __forceinline__ int quant(const unsigned short* __restrict__ x, int k, int sh) {
  return k < K_ ? q1(bf(x[k]), sh) : 0;
}

// one warp: item = (chunk c, plane group h), its 8 x 8 plane words; for h == 0 also the chunk's sum of q in hdr[1 + c]
__device__ __forceinline__ void prep_item(const unsigned short* __restrict__ x, uint2* pl, long long* hdr, int item,
                                          int sh) {
  const int lane = threadIdx.x & 31, c = item / G_, h = item % G_;
  unsigned mine0 = 0u, mine1 = 0u;
  long long qs = 0;
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const int q = quant(x, c * 256 + i * 32 + lane, sh);
    qs += q;
    const int qh = q >> (8 * h);
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const unsigned b = __ballot_sync(0xffffffffu, (qh >> j) & 1);
      if (lane == j * 4 + (i & 3)) {
        if (i < 4) mine0 = b; else mine1 = b;
      }
    }
  }
  pl[item * 32 + lane] = make_uint2(mine0, mine1);
  if (h == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) qs += __shfl_xor_sync(0xffffffffu, qs, o);
    if (lane == 0) hdr[1 + c] = qs;
  }
}

// a program of NTH threads: the row's scale (program 0 writes sh), then its warps' items
template <int NTH>
__device__ __forceinline__ void make_planes(const unsigned short* __restrict__ x, uint2* pl, long long* hdr,
                                            float* red) {
  int e;
  frexpf(row_max<NTH>((const uint4*)x, red), &e);
  const int sh = min(P_ - 1 - e, 127);
  if (blockIdx.x == 0 && threadIdx.x == 0) hdr[0] = sh;
  const int item = blockIdx.x * (NTH / 32) + (threadIdx.x >> 5);
  if (item < NCH * G_) prep_item(x, pl, hdr, item, sh);
}

extern "C" __global__ void __launch_bounds__(32 * PW, 1)
bmma_prep(const unsigned short* __restrict__ x, uint2* __restrict__ pl, long long* __restrict__ hdr) {
#if PDL && PE
  asm volatile("griddepcontrol.launch_dependents;");         // the product may launch before this one waits
#endif
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __shared__ float red[PW];
  make_planes<32 * PW>(x, pl, hdr, red);
}

// FUSED: the first programs make the planes (as bmma_prep) after griddepcontrol.wait, publish them with a fence and
// a counter, and every program spins on the counter before it reads them (through L2: they were written during
// this kernel); the last program through resets the counters for the next launch.  Programs start in index order,
// so the makers are resident before any program waits on them.
// the planes and sums: through L2 when this kernel wrote them (FUSED), else through the read-only path
template <bool FUSED, class T>
__device__ __forceinline__ T ldp(const T* p) { return FUSED ? __ldcg(p) : __ldg(p); }

template <bool FUSED>
__device__ __forceinline__ void gemv_body(const uint4* __restrict__ wt, const unsigned short* __restrict__ x,
                                          uint2* pl, long long* hdr, unsigned* sync,
                                          const unsigned short* __restrict__ sc, unsigned short* __restrict__ y) {
  __shared__ long long red[WK * ROWS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wk = warp % WK, wr = warp / WK;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * (RT * WR) + wr * RT;
  uint4 a[RT][CPW];
#pragma unroll
  for (int j = 0; j < CPW; j++) {
    const int c = wk * CPW + j;
#pragma unroll
    for (int i = 0; i < RT; i++) {
#if MODE == 1
      a[i][j] = make_uint4(lane * 0x9E3779B9u + j, lane * 0x85EBCA6Bu ^ i, (lane + j) * 0xC2B2AE35u, lane ^ (i * 77u));
#else
      a[i][j] = (tile0 + i < NTILES && c < NCH) ? ldw(wt + ((size_t)(tile0 + i) * NCH + c) * 32 + lane)
                                                 : make_uint4(0u, 0u, 0u, 0u);
#endif
    }
  }
  float srow[(ROWS + 31) / 32];                                 // warp 0's row scales: weights, loaded early
#pragma unroll
  for (int m = 0; m < (ROWS + 31) / 32; m++) {
    const int r = lane + 32 * m, row = blockIdx.x * ROWS + r;
    srow[m] = 0.f;
    if (warp == 0 && r < ROWS && row < N_) {
      unsigned short h;
#if NC
      h = __ldg(sc + row);
#else
      asm volatile("ld.global.u16 %0, [%1];" : "=h"(h) : "l"(sc + row));     // plain load: see ldw
#endif
      asm("cvt.f32.f16 %0, %1;" : "=f"(srow[m]) : "h"(h));
    }
  }
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  if (FUSED) {
    constexpr int NPREP = (NCH * G_ + NT / 32 - 1) / (NT / 32);
    if (blockIdx.x < NPREP) {
      __shared__ float fred[NT / 32];
      make_planes<NT>(x, pl, hdr, fred);
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicAdd(sync, 1u);
    }
    if (threadIdx.x == 0) {
      unsigned v;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(sync) : "memory");
        if (v < NPREP) __nanosleep(32);
      } while (v < NPREP);
      if (atomicAdd(sync + 1, 1u) == gridDim.x - 1) {          // every program is past the wait: reset
        atomicExch(sync, 0u);
        atomicExch(sync + 1, 0u);
      }
    }
    __syncthreads();
  }
  long long Q = 0;                                              // warp 0: sum q and sh, loaded with the planes
  int sh = 0;
  if (warp == 0) {
#pragma unroll
    for (int m = 0; m < (NCH + 31) / 32; m++)
      if (lane + 32 * m < NCH) Q += ldp<FUSED>(hdr + 1 + lane + 32 * m);
    sh = (int)ldp<FUSED>(hdr);
  }
  int acc[RT][G_][4];
#pragma unroll
  for (int i = 0; i < RT; i++)
#pragma unroll
    for (int h = 0; h < G_; h++) acc[i][h][0] = acc[i][h][1] = acc[i][h][2] = acc[i][h][3] = 0;
#pragma unroll
  for (int j = 0; j < CPW; j++) {
    const int c = wk * CPW + j;
    uint2 b[G_];
#pragma unroll
    for (int h = 0; h < G_; h++)
      b[h] = c < NCH ? ldp<FUSED>(pl + (c * G_ + h) * 32 + lane) : make_uint2(0u, 0u);
#pragma unroll
    for (int rep = 0; rep < REP; rep++)
#pragma unroll
    for (int i = 0; i < RT; i++)
#pragma unroll
      for (int h = 0; h < G_; h++) {
#if MODE == 2
        acc[i][h][0] += __popc(a[i][j].x & b[h].x);
        acc[i][h][1] += __popc(a[i][j].y & b[h].y);
        acc[i][h][2] += __popc(a[i][j].z & b[h].x);
        acc[i][h][3] += __popc(a[i][j].w & b[h].y);
#else
        bmma(acc[i][h], a[i][j], b[h]);
#endif
      }
  }
#pragma unroll
  for (int i = 0; i < RT; i++) {
    long long s0 = 0, s1 = 0;
#pragma unroll
    for (int h = 0; h < G_; h++) {
      const long long m = (h == G_ - 1 && t == 3) ? -2 : 2;      // plane P-1 counts -2^(P-1)
      const long long w = 1ll << (8 * h + 2 * t);
      s0 += ((long long)acc[i][h][0] + m * acc[i][h][1]) * w;
      s1 += ((long long)acc[i][h][2] + m * acc[i][h][3]) * w;
    }
    s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
    s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
    s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
    s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
    if (t == 0) {
      red[wk * ROWS + (wr * RT + i) * 16 + g] = s0;
      red[wk * ROWS + (wr * RT + i) * 16 + g + 8] = s1;
    }
  }
  __syncthreads();
  if (warp == 0) {                  // the row sums of the K slices, sum q and 2^-sh (exact: sh within +-1022)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) Q += __shfl_xor_sync(0xffffffffu, Q, o);
    const double d = __longlong_as_double((long long)(1023 - sh) << 52);
#pragma unroll
    for (int m = 0; m < (ROWS + 31) / 32; m++) {
      const int r = lane + 32 * m, row = blockIdx.x * ROWS + r;
      if (r < ROWS && row < N_) {
        long long S = 0;
#pragma unroll
        for (int q = 0; q < WK; q++) S += red[q * ROWS + r];
        const float v = (float)((double)(2 * S - Q) * d * (double)srow[m]);
        unsigned short o;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(o) : "f"(v));
        y[row] = o;
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(NT, 1)
bmma_gemv(const uint4* __restrict__ wt, uint2* pl, long long* hdr, const unsigned short* __restrict__ sc,
          unsigned short* __restrict__ y) {
  gemv_body<false>(wt, nullptr, pl, hdr, nullptr, sc, y);
}

extern "C" __global__ void __launch_bounds__(NT, 1)
bmma_fused(const uint4* __restrict__ wt, const unsigned short* __restrict__ x, uint2* pl, long long* hdr,
           unsigned* sync, const unsigned short* __restrict__ sc, unsigned short* __restrict__ y) {
  gemv_body<true>(wt, x, pl, hdr, sync, sc, y);
}
"""


def source(N: int, K: int, rt: int, wk: int, wr: int, planes: int = 24, mode: int = 0, pdl: int = 1, pw: int = 4,
           rep: int = 1, nc: int = 0, pe: int = 0) -> str:
    assert planes % 8 == 0 and 8 < planes <= 32 and K % 8 == 0, (planes, K)
    head = f"#define N_ {N}\n#define K_ {K}\n#define RT {rt}\n#define WK {wk}\n#define WR {wr}\n#define P_ {planes}\n"
    head += f"#define MODE {mode}\n#define PDL {pdl}\n#define PW {pw}\n#define REP {rep}\n#define NC {nc}\n"
    head += f"#define PE {pe}\n"
    return head + HELPERS + SOURCE


def layout(bits: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K/8) uint8 sign bits (bit b of byte m = input 8m + b, 1 = +1) -> (tiles * chunks * 32, 4) int32, the
    A fragments of m16n8k256 in load order: tile of 16 rows, chunk of 256 inputs, lane 4g + t holding rows g and
    g + 8, inputs 32t.. and 128 + 32t.. of the chunk (words x, y, z, w = (g, lo), (g + 8, lo), (g, hi), (g + 8, hi))."""
    N = bits.shape[0]
    T, C = (N + 15) // 16, (K + 255) // 256
    b = torch.zeros(T * 16, C * 32, dtype=torch.uint8, device=bits.device)
    b[:N, :bits.shape[1]] = bits
    w = b.view(torch.int32).view(T, 2, 8, C, 2, 4)          # tile, half, g, chunk, hi, t
    return w.permute(0, 3, 2, 5, 4, 1).reshape(-1, 4).contiguous()


def quantize(x: torch.Tensor, planes: int):
    """x (K,) bf16 -> (q int64, sh): q = rint(x * 2^sh), max|x| < 2^(planes - 1 - sh) (frexp's exponent; sh at
    most 127, so that 2^sh is an fp32 number)."""
    e = int(torch.frexp(x.float().abs().max()).exponent)
    sh = min(planes - 1 - e, 127)
    return torch.round(x.double() * 2.0 ** sh).long(), sh     # 2.0 ** sh exact (torch.ldexp's pow is not on CUDA)


def planes_ref(x: torch.Tensor, planes: int) -> torch.Tensor:
    """The prep kernel's output, made in torch: (chunks * planes/8 * 32, 2) int32."""
    q, _ = quantize(x, planes)
    K = q.numel()
    C = (K + 255) // 256
    qp = torch.zeros(C * 256, dtype=torch.int64, device=x.device)
    qp[:K] = q
    bit = (qp[None] >> torch.arange(planes, device=x.device)[:, None]) & 1            # (planes, C*256)
    words = (bit.view(planes, C, 8, 32) << torch.arange(32, device=x.device)).sum(-1)  # (planes, C, 8) in [0, 2^32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    w = words.view(planes // 8, 8, C, 2, 4)                   # h, g, chunk, hi, t
    return w.permute(2, 0, 1, 4, 3).reshape(-1, 2).to(torch.int32).contiguous()


def exact_reference(x: torch.Tensor, bits: torch.Tensor, sc: torch.Tensor, K: int, planes: int) -> torch.Tensor:
    """What the kernels compute, in float64 from the same integers: (N,) bf16."""
    from binaryllm.export.bits import unpack_signs
    q, sh = quantize(x, planes)
    S = unpack_signs(bits, K, torch.float64) @ q.double()                           # exact: integers < 2^53
    return (S * 2.0 ** -sh * sc.double()).float().bfloat16()


def emulate(wt: torch.Tensor, pl: torch.Tensor, N: int, K: int, planes: int) -> torch.Tensor:
    """The gemv kernel's integer result ``sum_k w_k q_k`` (before ``- sum q`` is applied, i.e. sum_j c_j popc) from
    the two operand buffers, in torch on any device: every m16n8k256 rebuilt from its fragments as the PTX ISA lays
    them out (A: a0/a2 row g, a1/a3 row g + 8, a0/a1 inputs 32t.., a2/a3 128 + 32t..; B: b0/b1 column g, the same
    inputs; C: columns 2t, 2t + 1), so the CPU tests check ``layout`` and ``planes_ref`` against the exact product.
    Returns (N,) int64 ``sum_k b_k q_k`` (b in {0, 1})."""
    T, C, G = (N + 15) // 16, (K + 255) // 256, planes // 8
    bit = torch.arange(32, device=wt.device)

    def unbits(v):                                            # int32 (...) -> (..., 32) of 0/1, bit i = input i
        return (v.long()[..., None] >> bit) & 1

    a = unbits(wt.view(T, C, 8, 4, 4))                        # tile, chunk, g, t, register, bit
    A = torch.zeros(T, C, 16, 256, dtype=torch.long, device=wt.device)
    for reg, (half, hi) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        for t in range(4):
            A[:, :, 8 * half:8 * half + 8, 128 * hi + 32 * t:128 * hi + 32 * t + 32] = a[:, :, :, t, reg]
    b = unbits(pl.view(C, G, 8, 4, 2))                        # chunk, group, g, t, register, bit
    B = torch.zeros(C, G, 256, 8, dtype=torch.long, device=wt.device)
    for hi in range(2):
        for t in range(4):
            B[:, :, 128 * hi + 32 * t:128 * hi + 32 * t + 32, :] = b[:, :, :, t, hi].transpose(-1, -2)
    cnt = torch.einsum("tcrk,chkn->trhn", A, B).reshape(T * 16, planes)       # popc(row & plane j), summed over K
    c = 2 ** torch.arange(planes, device=wt.device)
    c[-1] = -c[-1]
    return (cnt * c).sum(-1)[:N]


def compiled(N: int, K: int, rt: int, wk: int, wr: int, planes: int = 24, mode: int = 0, pdl: int = 1, pw: int = 4,
             rep: int = 1, nc: int = 0, pe: int = 0):
    """(prep(x, pl, hdr), gemv(wt, pl, hdr, sc, y), fused(wt, x, pl, hdr, sync, sc, y)) launchers for one compiled
    size; ``sync``: two int32 zeros, kept between calls (the fused kernel leaves them zero)."""
    src = source(N, K, rt, wk, wr, planes, mode, pdl, pw, rep, nc, pe)
    kp, kg, kf = (torch.cuda._compile_kernel(src, name) for name in ("bmma_prep", "bmma_gemv", "bmma_fused"))
    chunks, rows = (K + 255) // 256, 16 * rt * wr
    grid_p = (chunks * planes // 8 + pw - 1) // pw        # pw warps a program, one (chunk, group) each
    grid = (N + rows - 1) // rows
    assert grid >= (chunks * planes // 8 + wk * wr - 1) // (wk * wr), "fused: fewer programs than plane makers"

    def prep(x, pl, hdr):
        launch(kp.func, grid_p, 32 * pw, 0, [x, pl, hdr], bool(pdl))

    def gemv(wt, pl, hdr, sc, y):
        launch(kg.func, grid, 32 * wk * wr, 0, [wt, pl, hdr, sc, y], bool(pdl))
        return y

    def fused(wt, x, pl, hdr, sync, sc, y):
        launch(kf.func, grid, 32 * wk * wr, 0, [wt, x, pl, hdr, sync, sc, y], bool(pdl))
        return y
    return prep, gemv, fused


def measure(N: int, K: int, tile, flags: dict, case, row: dict):
    from binaryllm.bench import _gpu_time, _rel_err
    ts, sc, x, ref, g, bits = case
    rt, wk, wr = tile
    n, P = len(ts), flags.get("planes", 24)
    prep, gemv, fused = compiled(N, K, rt, wk, wr, **flags)
    wts = [layout(b, K) for b in bits]
    xr = x.view(-1)
    pl = torch.zeros(((K + 255) // 256) * (P // 8) * 32, 2, dtype=torch.int32, device="cuda")
    hdr = torch.zeros(1 + (K + 255) // 256, dtype=torch.int64, device="cuda")    # sh, sum q a chunk
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")
    ys = [torch.empty(N, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    prep(xr, pl, hdr)
    gemv(wts[0], pl, hdr, sc, ys[0])
    torch.cuda.synchronize()
    q, sh = quantize(xr, P)
    out = {"planes_ok": bool(torch.equal(pl, planes_ref(xr, P))),
           "hdr_ok": [int(hdr[0]), int(hdr[1:].sum())] == [sh, int(q.sum())]}
    checked = flags.get("mode", 0) == 0 and flags.get("rep", 1) == 1
    if checked:
        exact = exact_reference(xr, bits[0], sc, K, P)
        out["mismatch"] = int((ys[0] != exact).sum())
        out["err"] = _rel_err(ys[0][None].float(), ref)
        pl.zero_()
        hdr.zero_()
        yf = fused(wts[0], xr, pl, hdr, sync, sc, torch.empty_like(ys[0]))
        torch.cuda.synchronize()
        out["fused_mismatch"] = int((yf != exact).sum())
        out["sync_reset"] = bool((sync == 0).all())          # the fused kernel leaves its counters at 0
    if checked and (out["mismatch"] or out["fused_mismatch"] or not out["sync_reset"] or not out["planes_ok"]
                    or not out["hdr_ok"]):
        return {"WRONG": out}
    one = lambda: [gemv(w, pl, hdr, sc, yy) for w, yy in zip(wts, ys)]          # noqa: E731
    both = lambda: [(prep(xr, pl, hdr), gemv(w, pl, hdr, sc, yy)) for w, yy in zip(wts, ys)]  # noqa: E731
    fu = lambda: [fused(w, xr, pl, hdr, sync, sc, yy) for w, yy in zip(wts, ys)]  # noqa: E731
    out["gemv_us"] = [round(_gpu_time([one], 5, 7) * 1e6 / n, 2) for _ in range(2)]
    out["prep_gemv_us"] = [round(_gpu_time([both], 5, 7) * 1e6 / n, 2) for _ in range(2)]
    out["fused_us"] = [round(_gpu_time([fu], 5, 7) * 1e6 / n, 2) for _ in range(2)]
    out["prep_us"] = round(_gpu_time([lambda: [prep(xr, pl, hdr) for _ in range(n)]], 5, 7) * 1e6 / n, 2)
    if checked:                                   # the timed replays left the fused kernel's output
        out["fused_after_mismatch"] = int((ys[0] != exact).sum())
        out["sync_reset_after"] = bool((sync == 0).all())
    best = min(out["gemv_us"])
    out["x_bf16"] = [round(row["bf16"] / best, 2), round(row["bf16"] / min(out["prep_gemv_us"]), 2),
                     round(row["bf16"] / min(out["fused_us"]), 2)]
    out["hbm"] = [round(N * K / 8 / t / 1e6 / 3.35, 3) for t in (best, min(out["fused_us"]))]
    return out


def main() -> None:
    from mma_xs import probe_specs                         # bench/ (this script's folder)
    probe_specs("bmma", sys.argv[1:] or ["8192x8192:1:8:1", "8192x8192:1:8:1:16", "8192x8192:1:4:1",
                                         "16384x16384:1:16:1", "4096x4096:1:8:1", "12288x4096:1:8:1",
                                         "22016x4096:2:8:1", "4096x11008:1:8:1"],
                3, ("planes", "mode", "pdl", "pw", "rep", "nc", "pe"), measure)


if __name__ == "__main__":
    main()
