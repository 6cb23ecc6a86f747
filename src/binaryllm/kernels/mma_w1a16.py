"""Decode W1A16 kernel ``mma`` (Gluon, Triton's explicit-layout dialect): ``y = ((x * input_scale) @ sign(W)^T) *
row_scale + bias`` for 1-16 rows of bf16/fp16 activations, the weights as +-1 operands of ``mma.sync.m16n8k16``
generated in registers straight from the bits.

Why not plain Triton (``triton_w1a16.tc``): there the compiler decides where operands live, and it sends each
plane's activation tile through shared memory before every dot (the H100 SASS: as many global loads and shared
stores of x as tensor-core ops).  Here every layout is spelled out, so

* each thread loads exactly the weight bits of its A fragments (one 16-byte load per 1,024 weights a warp) and
  turns every pair of them into a bf16x2 register with two integer instructions (``shl`` puts bits i and i + 16
  on the two sign positions, ``lop3`` makes (-1.0, -1.0) with those signs flipped where a bit is 1): the
  register *is* the tensor-core operand, nothing goes through shared memory (or, with CLASS_CONV, on by
  default, in one-row bf16 kernels read through XS by one chain: the "class" conversion, four shifts a word and
  one ``lop3`` a register, with x doubled in two of the four column classes and a sum of x taken off at the end);
* each thread loads its B fragment (the activations) straight from x with 16-byte loads;
* the warps of a program split K (a batched 3-D mma, one batch entry per warp) and add their partial sums once at
  the end, so that even a 4096-row matrix keeps every SM busy with many warps;
* with CHAINS = 4 each warp keeps four accumulators (batch entries kg S + s: one per 64-column group kg) instead
  of one, so its tensor-core ops are four independent dependency chains rather than one, summed with the rest at
  the end; on the H100 this made the small, latency-bound matrices (SmolLM2's) about a quarter faster;
* with XS (one row of activations only) the program first copies its K slice of x into shared memory, in the
  order the fragments read it, and each round reads its activations from there instead of loading them from
  global memory into registers ahead of use: lanes of the other seven batch columns read the same words, so
  every column of the mma holds row 0 and only column 0 is stored.  That took the 1x4x4 tile from 126 to 54
  registers a thread (at 8192^2), and made most one-row Llama-7B shapes faster on the H100;
* with paired tiles (``prepare_tiles(pairs=P)``, a stacked [gate | up] layer of 2 P rows: ``pair_order``) each
  16-row tile holds gate rows j .. j + 7 and the matching up rows, which the mma accumulator gives to the same
  thread (rows g and 8 + g); the epilogue stores them back in weight-row order, or with GATED silu(gate) * up
  (P columns) instead: a gated MLP without the elementwise kernel after its gate/up projection
  (``kernels/fusion.py`` rewrites the compiled decode step to use it);
* with RES the epilogue adds a residual (y = r + the product, rounded as eager) and writes the program's sum of
  y^2 over its rows, one float a row of x; with NORM (one row: XS) the kernel adds up such partial sums (a few
  hundred floats) in every program and RMS-normalizes x with a norm weight as it copies x to shared memory.  A
  pair of them is a block's residual add + RMSNorm between two packed layers without a kernel of its own
  (``kernels/fusion.py`` rewrites the compiled decode step to use them);
* on sm_90+ it is launched with programmatic dependent launch (PDL): the weights do not depend on the kernel
  before it, so the first round of them (and the epilogue's row scales and bias: EARLY) is loaded while that
  kernel is still running; ``griddepcontrol.wait`` comes before x and a residual are read (and before anything is
  stored); ``griddepcontrol.launch_dependents`` (right after that wait, or for the fused kernels of a decode step
  just before it) lets the next kernel start early in the same way (TRIG: where, or whether, a kernel does that
  is apart from how it is launched; Llama-7B's gate/up kernel is launched without PDL but lets the down
  projection launch at its start).  Kernels launched without PDL are ordered as usual.  On the H100 this took
  the back-to-back batch-1 time at 8192^2 from 8.9 to 6.9 us (best tiles); in a compiled decode step it only pays
  together with torch.compile's own PDL (``decode.compile_options``): its neighbours must take part.

Weight layout ("tiles", made once at load by ``prepare_tiles``; the on-disk bits stay as they are): K is padded
to a multiple of 256 and N to a multiple of 16.  For row tile ``rt`` (16 rows), k-group ``kb`` (256 columns) and
lane ``l = 4 g + t`` (``g = l // 4``, ``t = l % 4`` as in the PTX fragment tables) there are KG = 4 int32
words, at ``((rt * KB + kb) * 32 + l) * 4 + kg``.  Word ``kg`` of lane (g, t) holds, at bit ``i + 16 e``
(i = 8 hk + 4 h + c, c, hk, h, e in {0, 1} except c in 0..3), the sign bit (1 = +1) of weight
``W[16 rt + 8 h + g, 256 kb + 64 kg + 16 t + 4 c + 2 hk + e]``.  Inside each 64-column group the kernel's k
order is permuted (logical k = 16 c + 8 hk + 2 t + e reads column 16 t + 4 c + 2 hk + e): the sum over k does
not care, and it makes each thread's activations 16 contiguous values (two 16-byte loads).

Rounding: x * (+-1) products are exact, sums in fp32 on the tensor cores (order differs from a dense reference
by fp32 rounding), the row scale is applied in fp32 and the result rounded once to x's dtype.  An input scale is
applied to x first (a separate elementwise op, not in the kernel) and rounded to x's dtype, as the PyTorch
path does.  The class conversion sums products 2 x or 0 (exact; a -1 weight of classes 0 and 1 leaves 2^-31 x or
less) and x times +-1, and subtracts the fp32 sum T of x over classes 0-2: the same sum up to fp32 rounding.

Tested on the CPU through ``prepare_tiles``/``unpack_tiles`` (layout round trips) and ``reference_tiles`` (the
kernel's arithmetic in PyTorch, fragment by fragment); the kernel itself only runs on a CUDA GPU (Gluon has no
interpreter), where ``binaryllm bench kernels`` checks every output against the dense reference.
"""
from __future__ import annotations

import torch

