"""How long one kernel boundary of a decode step's chain costs, by how the next kernel waits (H100; twentieth
session of docs/RESULTS.md).

A chain of KERNELS launches of one small Triton kernel, captured in a CUDA graph: each program reads the whole
vector x the previous launch wrote (N floats, like a GEMV's activations) and writes its own slice of y, so every
launch depends on every program of the one before, as the step's matmuls do.  Ways to wait:

* ``plain``: no PDL, the next launch starts when the previous one ended;
* ``pdl``: programmatic dependent launch, ``griddepcontrol.wait`` before reading x, then
  ``griddepcontrol.launch_dependents`` (as the mma kernel's TRIG 1);
* ``flag``: launched with PDL too, but it waits on a counter in global memory instead of ``griddepcontrol.wait``:
  every program adds 1 to it (release, one thread, after a CTA barrier) once its stores are issued, and launch j
  spins (acquire loads) until it holds the programs of launches 0 .. j-1; the counter is zeroed at the start of
  the graph.  Then the trigger, as in ``pdl``.

Each way's result is checked against ``plain`` (the same arithmetic, so equal bit for bit): a race shows there.

    PYTHONPATH=src python bench/chain_sync.py [PROGRAMS,...] [N] [KERNELS]
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from binaryllm.bench import _event_time


@triton.jit
def _gdc_wait():
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gdc_launch():
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _ld_acquire(p):
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [p], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def chain_kernel(x_ptr, y_ptr, cnt_ptr, target, N, MODE: tl.constexpr, BLOCK: tl.constexpr, SLICE: tl.constexpr):
    pid = tl.program_id(0)
    if MODE == 1:
        _gdc_wait()
        _gdc_launch()
    if MODE == 2:
        one = tl.full([1], 0, tl.int32)
        c = _ld_acquire(cnt_ptr + one)
        while tl.max(c, 0) < target:
            c = _ld_acquire(cnt_ptr + one)
        _gdc_launch()
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(0, N, BLOCK):
        acc += tl.load(x_ptr + k + offs, mask=k + offs < N, other=0.0)
    s = tl.sum(acc, 0)
    so = pid * SLICE + tl.arange(0, SLICE)
    xv = tl.load(x_ptr + so, mask=so < N, other=0.0)
    tl.store(y_ptr + so, xv * 0.5 + s * 1e-6, mask=so < N)
    if MODE == 2:
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


def build(mode: int, programs: int, n: int, kernels: int):
    x = torch.randn(n, device="cuda")
    bufs = [x.clone(), torch.empty_like(x)]
    cnt = torch.zeros(1, device="cuda", dtype=torch.int32)
    sl = triton.next_power_of_2(triton.cdiv(n, programs))

    def run():
        bufs[0].copy_(x)
        cnt.zero_()
        for j in range(kernels):
            chain_kernel[(programs,)](bufs[j % 2], bufs[1 - j % 2], cnt, j * programs, n, MODE=mode, BLOCK=1024,
                                      SLICE=sl, num_warps=4, launch_pdl=mode > 0)
        return bufs[kernels % 2]
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    return g, out, cnt


def main():
    progs = [int(p) for p in (sys.argv[1] if len(sys.argv) > 1 else "132,256,768").split(",")]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    kernels = int(sys.argv[3]) if len(sys.argv) > 3 else 160
    res = {"device": torch.cuda.get_device_name(), "N": n, "kernels": kernels, "rows": []}
    for p in progs:
        graphs = {name: build(mode, p, n, kernels) for mode, name in enumerate(("plain", "pdl", "flag"))}
        times = {k: [] for k in graphs}
        for rep in range(7):
            for name, (g, _, _) in graphs.items():
                g.replay()
                t = _event_time(lambda: [g.replay() for _ in range(5)], 5)
                times[name].append(t * 1e6 / kernels)
        ref = graphs["plain"][1]
        row = {"programs": p, "us_per_kernel": {k: round(sorted(v)[len(v) // 2], 3) for k, v in times.items()},
               "equal_to_plain": {k: bool(torch.equal(o, ref)) for k, (_, o, _) in graphs.items()},
               "flag_count": int(graphs["flag"][2].item()), "flag_count_expected": kernels * p}
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "chain_sync.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
