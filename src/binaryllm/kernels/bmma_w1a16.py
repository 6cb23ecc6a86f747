"""One-row W1A16 on the binary tensor cores (``bmma``, Gluon): ``y = (x @ sign(W)^T) * row_scale + bias`` with x
turned into bit planes, so that the packed sign bits are the tensor-core operand with no conversion to bf16.

Why: the ``mma`` kernel turns every sign bit into a bf16 operand and spends 16 ``m16n8k16`` ops on 16 rows x 256
inputs; at 8192^2 its chain of tensor-core ops alone takes most of its time (docs/RESULTS.md, seventeenth session).
Ampere's and Hopper's tensor cores also multiply bits: ``mma.sync.m16n8k256 ... .b1.b1.s32.and.popc`` (SASS
``BMMA.168256.AND.POPC``) adds up ``popc(a & b)`` over 256 inputs for 16 rows x 8 columns.  With x as P bit planes
(the 8 columns of one op are 8 planes), P = 24 takes 3 such ops per 16 rows x 256 inputs, and the weights need two
integer instructions a 32-bit word to become the A fragment (below).  On the H100 (docs/RESULTS.md, thirty-third
session) the CUDA C probe ``bench/bmma_probe.py`` takes 4.07 us (24 planes) and 3.02 (16) on planes already made at
8192^2, against ``mma``'s 5.9; these Gluon kernels take 4.0 for the product and 6.2-6.6 with the prep (thirty-fourth
session), so ``auto`` takes plain layers only where that still beats ``mma`` (AUTO_MIN, AUTO_K, AUTO_K_ALSO):
16384^2, Llama-7B's down projection, also with the decode step's residual epilogue (1022 against 1039 us a step), and
K = 4096 layers from 8192 rows up (thirty-eighth session: 1.0-1.4x ``mma`` alone); and the
decode step's fused gate/up (silu(gate) * up in the epilogue) and q/k/v (the RMSNorm in the prep) layers
(AUTO_GATED, AUTO_NORM; 908.6 against 1015.2 us a step, thirty-seventh session).

The arithmetic, exact in integers.  ``q = rint(x * 2^sh)`` with one power-of-two scale for the row, ``sh = min(P -
1 - e, 127)`` where ``max|x| = m 2^e`` (m in [0.5, 1); e = -126 when max|x| is 0 or an fp32 subnormal), so that
``|q| < 2^(P-1)``: a bf16 x within 2^-(P-9) of the row's largest is exact, smaller ones round to the 2^-sh grid
(ties to even).  With sign bits b (1 = +1) ``sum_k w_k q_k = 2 sum_j c_j popc(b & plane_j) - sum_k q_k``, ``c_j =
2^j`` and ``c_(P-1) = -2^(P-1)`` (two's complement), summed in int64; then ``y = dtype(fp32(fp64(that) * 2^-sh *
row_scale) + bias)``.  ``reference`` computes exactly that in float64 from the same integers, so the GPU output is
compared bit for bit; against the dense product it differs by the rounding of x to the 2^-sh grid.

Two kernels, launched back to back with programmatic dependent launch on sm_90+:

* ``prep`` (after ``griddepcontrol.wait``; EARLY / EARLY_RES: it lets the product launch before that wait):
  program (p, h) loads its chunks of x (XFIRST: before the max pass), takes max|x| over the whole row, then turns
  its chunks of 256 inputs into the words of plane group h: thread (chunk, g, t, z) holds the 32 values of x its word
  needs (two runs of 16 contiguous inputs), rounds them to q, and ORs bit 8h + g of each into place; the h = 0
  programs also write their chunks' sums of q (``hdr[1 + c]``), program (0, 0) the row's ``sh`` (``hdr[0]``).
  NORM: x is first RMSNorm(x) * weight as ``mma_w1a16.rms_norm`` rounds it, the mean square from the partial sums
  that the kernel before it wrote (the decode step's q/k/v and gate/up after a residual epilogue); the norm weights
  are loaded before the wait.
* ``bmma``: a program of W warps owns RT tiles of 16 rows; warp s takes k-groups s CPW .. s CPW + CPW - 1.  It
  loads its weight words and the epilogue's row scales (and bias) *before* ``griddepcontrol.wait``, so they stream
  in while ``prep`` runs (plain ``ld.global``: ptxas hoists the wait above ``.nc`` loads); then the planes and the
  header (sh and the sums of q, one load every warp sums on its own), RT x CPW x P/8 BMMAs, and int64 row sums
  (quad shuffles, then the warps through shared memory), kept in one layout from the accumulators to the store.
  RES: residual + y (rounded as eager) and the program's sum of its square over its rows, as ``mma``'s RES, for the
  RMSNorm prologue of the kernel after it.  GATED (paired tiles): silu(gate) * up, rounded as eager, where a
  thread's two rows of a tile are gate row j and up row j (``mma``'s GATED).

The one-kernel form (FUSED, ``bmma_matmul(..., fused=True)``; off: thirty-ninth session, 6.5 us at 8192^2 against
the pair's 6.2-6.6 and ``mma``'s 5.9-6.0): the product's own programs load x after the wait, take the row's max
(one barrier), round to q and make their warps' plane words with a 32 x 32 bit transpose in registers
(``transpose_words``), so there is no prep and no grid boundary, but every program converts the whole row; so its
programs are few and wide (``fused_config``).  STAMP (diagnostics, ``bench/bmma_timeline.py``): clock64 and
globaltimer stamps around the PDL wait into p_ptr.

Weights: the ``mma`` kernel's tiles as they are (``mma_w1a16.prepare_tiles``; paired tiles too), so a layer needs
no second copy.  Lane (g, t)'s words kg = 0..3 of a (tile, k-group) hold rows g and g + 8 (the nibbles of each
byte, bit 2 of the position = h) for 64 columns each; two shifts and two ``lop3`` a pair of words make the four A
registers (row g / g + 8, fragment inputs 32t.. / 128 + 32t..).  The fragment's input order is therefore a
permutation of the k-group's 256 columns (``plane_columns``), and ``prep`` writes the planes in that same order:
the sum over k does not care.

Tested on the CPU through ``planes_ref`` (the prep's output in PyTorch) and ``emulate`` (every m16n8k256 rebuilt
from the tile words and planes as the PTX ISA lays out the fragments) against the exact integer product; the
kernels themselves run on a CUDA GPU only (Gluon has no interpreter), where the tests and ``bench/bmma_bench.py``
compare every output with ``reference`` bit for bit.
"""
from __future__ import annotations

import os

import torch

from .mma_w1a16 import GROUP_K, check_pairs, tile_shape, unpack_tiles
from .mma_w1a16 import res_parts as res_parts_mma

