"""The greedy token of a decode step, fed back as the next step's input, in one Triton kernel.

Why: a greedy step on the GPU ended in four small kernels after the logits (the argmax, its copy into the chunk's
token buffer, the copy into the step's input ids, position + 1), each launched only after the one before had ended.
In the H100 decode loop they cost 16-24 us a token (Llama-7B shape, about 1.5% of the step; docs/RESULTS.md,
twenty-first session); this kernel took 12 us a token off (greedy chunks of 8: 1065.6 against 1077.6 us, twenty-second
session).  Here one launch does all four: ``P`` programs a sequence each take ``BLOCK`` logits, make
their largest (and its first index) into one 64-bit key, and ``atomic_max`` it into the sequence's slot; the last
program to arrive (a counter, acquire-release) reads the slot, writes the token into ``picked`` and ``ids``, and puts
slot and counter back for the next step.  The last program of sequence 0 also adds 1 to ``pos`` (one position for
every sequence, as ``StaticDecoder`` keeps it).  On sm_90+ it is launched with programmatic dependent launch.

The token is ``torch.argmax``'s: the largest logit, the first index among equal ones, a NaN above everything (its
first index).  The key is the logit's fp32 bit pattern made order-preserving as a signed integer, then the index
complemented in the low 32 bits, so one integer maximum is the (value, first index) maximum.  Tested against
``torch.argmax`` on the CPU under ``TRITON_INTERPRET=1``, and on the GPU directly and through the decoder, both in
tests/test_pick.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl_launch

BLOCK = 2048              # logits a program: 16 programs for a 32000-token vocabulary, 24 for 49152
KEY_EMPTY = -(2 ** 63)    # a slot with no key in it (below every key)
_EMPTY = tl.constexpr(KEY_EMPTY)


@triton.jit
def _pick_kernel(logits_ptr, s_lb, V, key_ptr, count_ptr, picked_ptr, s_pb, ids_ptr, s_ib, pos_ptr,
                 BLOCK: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = p * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(logits_ptr + b * s_lb + offs, mask=ok, other=float("-inf")).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # signed order of the floats: -inf < ... < -0 < 0 < ... < inf
    order = tl.where(x != x, 0x7FFFFFFF, order)         # NaN above everything, as torch.argmax takes it
    order = tl.where(ok, order, -0x7FFFFFFF - 1)
    best = tl.max(order, 0)
    first = tl.min(tl.where(order == best, offs, 2 ** 31 - 1), 0)
    key = best.to(tl.int64) * 4294967296 + (4294967295 - first.to(tl.int64))
    tl.atomic_max(key_ptr + b, key, sem="relaxed")
    tl.debug_barrier()                                  # the key is in before this program counts itself in
    arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
    if arrived == P - 1:                                # the last program of this sequence: every key is in
        k = tl.atomic_xchg(key_ptr + b, _EMPTY, sem="acquire")
        tok = 4294967295 - (k & 4294967295)
        tl.store(picked_ptr + b * s_pb, tok)
        tl.store(ids_ptr + b * s_ib, tok)
        tl.atomic_xchg(count_ptr + b, 0, sem="relaxed")
        if b == 0:
            tl.store(pos_ptr, tl.load(pos_ptr) + 1)


def scratch(batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots (one int64 key a sequence, empty) and arrival counters (int32, 0) that ``pick_feed`` needs; it
    leaves them as it found them."""
    return (torch.full((batch,), KEY_EMPTY, dtype=torch.int64, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device))


def pick_feed(logits: torch.Tensor, picked: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
              slots: tuple[torch.Tensor, torch.Tensor], block: int = BLOCK) -> None:
    """``t = logits.argmax(-1)``; ``picked.copy_(t)``; ``ids.copy_(t[:, None])``; ``pos.add_(1)`` in one launch.
    logits (B, V) with a contiguous last dimension, picked (B,) and ids (B, 1) int64 (any strides), pos one int64
    element; ``slots`` from ``scratch(B, device)``."""
    B, V = logits.shape
    if logits.stride(1) != 1 or picked.shape != (B,) or ids.shape != (B, 1) or pos.numel() != 1 \
            or picked.dtype != torch.int64 or ids.dtype != torch.int64 or pos.dtype != torch.int64:
        raise ValueError("pick_feed takes logits (B, V) with contiguous rows, int64 picked (B,), ids (B, 1) and pos")
    key, count = slots
    pdl = pdl_launch(logits)
    block = min(block, triton.next_power_of_2(V))
    _pick_kernel[(B, triton.cdiv(V, block))](logits, logits.stride(0), V, key, count, picked, picked.stride(0), ids,
                                             ids.stride(0), pos, BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl)