KG = 4               # int32 words a thread loads per k-group: one 16-byte load
GROUP_K = 64 * KG    # columns of a k-group
# RT (row tiles of 16 a program), warps (= ways K is split), CH (k-groups a warp loads at once)[, FENCE (1: all
# of a round's weight loads issued before its first tensor-core op)[, PDL (1: programmatic dependent launch on
# sm_90+, see the kernel)[, CHAINS (1 or 4 accumulators a warp: 4 makes its tensor-core ops four independent
# chains)]]]: the H100 sweeps' best (docs/RESULTS.md) for 1-8 rows, for 1-8 rows of a matrix of LARGE weights or
# more (16384^2: 21.8 against 32.3 us), and for 9-16 rows; with 1-8 rows and K <= 2048 (SmolLM2) one k-group a
# warp and four chains (``default_config``: 23-27% faster on its four fused shapes, +13% SmolLM2 decode).  Four
# chains also made 4096x11008 faster alone (6.63 against 7.38 us) but the 7B decode step slower (about 580
# against 630 tok/s), so larger K kept one (2-8 rows still do).  [, XS (1: one row, read into shared memory
# once)]: one row of a matrix with K > 2048 and fewer than XS_MAX weights reads x into shared memory and runs four
# chains (MMA_CONFIG_1_XS; MMA_CONFIG_1_XS_LONG, CH 2, above 16 k-groups): alone 19% faster on 4096^2, 16% on
# 4096x11008, 4% slower on 12288x4096, and the Llama-7B decode step 4% faster in the same process; at 8192^2 it
# was 1-5% slower, so matrices of XS_MAX weights and more keep their tiles (docs/RESULTS.md, thirteenth session).
# Seventeenth session, H100 Llama-7B decode steps in one process (docs/RESULTS.md): above 16 k-groups the XS tile
# splits K 8 ways, not 4 (4096x11008, 256 programs: 6 rounds a warp became 3; step 1265 -> 1223 us); one row read
# through the RMSNorm prologue (NORM, which needs XS) takes 2 warps of 8 k-groups: for a matrix of XS_MAX weights
# or more (Llama-7B's gate/up, 22016x4096) in 32-row programs with one chain (MMA_CONFIG_1_NORM: its 1376 16-row
# programs at 48 registers a thread were 1.04 waves of the 1320 that fit at once; 4 warps 1207, 2 warps 1190-1194
# us with the down tile), below it with four chains (12288x4096, MMA_CONFIG_1_NORM_XS: 0.4% in two runs).
# Twenty-first session (H100, back to back, same process): one row of a matrix of XS_MAX weights or more, below LARGE,
# without the prologue takes 32-row programs of 4 warps that each read their whole K slice in one round through XS,
# one chain (MMA_CONFIG_1_MID): 8192^2 6.47-6.52 against 6.66-6.68 us, 22016x4096 9.57-9.58 against 9.79-9.96.
# BINARYLLM_MMA_CONFIG overrides all
MMA_CONFIG_1 = (1, 4, 4, 0, 1)
MMA_CONFIG_1_LARGE = (2, 4, 2, 1, 1)
MMA_CONFIG_1_XS = (1, 4, 4, 0, 1, 4, 1)
MMA_CONFIG_1_XS_LONG = (1, 8, 2, 0, 1, 4, 1)         # above 16 k-groups
MMA_CONFIG_1_NORM = (2, 2, 8, 0, 1, 1, 1)            # XS_MAX weights or more, RMSNorm prologue
MMA_CONFIG_1_NORM_XS = (1, 2, 8, 0, 1, 4, 1)         # fewer, up to 16 k-groups, RMSNorm prologue
MMA_CONFIG_1_MID = (2, 4, 8, 0, 1, 1, 1)             # XS_MAX weights or more, below LARGE (8192^2)
MMA_CONFIG_16 = (2, 4, 4, 1, 1)
LARGE = 2 ** 27
XS_MAX = 2 ** 26
PDL_DEFAULT = 1
# the gated epilogue's kernel (a gate/up projection, the down projection after it) with GATED_PDL_MAX weights or more
# is launched without PDL.  H100 decode steps, same process (docs/RESULTS.md, fourteenth session): Llama-7B
# (22016x4096, 1376 programs) 1608 us with PDL, 1437 without, 1458 without the gating pass; SmolLM2 (3072x576, 192
# programs) 506 us with PDL, 548 without, 550 without the pass.  Sizes in between were not measured.
GATED_PDL_MAX = XS_MAX
# GATED_PDL: launch it with PDL all the same (off: with the one-wave tile and GATED_TRIGGER 2, 1190 against 1172 us
# in a Llama-7B step).  Where a kernel lets the next one launch
# (griddepcontrol.launch_dependents, which does not need the kernel itself launched with PDL): TRIGGER 1 right after
# its own wait, 2 after its tensor-core loop, 3 before its wait, 0 not at all (the next kernel launches when this
# one ends);
# GATED_TRIGGER the same for the large gated kernel.  Seventeenth session, Llama-7B step with the one-wave gate/up
# tile (MMA_CONFIG_1_NORM): GATED_TRIGGER 2 1173 us, 0 or 1 1193 (with the earlier two-wave tile 1 was 10% slower
# and 2 equal); TRIGGER 2 for every kernel 9% slower.  Nineteenth session, with the early epilogue loads:
# GATED_TRIGGER 1 1085.8 us against 2 1097.65 (TRIGGER 2 1157.9).  Twentieth session: 3, before the kernel's own
# wait (the next kernel's programs launch while this one still waits for the one before it), for every kernel: in
# three Llama-7B step A/Bs 1075.8 / 1068.35 / 1074.6 us against 1082.05 / 1073.0 / 1080.45, SmolLM2 346.1 against
# 353.75; but back to back (``bench kernels``, a chain of one plain kernel) the one-row XS kernels became far slower
# (4096^2 5.35 against 2.78 us, 4096x11008 9.34 against 6.43): there every kernel launches the next before it waits,
# and the queued kernels' programs fill the GPU.  In the step every packed kernel is a fused one (RES, NORM, gated)
# and the chain is broken at each block by the attention (which triggers after its wait) and the large gated kernel
# (not launched with PDL).  So FUSED_TRIGGER (kernels with a residual epilogue, a norm prologue or a gated
# epilogue) is 3, TRIGGER (plain kernels) stays 1
GATED_PDL = False
TRIGGER = 1
FUSED_TRIGGER = 3
GATED_TRIGGER = 1
# EARLY_EPILOGUE, bits: 1 the epilogue's row scales and bias are loaded before the PDL wait, 2 a residual right after
# it (else after the tensor-core loop, where ptxas left them: a global-memory round trip at the end of every kernel)
EARLY_EPILOGUE = 3
# EARLY_EPILOGUE_MID: the same bits for a plain kernel (no residual, norm or gated epilogue) of one row and XS_MAX up to
# LARGE weights (MMA_CONFIG_1_MID's range: 8192^2, 22016x4096).  Twenty-second session, H100 back to back
# (``bench/mma_xs.py consts``): without the early row-scale loads the 8192^2 default tile took 6.23 against 6.58 us
# and its registers fell from 118 to 96 (five programs a SM instead of four); 16384^2 and 4096^2 were 1-2% slower
# without them, and the fused kernels of the decode step faster with them (nineteenth session), so only this range
EARLY_EPILOGUE_MID = 0
# one row of activations through registers (not XS) in one chain a warp, the tile that holds a round of x ahead of
# its use: at most MAXNREG_1 registers a thread (ptxas' maxnreg).  The early loads hold registers through the loop
# and took the 8192^2 tile from 126 to 132, where its 512 programs no longer fit at once (H100: 10.6 against 6.8
# us); capped it keeps 128 and spills nothing.  Not every tile: under a cap ptxas takes more registers than it
# does without one (the gate/up tile 98 -> 128), which leaves less room for the next kernel's early programs
MAXNREG_1 = 128
# CLASS_CONV, bits: the class conversion of the sign bits (CLASS_LOP, below) in kernels of one row of bf16 read
# through XS by one chain: 1 plain kernels (with the default tiles the MID range, 8192^2 and 22016x4096), 2 fused
# ones (a norm prologue, a residual, paired or gated epilogue; with the default tiles Llama-7B's gate/up);
# CLASS_CHAINS4: kernels with four chains as well (each warp's T then comes off the warps' sum).  Twenty-fifth
# session (H100, with CLASS_T_LATE): 8192^2 5.92 against 6.24 us (``bench/mma_xs.py cls8192``), the Llama-7B
# decode step 1046.9 against 1060.5 us (``bench/decode_step.py consts``); docs/RESULTS.md
CLASS_CONV = 3
CLASS_CHAINS4 = False
CLASS_T_LATE = True               # T from shared memory after the tensor-core loop (CLS 2), not from x as loaded
# PRE_ROUNDS (0-3): rounds of weights a warp loads before the PDL wait (the rest after it, one round at a time);
# GATED_PRE_ROUNDS the same for the large gated kernel (when it is launched with PDL: GATED_PDL)
PRE_ROUNDS = 1
GATED_PRE_ROUNDS = 1


