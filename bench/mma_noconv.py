"""How much of the mma kernel's time is the bit -> +-1 conversion (shl + lop3 a register)?  The variant does one
xor a register instead (wrong values, a distinct constant per pair so nothing is merged), with the same loads
and tensor-core ops.  Back-to-back batch-1 timings (weights cycled past the L2 cache), against the real kernel
in the same process.  CUDA only; results in docs/RESULTS.md (twelfth session).

    PYTHONPATH=src OUT=. python bench/mma_noconv.py          # writes ./noconv.json
"""
import json
import os

import torch
from binaryllm.bench import _copies, _gpu_time
from binaryllm.export.bits import pack_signs
from binaryllm.kernels import mma_w1a16 as mw
from mma_hot import patched          # bench/ is the script's directory: the same patch as mma_hot.py's "noconv"

nc = patched("noconv", hot=False, noconv=True)
dev = "cuda"


out = {}
for N, K in [(8192, 8192), (4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (16384, 16384), (960, 576),
             (3072, 576)]:
    n = _copies(N * K // 8, 64)
    ts = [mw.prepare_tiles(pack_signs(torch.randn(N, K, device=dev)), K) for _ in range(n)]
    sc = (torch.rand(N, device=dev) + 0.5).half()
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    row = {}
    for rep in range(2):
        for name, mod in (("real", mw), ("noconv", nc)):
            def chain(mod=mod, ts=ts):
                for t in ts:
                    mod.mma_matmul(x, t, sc, N, K)
            row.setdefault(name, []).append(round(_gpu_time([chain], iters=5, reps=7) * 1e6 / n, 2))
    row["weight_TBps_real"] = round(N * K / 8 / min(row["real"]) / 1e6, 2)
    row["weight_TBps_noconv"] = round(N * K / 8 / min(row["noconv"]) / 1e6, 2)
    out[f"{N}x{K}"] = row
    print(f"{N}x{K}", row, flush=True)
    del ts
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "noconv.json"), "w"), indent=1)
