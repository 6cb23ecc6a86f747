"""The package's binary-tensor-core batch-1 kernels (``kernels/bmma_w1a16.py``: prep + product) against the ``mma``
kernel and cuBLAS bf16, in one process on one GPU.  Every output is checked first: bit for bit against
``bmma_w1a16.reference`` (the exact rounding), the planes against ``planes_ref``; shapes that are not multiples of
the tiles, paired tiles and a bias are checked too.  Times: back to back in one CUDA graph, weights cycled past L2
(as ``bench kernels``), µs a call; "pair" = prep + product from a bf16 x, "product" = on planes already made.

    PYTHONPATH=src OUT=. python bench/bmma_bench.py [NxK[:RT,W[,P[,V[,R]]]][:FRT,FW[,FR]] ...]  # ./bmma_bench.json

V: bits 1 FENCE, 2 CHAIN, 4 ASM_CONV, 8 EARLY, 16 XFIRST, 32 NARROW (``bmma_w1a16.set_variant``); R, FR: the
product compiled with at most that many registers a thread.  "fused" = the one-kernel form (the product's programs
make the planes themselves), tile FRT,FW (default ``fused_config``), checked bit for bit too.
"""
import sys

import torch

from binaryllm.bench import _gpu_time, _rel_err
from binaryllm.export.bits import pack_signs
from binaryllm.kernels import bmma_w1a16 as bw
from binaryllm.kernels import mma_w1a16 as mw
from mma_xs import bf16_us, case, each_spec                       # bench/ (this script's folder)

DEFAULT = ["8192x8192", "8192x8192:1,4,16", "8192x8192:1,8", "16384x16384", "16384x16384:1,16,16",
           "4096x11008", "4096x11008:1,8,16", "4096x4096", "12288x4096", "22016x4096"]
CHECKS = [(1000, 1000, 0, False), (4000, 3000, 0, True), (2048, 1536, 1024, True), (960, 576, 0, False)]


def check_small(dev: str = "cuda") -> dict:
    """Odd shapes, paired tiles, bias: the kernels' output against ``reference``, bit for bit."""
    out = {}
    for N, K, pairs, with_bias in CHECKS:
        g = torch.Generator(device=dev).manual_seed(N * 7 + K)
        bits = pack_signs(torch.randn(N, K, device=dev, generator=g))
        tiles = mw.prepare_tiles(bits, K, pairs)
        sc = (torch.rand(N, device=dev, generator=g) + 0.5).half()
        bias = torch.randn(N, device=dev, generator=g).bfloat16() if with_bias else None
        for P in (16, 24, 32):
            x = (torch.randn(K, device=dev, generator=g) * 3).bfloat16()
            y = bw.bmma_matmul(x[None], tiles, sc, N, K, bias=bias, pairs=pairs, planes=P)[0]
            exact = bw.reference(x, tiles, sc, N, K, bias, pairs, P)
            pl, hdr = bw.make_planes(x, K, P)
            rp, rh = bw.planes_ref(x, P)
            out[f"{N}x{K} pairs {pairs} bias {with_bias} P {P}"] = {
                "mismatch": int((y != exact).sum()), "planes_ok": bool(torch.equal(pl, rp)),
                "hdr_ok": bool(torch.equal(hdr, rh))}
    return out


def measure(spec: str) -> dict:
    shape, *f = spec.split(":")
    N, K = map(int, shape.split("x"))
    fields = [int(v) for v in f[0].split(",")] if f and f[0] else []
    cfg = (tuple(fields[:2]) + tuple(fields[4:5])) or None      # (RT, W[, registers])
    P = fields[2] if len(fields) > 2 else bw.PLANES
    fcfg = tuple(int(v) for v in f[1].split(",")) if len(f) > 1 else None
    old = bw.set_variant(fields[3]) if len(fields) > 3 else None
    try:
        return _measure(N, K, cfg, P, fcfg)
    finally:
        if old is not None:
            bw.set_variant(old)


def _measure(N: int, K: int, cfg, P: int, fcfg=None) -> dict:
    ts, sc, x, ref, g, bits = case(N, K)
    n = len(ts)
    xr = x.view(-1)
    row = {"config": list(cfg or bw.CONFIG or bw.default_config(N, K)), "planes": P,
           "variant": bw.variant()}
    y = bw.bmma_matmul(x, ts[0], sc, N, K, planes=P, config=cfg)
    exact = bw.reference(xr, ts[0], sc, N, K, planes=P)
    pl, hdr = bw.make_planes(xr, K, P)
    rp, rh = bw.planes_ref(xr, P)
    row["fused_config"] = list(fcfg or bw.fused_config(N, K))
    yf = bw.bmma_matmul(x, ts[0], sc, N, K, planes=P, config=fcfg, fused=True)
    row["mismatch"] = int((y[0] != exact).sum()) + int((yf[0] != exact).sum())
    row["planes_ok"] = bool(torch.equal(pl, rp)) and bool(torch.equal(hdr, rh))
    row["err"] = _rel_err(y.float(), ref)
    if row["mismatch"] or not row["planes_ok"]:
        return row
    ys = [torch.empty(N, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    pair = lambda: [bw.bmma_matmul(x, t, sc, N, K, planes=P, config=cfg) for t in ts]          # noqa: E731
    prod = lambda: [bw.bmma_product(pl, hdr, t, sc, N, K, torch.bfloat16, planes=P, config=cfg, out=o)  # noqa: E731
                    for t, o in zip(ts, ys)]
    prep = lambda: [bw.make_planes(xr, K, P) for _ in ts]                                     # noqa: E731
    mma = lambda: [mw.mma_matmul(x, t, sc, N, K) for t in ts]                                 # noqa: E731
    fused = lambda: [bw.bmma_matmul(x, t, sc, N, K, planes=P, config=fcfg, fused=True) for t in ts]  # noqa: E731
    row["bf16"] = bf16_us(x, N, K, g)
    for name, fn in (("mma", mma), ("fused", fused), ("pair", pair), ("product", prod), ("prep", prep),
                     ("mma_again", mma), ("fused_again", fused), ("pair_again", pair)):
        row[name] = round(_gpu_time([fn], 5, 7) * 1e6 / n, 2)
    fbest = min(row["fused"], row["fused_again"])
    row["fused_x_bf16"] = round(row["bf16"] / fbest, 2)
    row["fused_hbm"] = round(N * K / 8 / fbest / 1e6 / 3.35, 3)
    best = min(row["pair"], row["pair_again"])
    row["pair_x_bf16"] = round(row["bf16"] / best, 2)
    row["pair_hbm"] = round(N * K / 8 / best / 1e6 / 3.35, 3)
    row["product_x_bf16"] = round(row["bf16"] / row["product"], 2)
    row["mma_x_bf16"] = round(row["bf16"] / min(row["mma"], row["mma_again"]), 2)
    ts.clear()
    bits.clear()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    res = {"device": torch.cuda.get_device_name(), "checks": check_small()}
    print(res["checks"], flush=True)
    each_spec(res, sys.argv[1:] or DEFAULT, measure, "bmma_bench.json")


if __name__ == "__main__":
    main()