def default_config(M: int, N: int, K: int, norm: bool = False) -> tuple:
    """The measured default tile for M rows of an (N, K) matrix, ``norm`` for a kernel with the RMSNorm prologue
    (see the constants above)."""
    KB = tile_shape(N, K)[1]
    if M > 8:
        return MMA_CONFIG_16
    if N * K >= LARGE:
        return MMA_CONFIG_1_LARGE
    if KB <= 8:                                       # one k-group a warp: 1, 2, 4 or 8 warps
        return (1, 1 << (KB - 1).bit_length(), 2, 0, 1, 4)
    if M == 1 and norm and N * K >= XS_MAX:
        return MMA_CONFIG_1_NORM
    if M == 1 and norm and KB <= 16:
        return MMA_CONFIG_1_NORM_XS
    if M == 1 and N * K < XS_MAX:
        return MMA_CONFIG_1_XS if KB <= 16 else MMA_CONFIG_1_XS_LONG
    if M == 1 and not norm:
        return MMA_CONFIG_1_MID
    return MMA_CONFIG_1


def _env_config() -> tuple | None:
    from . import env_ints
    cfg = env_ints("BINARYLLM_MMA_CONFIG", "1,4,4,0,1")
    if cfg is not None and (len(cfg) not in (3, 4, 5, 6, 7) or cfg[1] not in (1, 2, 4, 8, 16)
                            or cfg[2] not in (1, 2, 4, 8) or cfg[0] < 1 or any(f not in (0, 1) for f in cfg[3:5])
                            or cfg[5:6] not in ((), (1,), (4,)) or cfg[6:] not in ((), (0,), (1,))):
        from ..errors import BinaryLLMError
        raise BinaryLLMError(f"BINARYLLM_MMA_CONFIG={','.join(map(str, cfg))!r} is not RT,WARPS,CH[,FENCE[,PDL"
                             f"[,CHAINS[,XS]]]] (e.g. 1,4,4,0,1; WARPS a power of 2 up to 16, CH one of 1, 2, 4, "
                             f"8, FENCE, PDL and XS 0 or 1, CHAINS 1 or 4); fix or unset it")
    return cfg


_ENV_CONFIG = _env_config()
_USABLE: dict[int, bool] = {}


def usable(device_index: int) -> bool:
    """Triton usable on this GPU (``kernels.triton_usable``: compute capability >= 8.0, which bf16 mma.sync needs
    too) and Gluon importable (Triton >= 3.4); decided once per device, with one warning when not."""
    if device_index not in _USABLE:
        from . import triton_usable
        ok = triton_usable(device_index)
        if ok:
            try:
                from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: F401
            except Exception:  # an older Triton without Gluon
                from . import warn_once
                warn_once("no-gluon", "this Triton has no Gluon (needs >= 3.4): packed decode uses the slower "
                                      "tc/gemv kernels")
                ok = False
        _USABLE[device_index] = ok
    return _USABLE[device_index]


def disable(device_index: int, err: Exception) -> None:
    """The kernel failed to build or run here (e.g. a Triton with another Gluon): fall back, say so once."""
    from . import warn_once
    _USABLE[device_index] = False
    warn_once("mma-failed", f"the mma decode kernel failed ({type(err).__name__}: {str(err)[:200]}); packed decode "
                            f"uses the tc/gemv kernels")


