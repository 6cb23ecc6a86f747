"""Small Gluon functions that the Gluon kernels (``mma_w1a16``, ``bmma_w1a16``) share, built on first use:
importing Gluon needs a Triton that has it (>= 3.4), so nothing here runs at import."""
from __future__ import annotations

import functools
import types


@functools.cache
def gluon_importable() -> bool:
    try:
        from triton.experimental import gluon  # noqa: F401
    except Exception:  # no Triton, or one without Gluon
        return False
    return True


@functools.cache
def helpers() -> types.SimpleNamespace:
    """dim_layout, p2 (constexpr functions); ar, xor, launch_dependents, pdl_wait, pdl_enter, rms_rstd, rms_normed,
    stamp (jit functions)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.constexpr_function
    def dim_layout(layout, dim, rank):
        """The 1-D layout of dimension ``dim`` of a rank-``rank`` tensor in ``layout``."""
        for d in reversed(range(rank)):
            if d != dim:
                layout = gl.SliceLayout(d, layout)
        return layout

    @gluon.constexpr_function
    def p2(n):
        return 1 << (n - 1).bit_length()

    @gluon.jit
    def ar(n: gl.constexpr, DIM: gl.constexpr, RANK: gl.constexpr, layout: gl.constexpr):
        """arange(n) along dimension DIM of a rank-RANK tensor in ``layout`` (size 1 along the others)."""
        v = gl.arange(0, n, layout=dim_layout(layout, DIM, RANK))
        for d in gl.static_range(RANK):
            if d != DIM:
                v = gl.expand_dims(v, d)
        return v

    @gluon.jit
    def xor(a, b):
        return a ^ b

    @gluon.jit
    def launch_dependents():
        # PDL: the next kernel may launch now (it still waits for this one to end before it reads what it wrote)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def pdl_wait():
        # PDL: wait for the kernel before this one to finish (and its writes to be visible)
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def pdl_enter(EARLY):                # EARLY: a constexpr (a static if)
        # PDL at a kernel's start: wait for the kernel before, and let the next one launch after that wait, or with
        # EARLY before it (the next kernel's loads of weights then overlap this one's wait too)
        if EARLY:
            launch_dependents()
        pdl_wait()
        if not EARLY:
            launch_dependents()

    @gluon.jit
    def rms_rstd(p_ptr, NP, K, eps, NPP: gl.constexpr, WARPS: gl.constexpr):
        # RMSNorm's rstd = rsqrt(mean(x^2) + eps) in fp32, the mean from the NP partial sums that the kernel before
        # wrote (a residual epilogue), added up by every program
        pi = gl.arange(0, NPP, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
        return gl.rsqrt(gl.sum(gl.load(p_ptr + pi, mask=pi < NP, other=0.0), axis=0) / K + eps)

    @gluon.jit
    def rms_normed(v, rstd, w, dt: gl.constexpr):
        # RMSNorm as eager PyTorch rounds it (mma_w1a16.rms_norm): x * rstd in fp32 to x's dtype dt, times the
        # weight, rounded again
        return ((v.to(gl.float32) * rstd).to(dt).to(gl.float32) * w.to(gl.float32)).to(dt)

    @gluon.jit
    def stamp(ptr, k: gl.constexpr):
        """Diagnostics (``bench/bmma_timeline.py``): this program's SM at ptr[8 p], and its clock64 and globaltimer
        at point k (0 start, 1 after the PDL wait, 2 after its last store) at ptr[8 p + 1 + k] and [8 p + 4 + k],
        the largest over its threads (atomic max into a zeroed buffer)."""
        clk = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)
        gt = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                       pack=1)
        base = ptr + (gl.program_id(0) + gl.program_id(1) * gl.num_programs(0)) * 8
        if k == 0:
            sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.atomic_max(base, sm.to(gl.int64))
        gl.atomic_max(base + 1 + k, clk)
        gl.atomic_max(base + 4 + k, gt)

    return types.SimpleNamespace(dim_layout=dim_layout, p2=p2, ar=ar, xor=xor, launch_dependents=launch_dependents,
                                 pdl_wait=pdl_wait, pdl_enter=pdl_enter, rms_rstd=rms_rstd, rms_normed=rms_normed,
                                 stamp=stamp)
