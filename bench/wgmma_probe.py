"""The experimental wgmma kernel (``kernels/wgmma_w1a16.py``, measured and not kept: ``git apply
docs/data/wgmma-experiment.patch`` first) against the ``mma`` kernel's default tile at batch 1: back to back in one
CUDA graph, weights cycled past the L2 cache (as ``bench kernels``), every output checked against the dense
reference first, cuBLAS bf16 of the same shape in the same process.  CUDA (Hopper) only; results in docs/RESULTS.md
(thirtieth session: at 8192^2 the best tile took 8.5 us against the mma kernel's 5.9).  A config with KGS > 1 gave
wrong outputs or an illegal memory access there, and a fault is sticky: run one config a process.

    PYTHONPATH=src OUT=. python bench/wgmma_probe.py [shapes] [configs]
    # shapes: NxK,NxK...; configs: RT,S,CLS,PEND,KGS;...   writes ./wgmma_probe.json
"""
import json
import os
import sys

import torch

from binaryllm.bench import _copies, _gpu_time, _rel_err
from binaryllm.kernels import mma_w1a16 as mw
from binaryllm.kernels import wgmma_w1a16 as wg
from mma_xs import case                       # bench/ (this script's folder)

SHAPES = [(8192, 8192), (22016, 4096), (16384, 16384), (4096, 4096), (12288, 4096), (4096, 11008)]
CONFIGS = [(2, 4, 1, 1, 1), (2, 4, 1, 2, 1), (1, 4, 1, 1, 1), (4, 4, 1, 1, 1)]


def main() -> None:
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else SHAPES
    configs = [tuple(map(int, c.split(","))) for c in sys.argv[2].split(";")] if len(sys.argv) > 2 else CONFIGS
    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "configs": configs, "rows": {}}
    for N, K in shapes:
        ts, sc, x, ref, g, _ = case(N, K, dev)
        n = len(ts)
        dense = [torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
                 for _ in range(_copies(N * K * 2, 8))]
        row = {"mma_err": _rel_err(mw.mma_matmul(x, ts[0], sc, N, K), ref)}
        fns = {"bf16": lambda d=dense: [torch.nn.functional.linear(x, w) for w in d],
               "mma": lambda ts=ts: [mw.mma_matmul(x, t, sc, N, K) for t in ts]}
        per = {"bf16": len(dense), "mma": n}
        for cfg in configs:
            key = ",".join(map(str, cfg))
            try:
                y = wg.wgmma_matmul(x, ts[0], sc, N, K, cfg)
                torch.cuda.synchronize()
                err = _rel_err(y, ref)
                row[key + "_err"] = err
                if not err <= 1e-2:
                    row[key] = f"WRONG {err:.3g}"
                    continue
                fns[key] = lambda cfg=cfg, ts=ts: [wg.wgmma_matmul(x, t, sc, N, K, cfg) for t in ts]
                per[key] = n
            except Exception as e:  # a tile that does not build or fit
                row[key] = f"FAIL {type(e).__name__}: {str(e)[:200]}"
        print(f"{N}x{K} checked", row, flush=True)
        for rep in range(2):
            for key, fn in fns.items():
                t = _gpu_time([fn], iters=5, reps=7) * 1e6 / per[key]
                row.setdefault(key, []).append(round(t, 2))
        print(f"{N}x{K}", row, flush=True)
        res["rows"][f"{N}x{K}"] = row
        del fns, ts, dense
        torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "wgmma_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
