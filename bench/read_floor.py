"""What is the fastest a standalone kernel can read N bytes on this GPU, timed exactly as ``bench kernels``
times the 1-bit matmul (back to back in one CUDA graph, buffers cycled past the L2 cache)?  A control for the
batch-1 targets: a Triton kernel that only loads int32 words (16-byte loads, every load of a program issued
before the first use), folds them with xor and stores one word a program, swept over bytes a program, warps and
programmatic dependent launch (PDL: loads before ``griddepcontrol.wait``, as the mma kernel does).  Also an
empty kernel (the cost of a kernel boundary in a graph), and in the same process the mma kernel and cuBLAS bf16
at batch 1 on the matrices of those sizes.  CUDA only; results in docs/RESULTS.md (thirteenth session).

    PYTHONPATH=src OUT=. python bench/read_floor.py          # writes ./read_floor.json
"""
import json
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from binaryllm.bench import _copies, _gpu_time


@triton.jit
def _read(p, out, BLOCK: tl.constexpr, ITERS: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * (BLOCK * ITERS) + tl.arange(0, BLOCK)
    acc = tl.load(p + offs)
    for i in tl.static_range(1, ITERS):
        acc ^= tl.load(p + offs + i * BLOCK)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(out + pid, tl.xor_sum(acc, 0))


@triton.jit
def _empty(out, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(out + tl.program_id(0), 1)


def read(buf: torch.Tensor, out: torch.Tensor, block: int, iters: int, warps: int, pdl: bool) -> None:
    grid = buf.numel() // (block * iters)
    _read[(grid,)](buf, out, BLOCK=block, ITERS=iters, PDL=pdl, num_warps=warps, launch_pdl=pdl)


def check(dev: str) -> None:
    """The read kernel really reads: its per-program xor matches torch's."""
    buf = torch.randint(-2**31, 2**31 - 1, (64 * 4096,), device=dev, dtype=torch.int32)
    out = torch.zeros(64, device=dev, dtype=torch.int32)
    read(buf, out, 1024, 4, 4, False)
    want = buf.view(64, -1).cpu()
    ref = torch.zeros(64, dtype=torch.int32)
    for j in range(want.shape[1]):
        ref ^= want[:, j]
    assert torch.equal(out.cpu(), ref), "read kernel xor mismatch"


def main() -> None:
    dev = "cuda"
    check(dev)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    out = torch.zeros(1 << 20, device=dev, dtype=torch.int32)

    # a kernel boundary: empty kernels back to back
    empty = {}
    for grid in (132, 528, 1056):
        for pdl in (False, True):
            def chain(grid=grid, pdl=pdl):
                for _ in range(20):
                    _empty[(grid,)](out, PDL=pdl, num_warps=4, launch_pdl=pdl)
            empty[f"grid{grid}_pdl{int(pdl)}"] = round(_gpu_time([chain], iters=5, reps=7) * 1e6 / 20, 3)
    res["empty_us"] = empty
    print("empty", empty, flush=True)

    from binaryllm.export.bits import pack_signs
    from binaryllm.kernels import mma_w1a16 as mw
    rows = {}
    for N, K in [(4096, 4096), (12288, 4096), (8192, 8192), (22016, 4096), (16384, 16384)]:
        nbytes = N * K // 8
        n = _copies(nbytes, 64)
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), device=dev, dtype=torch.int32) for _ in range(n)]
        row = {"MB": round(nbytes / 2**20, 2), "read": {}}
        for block, warps in ((1024, 4), (2048, 8), (512, 4)):
            for iters in (1, 2, 4, 8, 16):
                if (nbytes // 4) % (block * iters):
                    continue
                for pdl in (False, True):
                    def chain(block=block, iters=iters, warps=warps, pdl=pdl, bufs=bufs):
                        for b in bufs:
                            read(b, out, block, iters, warps, pdl)
                    key = f"{block * iters * 4 // 1024}KiB_w{warps}_pdl{int(pdl)}"
                    row["read"][key] = round(_gpu_time([chain], iters=5, reps=7) * 1e6 / n, 2)
        best = min(row["read"], key=row["read"].get)
        row["read_best"] = [best, row["read"][best], round(nbytes / row["read"][best] / 1e6, 3)]
        del bufs
        # the mma kernel (default tile) and cuBLAS bf16 on the matrix of this size, same timing
        ts = [mw.prepare_tiles(pack_signs(torch.randn(N, K, device=dev)), K) for _ in range(n)]
        sc = (torch.rand(N, device=dev) + 0.5).half()
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)

        def mma_chain(ts=ts):
            for t in ts:
                mw.mma_matmul(x, t, sc, N, K)
        row["mma_us"] = round(_gpu_time([mma_chain], iters=5, reps=7) * 1e6 / n, 2)
        del ts
        nb = _copies(N * K * 2, 16)
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(nb)]

        def bf16_chain(ws=ws):
            for w in ws:
                torch.nn.functional.linear(x, w)
        row["bf16_us"] = round(_gpu_time([bf16_chain], iters=5, reps=7) * 1e6 / nb, 2)
        del ws
        row["mma_TBps"] = round(nbytes / row["mma_us"] / 1e6, 3)
        print(f"{N}x{K}", {k: v for k, v in row.items() if k != "read"}, flush=True)
        rows[f"{N}x{K}"] = row
        torch.cuda.empty_cache()
    res["rows"] = rows
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "read_floor.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
