"""Where the time of a chain of batch-1 bmma calls goes: every program of every kernel in the chain records its SM,
and its clock64 and globaltimer at three points (``gluon_helpers.stamp``): "start" (after it issued its weight
loads; the prep: at its top), "wait" (after the PDL wait returned: the kernel before it has ended), "end" (after
its last store).  One CUDA graph of the chain (as ``bench kernels`` times it, weights cycled past L2) is replayed
once with the stamps on; the same chain without stamps gives the µs a call.

    PYTHONPATH=src OUT=. python bench/bmma_timeline.py [NxK] [mode ...]     # ./bmma_timeline.json, .png

modes: pair (prep + product from a bf16 x), product (on planes already made), fused (the one-kernel form);
pair_early: the pair with EARLY (the prep lets the product launch before its own wait).
Printed a call (ns, from the chain's middle calls, medians over calls): the kernel's first and last program start,
wait and end relative to the previous kernel's last end; and per SM the cycles from one kernel's last end to the
next one's first start there.
"""
import json
import os
import statistics
import sys

import torch

from binaryllm.bench import _event_time
from binaryllm.kernels import bmma_w1a16 as bw
from mma_xs import case                                             # bench/ (this script's folder)


def chain(N: int, K: int, mode: str, ts, sc, x):
    """(list of launch callables, list of (kernel name, stamp buffer)) of one call per tile copy, twice over."""
    xr = x.view(-1)
    pl, hdr = bw.make_planes(xr, K)
    _, _, grid, _ = bw.launch_meta(N, K, fused=mode == "fused",
                                   config=bw.fused_config(N, K) if mode == "fused" else None)
    pgrid = bw.launch_meta(N, K)[0]
    calls, bufs = [], []
    for i in range(2 * len(ts)):
        t = ts[i % len(ts)]
        y = torch.empty(N, device="cuda", dtype=torch.bfloat16)
        b_prod = torch.zeros(grid[0], 8, dtype=torch.int64, device="cuda")
        if mode == "pair":
            b_prep = torch.zeros(pgrid[0] * pgrid[1], 8, dtype=torch.int64, device="cuda")
            bufs += [("prep", b_prep), ("product", b_prod)]

            def call(t=t, y=y, bp=b_prep, bq=b_prod, stamp=True):
                p, h = bw.make_planes(xr, K, stamp=bp if stamp else None)
                bw.bmma_product(p, h, t, sc, N, K, torch.bfloat16, out=y, stamp=bq if stamp else None)
        elif mode == "product":
            bufs.append(("product", b_prod))

            def call(t=t, y=y, bq=b_prod, stamp=True):
                bw.bmma_product(pl, hdr, t, sc, N, K, torch.bfloat16, out=y, stamp=bq if stamp else None)
        else:
            bufs.append(("fused", b_prod))

            def call(t=t, y=y, bq=b_prod, stamp=True):
                bw.bmma_product(None, None, t, sc, N, K, torch.bfloat16, out=y, x=xr, stamp=bq if stamp else None)
        calls.append(call)
    return calls, bufs


def graph_of(calls, stamp: bool):
    for c in calls[:2]:
        c(stamp=stamp)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c(stamp=stamp)
    return g


