"""Decode attention: one query token per sequence over a KV cache, in one Triton kernel (two for long caches).

Why: in a CUDA-graph decode step of SmolLM2-135M, transformers' SDPA path runs cuDNN's flash kernel for one query
token over at most 144 cached keys in 4.66 us a layer, the largest kernel after the matmuls (docs/RESULTS.md).
The work is tiny (3 KV heads x 144 keys x 64 dims); what costs is the kernel.  Here a program takes one KV head
of one sequence and all the query heads that share it (GQA: no ``repeat_kv`` copy), loads its keys and values
once and keeps the softmax online in registers.  On sm_90+ it is launched with programmatic dependent launch,
like the ``mma`` kernel: it waits (``griddepcontrol.wait``) before reading anything and lets the next kernel
launch at once.

Caches longer than ``CHUNK`` keys are split into chunks, one program each, whose partial softmax sums a second
kernel adds up (flash-decoding); there, keys a boolean mask leaves out are not read (predicated loads), so a long
static cache costs the positions filled so far.  Shorter caches load keys, values and mask at once instead (a
shorter latency chain).  In the H100 decode step of SmolLM2 this kernel took 3.76 us a layer against cuDNN's 4.66,
and the step 508 against 596 us (docs/RESULTS.md).

``decode_attention_rope`` also makes the rotary embedding of q and of the token's key and writes the token's key
and value into the caches (``kernels/fusion.py`` puts it into compiled steps in place of inductor's kernel for
them); it loads its first block of the cache (and a short rest of it, as one tail block) before the PDL wait,
since only the token's row changes in the step.
In the H100 decode step that took Llama-7B from 1340 to 1268 us and SmolLM2 from 451 to 415 us (docs/RESULTS.md).

Hooked into transformers through its attention interface (``register``; ``use_decode_attention(model)`` switches
a model from ``sdpa`` to it): no model code is touched, and every call the kernel does not cover (more than one
query token: the prefill; dropout; soft-capping, attention sinks, a per-head mask; not a CUDA tensor) goes to
transformers' own SDPA function unchanged.

Rounding: scores q.k and p.v are fp32 sums on the tensor cores (q, k, v in their dtype; the probabilities p are
rounded to v's dtype before p.v, as in flash attention); the softmax is fp32 (exp2 with the scale folded in);
the output is rounded once.  A query whose keys are all masked gets 0 (SDPA gives NaN).  Tested on the CPU under
``TRITON_INTERPRET=1`` against an fp32 reference and SDPA decoding (fp16: the interpreter's bf16 dot is wrong,
tests/test_kernels.py), and on the GPU in bf16 by tests/test_attention.py.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import DECODE_ATTENTION as NAME      # the name registered in transformers' attention interfaces
from . import INTERPRETED, pdl_launch

# Tiles (H100 sweep, kernel alone in a CUDA graph, docs/RESULTS.md): a cache of up to ONE_BLOCK keys in one block
# (144 keys: SmolLM2's heads 3.32 us against 3.82 with two blocks of 128; Llama-7B's 4.67 against 6.23 with three of
# 64); longer ones in blocks of 256 (head size <= 64) or 64 (larger: the pipelined loop's shared memory), CHUNK keys a
# program at most (longer caches are split over programs and added up: flash-decoding)
ONE_BLOCK = 256
CHUNK = 512
# with the rotary embedding and the cache write in the kernel (``decode_attention_rope``) the first block of keys
# and values is loaded before the PDL wait: at most PREFETCH elements each, over ROPE_WARPS warps (H100 decode steps,
# same process: SmolLM2 411.9 us against 427.1 with 4 warps; Llama-7B 1266.8 (128 keys a block) against 1374.1 with
# 4 warps and against 1340.9 without the pass; docs/RESULTS.md, sixteenth session; thirtieth session: 16 warps 0.970x
# and 0.947x of 8, 32 warps 0.814x on Llama-7B).  (A form that sent the loaded blocks to the tensor cores as loaded
# and added the token's row beside them, ROPE_FIXUP, was slower in both steps: 0.982x and 0.952x, twenty-ninth
# session; removed in the thirtieth)
PREFETCH = 16384
ROPE_WARPS = 8
# ... and when the cache is one chunk a little longer than that block (Llama-7B's 144 keys: 128 + 16), the rest of it
# too, as a tail block of the next power of 2 (TAIL_N), loaded before the wait with the first: not as a block of
# BLOCK_N keys, mostly masked, loaded after the first block's softmax.  PREFETCH_TAIL: the largest such tail (0: off)
PREFETCH_TAIL = 64
_LOG2E = tl.constexpr(1.4426950408889634)    # scores in log2 units: the kernels use exp2


@triton.jit
def _block_ok(m_ptr, b, n, L, s_mb, s_ml, d_ok, MASK: tl.constexpr, SKIP: tl.constexpr):
    """(ok, kv_ok) of keys n: attended (in the cache, not masked out) and loaded."""
    ok = n < L
    if MASK == 1:
        ok = ok & (tl.load(m_ptr + b * s_mb + n * s_ml, mask=ok, other=0) != 0)
        kv_ok = (ok if SKIP else n < L)[:, None] & d_ok[None, :]
    else:
        kv_ok = ok[:, None] & d_ok[None, :]
    return ok, kv_ok


@triton.jit
def _online(q, k, v, ok, n, m_ptr, b, s_mb, s_ml, m_i, l_i, acc, qk_scale, MASK: tl.constexpr):
    """One block of keys into the online softmax (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k)) * qk_scale                           # log2 units: exp2 below
    if MASK == 2:
        add = tl.load(m_ptr + b * s_mb + n * s_ml, mask=ok, other=0.0).to(tl.float32)
        s += add[None, :] * _LOG2E                                  # to log2 units too
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)            # all masked so far: no NaN from -inf - -inf
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _token_row(n, pos, kr, vr, k, v):
    """The block's keys and values (rows n) with the token's row at pos taken from registers (kr, vr): the cache
    row there may be loaded before the kernel wrote it."""
    at = (n == pos)[:, None]
    return tl.where(at, kr[None, :], k), tl.where(at, vr[None, :], v)


