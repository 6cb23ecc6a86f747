"""The dense one-row GEMV (``kernels/dense.py``) against cuBLAS (``torch.nn.functional.linear``) on output-embedding
shapes, back to back in a CUDA graph, weights cycled past L2; a sweep of (BN, BK, warps) tiles.  Every tile's output
is checked against an fp32 reference first.  CUDA only; docs/RESULTS.md (twentieth session).

    PYTHONPATH=src OUT=. python bench/dense_gemv.py [NxK,...]
"""
import json
import os
import sys

import torch

from binaryllm.bench import _copies, _gpu_time
from binaryllm.kernels import dense

TILES = ((8, 512, 4), (4, 1024, 4), (16, 256, 4), (16, 512, 8), (8, 1024, 8), (32, 256, 8), (4, 4096, 8),
         (8, 4096, 8), (16, 128, 4), (32, 128, 4), (64, 64, 4))


def main():
    shapes = [tuple(map(int, s.split("x"))) for s in (sys.argv[1] if len(sys.argv) > 1 else
                                                       "32000x4096,49152x576,4096x4096").split(",")]
    rows = []
    for N, K in shapes:
        n = _copies(N * K * 2, 8)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(n)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ ws[0].float().T)
        row = {"N": N, "K": K, "copies": n,
               "cublas_us": round(_gpu_time([lambda w=w: torch.nn.functional.linear(x, w) for w in ws]) * 1e6, 2)}
        err = (torch.nn.functional.linear(x, ws[0]).float() - ref).abs().max().item()
        row["cublas_max_err"] = err
        for t in TILES:
            y = dense.gemv(x, ws[0], t).float()
            e = (y - ref).abs().max().item()
            us = _gpu_time([lambda w=w, t=t: dense.gemv(x, w, t) for w in ws]) * 1e6
            row["x".join(map(str, t))] = {"us": round(us, 2), "max_err": e, "ok": e <= 2 * err + 1e-2}
        best = min((k for k in row if isinstance(row[k], dict)), key=lambda k: row[k]["us"])
        row["best"] = best
        row["best_speedup_vs_cublas"] = round(row["cublas_us"] / row[best]["us"], 3)
        row["best_TBps"] = round(N * K * 2 / row[best]["us"] / 1e6, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        ws = None
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows},
              open(os.path.join(os.environ.get("OUT", "."), "dense_gemv.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