PLANES = 24          # bit planes of x: 16, 24 or 32
# (RT row tiles of 16 a program, W warps = ways K is split) for the product: None picks one row tile and W by the
# k-groups (``default_config``: the best or only tile measured on the H100 at 8192^2, 4096x11008 and 16384^2)
CONFIG = None
PREP_CHUNKS = 2      # k-groups a prep program turns into planes (2 warps each)
# ``auto`` dispatch (triton_w1a16) takes these kernels for one row of a plain layer (no gated, residual or norm
# epilogue) of at least AUTO_MIN weights with more than AUTO_K inputs or with a number of inputs in AUTO_K_ALSO
# (a residual layer: more than AUTO_K only): where the H100 measured prep + product faster than ``mma``.  Thirty-third
# session: 16384^2 18.9-20.3 against 21.6-21.8 us, 4096x11008 5.7 against 6.7.  Thirty-eighth session (``bench
# kernels``, the defaults of both): K = 4096 from 8192 rows on, 8192x4096 4.07-4.09 against 5.67-5.72 us, 11008x4096
# 4.81-4.83 against 5.80-5.85, 12288x4096 5.02-5.71 against 5.80-5.83, 14336x4096 6.02-6.15 against 6.03-6.13 (a
# tie), 16384x4096 6.63-6.79 against 8.88-8.92, 22016x4096 8.05-8.10 against 9.11-9.26; but 8192^2 (K = 8192) 6.16
# against 6.04-6.12 and 4096^2 3.65-3.70 against 2.73-2.74.  K between 4096 and 8192 was not measured (mma keeps
# it).  BINARYLLM_BMMA=0 turns it off
AUTO_MIN = 2 ** 25
AUTO_K = 8192
AUTO_K_ALSO = (4096,)
AUTO = os.environ.get("BINARYLLM_BMMA", "1") != "0"
# FUSED: ``bmma_matmul`` runs the one-kernel form (the product's programs make x's planes themselves, no prep kernel)
# by default; not measured yet, so off
FUSED = False
# FENCE: the product issues every plane and hdr load before its first BMMA (a runtime-zero dependence, as mma's
# FENCE); without it ptxas spreads the plane loads between the BMMAs (SASS on the CPU box) and each L2 round trip is
# paid on its own.  CHAIN: each plane group's BMMAs over a warp's k-groups chained through the accumulator in one
# asm block (as the probe does), not one BMMA a k-group from zero and a sum after; ASM_CONV: the A fragment made with
# one shift and one lop3 a register (ptxas makes three of the masks and shift as written).  On the H100 none helped
# (thirty-fourth session: 8192^2 pair 6.2-6.6 us with none, 8.0 FENCE, 6.8-7.0 CHAIN, 6.6 ASM_CONV), so off
FENCE = False
CHAIN = False
ASM_CONV = False
# NARROW (bit 32): each plane group's counts weighted and summed over the quad in int32 (c_j / 2^8h), and only then
# widened to int64, where the sums were weighted in int64 (a 64-bit multiply and twice the shuffles); both exact.
# 8192^2 product: 496 SASS instructions a thread against 544 (ptxas on the CPU box); not measured on a GPU yet, so off
NARROW = False
# EARLY (bit 8): the prep lets the product launch before its own griddepcontrol.wait, so the product's weights
# stream in while the kernel before the prep still runs (the prep still waits before it reads x or writes planes;
# the product waits for the prep to end); EARLY_RES: the same for a product with the residual epilogue (the decode
# step's down projection, after the gated gate/up kernel).  XFIRST (bit 16): the prep loads its own chunks of x
# before the max pass, so the two reads of x are one round trip to L2, not two in a row.  H100, thirty-fourth
# session: alone the pair at 8192^2 takes 6.2-6.6 us as it was, 7.0-7.2 with EARLY, 6.2-6.6 with XFIRST (the prep
# 1.54 against 1.67); the Llama-7B decode step 1022 us with both against 1051 without (mma's down projection 1039)
EARLY = False
EARLY_RES = True
XFIRST = True
# PEARLY_RES: a residual-epilogue product lets the kernel after it launch before its own wait (the decode step's
# next layer, whose weights then stream in during the prep and the product).  H100, thirty-fourth session: the
# Llama-7B step 1015.1 against 1022.9 us
PEARLY_RES = True
# The decode step's fused layers on these kernels (thirty-fifth session): AUTO_GATED takes a gated gate/up layer
# (paired tiles, silu(gate) * up in the product's epilogue; with the RMSNorm before it made in the prep, NORM) of at
# least AUTO_MIN weights, whatever its K; AUTO_NORM the same for a plain layer behind an RMSNorm (q/k/v).
# EARLY_NORM: a prep with the norm lets its product launch before its own wait (as EARLY_RES); PEARLY_GATED: a gated
# product lets the kernel after it (the down projection's prep) launch before its own wait; GATED_CONFIG: the
# gated product's (RT, W): (1, 2) is the widest tile whose 1376 programs at 22016x4096 fit an H100 at once (80
# registers, 12 a SM; (1, 4) takes 64 and fits 8 a SM: two waves; bench/bmma_regs.py, ptxas on the CPU box).
# H100, thirty-seventh session (bench/decode_step.py consts): the Llama-7B step 908.6 us with both against 926.3
# with AUTO_GATED alone and 1015.2 with neither, the same greedy tokens; EARLY_NORM off 944.9, PEARLY_GATED on 916.7
# (default 910.7), GATED_CONFIG (1, 4) 950.3 against (1, 2) 926.3
AUTO_GATED = True
AUTO_NORM = True
EARLY_NORM = True
PEARLY_GATED = False
GATED_CONFIG = (1, 2)
_LO = 0x0F0F0F0F     # the low nibble of every byte: bit 2 of the position is 0 (row g of the tile)
_HI = 0xF0F0F0F0 - (1 << 32)     # the high nibbles as an int32 constant (row g + 8)


def plane_columns() -> torch.Tensor:
    """col[kappa]: the column of a k-group (0..255) that fragment input kappa (= 128 z + 32 t + pi, the m16n8k256
    A/B fragment order) stands for when the A fragment is made from ``mma`` tile words: bit pi of register z of
    lane t comes from word 2 z + (pi >> 2 & 1), whose bit holds column 64 kg + 16 t + 4 c + 2 hk + e with
    c = pi & 3, hk = pi >> 3 & 1, e = pi >> 4 & 1 (``mma_w1a16._bit_positions``)."""
    k = torch.arange(256)
    z, t, pi = k // 128, (k // 32) % 4, k % 32
    return 64 * (2 * z + (pi >> 2 & 1)) + 16 * t + 4 * (pi & 3) + 2 * (pi >> 3 & 1) + (pi >> 4 & 1)


def row_shift(x: torch.Tensor, planes: int) -> int:
    """sh for one row of x (see the module docstring): frexp's exponent of max|x| in fp32, -126 for 0; -1024 where
    x holds an inf or a NaN (then every output is inf or NaN: ``reference``)."""
    if not bool(torch.isfinite(x).all()):
        return -1024
    m = x.float().abs().max()
    e = int(torch.frexp(m).exponent) if m >= 2.0 ** -126 else -126
    return min(planes - 1 - e, 127)


def quantize(x: torch.Tensor, planes: int) -> tuple[torch.Tensor, int]:
    """One row x (K,) -> (q int64 (K,), sh): q = rint(x * 2^sh), ties to even, |q| < 2^(planes - 1); finite x."""
    sh = row_shift(x, planes)
    if sh == -1024:
        raise ValueError("quantize takes finite activations (this row holds an inf or a NaN)")
    # times the Python float 2.0 ** sh (exact), not torch.ldexp: on the H100 its pow(2, 11) is not exact in float64,
    # and x 2^11 landed next to, not on, the halfway points that a 16-plane grid has (docs/RESULTS.md)
    q = torch.round(x.double() * 2.0 ** sh)
    return q.long(), sh


