"""bench/bmma_timeline.py's analysis of the per-program stamps, on a synthetic chain (the stamps themselves need a
CUDA GPU: the kernels' STAMP variant is checked on the CPU box in test_bmma_kernel.py)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bmma_timeline as bt                                       # noqa: E402


def _chain(n_calls=8, prep_programs=6, prod_programs=12, sms=4):
    """prep then product, each kernel starting 100 ns after the previous one's last end, its programs waiting
    300 ns and ending 1000 ns after they start; clock64 = 2 x globaltimer on every SM."""
    bufs, t = [], 0
    for _ in range(n_calls):
        for name, n in (("prep", prep_programs), ("product", prod_programs)):
            b = torch.zeros(n, 8, dtype=torch.int64)
            b[:, 0] = torch.arange(n) % sms
            b[:, 4] = t + 100 + torch.arange(n) * 10
            b[:, 5] = b[:, 4] + 300
            b[:, 6] = b[:, 4] + 1000
            b[:, 1:4] = 2 * b[:, 4:7]
            t = int(b[:, 6].max())
            bufs.append((name, b))
    return bufs


def test_timeline_analysis_measures_from_the_previous_kernels_last_end():
    res = bt.analyse(_chain())
    # product programs start 100 .. 210 ns after the prep's last end, wait 400 .., end 1100 .. 1210
    assert res["product"]["start"] == [100, 210] and res["product"]["wait"] == [400, 510]
    assert res["product"]["end"] == [1100, 1210]
    assert res["prep"]["start"] == [100, 150] and res["prep"]["programs"] == 6 and res["product"]["sms"] == 4
    gaps = res["sm_cycles_after_previous_end (start, wait, end)"]
    assert set(gaps) == {"prep->product", "product->prep"}
    assert all(g[2] > g[1] > g[0] > 0 for g in gaps.values())   # per SM: start, then the wait, then the end
    assert len(res["calls"]) == 15