def analyse(bufs) -> dict:
    """Per kernel launch: ns of first/last start, wait and end relative to the previous launch's last end (the
    globaltimer); per SM gaps in cycles (clock64) between the end of one launch's last program there and the first
    start of the next launch's there."""
    st = [b.cpu() for _, b in bufs]
    names = [n for n, _ in bufs]
    gt = [s[:, 4:7] for s in st]
    res = {"globaltimer_steps_ns": sorted({int(v) for s in gt for v in (s[1:, 0] - s[:-1, 0]).abs().tolist()
                                            if v > 0})[:6]}
    rows = []
    for i in range(1, len(st)):
        prev_end = int(gt[i - 1][:, 2].max())
        g = gt[i] - prev_end
        rows.append({"kernel": names[i], "start": [int(g[:, 0].min()), int(g[:, 0].max())],
                     "wait": [int(g[:, 1].min()), int(g[:, 1].max())], "end": [int(g[:, 2].min()), int(g[:, 2].max())],
                     "programs": len(g), "sms": len(set(st[i][:, 0].tolist()))})
    mid = rows[len(rows) // 4: 3 * len(rows) // 4]
    for name in sorted(set(names)):
        sel = [r for r in mid if r["kernel"] == name]
        res[name] = {k: [statistics.median(r[k][0] for r in sel), statistics.median(r[k][1] for r in sel)]
                     for k in ("start", "wait", "end")}
        res[name]["programs"] = sel[0]["programs"]
        res[name]["sms"] = sel[0]["sms"]
    # per SM: cycles between launch i-1's last end there and launch i's first start there (both on that SM)
    gaps = {}
    for i in range(1, len(st)):
        a, b = st[i - 1], st[i]
        per = []
        for sm in set(b[:, 0].tolist()) & set(a[:, 0].tolist()):
            ea = int(a[a[:, 0] == sm][:, 3].max())
            sb = int(b[b[:, 0] == sm][:, 1].min())
            wb = int(b[b[:, 0] == sm][:, 2].min())
            eb = int(b[b[:, 0] == sm][:, 3].max())
            per.append((sb - ea, wb - ea, eb - ea))
        if per:
            gaps.setdefault(f"{names[i - 1]}->{names[i]}", []).append(
                [statistics.median(p[j] for p in per) for j in range(3)])
    res["sm_cycles_after_previous_end (start, wait, end)"] = {
        k: [statistics.median(v[j] for v in vs[len(vs) // 4: 3 * len(vs) // 4 or 1]) for j in range(3)]
        for k, vs in gaps.items()}
    res["calls"] = rows
    return res


def plot(bufs, path: str, first: int, n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = bufs[first:first + n]
    t0 = min(int(b[:, 4].min()) for _, b in sel)
    colors = {"prep": "tab:orange", "product": "tab:blue", "fused": "tab:green"}
    fig, ax = plt.subplots(figsize=(12, 6))
    for k, (name, b) in enumerate(sel):
        b = b.cpu()
        for r in b.tolist():
            sm, s, w, e = r[0], (r[4] - t0) / 1e3, (r[5] - t0) / 1e3, (r[6] - t0) / 1e3
            ax.plot([s, w], [sm, sm], color=colors[name], alpha=0.25, lw=2)
            ax.plot([w, e], [sm, sm], color=colors[name], alpha=0.9 if k % 2 else 0.6, lw=2)
    ax.set_xlabel("µs (globaltimer)")
    ax.set_ylabel("SM")
    ax.set_title("programs: light = start..PDL wait returns, dark = wait..last store; " +
                 ", ".join(f"{k} {v}" for k, v in colors.items() if any(n == k for n, _ in sel)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = sys.argv[1:]
    shape = args.pop(0) if args and "x" in args[0] else "8192x8192"
    N, K = map(int, shape.split("x"))
    modes = args or ["pair", "product", "fused"]
    ts, sc, x, _, _, bits = case(N, K)
    out = {"device": torch.cuda.get_device_name(), "shape": shape}
    for spec in modes:
        mode, _, early = spec.partition("_")
        old = bw.set_variant(bw.variant() | 8) if early == "early" else None
        calls, bufs = chain(N, K, mode, ts, sc, x)
        plain = graph_of(calls, False)
        us = statistics.median(_event_time(plain.replay, len(calls)) for _ in range(5)) * 1e6
        g = graph_of(calls, True)
        for _, b in bufs:
            b.zero_()
        g.replay()
        torch.cuda.synchronize()
        us_st = _event_time(g.replay, len(calls)) * 1e6
        for _, b in bufs:
            b.zero_()
        g.replay()
        torch.cuda.synchronize()
        res = analyse(bufs)
        res["us_a_call"] = round(us, 2)
        res["us_a_call_with_stamps"] = round(us_st, 2)
        if old is not None:
            bw.set_variant(old)
        out[spec] = res
        short = {k: v for k, v in res.items() if k != "calls"}
        print(spec, json.dumps(short), flush=True)
        per = 2 if mode == "pair" else 1
        plot(bufs, os.path.join(os.environ.get("OUT", "."), f"bmma_timeline_{spec}.png"), len(bufs) // 2, 3 * per)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "bmma_timeline.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