def planes_ref(x: torch.Tensor, planes: int = PLANES) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``prep`` writes for one row x (K,): (planes int32 (KB * P/8 * 32 * 2,), hdr int64 (1 + KB,)).  Word
    ((c * G + h) * 32 + 4 g + t) * 2 + z holds at bit pi plane 8 h + g (two's complement bit) of q at column
    ``plane_columns()[128 z + 32 t + pi]`` of k-group c; hdr = [sh, sum of q over each k-group]."""
    q, sh = quantize(x, planes)
    K = q.numel()
    KB = (K + GROUP_K - 1) // GROUP_K
    qp = torch.zeros(KB * GROUP_K, dtype=torch.int64, device=x.device)
    qp[:K] = q
    qk = qp.view(KB, GROUP_K)[:, plane_columns().to(x.device)]                # [c, kappa]
    bit = (qk[:, None, :] >> torch.arange(planes, device=x.device)[None, :, None]) & 1   # [c, j, kappa]
    words = (bit.view(KB, planes, 2, 4, 32) << torch.arange(32, device=x.device)).sum(-1)   # [c, j, z, t]
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    w = words.view(KB, planes // 8, 8, 2, 4).permute(0, 1, 2, 4, 3)          # [c, h, g, t, z]
    hdr = torch.cat([torch.tensor([sh], dtype=torch.int64, device=x.device), qp.view(KB, GROUP_K).sum(-1)])
    return w.reshape(-1).to(torch.int32).contiguous(), hdr


def transpose_words(q: torch.Tensor) -> torch.Tensor:
    """The one-kernel form's bit transpose (``_xplanes``) in PyTorch: q (..., 32) integers (their low 32 bits, two's
    complement) -> (..., 32) int64 words, word j holding bit j of q[i] at bit i, in the kernel's five stages: words
    i and i + S (bit S of i clear) exchange ``t = ((a >> S) ^ b) & M``, ``b ^= t``, ``a ^= t << S``."""
    A = q.long() & 0xFFFFFFFF
    for S, M in ((16, 0x0000FFFF), (8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        B = A.view(*A.shape[:-1], 32 // (2 * S), 2, S)
        a, b = B[..., 0, :], B[..., 1, :]
        t = ((a >> S) ^ b) & M
        A = torch.stack([(a ^ (t << S)) & 0xFFFFFFFF, b ^ t], -2).reshape(A.shape)
    return A


def emulate(tiles: torch.Tensor, pl: torch.Tensor, out_features: int, in_features: int,
            planes: int = PLANES) -> torch.Tensor:
    """The product kernel's integer sums from its two operand buffers, in PyTorch: the A fragments made from the
    tile words as the kernel makes them (``_LO``/``_HI`` masks and 4-bit shifts), B from the plane words, every
    m16n8k256 rebuilt as the PTX ISA lays out its fragments (A: a0/a2 row g, a1/a3 row g + 8, a0/a1 inputs 32 t..,
    a2/a3 128 + 32 t..; B: b0/b1 column g, the same inputs; C: columns 2 t, 2 t + 1), and the planes weighted by
    c_j.  Returns (tile rows,) int64 ``sum_k b_k q_k`` (b in {0, 1}) in tile-row order."""
    NT, KB = tile_shape(out_features, in_features)
    G = planes // 8
    w = tiles.long().view(NT, KB, 32, 2, 2) & 0xFFFFFFFF                      # [rt, kb, lane, zz, kgl]
    w0, w1 = w[..., 0], w[..., 1]
    lo = (w0 & _LO) | ((w1 << 4) & 0xF0F0F0F0)                                # row g, registers z = 0, 1
    hi = ((w0 >> 4) & _LO) | (w1 & 0xF0F0F0F0)                                # row g + 8
    bit = torch.arange(32, device=tiles.device)
    A = torch.stack([lo, hi], -1)[..., None] >> bit & 1                       # [rt, kb, lane, z, half, pi]
    A = A.view(NT, KB, 8, 4, 2, 2, 32).permute(0, 5, 2, 1, 4, 3, 6)          # [rt, half, g, kb, z, t, pi]
    A = A.reshape(NT * 16, KB * 256)                                          # rows 16 rt + 8 half + g, k = kappa
    B = pl.long().view(KB, G, 8, 4, 2)[..., None] >> bit & 1                 # [c, h, g, t, z, pi]
    B = B.permute(0, 4, 3, 5, 1, 2).reshape(KB * 256, planes)                 # [k = (c, z, t, pi), j = 8 h + g]
    cnt = A @ B                                                               # popc(row & plane j), summed
    c = 2 ** torch.arange(planes, device=tiles.device)
    c[-1] = -c[-1]
    return cnt @ c


def reference(x: torch.Tensor, tiles: torch.Tensor, row_scale: torch.Tensor, out_features: int, in_features: int,
              bias: torch.Tensor | None = None, pairs: int = 0, planes: int = PLANES) -> torch.Tensor:
    """What the kernels compute for one row x (K,) (any device), in float64 from the same integers: (N,) in x's
    dtype, the exact rounding of the module docstring.  A row holding an inf or a NaN gives NaN here; the kernels
    give inf or NaN (2^-sh is infinite), so compare such rows by ``isfinite``."""
    if not bool(torch.isfinite(x).all()):
        return torch.full((out_features,), float("nan"), dtype=x.dtype, device=x.device)
    q, sh = quantize(x, planes)
    bits = unpack_tiles(tiles, out_features, in_features, pairs).double()   # weight rows, 0/1
    s = 2 * (bits @ q.double()) - q.sum().double()                           # exact: |s| < 2^53
    y = (s * 2.0 ** -sh * row_scale.double()).float()                       # 2^-sh exact, as in quantize
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _build():
    """(prep, bmma) Gluon kernels, built on first use."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    # $0-$3 d; $4-$7 a0-a3; $8-$11 b as [b0, b0, b1, b1]; $12-$15 c
    bmma_asm = gl.constexpr("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {$0,$1,$2,$3}, "
                            "{$4,$5,$6,$7}, {$8,$10}, {$12,$13,$14,$15};")
    LO = gl.constexpr(_LO)
    HI = gl.constexpr(_HI)
    # lop3 0xE4: (a & c) | (b & ~c); a_lo = (w_e & LO) | ((w_o << 4) & ~LO), a_hi = ((w_e >> 4) & LO) | (w_o & ~LO)
    conv_lo = gl.constexpr("{ .reg .b32 s; shl.b32 s, $2, 4; lop3.b32 $0, $1, s, 0x0F0F0F0F, 0xE4; }")
    conv_hi = gl.constexpr("{ .reg .b32 s; shr.u32 s, $1, 4; lop3.b32 $0, s, $2, 0x0F0F0F0F, 0xE4; }")
    from .gluon_helpers import helpers
    H = helpers()
    _p2, _ar, _xor, _pdl_enter = H.p2, H.ar, H.xor, H.pdl_enter
    _rms_rstd, _rms_normed, _stamp = H.rms_rstd, H.rms_normed, H.stamp

    @gluon.jit
    def _or(a, b):
        return a | b

    @gluon.jit
    def _rint(v):                     # fp32 -> int32, round to nearest even (cvt.rni)
        return gl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=gl.int32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _shift(field, P: gl.constexpr):
        """(sh, 2^sh in fp32) from the exponent field of max|x|'s fp32 bit pattern (``row_shift``); a non-finite x:
        sh = -1024, which makes the product's 2^-sh infinite, so every y is inf or NaN."""
        e = gl.maximum(field - 126, -126)
        sh = gl.where(field == 255, -1024, gl.minimum(P - 1 - e, 127))
        return sh, ((127 + gl.maximum(sh, -126)) << 23).to(gl.float32, bitcast=True)

    @gluon.jit
    def prep(x_ptr, pl_ptr, hdr_ptr, K, nw_ptr, p_ptr, NP, eps, KB: gl.constexpr, P: gl.constexpr,
             CP: gl.constexpr, MB: gl.constexpr, NMB: gl.constexpr, PDL: gl.constexpr, EARLY: gl.constexpr = False,
             XFIRST: gl.constexpr = False, NORM: gl.constexpr = False, NPP: gl.constexpr = 32,
             STAMP: gl.constexpr = False):
        G: gl.constexpr = P // 8
        dt: gl.constexpr = x_ptr.dtype.element_ty
        # NORM: x is RMSNorm(x) * weight with the mean square from the producer's NP partial sums (p_ptr); the
        # whole row of weights (the max pass's, one load) and the program's own chunks are loaded before the wait
        NL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, 2 * CP], [1, 0])
        if NORM:
            mo2 = _ar(_p2(NMB), 0, 2, NL) * MB + _ar(MB, 1, 2, NL)
            nwm = gl.load(nw_ptr + mo2, mask=mo2 < K, other=0.0)
        elif PDL:
            if STAMP:                     # diagnostics: p_ptr is the timeline buffer (no NORM)
                _stamp(p_ptr, 0)
            _pdl_enter(EARLY)
            if STAMP:
                _stamp(p_ptr, 1)
        pid = gl.program_id(0)
        # [c, g, t, z, kgl, q]: thread (c, g, t, z) holds columns 64 (2 z + kgl) + 16 t + q of k-group c
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 2, 16], [1, 8, 4, 1, 1, 1], [CP, 1, 1, 2, 1, 1],
                                           [5, 4, 3, 2, 1, 0])
        c = pid * CP + _ar(CP, 0, 6, L)
        g = _ar(8, 1, 6, L)
        t = _ar(4, 2, 6, L)
        z = _ar(2, 3, 6, L)
        kgl = _ar(2, 4, 6, L)
        qq = _ar(16, 5, 6, L)
        col = c * 256 + (2 * z + kgl) * 64 + t * 16 + qq
        if NORM:
            nwv = gl.load(nw_ptr + col, mask=(col < K) & (c < KB), other=0.0)
            if PDL:
                _pdl_enter(EARLY)
            rstd = _rms_rstd(p_ptr, NP, K, eps, NPP, 2 * CP)
        if XFIRST:
            xv = gl.load(x_ptr + col, mask=(col < K) & (c < KB), other=0.0)
            if NORM:
                xv = _rms_normed(xv, rstd, nwv, dt)
        # max|x| over the row, every program on its own; as the integer maximum of |x|'s fp32 bit patterns: the
        # same order for finite values, and an inf or a NaN anywhere comes out on top (exponent field 255), where a
        # float maximum would drop a NaN
        if NORM:
            v2 = _rms_normed(gl.load(x_ptr + mo2, mask=mo2 < K, other=0.0), rstd, nwm, dt)
            field = gl.max(gl.max(v2.to(gl.float32).to(gl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0) >> 23
        else:
            # MB values a pass (8 a thread), NMB passes
            ml: gl.constexpr = gl.BlockedLayout([8], [32], [2 * CP], [0])
            mo = gl.arange(0, MB, layout=ml)
            m = gl.zeros([MB], gl.int32, ml)
            for i in gl.static_range(NMB):
                v = gl.load(x_ptr + i * MB + mo, mask=i * MB + mo < K, other=0.0)
                m = gl.maximum(m, v.to(gl.float32).to(gl.int32, bitcast=True) & 0x7FFFFFFF)
            field = gl.max(m, axis=0) >> 23
        sh, two_sh = _shift(field, P)
        if not XFIRST:
            xv = gl.load(x_ptr + col, mask=(col < K) & (c < KB), other=0.0)
            if NORM:
                xv = _rms_normed(xv, rstd, nwv, dt)
        qv = _rint(xv.to(gl.float32) * two_sh)
        pi = (qq >> 2) + 4 * kgl + 8 * ((qq >> 1) & 1) + 16 * (qq & 1)     # fragment bit of column q (plane_columns)
        WL: gl.constexpr = gl.SliceLayout(4, gl.SliceLayout(5, L))          # [c, g, t, z]: a word a thread
        wc = pid * CP + _ar(CP, 0, 4, WL)
        woff = (wc * G * 32 + 4 * _ar(8, 1, 4, WL) + _ar(4, 2, 4, WL)) * 2 + _ar(2, 3, 4, WL)
        h = gl.program_id(1)
        word = gl.reduce(gl.reduce(((qv >> (8 * h + g)) & 1) << pi, 5, _or), 4, _or)
        gl.store(pl_ptr + woff + h * 64, word, mask=wc < KB)
        if h == 0:
            q0 = gl.where(g == 0, qv, 0).to(gl.int64)                          # every g holds the same q
            qs = gl.sum(gl.sum(gl.sum(gl.sum(gl.sum(q0, axis=5), axis=4), axis=3), axis=2), axis=1)
            cs = pid * CP + _ar(CP, 0, 1, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, WL))))
            gl.store(hdr_ptr + 1 + cs, qs, mask=cs < KB)
        if (pid == 0) & (h == 0):
            gl.store(hdr_ptr, sh.to(gl.int64))
        if STAMP:
            _stamp(p_ptr, 2)

    @gluon.jit
    def _bmma(a, b, c):
        return gl.inline_asm_elementwise(bmma_asm, "=r,=r,=r,=r" + ",r" * 12, [a, b, c], dtype=gl.int32,
                                         is_pure=True, pack=4)

    @gluon.jit
    def _planes(pl_ptr, boff, cb, KB: gl.constexpr, EVEN: gl.constexpr):
        if EVEN:
            return gl.load(pl_ptr + boff)
        else:
            return gl.load(pl_ptr + boff, mask=cb < KB, other=0)

    @gluon.jit
    def _xall(b):                     # [W, 1, CPWP, 32, 2] -> xor over a thread's own words (no data moves)
        return gl.reduce(gl.reduce(b, 4, _xor, keep_dims=True), 2, _xor, keep_dims=True)

    @gluon.constexpr_function
    def chain_asm(n):
        """One plane group's BMMAs over n k-groups chained through the accumulator: outputs $0-$3 (the sum),
        $4.. (0, unused); inputs a (4 a k-group) from $4n, b ([b0, b0, b1, b1] a k-group) from $8n."""
        code = "".join(f"mov.b32 ${i}, 0; " for i in range(4 * n))
        for j in range(n):
            a = 4 * n + 4 * j
            b = 8 * n + 4 * j
            code += ("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {$0,$1,$2,$3}, "
                     f"{{${a},${a + 1},${a + 2},${a + 3}}}, {{${b},${b + 2}}}, {{$0,$1,$2,$3}}; ")
        return "{ " + code + "}"

    @gluon.constexpr_function
    def _log2(n):
        return (n - 1).bit_length()

    @gluon.constexpr_function
    def chain_constraints(n):
        return ",".join(["=r"] * (4 * n) + ["r"] * (8 * n))

    @gluon.jit
    def _group(a, b2, h: gl.constexpr, lane_c, e_c, P: gl.constexpr, W: gl.constexpr, RT: gl.constexpr,
               CPWP: gl.constexpr, L: gl.constexpr, cl: gl.constexpr, CHAIN: gl.constexpr, NARROW: gl.constexpr):
        """Plane group h's BMMAs (b2: its [.., 2] plane words), summed over the warp's k-groups and weighted by
        c_j, and over the quad's 8 columns of each row: [s, rt, g, half] int64 (rows 16 rt + 8 half + g).  CHAIN:
        the k-groups chained in one asm block, the sum in k-group 0's slot of its output; else one BMMA a k-group
        from zero, summed after.  NARROW: the weighting and the quad's sum in int32, as c_j / 2^8h."""
        b = gl.convert_layout(gl.reshape(gl.join(b2, b2), [W, 1, CPWP, 32, 4]).broadcast_to([W, RT, CPWP, 32, 4]), L)
        if CHAIN:
            d = gl.inline_asm_elementwise(chain_asm(CPWP), chain_constraints(CPWP), [a, b], dtype=gl.int32,
                                          is_pure=True, pack=4 * CPWP)
            d = gl.permute(d, (0, 1, 3, 4, 2))                                  # [s, rt, lane, e, k-group]
            for i in gl.static_range(_log2(CPWP)):
                d, _ = gl.split(gl.reshape(d, [W, RT, 32, 4, CPWP >> (i + 1), 2]))    # k-group index 0
            cnt = gl.convert_layout(gl.reshape(d, [W, RT, 32, 4]), cl)
        else:
            cnt = gl.sum(_bmma(a, b, gl.zeros([W, RT, CPWP, 32, 4], gl.int32, L)), axis=2)
        j = 8 * h + 2 * (lane_c % 4) + e_c % 2                                   # plane of C column 2 t + e % 2
        if NARROW:
            # c_j / 2^8h in int32 (|cnt| <= 256 CPW: the sum of a quad's 8 columns stays below 2^(18) CPW), the
            # columns and the quad summed there, then to int64 and times 2^8h: [s, rt, g, half]
            v = gl.where(j == P - 1, -cnt, cnt) << (j - 8 * h)
            v = gl.sum(gl.sum(gl.reshape(v, [W, RT, 8, 4, 2, 2]), axis=5), axis=3)
            return v.to(gl.int64) << (8 * h)
        else:
            coef = gl.where(j == P - 1, -1, 1).to(gl.int64) << j.to(gl.int64)
            v = cnt.to(gl.int64) * coef
            return gl.sum(gl.sum(gl.reshape(v, [W, RT, 8, 4, 2, 2]), axis=5), axis=3)

    @gluon.jit
    def _loaded_planes(pl_ptr, hdr_ptr, zero, KB: gl.constexpr, P: gl.constexpr, W: gl.constexpr,
                       CPW: gl.constexpr, CPWP: gl.constexpr, bl: gl.constexpr, EVEN: gl.constexpr,
                       FENCE: gl.constexpr):
        """The planes and the header that ``prep`` wrote: (b0, b1, b2, b3, hv, ho); groups past P/8 are b0 again
        (unused)."""
        G: gl.constexpr = P // 8
        jb = _ar(CPWP, 2, 5, bl)
        cb = gl.where(jb < CPW, _ar(W, 0, 5, bl) * CPW + jb, KB)
        boff = (cb * G * 32 + _ar(32, 3, 5, bl)) * 2 + _ar(2, 4, 5, bl)
        b0 = _planes(pl_ptr, boff, cb, KB, EVEN)
        b1 = b0
        b2 = b0
        b3 = b0
        if G > 1:
            b1 = _planes(pl_ptr, boff + 64, cb, KB, EVEN)
        if G > 2:
            b2 = _planes(pl_ptr, boff + 128, cb, KB, EVEN)
        if G > 3:
            b3 = _planes(pl_ptr, boff + 192, cb, KB, EVEN)
        # hdr = [sh, the KB sums of q] in one load; every warp holds all of it (the layout is replicated over the
        # warps), so its sums are warp-local: no barrier
        KBP: gl.constexpr = _p2(max(KB + 1, 32))
        hl: gl.constexpr = gl.BlockedLayout([KBP // 32], [32], [W], [0])
        ho = gl.arange(0, KBP, layout=hl)
        hv = gl.load(hdr_ptr + ho, mask=ho <= KB, other=0)
        # FENCE: all plane and hdr loads in flight before the first BMMA: each group's words then depend on every
        # load (zero is a runtime 0 ptxas cannot see through; without it ptxas spreads the loads between the BMMAs,
        # and each round trip to L2 is paid on its own)
        if FENCE:
            dep = _xall(b0)
            if G > 1:
                dep = dep ^ _xall(b1)
            if G > 2:
                dep = dep ^ _xall(b2)
            if G > 3:
                dep = dep ^ _xall(b3)
            dep = (dep ^ gl.reduce(hv, 0, _xor).to(gl.int32)) & zero       # hdr too
            b0 = b0 ^ dep
            if G > 1:
                b1 = b1 ^ dep
            if G > 2:
                b2 = b2 ^ dep
            if G > 3:
                b3 = b3 ^ dep
        return b0, b1, b2, b3, hv, ho

    @gluon.jit
    def _tstage(A, S: gl.constexpr, M: gl.constexpr, W: gl.constexpr, CPWP: gl.constexpr):
        """One stage of the 32 x 32 bit transpose a thread makes of its 32 words (the last dimension): words i and
        i + S (bit S of i clear) swap the bits of i + S at positions with that bit of the position clear against
        those of i set: ``t = ((a >> S) ^ b) & M; b ^= t; a ^= t << S`` (M: the positions with bit S clear; the
        arithmetic shift's sign bits fall outside M)."""
        B = gl.permute(gl.reshape(A, [W, CPWP, 2, 4, 32 // (2 * S), 2, S]), (0, 1, 2, 3, 4, 6, 5))
        a, b = gl.split(B)
        t = ((a >> S) ^ b) & M
        return gl.reshape(gl.permute(gl.join(a ^ (t << S), b ^ t), (0, 1, 2, 3, 4, 6, 5)), [W, CPWP, 2, 4, 32])

    @gluon.jit
    def _bgroup(Ph, W: gl.constexpr, CPWP: gl.constexpr, bl: gl.constexpr):
        """Plane group words [s, j, z, t, g] -> the product's B layout [s, 1, j, lane = 4 g + t, z]."""
        return gl.convert_layout(gl.reshape(gl.permute(Ph, (0, 1, 4, 3, 2)), [W, 1, CPWP, 32, 2]), bl)

    @gluon.jit
    def _xplanes(x_ptr, K, KB: gl.constexpr, P: gl.constexpr, W: gl.constexpr, CPW: gl.constexpr,
                 CPWP: gl.constexpr, bl: gl.constexpr):
        """FUSED: the planes of x made by the product's own program, each warp those of its own k-groups: thread
        (s, j, z, t) loads the 32 inputs of run (k-group s CPW + j, z, t) (two runs of 16 contiguous columns), the
        program takes max|x| over the row (one barrier), rounds to q, puts the 32 values in fragment order pi
        (``plane_columns``), and turns them into plane words with a 32 x 32 bit transpose in registers (five
        stages of shifts and xors, ``transpose_words``), in place of ``prep``'s 3 instructions a bit.  Returns
        (b0, b1, b2, b3, sum of q (int64), sh (int64)); groups past P/8 are b0 again (unused)."""
        # [s, j, z, t, e, qq]: column 64 (2 z + e) + 16 t + qq of k-group s CPW + j
        XL: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 2, 16], [1, 4, 2, 4, 1, 1], [W, 1, 1, 1, 1, 1],
                                            [5, 4, 3, 2, 1, 0])
        j = _ar(CPWP, 1, 6, XL)
        col = ((_ar(W, 0, 6, XL) * CPW + j) * 256 + (2 * _ar(2, 2, 6, XL) + _ar(2, 4, 6, XL)) * 64
               + _ar(4, 3, 6, XL) * 16 + _ar(16, 5, 6, XL))
        xv = gl.load(x_ptr + col, mask=(j < CPW) & (col < K), other=0.0)
        # max|x| over the row as the prep takes it (the integer maximum of |x|'s fp32 bit patterns)
        m = xv.to(gl.float32).to(gl.int32, bitcast=True) & 0x7FFFFFFF
        m = gl.max(gl.max(gl.max(gl.max(gl.max(gl.max(m, axis=5), axis=4), axis=3), axis=2), axis=1), axis=0)
        field = m >> 23
        sh, two_sh = _shift(field, P)
        qv = _rint(xv.to(gl.float32) * two_sh)
        qs = gl.sum(gl.sum(qv, axis=5), axis=4).to(gl.int64)                 # a run's 32 values: |sum| < 2^28
        Q = gl.sum(gl.sum(gl.sum(gl.sum(qs, axis=3), axis=2), axis=1), axis=0)
        # fragment order: pi = 16 p4 + 8 p3 + 4 p2 + 2 p1 + p0 is column 16 e + qq with e = p2 and qq's bits
        # (qq3, qq2, qq1, qq0) = (p1, p0, p3, p4)
        A = gl.permute(gl.reshape(qv, [W, CPWP, 2, 4, 2, 2, 2, 2, 2]), (0, 1, 2, 3, 8, 7, 4, 5, 6))
        A = gl.reshape(A, [W, CPWP, 2, 4, 32])
        A = _tstage(A, 16, 0x0000FFFF, W, CPWP)
        A = _tstage(A, 8, 0x00FF00FF, W, CPWP)
        A = _tstage(A, 4, 0x0F0F0F0F, W, CPWP)
        A = _tstage(A, 2, 0x33333333, W, CPWP)
        A = _tstage(A, 1, 0x55555555, W, CPWP)
        # word j = 8 h + g holds plane j: [.., h, g] -> the groups h = 0..3 as four tensors [s, j, z, t, g]
        H = gl.reshape(gl.permute(gl.reshape(A, [W, CPWP, 2, 4, 4, 8]), (0, 1, 2, 3, 5, 4)),
                       [W, CPWP, 2, 4, 8, 2, 2])
        h02, h13 = gl.split(H)
        h0, h2 = gl.split(h02)
        h1, h3 = gl.split(h13)
        b0 = _bgroup(h0, W, CPWP, bl)
        b1 = b0
        b2 = b0
        b3 = b0
        if P > 8:
            b1 = _bgroup(h1, W, CPWP, bl)
        if P > 16:
            b2 = _bgroup(h2, W, CPWP, bl)
        if P > 24:
            b3 = _bgroup(h3, W, CPWP, bl)
        return b0, b1, b2, b3, Q, sh.to(gl.int64)

    @gluon.jit
    def bmma(w_ptr, pl_ptr, hdr_ptr, s_ptr, b_ptr, y_ptr, r_ptr, p_ptr, N, zero, x_ptr, K, KB: gl.constexpr,
             P: gl.constexpr, RT: gl.constexpr, W: gl.constexpr, HAS_BIAS: gl.constexpr, PAIRS: gl.constexpr,
             EVEN: gl.constexpr, PDL: gl.constexpr, FENCE: gl.constexpr, CHAIN: gl.constexpr = False,
             ASM_CONV: gl.constexpr = False, RES: gl.constexpr = False, TRIG_EARLY: gl.constexpr = False,
             GATED: gl.constexpr = False, FUSED: gl.constexpr = False, STAMP: gl.constexpr = False,
             NARROW: gl.constexpr = False):
        G: gl.constexpr = P // 8
        CPW: gl.constexpr = (KB + W - 1) // W              # k-groups a warp
        CPWP: gl.constexpr = _p2(CPW)                        # as a tensor dimension (past CPW: masked, zeros)
        NT = (N + 15) // 16
        pid = gl.program_id(0)
        # [s, rt, cpw, lane, kg]: a 16-byte load of lane l's four words of each (tile, k-group)
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 1, 32, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        rt = pid * RT + _ar(RT, 1, 5, L)
        j = _ar(CPWP, 2, 5, L)
        c = gl.where(j < CPW, _ar(W, 0, 5, L) * CPW + j, KB)            # KB: no k-group (masked)
        lane = _ar(32, 3, 5, L)
        kg = _ar(4, 4, 5, L)
        woff = ((rt * KB + c) * 32 + lane) * 4 + kg
        if EVEN:
            words = gl.load(w_ptr + woff)
        else:
            words = gl.load(w_ptr + woff, mask=(c < KB) & (rt < NT), other=0)
        cl: gl.constexpr = gl.SliceLayout(2, L)                                   # [s, rt, lane, e]
        lane_c = _ar(32, 2, 4, cl)
        e_c = _ar(4, 3, 4, cl)
        # the epilogue's rows, in the layout the row sums will have (the same reshape and reductions applied to
        # the tile-row index of every accumulator element: 16 r + 8 half + g for C element e of lane 4 g + t), and
        # their scales (and bias): weights, loaded before the wait; no layout conversion after the loop
        rows = (pid * RT + _ar(RT, 1, 4, cl)) * 16 + (e_c // 2) * 8 + lane_c // 4 + 0 * _ar(W, 0, 4, cl)
        offs = gl.max(gl.max(gl.max(gl.reshape(rows, [W, RT, 8, 4, 2, 2]), axis=5), axis=3), axis=0)
        n_ok = offs < N
        if PAIRS:
            wrow = (offs // 16) * 8 + offs % 8 + ((offs // 8) % 2) * (N // 2)
        else:
            wrow = offs
        rscale = gl.load(s_ptr + wrow, mask=n_ok, other=0.0)
        if HAS_BIAS:
            bias = gl.load(b_ptr + wrow, mask=n_ok, other=0.0)
        if STAMP:                         # diagnostics: p_ptr is the timeline buffer (no RES)
            _stamp(p_ptr, 0)
        if PDL:
            _pdl_enter(TRIG_EARLY)
        if STAMP:
            _stamp(p_ptr, 1)
        # the planes: all P/8 groups loaded first (8 bytes a lane: b0, b1), then sh and the k-groups' sums of q;
        # FUSED: made here from x (no prep kernel)
        bl: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 2], [1, 1, 1, 32, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        if FUSED:
            b0, b1, b2, b3, Q, sh = _xplanes(x_ptr, K, KB, P, W, CPW, CPWP, bl)
            # the tile words through a runtime zero that depends on the last plane group: without it ptxas makes
            # the A fragments before the planes, and the warp stalls on its weights before it converts x
            dep = _xall(b0) if G == 1 else _xall(b1) if G == 2 else _xall(b2) if G == 3 else _xall(b3)
            words = words ^ gl.convert_layout(dep & zero, L)
        else:
            b0, b1, b2, b3, hv, ho = _loaded_planes(pl_ptr, hdr_ptr, zero, KB, P, W, CPW, CPWP, bl, EVEN, FENCE)
        if RES:
            res = gl.load(r_ptr + wrow, mask=n_ok, other=0.0)
        # the A fragments: kg = 2 zz + kgl; rows g / g + 8 are the low / high nibbles of each byte
        w_e, w_o = gl.split(gl.reshape(words, [W, RT, CPWP, 32, 2, 2]))
        if ASM_CONV:
            a_lo = gl.inline_asm_elementwise(conv_lo, "=r,r,r", [w_e, w_o], dtype=gl.int32, is_pure=True, pack=1)
            a_hi = gl.inline_asm_elementwise(conv_hi, "=r,r,r", [w_e, w_o], dtype=gl.int32, is_pure=True, pack=1)
        else:
            a_lo = (w_e & LO) | ((w_o << 4) & HI)
            a_hi = ((w_e >> 4) & LO) | (w_o & HI)
        a = gl.convert_layout(gl.reshape(gl.join(a_lo, a_hi), [W, RT, CPWP, 32, 4]), L)   # [a0, a1, a2, a3]
        tot = _group(a, b0, 0, lane_c, e_c, P, W, RT, CPWP, L, cl, CHAIN, NARROW)
        if G > 1:
            tot += _group(a, b1, 1, lane_c, e_c, P, W, RT, CPWP, L, cl, CHAIN, NARROW)
        if G > 2:
            tot += _group(a, b2, 2, lane_c, e_c, P, W, RT, CPWP, L, cl, CHAIN, NARROW)
        if G > 3:
            tot += _group(a, b3, 3, lane_c, e_c, P, W, RT, CPWP, L, cl, CHAIN, NARROW)
        # [s, rt, g, t, half, col] -> sum over col, t (the quad) and s (the warps) -> [rt, g, half]
        r = gl.sum(tot, axis=0)
        if not FUSED:
            Q = gl.sum(gl.where(ho > 0, hv, 0), axis=0)
            sh = gl.sum(gl.where(ho == 0, hv, 0), axis=0)
        d = ((1023 - sh) << 52).to(gl.float64, bitcast=True)                     # 2^-sh, exact
        out = ((2 * r - Q).to(gl.float64) * d * rscale.to(gl.float64)).to(gl.float32)
        if HAS_BIAS:
            out += bias.to(gl.float32)
        yv = out.to(y_ptr.dtype.element_ty)
        if RES:
            # the residual add after the layer, rounded as eager (the product to y's dtype, then the sum), and this
            # program's sum of y^2 over its rows for the RMSNorm that reads y next (as mma's RES epilogue)
            yv = (yv.to(gl.float32) + res.to(gl.float32)).to(y_ptr.dtype.element_ty)
            hf = gl.where(n_ok, yv.to(gl.float32), 0.0)
            gl.store(p_ptr + pid, gl.sum(gl.sum(gl.sum(hf * hf, axis=2), axis=1), axis=0))
        if GATED:
            # paired tiles: tile rows g (gate row j) and 8 + g (up row j) are the two halves of the last
            # dimension, so y_j = silu(gate) * up needs no data moved; rounded as eager PyTorch rounds gate_up ->
            # silu -> product (as mma's GATED)
            gate, up = gl.split(yv)
            o2, _ = gl.split(offs)
            ok2, _ = gl.split(n_ok)
            gf = gate.to(gl.float32)
            sg = (gf / (1.0 + gl.exp(-gf))).to(y_ptr.dtype.element_ty)
            gl.store(y_ptr + (o2 // 16) * 8 + o2 % 8, (sg.to(gl.float32) * up.to(gl.float32)).to(
                y_ptr.dtype.element_ty), mask=ok2)
        else:
            gl.store(y_ptr + wrow, yv, mask=n_ok)
        if STAMP:
            _stamp(p_ptr, 2)

    return prep, bmma


_KERNELS = None


_USABLE: dict[int, bool] = {}


def usable(device_index: int) -> bool:
    """A GPU with the binary tensor-core op (compute capability 8.0+) and a Triton with Gluon; once per device."""
    if device_index not in _USABLE:
        from . import compute_major, triton_usable
        from .gluon_helpers import gluon_importable
        _USABLE[device_index] = (triton_usable(device_index) and compute_major(device_index) >= 8
                                 and gluon_importable())
    return _USABLE[device_index]


def disable(device_index: int, err: Exception) -> None:
    """The kernels failed to build or run here: ``auto`` stops taking them on this device, said once."""
    from . import warn_once
    _USABLE[device_index] = False
    warn_once("bmma-failed", f"the bmma kernels failed ({type(err).__name__}: {str(err)[:200]}); one-row packed "
                             "layers use the mma kernel")


def takes(x: torch.Tensor, out_features: int, in_features: int, residual: bool = False, gated: bool = False,
          norm: bool = False) -> bool:
    """Whether ``auto`` dispatch runs a layer on these kernels: AUTO on, one row of bf16/fp16 on a usable CUDA GPU,
    at least AUTO_MIN weights; a plain layer with more than AUTO_K inputs or a number of inputs in AUTO_K_ALSO, one
    with the residual epilogue (``residual``) with more than AUTO_K inputs and partial sums of y^2 over the same rows
    as ``mma``'s (``res_parts``, which the compiled decode step's shapes are traced with); a ``gated`` one (with or
    without ``norm``) under AUTO_GATED, a plain one with ``norm`` under AUTO_NORM, whatever their K."""
    ok = (AUTO and out_features * in_features >= AUTO_MIN and x.numel() == in_features
          and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and usable(x.device.index or 0))
    if gated or norm:
        return ok and not residual and (AUTO_GATED if gated else AUTO_NORM)
    if residual:
        return ok and in_features > AUTO_K and (
            res_parts(out_features, in_features) == res_parts_mma(1, out_features, in_features))
    return ok and (in_features > AUTO_K or in_features in AUTO_K_ALSO)


def res_parts(N: int, K: int, config: tuple | None = None) -> tuple[int, int]:
    """(programs, rows a program) of the product: its residual epilogue writes one partial sum of y^2 a program."""
    rt = (config or CONFIG or default_config(N, K))[0]
    return -(-tile_shape(N, K)[0] // rt), 16 * rt


def variant() -> int:
    """The switches as bits: 1 FENCE, 2 CHAIN, 4 ASM_CONV, 8 EARLY, 16 XFIRST, 32 NARROW."""
    return (int(FENCE) | 2 * int(CHAIN) | 4 * int(ASM_CONV) | 8 * int(EARLY) | 16 * int(XFIRST)
            | 32 * int(NARROW))


def set_variant(bits: int) -> int:
    """FENCE, CHAIN, ASM_CONV, EARLY, XFIRST, NARROW from bits 1, 2, 4, 8, 16, 32 (the benchmark's A/B); returns
    the bits set before."""
    global FENCE, CHAIN, ASM_CONV, EARLY, XFIRST, NARROW
    old = variant()
    FENCE, CHAIN, ASM_CONV, EARLY, XFIRST, NARROW = (bool(bits & b) for b in (1, 2, 4, 8, 16, 32))
    return old


def default_config(N: int, K: int) -> tuple[int, int]:
    """(1, W): W = 4 warps up to 32 k-groups (8192^2: 4.27 against 4.64 us with 8, the pair 6.6 against 7.1), 8 below
    64 (4096x11008), 16 from 64 (16384^2); docs/RESULTS.md, thirty-third session."""
    KB = tile_shape(N, K)[1]
    return (1, 4 if KB <= 32 else 8 if KB < 64 else 16)


def fused_config(N: int, K: int, sms: int = 132) -> tuple[int, int]:
    """(RT, W) of the one-kernel form: every program turns all of x into planes, so few programs of many row tiles:
    W = 8 warps (16 from 64 k-groups), RT row tiles for about one program an SM, at most 64 registers of tile words
    a thread (RT x the k-groups a warp, padded to a power of 2, x 4)."""
    NT, KB = tile_shape(N, K)
    w = 8 if KB <= 64 else 16
    cpwp = 1 << (-(-KB // w) - 1).bit_length()
    rt = max(1, min(64 // (4 * cpwp), -(-NT // sms)))
    return (1 << (rt.bit_length() - 1), w)                   # a tensor dimension: a power of 2


def launch_meta(N: int, K: int, planes: int = PLANES, config: tuple | None = None, has_bias: bool = False,
                pairs: int = 0, pdl: bool = False, res: bool = False, gated: bool = False,
                norm_parts: int = 0, fused: bool = False) -> tuple[tuple, dict, tuple, dict]:
    """(prep grid, prep constexprs, product grid, product constexprs) for an (N, K) matrix; ``norm_parts``: the
    prep makes RMSNorm(x) from that many partial sums (NORM)."""
    if planes not in (16, 24, 32):
        raise ValueError(f"bmma takes 16, 24 or 32 planes, not {planes}")
    if K > 2 ** 20:
        raise ValueError(f"bmma takes at most 2^20 inputs (its int32 sums), not {K}")
    rt, w = (config or (GATED_CONFIG if gated else None) or CONFIG or default_config(N, K))[:2]
    NT, KB = tile_shape(N, K)
    cp = PREP_CHUNKS
    mb = 8 * 32 * 2 * cp
    prep = dict(KB=KB, P=planes, CP=cp, MB=mb, NMB=-(-K // mb), PDL=pdl,
                EARLY=EARLY or (res and EARLY_RES) or (norm_parts > 0 and EARLY_NORM), XFIRST=XFIRST,
                NORM=norm_parts > 0, NPP=1 << max(norm_parts - 1, 0).bit_length())
    cpw = -(-KB // w)
    even = cpw * w == KB and cpw & (cpw - 1) == 0 and NT % rt == 0
    prod = dict(KB=KB, P=planes, RT=rt, W=w, HAS_BIAS=has_bias, PAIRS=bool(pairs), EVEN=even, PDL=pdl,
                FENCE=FENCE, CHAIN=CHAIN, ASM_CONV=ASM_CONV, RES=res,
                TRIG_EARLY=(res and PEARLY_RES) or (gated and PEARLY_GATED), GATED=gated, FUSED=fused,
                NARROW=NARROW)
    return (-(-KB // cp), planes // 8), prep, (-(-NT // rt),), prod


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build()
    return _KERNELS


def make_planes(x: torch.Tensor, in_features: int, planes: int = PLANES, res: bool = False,
                norm: tuple | None = None, stamp: torch.Tensor | None = None) -> tuple:
    """The ``prep`` kernel: one row x (K values, bf16/fp16, CUDA) -> (planes int32, hdr int64) as ``planes_ref``
    lays them out; ``res``: for a product with the residual epilogue (EARLY_RES); ``norm`` = (partials, weight,
    eps): the planes of ``mma_w1a16.rms_norm(x, partials, weight, eps)`` (the norm made as the prep reads x)."""
    K = in_features
    if x.numel() != K:
        raise ValueError(f"bmma takes one row of activations ({K} values), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("bmma takes bf16 or fp16 activations")
    from . import pdl_launch
    pdl = pdl_launch(x)
    parts, nw, eps = x, x, 0.0                                   # unused pointers without the norm
    if norm is not None:
        parts, nw, eps = norm
        if nw.numel() != K:
            raise ValueError(f"bmma's norm weight has {K} values, got shape {tuple(nw.shape)}")
        parts, nw = parts.reshape(-1).float().contiguous(), nw.reshape(K).to(x.dtype).contiguous()
    pgrid, pmeta, _, _ = launch_meta(16, K, planes, pdl=pdl, res=res,     # the prep's launch needs no N
                                     norm_parts=parts.numel() if norm is not None else 0)
    KB = pmeta["KB"]
    pl = torch.empty(KB * planes * 8, dtype=torch.int32, device=x.device)
    hdr = torch.empty(1 + KB, dtype=torch.int64, device=x.device)
    if stamp is not None:                                        # diagnostics: bench/bmma_timeline.py
        if norm is not None or not pdl:
            raise ValueError("bmma's timeline stamps take a prep without the norm, launched with PDL")
        parts, pmeta["STAMP"] = stamp, True
    _kernels()[0][pgrid](x.reshape(K).contiguous(), pl, hdr, K, nw, parts, parts.numel(), float(eps),
                         num_warps=2 * pmeta["CP"], launch_pdl=pdl, **pmeta)
    return pl, hdr


def bmma_product(pl: torch.Tensor, hdr: torch.Tensor, tiles: torch.Tensor, row_scale: torch.Tensor,
                 out_features: int, in_features: int, dtype: torch.dtype, bias: torch.Tensor | None = None,
                 pairs: int = 0, planes: int = PLANES, config: tuple | None = None,
                 out: torch.Tensor | None = None, residual: torch.Tensor | None = None, gated: bool = False,
                 x: torch.Tensor | None = None, stamp: torch.Tensor | None = None):
    """The product kernel on planes from ``make_planes``: (N,) in ``dtype`` (into ``out`` if given); with ``x`` (K
    values, bf16/fp16) in place of ``pl`` and ``hdr`` (None) the one-kernel form: its programs make x's planes
    themselves (FUSED; ``fused_config`` tiles by default).  With
    ``residual`` (N values): (residual + y, partials), partials (1, programs) fp32 sums of the result's squares over
    each program's rows (``res_parts``), as ``mma_matmul(residual=...)`` returns them.  ``gated`` (paired tiles):
    (N / 2,) silu(y[:N/2]) * y[N/2:], rounded as ``kernels.silu_mul``."""
    N, K = out_features, in_features
    check_pairs(N, pairs)
    if residual is not None and pairs:
        raise ValueError("bmma's residual epilogue takes unpaired tiles")
    if gated and not pairs:
        raise ValueError("bmma's gated output needs paired tiles (prepare_tiles(pairs=N // 2))")
    from . import pdl_launch
    pdl = pdl_launch(tiles)
    fused = x is not None
    if fused:
        if x.numel() != K or x.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"bmma takes one row of bf16 or fp16 activations ({K} values), got {x.dtype} "
                             f"{tuple(x.shape)}")
        config = config or fused_config(N, K)
        x = x.reshape(K).contiguous()
    _, _, grid, meta = launch_meta(N, K, planes, config, bias is not None, pairs, pdl, residual is not None, gated,
                                   fused=fused)
    y = torch.empty(N // 2 if gated else N, dtype=dtype, device=tiles.device) if out is None else out
    r, part = row_scale, row_scale                              # unused pointers: any tensor
    if residual is not None:
        if residual.numel() != N:
            raise ValueError(f"bmma's residual has {N} values a row, got shape {tuple(residual.shape)}")
        r = residual.reshape(N).contiguous()
        part = torch.empty(1, grid[0], dtype=torch.float32, device=tiles.device)
    if stamp is not None:                                       # diagnostics: bench/bmma_timeline.py
        if residual is not None:
            raise ValueError("bmma's timeline stamps take a product without the residual epilogue")
        part, meta["STAMP"] = stamp, True
    if fused:
        pl = hdr = x                                            # unused pointers
    extra = {"maxnreg": config[2]} if config is not None and len(config) > 2 else {}    # (RT, W, registers)
    _kernels()[1][grid](tiles, pl, hdr, row_scale, bias if bias is not None else row_scale, y, r, part, N, 0,
                        x if fused else pl, K, num_warps=meta["W"], launch_pdl=pdl, **extra, **meta)
    return (y, part) if residual is not None else y


def bmma_matmul(x: torch.Tensor, tiles: torch.Tensor, row_scale: torch.Tensor, out_features: int,
                in_features: int, input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                pairs: int = 0, planes: int = PLANES, config: tuple | None = None,
                residual: torch.Tensor | None = None, gated: bool = False, norm: tuple | None = None,
                fused: bool | None = None):
    """x (..., K) bf16/fp16 on CUDA, one row; tiles from ``mma_w1a16.prepare_tiles`` (``pairs`` as made);
    returns (..., N) in x's dtype (module docstring: the rounding).  ``config`` = (RT, W) (default CONFIG, or
    ``fused_config``), or (RT, W, registers): the product compiled with at most that many registers a thread.  ``fused``: one kernel that makes the planes itself (default FUSED; not with ``norm``).
    ``residual`` (..., N): returns (residual + y, partials) as ``bmma_product`` does; ``gated``: (..., N / 2)
    silu(gate) * up; ``norm`` = (partials, weight, eps): x is ``mma_w1a16.rms_norm(x, ...)`` first (made in the
    prep), as ``mma_matmul(norm=...)``."""
    xr = x.reshape(-1)
    if input_scale is not None:
        if norm is not None:
            raise ValueError("bmma's norm prologue takes no input scale")
        xr = xr * input_scale.to(xr.dtype)          # rounded to x's dtype, as the PyTorch path does
    if FUSED if fused is None else fused:
        if norm is not None:
            raise ValueError("bmma's one-kernel form takes no norm prologue (fused=False)")
        y = bmma_product(None, None, tiles, row_scale, out_features, in_features, x.dtype, bias, pairs, planes,
                         config, residual=residual, gated=gated, x=xr)
    else:
        pl, hdr = make_planes(xr, in_features, planes, residual is not None, norm)
        y = bmma_product(pl, hdr, tiles, row_scale, out_features, in_features, x.dtype, bias, pairs, planes,
                         config, residual=residual, gated=gated)
    if residual is not None:
        return y[0].reshape(*x.shape[:-1], out_features), y[1]
    return y.reshape(*x.shape[:-1], out_features // 2 if gated else out_features)
