"""Does a batch-1 matrix get faster when the CUDA cores take some of its rows while the tensor cores take the rest?
The ``mma`` kernel is bound by its chain of tensor-core ops, not by issue slots or HBM (docs/RESULTS.md, seventeenth
and thirtieth sessions), so the plain ``gemv`` kernel (CUDA cores) on a share of the rows, on a second stream of the
same CUDA graph, might run beside it for free.  Times, back to back with the weights cycled past L2: mma on its
rows alone, gemv on the rest alone, both at once (fork/join in the graph), against mma on the whole matrix and
cuBLAS bf16.  Every output is checked against the dense reference first.  CUDA only; docs/RESULTS.md (thirtieth
session).

    PYTHONPATH=src OUT=. python bench/split_probe.py [NxK] [gemv shares, e.g. 0.0625,0.125]   # ./split_probe.json
"""
import json
import os
import sys

import torch

from binaryllm.bench import _gpu_time, _rel_err
from binaryllm.kernels import mma_w1a16 as mw
from binaryllm.kernels.triton_w1a16 import prepare_weight, w1a16_matmul
from mma_xs import bf16_us, case                       # bench/ (this script's folder)


def main() -> None:
    N, K = map(int, (sys.argv[1] if len(sys.argv) > 1 else "8192x8192").split("x"))
    shares = [float(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0.0625, 0.125, 0.1875, 0.25]
    ts, sc, x, ref, g, bits = case(N, K)                           # bits: cut into row ranges below
    side = torch.cuda.Stream()
    res = {"device": torch.cuda.get_device_name(), "shape": [N, K], "copies": len(ts)}
    res["bf16"] = bf16_us(x, N, K, g)
    res["mma_all"] = round(_gpu_time([lambda: [mw.mma_matmul(x, t, sc, N, K) for t in ts]], 5, 7) * 1e6 / len(ts), 2)
    print(res, flush=True)
    for share in shares:
        r2 = int(N * share) // 32 * 32
        r1 = N - r2
        ta = [mw.prepare_tiles(b[:r1].contiguous(), K) for b in bits]
        wb = [prepare_weight(b[r1:].contiguous(), K) for b in bits]
        sa, sb = sc[:r1].contiguous(), sc[r1:].contiguous()

        def both(i):
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            ya = mw.mma_matmul(x, ta[i], sa, r1, K)
            with torch.cuda.stream(side):
                yb = w1a16_matmul(x, wb[i], sb, K, mode="gemv")
            cur.wait_stream(side)
            return ya, yb

        ya, yb = both(0)
        torch.cuda.synchronize()
        row = {"rows_gemv": r2, "err": _rel_err(torch.cat([ya, yb], -1), ref)}
        n = len(ts)
        row["mma_part"] = round(_gpu_time([lambda: [mw.mma_matmul(x, t, sa, r1, K) for t in ta]], 5, 7) * 1e6 / n, 2)
        row["gemv_part"] = round(_gpu_time([lambda: [w1a16_matmul(x, w, sb, K, mode="gemv") for w in wb]], 5, 7)
                                 * 1e6 / n, 2)
        row["both"] = [round(_gpu_time([lambda: [both(i) for i in range(n)]], 5, 7) * 1e6 / n, 2) for _ in range(2)]
        res[f"share {share}"] = row
        print(share, row, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "split_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
