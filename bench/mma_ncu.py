"""The batch-1 mma kernels under Nsight Compute: what their warps wait on.  Launches each case (the 8192^2 target
and the Llama-7B step's four kernels with their step epilogues and prologues) WARM + 1 times, so that

    ncu --clock-control none --set full -k regex:^kernel$ --launch-skip-before-match 0 -o $OUT/mma \\
        python bench/mma_ncu.py
    ncu --import $OUT/mma.ncu-rep --page raw --csv > $OUT/raw.csv

profiles them (every launch; the last of each case is the warm one).  Prints the cases in launch order.  CUDA
only; results in docs/RESULTS.md (nineteenth session).  ``python bench/mma_ncu.py time`` times the same cases
back to back instead (weights cycled past L2), as a check that they are the step's kernels;
``python bench/mma_ncu.py report raw.csv`` prints the raw page's time, issue, occupancy and warp-stall columns.
"""
import csv
import sys

import torch
from binaryllm.bench import _copies, _gpu_time
from binaryllm.export.bits import pack_signs
from binaryllm.kernels import mma_w1a16 as mw

WARM = 1


def cases():
    """(name, N, K, kwargs of mma_matmul) for one row of activations."""
    return [("8192x8192 plain", 8192, 8192, {}),
            ("q/k/v 12288x4096 norm", 12288, 4096, {"norm": True}),
            ("o 4096x4096 res", 4096, 4096, {"res": True}),
            ("gate/up 22016x4096 norm gated", 22016, 4096, {"norm": True, "gated": True}),
            ("down 4096x11008 res", 4096, 11008, {"res": True})]


def make(N: int, K: int, kw: dict, copies: int = 1):
    """A closure list running the case on ``copies`` distinct weight tensors, and the config it launches with."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    pairs = N // 2 if kw.get("gated") else 0
    tiles = [mw.prepare_tiles(pack_signs(torch.randn(N, K, device="cuda", generator=g)), K, pairs=pairs)
             for _ in range(copies)]
    x = torch.randn(1, K, device="cuda", generator=g).to(torch.bfloat16)
    scale = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    extra = {}
    if kw.get("gated"):
        extra.update(pairs=pairs, gated=True)
    if kw.get("res"):
        extra["residual"] = torch.randn(1, N, device="cuda", generator=g).to(torch.bfloat16)
    if kw.get("norm"):
        part = mw.res_partials(x, 256, 16)                  # as many partial sums as a 4096-row RES kernel writes
        extra["norm"] = (part, (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16), 1e-5)
    cfg = mw.tile_config(1, N, K, norm=bool(kw.get("norm")))
    return [lambda t=t: mw.mma_matmul(x, t, scale, N, K, **extra) for t in tiles], cfg


KEYS = ("gpu__time_duration.sum", "launch__registers_per_thread", "launch__grid_size",
        "sm__warps_active.avg.pct_of_peak_sustained_active", "smsp__issue_active.avg.pct_of_peak_sustained_active",
        "smsp__inst_executed.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
        "smsp__average_warp_latency_per_inst_issued.ratio", "sm__cycles_elapsed.avg")


def report(path: str) -> None:
    """Key columns and the warp-stall breakdown (cycles a warp spends per issued instruction, by reason) of each
    profiled launch in an ``ncu --page raw --csv`` export."""
    rows = list(csv.reader(open(path)))
    head, data = rows[0], rows[2:]              # row 1: units
    for r in data:
        v = dict(zip(head, r))
        print(f"launch {v.get('ID')}: " + ", ".join(f"{k.split('.')[0]}={v[k]}" for k in KEYS if k in v))
        stalls = {k: float(v[k].replace(",", "")) for k in head
                  if k.startswith("smsp__average_warps_issue_stalled_") and k.endswith("_per_issue_active.ratio")
                  and v[k] not in ("", "n/a")}
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:8]
        print("   stalls/issue: " + ", ".join(f"{k[34:-23]} {x:.2f}" for k, x in top))


def main() -> None:
    if sys.argv[1:2] == ["report"]:
        return report(sys.argv[2])
    timing = "time" in sys.argv[1:]
    for name, N, K, kw in cases():
        fns, cfg = make(N, K, kw, _copies(N * K // 8, 64) if timing else 1)
        if timing:
            us = [round(_gpu_time(fns, iters=5 * len(fns), reps=7) * 1e6, 2) for _ in range(2)]
            print(f"{name}: tile {cfg}, {us} us", flush=True)
        else:
            for _ in range(WARM + 1):
                fns[0]()
            torch.cuda.synchronize()
            print(f"{name}: tile {cfg}, {WARM + 1} launches", flush=True)


if __name__ == "__main__":
    main()