def _bit_positions() -> torch.Tensor:
    """pos[h, q]: the bit of a lane's word holding row 8 h + g, column 16 t + q of its 16 x 64 block
    (q = 4 c + 2 hk + e: bit 8 hk + 4 h + c + 16 e, so that the four column classes c of one (hk, h) are
    neighbours, as the class conversion needs)."""
    q = torch.arange(16)
    h = torch.arange(2)[:, None]
    return (8 * ((q // 2) % 2) + q // 4)[None, :] + 4 * h + 16 * (q % 2)[None, :]


def pair_bits(i: int) -> tuple[int, int, int]:
    """(c, hk, h) of pair i of a word (its bits i and i + 16): i = 8 hk + 4 h + c."""
    return i % 4, i // 8, (i // 4) % 2


# Two ways the kernel turns pair i of a word (bits i, i + 16) into one bf16x2/f16x2 register of the A operand.
# "sign": a shift puts both bits on the sign positions (15, 31), then one lop3 flips (-1, -1) where a bit is 1: two
# instructions a register.  "class" (CLS: one row of bf16 through XS; which kernels: CLASS_CONV): the word is shifted
# once for every (hk, h), by 12 - 4 (2 hk + h), so that pairs c = 0..3 land on bits 12 + c and 28 + c; then one
# lop3 a register makes, for the column class c = (column % 16) // 4:
#   c 0: bit 12 (exponent bit 5)  ->  1.0 where set, 2^-32 where not   (x read as 2 x)
#   c 1: bit 13 (exponent bit 6)  ->  1.0 where set, 2^-64 where not   (x read as 2 x)
#   c 2: bit 14 (exponent bit 7)  ->  2.0 where set, 0 where not       (x as is)
#   c 3: bit 15 (sign)            -> +1.0 where set, -1.0 where not    (x as is)
# so in classes 0-2 a product is 2 x for a +1 weight and 0 (up to 2^-31 x) for a -1, which is x + (+-x); the
# kernel subtracts T, the sum of x over those columns, once at the end.  Four shifts and sixteen lop3 a word
# instead of sixteen of each.  The eighteenth session measured it in every XS kernel of the decode step: 3.3%
# slower there (the step's kernels are latency-bound, and T sits before the first tensor-core op), faster alone
# on the larger one-row shapes; twenty-third session: see CLASS_CONV
CLASS_SHIFT = (12, 8, 4, 0)                       # by 2 hk + h
CLASS_LOP = ((0x10001000, 0x2F802F80, 0xEA), (0x20002000, 0x1F801F80, 0xEA), (0x40004000, 0, 0xC0),
             (0x80008000, 0xBF80BF80, 0x6A))        # (mask, constant, lut) by c: (w & mask) | or ^ constant
CLASS_X2 = 2                                      # classes below this read 2 x


def tile_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """(row tiles, k-groups) of the padded matrix."""
    return (out_features + 15) // 16, (in_features + GROUP_K - 1) // GROUP_K


def pair_order(pairs: int) -> torch.Tensor:
    """Paired tiles (two stacked halves of ``pairs`` rows each, e.g. a gated MLP's gate and up): tile row
    16 r + 8 h + g holds weight row h pairs + 8 r + g, so that each thread of the kernel's epilogue holds a gate
    row and its up row (the accumulator rows g and 8 + g).  Returns that weight row for every tile row."""
    return torch.arange(2 * pairs).view(2, pairs // 8, 8).transpose(0, 1).reshape(-1)


def check_pairs(N: int, pairs: int) -> None:
    if pairs and not (pairs * 2 == N and pairs % 8 == 0):
        raise ValueError(f"paired tiles need N = 2 pairs with pairs a multiple of 8 (N {N}, pairs {pairs})")


@torch.no_grad()
def prepare_tiles(packed_u8: torch.Tensor, in_features: int, pairs: int = 0) -> torch.Tensor:
    """(N, ceil(K/8)) uint8 sign bits (binaryllm's layout, least significant bit first) -> the kernel's int32
    tile words (a flat tensor, see the module docstring), on the same device.  Padded rows and columns get 0
    bits; the kernel never lets them reach the output (rows are masked at the store, columns meet x = 0).
    ``pairs``: rows in ``pair_order`` (the kernel then needs ``pairs`` too)."""
    N = packed_u8.shape[0]
    check_pairs(N, pairs)
    if pairs:
        packed_u8 = packed_u8[pair_order(pairs).to(packed_u8.device)]
    NT, KB = tile_shape(N, in_features)
    bits = ((packed_u8[..., None] >> torch.arange(8, device=packed_u8.device, dtype=torch.uint8)) & 1)
    bits = bits.reshape(N, -1)[:, :in_features]
    full = torch.zeros(NT * 16, KB * GROUP_K, dtype=torch.int64, device=packed_u8.device)
    full[:N, :in_features] = bits
    # [rt, h, g, kb, kg, t, q] -> word[rt, kb, g, t, kg] = sum over (h, q) of bit << pos[h, q]
    b = full.view(NT, 2, 8, KB, KG, 4, 16)
    pos = _bit_positions().to(packed_u8.device)
    words = (b << pos[None, :, None, None, None, None, :]).sum(dim=(1, 6))      # [rt, g, kb, kg, t]
    words = words.permute(0, 2, 1, 4, 3).contiguous()                            # [rt, kb, g, t, kg]
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).reshape(-1)


@torch.no_grad()
def unpack_tiles(tiles: torch.Tensor, out_features: int, in_features: int, pairs: int = 0) -> torch.Tensor:
    """The inverse of ``prepare_tiles``: (N, K) sign bits as uint8 0/1 (tests and debugging)."""
    NT, KB = tile_shape(out_features, in_features)
    w = tiles.to(torch.int64).view(NT, KB, 8, 4, KG) & 0xFFFFFFFF               # [rt, kb, g, t, kg]
    pos = _bit_positions().to(tiles.device)
    b = (w[:, None, :, :, :, :, None] >> pos[None, :, None, None, None, None, :]) & 1   # [rt, h, kb, g, t, kg, q]
    b = b.permute(0, 1, 3, 2, 5, 4, 6).reshape(NT * 16, KB * GROUP_K)          # [rt, h, g, kb, kg, t, q]
    b = b[:out_features, :in_features].to(torch.uint8)
    if pairs:
        b = b[torch.argsort(pair_order(pairs)).to(b.device)]
    return b


def _class_values(t: torch.Tensor, c: int) -> torch.Tensor:
    """The two bf16 values one lop3 makes of a shifted word t (int64 holding 32 bits) for class c (CLASS_LOP), as
    fp32: [..., 2] (elements e = 0, 1: the low and the high half)."""
    mask, const, lut = CLASS_LOP[c]
    r = (t & mask) ^ const if lut == 0x6A else (t & mask) | const
    halves = torch.stack([r & 0xFFFF, (r >> 16) & 0xFFFF], -1)
    return (halves << 16).to(torch.int32).view(torch.float32)      # bf16 bits on top of an fp32: exact


def reference_tiles(x: torch.Tensor, tiles: torch.Tensor, row_scale: torch.Tensor, out_features: int,
                    in_features: int, pairs: int = 0, cls: bool = False) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch, as its registers see it: for every k-group each lane (g, t) turns
    pair i of its word into two +-1 values with the same shift/mask as the inline PTX, and the m16n8k16 A
    fragment positions (row 8 h + g, logical column 16 c + 8 hk + 2 t + e) are multiplied with x read at the
    permuted columns 16 t + 4 c + 2 hk + e.  ``cls``: the class conversion instead (CLASS_LOP on the word shifted
    by CLASS_SHIFT, x doubled in the classes below CLASS_X2, the sum T subtracted at the end).  fp32 throughout;
    (M, N) out."""
    NT, KB = tile_shape(out_features, in_features)
    M = x.shape[0]
    xp = torch.zeros(M, KB * GROUP_K, dtype=torch.float32, device=x.device)
    xp[:, :in_features] = x.float()
    w = tiles.to(torch.int64).view(NT, KB, 8, 4, KG) & 0xFFFFFFFF               # [rt, kb, g, t, kg]
    acc = torch.zeros(M, NT, 2, 8, dtype=torch.float32, device=x.device)        # [m, rt, h, g]
    for i in range(16):                       # pair i = 8 hk + 4 h + c: the shl/lop3 of asm(i) in _build
        c, hk, h = pair_bits(i)
        if cls:
            vals = _class_values((w << CLASS_SHIFT[2 * hk + h]) & 0xFFFFFFFF, c)
        else:
            t_ = (w << (15 - i)) & 0xFFFFFFFF
        for e in range(2):
            if cls:
                sign = vals[..., e]
            else:
                sign = torch.where(((t_ >> (15 + 16 * e)) & 1) == 1, 1.0, -1.0)     # [rt, kb, g, t, kg]
            cols = (torch.arange(KB)[:, None, None] * GROUP_K + torch.arange(KG)[None, None, :] * 64
                    + torch.arange(4)[None, :, None] * 16 + 4 * c + 2 * hk + e).to(x.device)   # [kb, t, kg]
            xv = xp[:, cols]                                                     # [m, kb, t, kg]
            if cls and c < CLASS_X2:
                xv = xv * 2
            acc[:, :, h] += torch.einsum("rbgtk,mbtk->mrg", sign, xv)
    if cls:
        acc -= xp.view(M, -1, 16)[:, :, :12].sum((1, 2))[:, None, None, None]    # T: columns with (col % 16) < 12
    y = acc.reshape(M, NT * 16)[:, :out_features]
    if pairs:                                 # tile rows back to weight rows, as the epilogue stores them
        y = y[:, torch.argsort(pair_order(pairs)).to(y.device)]
    return y * row_scale.float()[None, :]


_KERNEL = None


def _build():
    """The Gluon kernel, built on first use (importing Gluon needs a Triton that has it: >= 3.4)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .gluon_helpers import helpers
    H = helpers()
    _xor, _dim_layout, _p2, _ar = H.xor, H.dim_layout, H.p2, H.ar
    _launch_dependents, _pdl_wait = H.launch_dependents, H.pdl_wait
    _rms_rstd, _rms_normed = H.rms_rstd, H.rms_normed

    def asm(i: int, minus_one: int) -> str:
        pair = minus_one * 0x10001
        return (f"{{ .reg .b32 t; shl.b32 t, $1, {15 - i}; lop3.b32 $0, t, 0x80008000, {pair:#x}, 0x6a; }}")

    asm_bf16 = gl.constexpr(tuple(asm(i, 0xBF80) for i in range(16)))
    asm_fp16 = gl.constexpr(tuple(asm(i, 0xBC00) for i in range(16)))
    asm_cls = gl.constexpr(tuple(f"lop3.b32 $0, $1, {m:#x}, {v:#x}, {lut:#x};" for m, v, lut in CLASS_LOP))
    class_shift = gl.constexpr(CLASS_SHIFT)
    CLASS_X2_ = gl.constexpr(CLASS_X2)

    @gluon.jit
    def _pair(w2, i: gl.constexpr, BF16: gl.constexpr):
        # $1, $2: one word twice (elements e = 0, 1 of the pair); $0: the two +-1 of pair i as one register
        if BF16:
            return gl.inline_asm_elementwise(asm_bf16[i], "=r,r,r", [w2], dtype=gl.bfloat16, is_pure=True, pack=2)
        else:
            return gl.inline_asm_elementwise(asm_fp16[i], "=r,r,r", [w2], dtype=gl.float16, is_pure=True, pack=2)

    @gluon.jit
    def _c_block(w2, c: gl.constexpr, BF16: gl.constexpr):      # [..., e, h, hk] of column class c
        p00 = _pair(w2, c + 0, BF16)                              # pair 8 hk + 4 h + c
        p01 = _pair(w2, c + 4, BF16)
        p10 = _pair(w2, c + 8, BF16)
        p11 = _pair(w2, c + 12, BF16)
        return gl.join(gl.join(p00, p01), gl.join(p10, p11))

    @gluon.jit
    def _cls(sw2, c: gl.constexpr):
        # sw2: the word shifted for this pair's (hk, h), twice; $0: the two class-c values (CLASS_LOP)
        return gl.inline_asm_elementwise(asm_cls[c], "=r,r,r", [sw2], dtype=gl.bfloat16, is_pure=True, pack=2)

    @gluon.jit
    def _c_block_cls(s00, s01, s10, s11, c: gl.constexpr):     # the same from the four shifted words
        return gl.join(gl.join(_cls(s00, c), _cls(s01, c)), gl.join(_cls(s10, c), _cls(s11, c)))

    @gluon.jit
    def _class_sum(xf, th):
        # [S, KBLP, 4, 4, 16] -> [S]: sum of xf * th over a warp's K slice, a thread's k-groups first (fewer shuffles)
        return gl.sum(gl.sum(gl.sum(gl.sum(xf * th, axis=1), axis=3), axis=2), axis=1)

    @gluon.jit
    def _shifted(words, j: gl.constexpr):
        sw = words << class_shift[j]
        return gl.join(sw, sw)

    @gluon.jit
    def _mul_bf16(x, f):                # exact for f = 1 or 2 (through fp32 it would be three instructions)
        return gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [x, f], dtype=gl.bfloat16,
                                         is_pure=True, pack=2)

    @gluon.jit
    def _halves(t, RT: gl.constexpr, NB: gl.constexpr):
        """[16 RT, NB] rows of paired tiles -> (rows 16 r + g, rows 16 r + 8 + g) as [RT, 8, NB] each: in the mma
        layout a thread holds both, so this moves no data."""
        return gl.split(gl.permute(gl.reshape(t, [RT, 2, 8, NB]), (0, 2, 3, 1)))

    @gluon.jit
    def _load_words(w_ptr, woff, rnd: gl.constexpr, s, rt, ch, KB: gl.constexpr, KBL: gl.constexpr,
                    CH: gl.constexpr, N, EVEN: gl.constexpr):
        if EVEN:
            return gl.load(w_ptr + woff + rnd * CH * 128)
        else:
            g_ok = (rnd * CH + ch < KBL) & (s * KBL + rnd * CH + ch < KB) & (rt * 16 < N)
            return gl.load(w_ptr + woff + rnd * CH * 128, mask=g_ok, other=0)

    @gluon.jit
    def kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, zero,
               r_ptr, p_ptr, nw_ptr, eps, stride_rm, NP,
               KB: gl.constexpr, RT: gl.constexpr, NB: gl.constexpr, W: gl.constexpr, CH: gl.constexpr,
               BF16: gl.constexpr, HAS_BIAS: gl.constexpr, EVEN: gl.constexpr,
               FENCE: gl.constexpr, PDL: gl.constexpr, CHAINS: gl.constexpr = 1, XS: gl.constexpr = 0,
               PAIRS: gl.constexpr = 0, GATED: gl.constexpr = 0, RES: gl.constexpr = 0, NORM: gl.constexpr = 0,
               NPP: gl.constexpr = 1, TRIG: gl.constexpr = 0, EARLY: gl.constexpr = 1, PRE: gl.constexpr = 1,
               CLS: gl.constexpr = 0):
        """Program: 16 RT rows; warp s: k-groups s KBL ... s KBL + KBL - 1, CH of them per round (all of a
        round's loads are issued before its tensor-core work: ptxas does not hoist loads across rounds).
        RES: y = residual (r_ptr) + the product, and the program's sum of y^2 over its rows, one float a row of x,
        at p_ptr[m NP' + pid] (NP' = programs).  NORM (with XS): x is RMSNorm(x) * weight (nw_ptr), its rstd made
        from the NP partial sums at p_ptr that a RES kernel wrote.  EARLY bits: 1 the epilogue's row scales and
        bias (weights) are loaded before the PDL wait, 2 the residual right after it, not after the tensor-core
        loop.  PRE (0-3): rounds of weights loaded before the PDL wait.  TRIG: 1 the next kernel may launch after
        the wait, 2 after the tensor-core loop, 3 before the wait.  CLS (bf16, XS, one chain): the class
        conversion (CLASS_LOP): x goes to shared memory as 2 x in column classes 0 and 1 (after NORM), and each
        warp's sum T of x over classes 0-2 comes off its accumulator before the warps' sums are added."""
        S: gl.constexpr = W
        BN: gl.constexpr = RT * 16
        BK: gl.constexpr = CH * 256               # columns a warp takes per round
        KBL: gl.constexpr = (KB + S - 1) // S     # k-groups per warp
        ROUNDS: gl.constexpr = (KBL + CH - 1) // CH
        # words [s, rt, g, ch, kg, t]; activations [s, m, ch, kg, t, q]
        wl: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4, 1], [1, 1, 8, 1, 1, 4], [S, 1, 1, 1, 1, 1],
                                            [4, 5, 3, 2, 1, 0])
        xl: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 1, 16], [1, 8, 1, 1, 4, 1], [S, 1, 1, 1, 1, 1],
                                            [5, 3, 2, 4, 1, 0])
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[S, 1, 1],
                                                      instr_shape=[1, 16, 8])
        la: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
        lb: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
        pid = gl.program_id(0)
        ol: gl.constexpr = gl.SliceLayout(0, mma)                  # the epilogue's [BN, NB]
        offs_n = pid * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, ol))
        om = gl.arange(0, NB, layout=gl.SliceLayout(0, ol))
        n_ok = offs_n < N
        if PAIRS:
            # paired tiles (prepare_tiles(pairs=N / 2)): tile row 16 r + 8 h + g holds weight row h N / 2 + 8 r + g
            wrow = (offs_n // 16) * 8 + offs_n % 8 + ((offs_n // 8) % 2) * (N // 2)
        else:
            wrow = offs_n
        ok = (om[None, :] < M) & n_ok[:, None]
        if EARLY & 1:
            # weights: they need nothing of the kernel before this one, and loaded here their round trip is not
            # on the path after the tensor-core loop
            rscale = gl.load(s_ptr + wrow, mask=n_ok, other=0.0)
            if HAS_BIAS:
                bias = gl.load(b_ptr + wrow, mask=n_ok, other=0.0)

        s = _ar(S, 0, 6, wl)
        rt = pid * RT + _ar(RT, 1, 6, wl)
        ch = _ar(CH, 3, 6, wl)
        woff = ((rt * KB + s * KBL + ch) * 32 + _ar(8, 2, 6, wl) * 4 + _ar(4, 5, 6, wl)) * 4 + _ar(4, 4, 6, wl)
        xs = _ar(S, 0, 6, xl)
        xm = _ar(NB, 1, 6, xl)
        xch = _ar(CH, 2, 6, xl)
        xcol = (xs * KBL + xch) * 256 + _ar(4, 3, 6, xl) * 64 + _ar(4, 4, 6, xl) * 16 + _ar(16, 5, 6, xl)
        xoff = xm * stride_xm + xcol
        m_ok = xm < M

        acc = gl.zeros([S * CHAINS, BN, NB], gl.float32, mma)
        if XS:
            # one row (M = 1): x goes to shared memory once, in the order the fragments read it; each round's
            # activations are then read from there (lanes of other batch columns read the same words, so every
            # column of the mma holds row 0 and only column 0 is stored): far fewer registers than loading the
            # whole K slice of x from global memory ahead of its use
            KBLP: gl.constexpr = _p2(ROUNDS * CH)
            xsl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0])
            x_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [S, KBLP, 4, 4, 16], xsl)
            fl: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 8], [1, 1, 4, 4, 2], [S, 1, 1, 1, 1], [4, 3, 2, 1, 0])
            fkb = _ar(KBLP, 1, 5, fl)                   # the warp's k-group (past KBL: padding, zeros)
            fcol = ((_ar(S, 0, 5, fl) * KBL + fkb) * 256 + _ar(4, 2, 5, fl) * 64 + _ar(4, 3, 5, fl) * 16
                    + _ar(16, 4, 5, fl))
            f_ok = (fkb < KBL) & (fcol < K)
        if NORM:
            nwv = gl.load(nw_ptr + fcol, mask=f_ok, other=0.0)     # a weight: needs nothing of the kernel before
        if PDL:
            # programmatic dependent launch: the weights do not depend on the kernel before this one, so the
            # first round's are loaded while it finishes; x (its output) only after griddepcontrol.wait, which
            # also orders the store after everything the previous kernel reads; then the next kernel may launch
            # (a PDL kernel itself, it waits for this one to finish before it reads y)
            if PRE > 0:
                words0 = _load_words(w_ptr, woff, 0, s, rt, ch, KB, KBL, CH, N, EVEN)
            if PRE > 1 and ROUNDS > 1:
                words1 = _load_words(w_ptr, woff, 1, s, rt, ch, KB, KBL, CH, N, EVEN)
            if PRE > 2 and ROUNDS > 2:
                words2 = _load_words(w_ptr, woff, 2, s, rt, ch, KB, KBL, CH, N, EVEN)
        if TRIG == 3:
            _launch_dependents()
        if PDL:
            _pdl_wait()
        if TRIG == 1:
            _launch_dependents()
        if RES and (EARLY & 2):
            r = gl.load(r_ptr + om[None, :] * stride_rm + wrow[:, None], mask=ok, other=0.0)
        if XS:
            xv0 = gl.load(x_ptr + fcol, mask=f_ok, other=0.0)
            if NORM:
                # RMSNorm as eager PyTorch rounds it, the mean square from the producer's partial sums
                xv0 = _rms_normed(xv0, _rms_rstd(p_ptr, NP, K, eps, NPP, S), nwv, x_ptr.dtype.element_ty)
            if CLS:
                # column class (column % 16) // 4; T over the warp's K slice (x as loaded, fp32; CLS 2: after the
                # loop, from shared memory), then x doubled in classes 0 and 1 (exact in bf16)
                fq = _ar(16, 4, 5, fl)
                if CLS == 1:
                    tw = _class_sum(xv0.to(gl.float32), gl.where(fq < 12, 1.0, 0.0))
                xv0 = _mul_bf16(xv0, gl.where(fq < 4 * CLASS_X2_, 2.0, 1.0).to(gl.bfloat16).broadcast_to(xv0.shape))
            x_smem.store(xv0)
            gl.thread_barrier()
        for rnd in gl.static_range(ROUNDS):
            if PDL and rnd == 0 and PRE > 0:
                words = words0
            elif PDL and rnd == 1 and PRE > 1:
                words = words1
            elif PDL and rnd == 2 and PRE > 2:
                words = words2
            else:
                words = _load_words(w_ptr, woff, rnd, s, rt, ch, KB, KBL, CH, N, EVEN)
            if XS:
                xv = x_smem.slice(rnd * CH, CH, dim=1).load(gl.SliceLayout(1, xl))
                xv = gl.expand_dims(xv, 1).broadcast_to(S, NB, CH, 4, 4, 16)
            elif EVEN:
                xv = gl.load(x_ptr + xoff + rnd * CH * 256, mask=m_ok, other=0.0)
            else:
                k_ok = (rnd * CH + xch < KBL) & (xcol + rnd * CH * 256 < K)
                xv = gl.load(x_ptr + xoff + rnd * CH * 256, mask=m_ok & k_ok, other=0.0)
            if FENCE:
                # every word of the round now depends on all of them (zero is a runtime 0 ptxas cannot see
                # through), so all the round's weight loads are in flight before its first tensor-core op;
                # otherwise ptxas sinks each group's loads next to their use and the groups wait in turn
                dep = gl.reduce(gl.reduce(words, 4, _xor, keep_dims=True), 3, _xor, keep_dims=True)
                words = words ^ (dep & zero)
            if CLS:
                s00 = _shifted(words, 0)
                s01 = _shifted(words, 1)
                s10 = _shifted(words, 2)
                s11 = _shifted(words, 3)
                a = gl.join(gl.join(_c_block_cls(s00, s01, s10, s11, 0), _c_block_cls(s00, s01, s10, s11, 1)),
                            gl.join(_c_block_cls(s00, s01, s10, s11, 2), _c_block_cls(s00, s01, s10, s11, 3)))
            else:
                w2 = gl.join(words, words)
                a = gl.join(gl.join(_c_block(w2, 0, BF16), _c_block(w2, 1, BF16)),
                            gl.join(_c_block(w2, 2, BF16), _c_block(w2, 3, BF16)))
            if CHAINS == 1:
                # [s, rt, g, ch, kg, t, e, h, hk, c_lo, c_hi] -> [s, rt, h, g, ch, kg, c_hi, c_lo, hk, t, e] = (s, row, k)
                a = gl.permute(a, (0, 1, 7, 2, 3, 4, 10, 9, 8, 5, 6))
                a = gl.convert_layout(gl.reshape(a, [S, BN, BK]), la, assert_trivial=True)
                # x [s, m, ch, kg, t, q = 8 c_hi + 4 c_lo + 2 hk + e] -> [s, ch, kg, c_hi, c_lo, hk, t, e, m]
                xv = gl.permute(gl.reshape(xv, [S, NB, CH, 4, 4, 2, 2, 2, 2]), (0, 2, 3, 5, 6, 7, 4, 8, 1))
                xv = gl.convert_layout(gl.reshape(xv, [S, BK, NB]), lb, assert_trivial=True)
            else:
                # four accumulators a warp, one per kg (batch entry kg S + s), so that a warp's tensor-core ops
                # form four independent chains: -> [kg, s, rt, h, g, ch, c_hi, c_lo, hk, t, e]
                a = gl.permute(a, (4, 0, 1, 7, 2, 3, 10, 9, 8, 5, 6))
                a = gl.convert_layout(gl.reshape(a, [4 * S, BN, BK // 4]), la, assert_trivial=True)
                xv = gl.permute(gl.reshape(xv, [S, NB, CH, 4, 4, 2, 2, 2, 2]), (3, 0, 2, 5, 6, 7, 4, 8, 1))
                xv = gl.convert_layout(gl.reshape(xv, [4 * S, BK // 4, NB]), lb, assert_trivial=True)
            acc = mma_v2(a, xv, acc)

        if TRIG == 2:
            _launch_dependents()
        if CLS == 2:
            # x as stored (2 x in classes 0 and 1): its halves there; after the loop's reads, so the barrier is
            # only the one before it
            th = gl.where(fq < 4 * CLASS_X2_, 0.5, gl.where(fq < 12, 1.0, 0.0))
            tw = _class_sum(x_smem.load(fl).to(gl.float32), th)
        if CLS and CHAINS == 1:
            # warp s's T off its own accumulator (one chain: batch entry s), so the warps' sums add up to y
            tws = gl.convert_layout(tw, _dim_layout(mma, 0, 3))
            acc = acc - gl.expand_dims(gl.expand_dims(tws, 1), 2)
        out = gl.sum(acc, axis=0)                                   # [BN, NB]: the warps' K slices added
        if CLS and CHAINS > 1:
            out = out - gl.sum(tw, axis=0)                          # the warps' T added up on their own
        if not (EARLY & 1):
            rscale = gl.load(s_ptr + wrow, mask=n_ok, other=0.0)
            if HAS_BIAS:
                bias = gl.load(b_ptr + wrow, mask=n_ok, other=0.0)
        out = out * rscale.to(gl.float32)[:, None]
        if HAS_BIAS:
            out += bias.to(gl.float32)[:, None]
        out = out.to(y_ptr.dtype.element_ty)
        if GATED:
            # y = silu(gate) * up of the two halves, each thread holding rows g (gate) and 8 + g (up) of its
            # 16-row blocks: no data moves.  Rounded as eager PyTorch rounds gate_up -> silu -> product.
            yoff = om[None, :] * stride_ym + ((offs_n // 16) * 8 + offs_n % 8)[:, None]
            gate, up = _halves(out, RT, NB)
            yoff, _ = _halves(yoff, RT, NB)
            ok, _ = _halves(ok, RT, NB)
            gf = gate.to(gl.float32)
            sg = (gf / (1.0 + gl.exp(-gf))).to(y_ptr.dtype.element_ty)
            gl.store(y_ptr + yoff, (sg.to(gl.float32) * up.to(gl.float32)).to(y_ptr.dtype.element_ty), mask=ok)
        else:
            if RES:
                # the residual add after the layer (rounded as eager: the product to y's dtype, then the sum), and
                # this program's share of sum(y^2) for the RMSNorm that reads y next (a NORM kernel)
                if not (EARLY & 2):
                    r = gl.load(r_ptr + om[None, :] * stride_rm + wrow[:, None], mask=ok, other=0.0)
                out = (out.to(gl.float32) + r.to(gl.float32)).to(y_ptr.dtype.element_ty)
                hf = gl.where(ok, out.to(gl.float32), 0.0)
                gl.store(p_ptr + om * gl.num_programs(0) + pid, gl.sum(hf * hf, axis=0), mask=om < M)
            gl.store(y_ptr + om[None, :] * stride_ym + wrow[:, None], out, mask=ok)

    return kernel


def tile_config(M: int, N: int, K: int, config: tuple | None = None, norm: bool = False) -> tuple:
    """The tile config a launch uses: ``config``, else BINARYLLM_MMA_CONFIG, else ``default_config``."""
    return config or _ENV_CONFIG or default_config(M, N, K, norm)


def res_parts(M: int, N: int, K: int, config: tuple | None = None) -> tuple[int, int]:
    """(programs, rows a program) of the kernel for M rows of an (N, K) matrix: a RES kernel's partial sums of
    y^2 are one per program and row of x, over that program's output rows (``res_partials`` in PyTorch)."""
    rt = tile_config(M, N, K, config)[0]
    return -(-tile_shape(N, K)[0] // rt), 16 * rt


def res_partials(y: torch.Tensor, parts: int, rows: int) -> torch.Tensor:
    """(M, parts) fp32: sum of y^2 over output rows [p rows, (p + 1) rows) for each row of y (..., N)."""
    y2 = y.reshape(-1, y.shape[-1]).float()
    y2 = torch.nn.functional.pad(y2, (0, parts * rows - y2.shape[-1]))
    return (y2 * y2).view(y2.shape[0], parts, rows).sum(-1)


def rms_norm(x: torch.Tensor, partials: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight with the mean square from ``partials`` (M, parts) of x (..., K), rounded as eager
    PyTorch (and transformers' Llama-style RMSNorm) rounds it: x * rstd in fp32 to x's dtype, then the weight."""
    K = x.shape[-1]
    rstd = torch.rsqrt(partials.sum(-1) / K + eps).view(*x.shape[:-1], 1)
    return weight.to(x.dtype) * (x.float() * rstd).to(x.dtype)


def mma_matmul(x: torch.Tensor, tiles: torch.Tensor, row_scale: torch.Tensor, out_features: int,
               in_features: int, input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               config: tuple | None = None, pairs: int = 0, gated: bool = False,
               residual: torch.Tensor | None = None, norm: tuple | None = None):
    """x (..., K) bf16/fp16 on CUDA with at most 16 rows; tiles from ``prepare_tiles``; (..., N) in x's dtype.
    ``pairs``: the tiles were made with ``prepare_tiles(pairs=N // 2)``; then ``gated`` gives (..., N / 2),
    silu(y[:, :N/2]) * y[:, N/2:] made in the kernel's epilogue (a gated MLP's gate/up projection without the
    elementwise kernel after it).  ``residual`` (..., N): returns (residual + y, partials), the partials (M,
    programs) fp32 sums of its squares (``res_parts``, ``res_partials``).  ``norm`` = (partials, weight, eps), one
    row of x only: x is ``rms_norm(x, partials, weight, eps)`` first, made as the kernel reads x."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    K, N = in_features, out_features
    check_pairs(N, pairs)
    if gated and not pairs:
        raise ValueError("mma's gated output needs paired tiles (prepare_tiles(pairs=N // 2))")
    if residual is not None and (pairs or norm is not None):
        raise ValueError("mma's residual epilogue takes unpaired tiles and no norm")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > 16:
        raise ValueError("mma takes at most 16 rows of activations")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("mma takes bf16 or fp16 activations")
    if norm is not None and (M != 1 or input_scale is not None):
        raise ValueError("mma's RMSNorm prologue takes one row of activations and no input scale")
    if input_scale is not None:
        # applied here, not in the kernel: the in-kernel version measured wrong on the H100 (docs/RESULTS.md)
        x2 = x2 * input_scale.to(x2.dtype)
    from . import has_pdl
    grid, meta = launch_config(M, N, K, x.dtype == torch.bfloat16, bias is not None, config,
                               has_pdl(x.device.index or 0), pairs, gated, residual is not None,
                               0 if norm is None else norm[0].shape[-1])
    NY = N // 2 if gated else N
    y = torch.empty(M, NY, device=x.device, dtype=x.dtype)
    r, part, nw, eps = row_scale, row_scale, row_scale, 0.0       # unused pointers: any tensor
    if residual is not None:
        r = residual.reshape(M, N)
        if r.stride(-1) != 1:
            r = r.contiguous()
        part = torch.empty(M, grid[0], device=x.device, dtype=torch.float32)
    elif norm is not None:
        part, nw, eps = norm[0].contiguous(), norm[1].contiguous(), float(norm[2])
    _KERNEL[grid](x2, tiles, row_scale, bias if bias is not None else row_scale, y, M, N, K, x2.stride(0),
                  y.stride(0), 0, r, part, nw, eps, r.stride(0) if residual is not None else 0, part.shape[-1],
                  num_warps=meta["W"], launch_pdl=meta["PDL"], **compile_options(M, meta), **meta)
    y = y.reshape(*lead, NY)
    return (y, part) if residual is not None else y


def compile_options(M: int, meta: dict) -> dict:
    """Compiler options of the kernel for M rows of activations launched with ``meta`` (MAXNREG_1)."""
    cap = M == 1 and MAXNREG_1 and not meta["XS"] and meta["CHAINS"] == 1
    return {"maxnreg": MAXNREG_1} if cap else {}


def launch_config(M: int, N: int, K: int, bf16: bool, has_bias: bool, config: tuple | None = None,
                  has_pdl: bool = False, pairs: int = 0, gated: bool = False, res: bool = False,
                  norm_parts: int = 0) -> tuple:
    """(grid, the kernel's constexpr arguments) for M rows of a (N, K) matrix: the tile config (argument, else
    BINARYLLM_MMA_CONFIG, else ``default_config``), CH capped at the k-groups a warp has, EVEN when no
    mask is needed, PDL when the config asks for it (default PDL_DEFAULT) and the GPU has it (``has_pdl``), and
    for a ``gated`` epilogue only below GATED_PDL_MAX weights (unless GATED_PDL); TRIG, where the kernel lets the
    next one launch (TRIGGER; FUSED_TRIGGER with RES, NORM or GATED; GATED_TRIGGER for the large gated kernel; 0
    without PDL on the GPU); EARLY (EARLY_EPILOGUE; EARLY_EPILOGUE_MID for a plain one-row kernel of XS_MAX up to
    LARGE weights); PAIRS and GATED
    for paired tiles (``pairs``); RES for the residual epilogue; NORM (and XS, which it needs) for an RMSNorm of x
    from ``norm_parts`` partial sums, with its own default tiles (``default_config(norm=True)``)."""
    import triton
    rt, warps, ch, *rest = tile_config(M, N, K, config, norm_parts > 0)
    fence, pdl, chains, xs = (list(rest) + [1, PDL_DEFAULT, 1, 0][len(rest):])[:4]
    NT, KB = tile_shape(N, K)
    kbl = triton.cdiv(KB, warps)
    ch = min(ch, triton.next_power_of_2(kbl))
    even = K == KB * GROUP_K and KB % warps == 0 and kbl % ch == 0 and NT % rt == 0 and N == NT * 16
    pdl_ok = bool(pdl) and has_pdl
    large_gated = gated and N * K >= GATED_PDL_MAX
    launch = pdl_ok and (GATED_PDL or not large_gated)
    plain = not (res or gated or norm_parts or pairs)
    plain_mid = M == 1 and plain and XS_MAX <= N * K < LARGE
    xs_on = (bool(xs) or norm_parts > 0) and M == 1
    return (triton.cdiv(NT, rt),), dict(KB=KB, RT=rt, NB=8 if M <= 8 else 16, W=warps, CH=ch, BF16=bf16,
                                        HAS_BIAS=has_bias, EVEN=even, FENCE=bool(fence),
                                        PDL=launch, TRIG=(GATED_TRIGGER if large_gated else FUSED_TRIGGER
                                                          if res or gated or norm_parts else TRIGGER) if pdl_ok else 0,
                                        CHAINS=chains, XS=int(xs_on),
                                        PAIRS=int(bool(pairs)), GATED=int(gated), RES=int(res),
                                        NORM=int(norm_parts > 0), NPP=triton.next_power_of_2(max(norm_parts, 1)),
                                        EARLY=int(EARLY_EPILOGUE_MID if plain_mid else EARLY_EPILOGUE),
                                        PRE=int(GATED_PRE_ROUNDS if large_gated else PRE_ROUNDS),
                                        CLS=int(bool(CLASS_CONV & (1 if plain else 2)) and bf16 and xs_on
                                                and (chains == 1 or bool(CLASS_CHAINS4))) * (1 + bool(CLASS_T_LATE)))
