"""The decode step's fused layers on the binary tensor cores (``kernels/bmma_w1a16.py``: the prep with the RMSNorm,
NORM; the product with the gated epilogue, GATED) against the ``mma`` kernel's fused ones, one row, in one process.
Checked first: the bmma output of the normed x against ``reference`` bit for bit (partials whose mean square is
exact), the gated output against ``silu_mul`` of it.  Times as ``bmma_bench.py``: back to back in one CUDA graph,
weights cycled past L2, µs a call; "pair" = the prep (with the norm) + the product.

    PYTHONPATH=src OUT=. python bench/bmma_fused.py [NxK:gated:RT,W ...]     # ./bmma_fused.json
"""
import sys

import torch

from binaryllm.bench import _copies, _gpu_time
from binaryllm.export.bits import pack_signs
from binaryllm.kernels import bmma_w1a16 as bw
from binaryllm.kernels import mma_w1a16 as mw
from binaryllm.kernels import silu_mul
from mma_xs import each_spec                                # bench/ (this script's folder)

DEFAULT = ["22016x4096:1:1,2", "22016x4096:1:1,4", "22016x4096:1:1,1", "12288x4096:0:1,4", "12288x4096:0:1,2"]


def measure(spec: str) -> dict:
    shape, gated, cfg = spec.split(":")
    N, K = map(int, shape.split("x"))
    gated, cfg = bool(int(gated)), tuple(map(int, cfg.split(",")))
    pairs = N // 2 if gated else 0
    g = torch.Generator(device="cuda").manual_seed(N + K)
    ts = [mw.prepare_tiles(pack_signs(torch.randn(N, K, device="cuda", generator=g)), K, pairs)
          for _ in range(_copies(N * K // 8, 64))]
    sc = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    h = (torch.randn(1, K, device="cuda", generator=g) * 3).bfloat16()
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).bfloat16()
    eps = 2.0 ** -4
    part = torch.full((1, 256), K * (0.25 - eps) / 256, device="cuda")    # mean square exact: rstd = 2
    norm = (part, nw, eps)
    row = {"gated": gated, "config": list(cfg)}
    x = mw.rms_norm(h, part, nw, eps)
    exact = bw.reference(x[0], ts[0], sc, N, K, pairs=pairs)
    row["mismatch"] = int((bw.bmma_matmul(h, ts[0], sc, N, K, pairs=pairs, norm=norm, config=cfg)[0] != exact).sum())
    if gated:
        yg = bw.bmma_matmul(h, ts[0], sc, N, K, pairs=pairs, gated=True, norm=norm, config=cfg)[0]
        want = silu_mul(exact, pairs)
        row["gated_mismatch"] = int((yg != want).sum())
        row["gated_max_err"] = float((yg.float() - want.float()).abs().max())
        ym = mw.mma_matmul(h, ts[0], sc, N, K, pairs=pairs, gated=True, norm=norm)[0]
        row["mma_gated_vs_bmma_rel"] = float((ym.float() - yg.float()).norm() / ym.float().norm())
    pair = lambda: [bw.bmma_matmul(h, t, sc, N, K, pairs=pairs, gated=gated, norm=norm, config=cfg)  # noqa: E731
                    for t in ts]
    mma = lambda: [mw.mma_matmul(h, t, sc, N, K, pairs=pairs, gated=gated, norm=norm) for t in ts]    # noqa: E731
    prep = lambda: [bw.make_planes(h, K, norm=norm) for _ in ts]                                      # noqa: E731
    for name, fn in (("mma", mma), ("pair", pair), ("prep", prep), ("mma_again", mma), ("pair_again", pair)):
        row[name] = round(_gpu_time([fn], 5, 7) * 1e6 / len(ts), 2)
    row["pair_x_mma"] = round(min(row["mma"], row["mma_again"]) / min(row["pair"], row["pair_again"]), 3)
    ts.clear()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    each_spec({"device": torch.cuda.get_device_name()}, sys.argv[1:] or DEFAULT, measure, "bmma_fused.json")


if __name__ == "__main__":
    main()