@triton.jit
def _prefetched(q, k, v, n, pos, kr, vr, m_ptr, b, L, s_mb, s_ml, d_ok, m_i, l_i, acc, qk_scale, MASK: tl.constexpr):
    """A block of keys and values (rows n) loaded before the PDL wait into the online softmax, the token's row
    taken from registers."""
    ok, _ = _block_ok(m_ptr, b, n, L, s_mb, s_ml, d_ok, MASK, False)
    k, v = _token_row(n, pos, kr, vr, k, v)
    return _online(q, k, v, ok, n, m_ptr, b, s_mb, s_ml, m_i, l_i, acc, qk_scale, MASK)


@triton.jit
def _rope(x_ptr, d, D: tl.constexpr, ok, c, s):
    """x * cos + rotate_half(x) * sin in fp32 for a row of D values at x_ptr (2-D offsets in ``d``)."""
    HALF: tl.constexpr = D // 2
    x = tl.load(x_ptr + d, mask=ok, other=0.0).to(tl.float32)
    lo = d < HALF                                       # (offsets past D are masked)
    xr = tl.load(x_ptr + tl.where(lo, d + HALF, d - HALF), mask=ok, other=0.0).to(tl.float32)
    return x * c + tl.where(lo, -xr, xr) * s


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, po_ptr, pml_ptr, L, KVH, qk_scale,
                 s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_mb, s_ml, s_ob, s_oh,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
                 CHUNK_N: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                 SKIP: tl.constexpr = True, ROPE: tl.constexpr = False, kn_ptr=None, vn_ptr=None, cos_ptr=None,
                 sin_ptr=None, pos_ptr=None, s_knb=0, s_knh=0, s_vnb=0, s_vnh=0, s_cb=0, s_sb=0,
                 TAIL_N: tl.constexpr = 0):
    """Program (b * KVH + h, c): query heads h G .. h G + G - 1 of sequence b over keys [c CHUNK_N, (c + 1)
    CHUNK_N) of KV head h.  MASK: 0 none, 1 boolean (True = attend), 2 additive.  SKIP (boolean mask): keys it
    masks are not read (else keys and values load at once with the mask, which is shorter latency).  SPLIT: write
    the partial (acc, max, sum) for ``_combine_kernel`` instead of the output.

    ROPE: q (at q_ptr) and the token's key (kn_ptr) are before the rotary embedding, which is made here (rotate
    half: x cos + rotate_half(x) sin, fp32, rounded once); the token's key and value (vn_ptr) are written into the
    caches (k_ptr, v_ptr) at row pos (pos_ptr) by the program whose chunk holds it, and used from registers there.
    Every other cache row was written by an earlier step, so the first block of keys and values is loaded before
    the PDL wait, while the kernel before this one is still running; with TAIL_N (one chunk: L <= BLOCK_N +
    TAIL_N) so are the keys and values after it, and there is no loop."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // KVH
    h = bh % KVH
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    g_ok = g < G
    d_ok = d < D
    start = c * CHUNK_N
    kbase = k_ptr + b * s_kb + h * s_kh
    vbase = v_ptr + b * s_vb + h * s_vh
    if ROPE:
        n = start + tl.arange(0, BLOCK_N)
        pre_ok = (n < L)[:, None] & d_ok[None, :]
        k0 = tl.load(kbase + n[:, None] * s_kl + d[None, :], mask=pre_ok, other=0.0)
        v0 = tl.load(vbase + n[:, None] * s_vl + d[None, :], mask=pre_ok, other=0.0)
        if TAIL_N > 0:
            nt = start + BLOCK_N + tl.arange(0, TAIL_N)
            tail_ok = (nt < L)[:, None] & d_ok[None, :]
            kt = tl.load(kbase + nt[:, None] * s_kl + d[None, :], mask=tail_ok, other=0.0)
            vt = tl.load(vbase + nt[:, None] * s_vl + d[None, :], mask=tail_ok, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    q_ok = g_ok[:, None] & d_ok[None, :]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    if ROPE:
        pos = tl.load(pos_ptr)
        cs = tl.load(cos_ptr + b * s_cb + d, mask=d_ok, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + b * s_sb + d, mask=d_ok, other=0.0).to(tl.float32)
        q = _rope(q_ptr + b * s_qb + (h * G + g)[:, None] * s_qh, d[None, :], D, q_ok, cs[None, :],
                  sn[None, :]).to(q_ptr.dtype.element_ty)
        kr = _rope(kn_ptr + b * s_knb + h * s_knh, d, D, d_ok, cs, sn).to(k_ptr.dtype.element_ty)
        vr = tl.load(vn_ptr + b * s_vnb + h * s_vnh + d, mask=d_ok, other=0.0)
        mine = (pos >= start) & (pos < start + CHUNK_N) & (pos < L)
        tl.store(kbase + pos * s_kl + d, kr, mask=d_ok & mine)
        tl.store(vbase + pos * s_vl + d, vr, mask=d_ok & mine)
        m_i, l_i, acc = _prefetched(q, k0, v0, n, pos, kr, vr, m_ptr, b, L, s_mb, s_ml, d_ok, m_i, l_i, acc,
                                    qk_scale, MASK)
        if TAIL_N > 0:
            m_i, l_i, acc = _prefetched(q, kt, vt, nt, pos, kr, vr, m_ptr, b, L, s_mb, s_ml, d_ok, m_i, l_i, acc,
                                        qk_scale, MASK)
    else:
        q = tl.load(q_ptr + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=q_ok, other=0.0)
    FIRST: tl.constexpr = BLOCK_N if ROPE else 0         # ROPE: the first block is done above
    LAST: tl.constexpr = FIRST if TAIL_N > 0 else CHUNK_N  # ... with TAIL_N the rest too
    for n0 in range(FIRST, LAST, BLOCK_N):
        n = start + n0 + tl.arange(0, BLOCK_N)
        ok, kv_ok = _block_ok(m_ptr, b, n, L, s_mb, s_ml, d_ok, MASK, SKIP)
        k = tl.load(kbase + n[:, None] * s_kl + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(vbase + n[:, None] * s_vl + d[None, :], mask=kv_ok, other=0.0)
        if ROPE:
            k, v = _token_row(n, pos, kr, vr, k, v)
        m_i, l_i, acc = _online(q, k, v, ok, n, m_ptr, b, s_mb, s_ml, m_i, l_i, acc, qk_scale, MASK)
    if SPLIT:
        nc = tl.num_programs(1)
        row = (bh * nc + c) * GP + g
        tl.store(po_ptr + row[:, None] * DP + d[None, :], acc)
        tl.store(pml_ptr + row * 2, m_i)
        tl.store(pml_ptr + row * 2 + 1, l_i)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(po_ptr, pml_ptr, o_ptr, NC, KVH, s_ob, s_oh, NCP: tl.constexpr, G: tl.constexpr,
                    GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, PDL: tl.constexpr):
    """Program b * KVH + h: the NC chunks' partial sums of its query heads, rescaled to one softmax.  The loop
    runs to NCP (NC rounded up to a power of 2, masked beyond NC): a cache that grows recompiles it only when NC
    passes a power of 2 (and Triton 3.6's interpreter cannot loop to a runtime bound)."""
    bh = tl.program_id(0)
    b = bh // KVH
    h = bh % KVH
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.full([GP], float("-inf"), tl.float32)
    for c in range(0, NCP):
        ok = (g < GP) & (c < NC)
        m = tl.maximum(m, tl.load(pml_ptr + ((bh * NC + c) * GP + g) * 2, mask=ok, other=float("-inf")))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for c in range(0, NCP):
        ok = (g < GP) & (c < NC)
        row = (bh * NC + c) * GP + g
        w = tl.exp2(tl.load(pml_ptr + row * 2, mask=ok, other=float("-inf")) - m_ref)
        l_sum += w * tl.load(pml_ptr + row * 2 + 1, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(po_ptr + row[:, None] * DP + d[None, :], mask=ok[:, None], other=0.0)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(o_ptr + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(g < G)[:, None] & (d < D)[None, :])


def _pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


def block_config(L: int, D: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, warps, CHUNK_N, SKIP) for L keys of head size D; BINARYLLM_ATTN_CONFIG=BLOCK_N,WARPS[,CHUNK[,SKIP]]
    overrides.  Default: SKIP (masked keys not read) only for caches longer than a chunk."""
    from . import env_ints
    cfg = env_ints("BINARYLLM_ATTN_CONFIG", "128,4,512,0")
    if cfg is not None:
        if len(cfg) not in (2, 3, 4) or any(v < 1 or v & (v - 1) for v in cfg[:3]) or cfg[0] < 16 \
                or (len(cfg) >= 3 and cfg[2] < cfg[0]) or cfg[3:] not in ((), (0,), (1,)):
            from ..errors import BinaryLLMError
            raise BinaryLLMError(f"BINARYLLM_ATTN_CONFIG={','.join(map(str, cfg))!r} is not BLOCK_N,WARPS[,CHUNK"
                                 "[,SKIP]] (powers of 2, BLOCK_N >= 16, CHUNK >= BLOCK_N, SKIP 0 or 1; e.g. 128,4,"
                                 "512,0); fix or unset it")
        bn, warps, chunk, skip = (list(cfg) + [CHUNK, int(L > CHUNK)][len(cfg) - 2:])[:4]
    else:     # one block when the cache fits in ONE_BLOCK keys; else blocks of a size whose pipeline fits in smem
        bn = _pow2(L, 16) if L <= ONE_BLOCK else (256 if _pow2(D, 16) <= 64 else 64)
        warps, chunk, skip = 4, CHUNK, L > CHUNK
    return bn, warps, max(bn, min(chunk, _pow2(L, 16))), bool(skip)


def tail_block(L: int, bn: int, nc: int) -> int:
    """TAIL_N of the rope kernel for L keys in blocks of bn over nc chunks: the keys after the first block as one
    block of the next power of 2 (>= 16), when the cache is one chunk and that block is at most PREFETCH_TAIL and half
    of bn; else 0 (a loop over blocks of bn)."""
    tail = _pow2(L - bn, 16) if L > bn else 0
    return tail if nc == 1 and 0 < tail <= min(PREFETCH_TAIL, bn // 2) else 0


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) v for q (B, H, 1, D) and k, v (B, KVH, L, D) (H a multiple of KVH, query
    head i reading KV head i // (H / KVH)); mask None (every key), boolean (B or 1, 1, 1, L), True = attend, or
    additive of that shape.  Returns (B, 1, H, D), the layout transformers' attention functions return."""
    return _launch(q, k, v, mask, scale, None)


def decode_attention_rope(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """``decode_attention`` with the rotary embedding and the cache write made in the kernel: q (B, H, 1, D) and
    the token's key k_new (B, KVH, 1, D) before the rotary embedding (rotate half, cos and sin (B or 1, 1, 1, D)),
    its value v_new; the roped key and the value are written into k_cache, v_cache (B, KVH, L, D) at row ``pos``
    (one element), as ``cache.index_copy_(2, pos, ...)`` would, and attended to with the rest of the cache."""
    return _launch(q, k_cache, v_cache, mask, scale, (k_new, v_new, cos, sin, pos))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin in fp32, rounded once to x's dtype (as inductor computes it)."""
    h = x.shape[-1] // 2
    xf = x.float()
    return (xf * cos.float() + torch.cat([-xf[..., h:], xf[..., :h]], -1) * sin.float()).to(x.dtype)


def _launch(q, k, v, mask, scale, rope):
    B, H, _, D = q.shape
    KVH, L = k.shape[1], k.shape[2]
    G = H // KVH
    scale = D ** -0.5 if scale is None else scale
    if rope is None:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    if mask is not None:
        mask = mask.expand(B, 1, 1, L)
        s_mb, s_ml = mask.stride(0), mask.stride(3)
    else:
        s_mb = s_ml = 0
    bn, warps, chunk, skip = block_config(L, D)
    GP, DP = _pow2(G, 16), _pow2(D, 16)
    if rope is not None:
        # the first block's keys and values are held in registers from before the PDL wait to their use: keep them
        # to PREFETCH elements each (Llama-7B's 256 x 128 spilled and took 99 us a layer on the H100), over
        # ROPE_WARPS warps unless BINARYLLM_ATTN_CONFIG says otherwise
        if bn * DP > PREFETCH:
            bn = max(16, PREFETCH // DP)
            chunk = max(chunk, bn)
        if not os.environ.get("BINARYLLM_ATTN_CONFIG"):
            warps = ROPE_WARPS
    nc = triton.cdiv(L, chunk)
    tail = tail_block(L, bn, nc) if rope is not None else 0
    pdl = pdl_launch(q)
    extra = {"launch_pdl": True} if pdl else {}
    rope_args = {}
    if rope is not None:
        k_new, v_new, cos, sin, pos = rope
        q, k_new, v_new, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new, cos, sin))
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("decode_attention_rope writes into the caches: their last dimension must be contiguous")
        rope_args = dict(ROPE=True, kn_ptr=k_new, vn_ptr=v_new, cos_ptr=cos, sin_ptr=sin, pos_ptr=pos,
                         s_knb=k_new.stride(0), s_knh=k_new.stride(1), s_vnb=v_new.stride(0), s_vnh=v_new.stride(1),
                         s_cb=cos.stride(0) if cos.shape[0] > 1 else 0, s_sb=sin.stride(0) if sin.shape[0] > 1 else 0)
    if nc > 1:
        po = torch.empty(B * KVH * nc * GP, DP, device=q.device, dtype=torch.float32)
        pml = torch.empty(B * KVH * nc * GP, 2, device=q.device, dtype=torch.float32)
    else:
        po = pml = out
    _attn_kernel[(B * KVH, nc)](q, k, v, mask if mask is not None else q, out, po, pml, L, KVH,
                                scale * _LOG2E.value, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                k.stride(2), v.stride(0), v.stride(1), v.stride(2), s_mb, s_ml, out.stride(0),
                                out.stride(2), G=G, GP=GP, D=D, DP=DP, BLOCK_N=bn, CHUNK_N=chunk, MASK=kind,
                                SPLIT=nc > 1, PDL=pdl, SKIP=skip, num_warps=warps, TAIL_N=tail, **extra,
                                **rope_args)
    if nc > 1:
        _combine_kernel[(B * KVH,)](po, pml, out, nc, KVH, out.stride(0), out.stride(2), NCP=_pow2(nc, 1), G=G,
                                    GP=GP, D=D, DP=DP, PDL=pdl, num_warps=4, **extra)
    return out


def covers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           dropout: float, kwargs: dict) -> bool:
    """Whether ``decode_attention`` computes this call exactly as SDPA would (else the caller falls back)."""
    if query.shape[2] != 1 or dropout or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (query.is_cuda or INTERPRETED) or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
        return False
    if query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1] or key.dtype != query.dtype \
            or value.dtype != query.dtype:
        return False
    if any(kwargs.get(n) is not None for n in ("softcap", "s_aux", "sinks", "position_bias", "cache")):
        return False
    if kwargs.get("output_attentions"):
        return False
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
                             or mask.shape[0] not in (1, query.shape[0]) or mask.shape[3] != key.shape[2]):
        return False
    if query.is_cuda:
        from . import triton_usable
        return triton_usable(query.device.index or 0)
    return True


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface signature: the decode kernel where it covers the call, else SDPA."""
    if covers(query, key, value, attention_mask, dropout, kwargs):
        if torch.compiler.is_compiling():              # one opaque op for torch.compile (kernels/ops.py)
            from . import ops
            return ops.decode_attention(query, key, value, attention_mask, scaling), None
        return decode_attention(query, key, value, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Register the decode attention (and SDPA's mask for it) with transformers under ``NAME``; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_decode_attention(model) -> bool:
    """Switch a model that uses transformers' ``sdpa`` attention to the decode kernel (SDPA everywhere else, so
    results stay SDPA's up to rounding); other implementations (eager, flash, flex) are left alone.  Returns
    whether the model now uses it.  ``model.set_attn_implementation("sdpa")`` switches back."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == NAME:
        return True
    if impl != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(register())
    return model.config._attn_implementation == NAME


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float | None = None) -> torch.Tensor:
    """The same in fp32 PyTorch (tests): (B, 1, H, D) in q's dtype."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = q.float() @ kk.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2).to(q.dtype)
