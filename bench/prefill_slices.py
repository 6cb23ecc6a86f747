"""Prefill (2048 tokens) A/B: bf16 cuBLAS vs unpack + cuBLAS (today) vs unpack in N slices through one reused
buffer (L2-sized) with y^T row slices written in place (mm out=), and with y's column slices written in place
(``torch.mm(x, slice.t(), out=y[:, n0:n1])``).  CUDA only; docs/RESULTS.md (twelfth session).

    PYTHONPATH=src OUT=. python bench/prefill_slices.py        # writes ./prefill_slice.json
"""
import json, os, statistics
import torch
import torch.nn.functional as F
from binaryllm.export.bits import pack_signs
from binaryllm.kernels.triton_w1a16 import prepare_weight, unpack_dense

dev = "cuda"
M = 2048


def gtime(fn, reps=7, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / iters * 1e3)
    return statistics.median(ts)


out = {}
for N, K in [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (12288, 4096), (22016, 4096)]:
    w = torch.randn(N, K, device=dev)
    bits = pack_signs(w)
    words = prepare_weight(bits, K)
    sc = (torch.rand(N, device=dev) + 0.5).half()
    dense = (torch.where(w > 0, 1.0, -1.0) * sc.float()[:, None]).bfloat16()
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x, dense)
    row = {"bf16": gtime(lambda: F.linear(x, dense)),
           "unpack": gtime(lambda: F.linear(x, unpack_dense(words, sc, K, torch.bfloat16)))}
    for mb in (12, 16, 24, 32):
        rows_per = max(128, (mb * 2**20 // (K * 2)) // 128 * 128)
        if rows_per >= N:
            continue
        yT = torch.empty(N, M, device=dev, dtype=torch.bfloat16)

        y = torch.empty(M, N, device=dev, dtype=torch.bfloat16)

        def cols():
            for n0 in range(0, N, rows_per):
                n1 = min(N, n0 + rows_per)
                torch.mm(x, unpack_dense(words[n0:n1], sc[n0:n1], K, torch.bfloat16).t(), out=y[:, n0:n1])
            return y

        def sliced(transpose=False):
            for n0 in range(0, N, rows_per):
                n1 = min(N, n0 + rows_per)
                torch.mm(unpack_dense(words[n0:n1], sc[n0:n1], K, torch.bfloat16), x.t(), out=yT[n0:n1])
            return yT.t().contiguous() if transpose else yT
        err = (sliced(True).float() - ref.float()).abs().max().item()
        row[f"slice{mb}MB_yT"] = gtime(lambda: sliced(False))
        row[f"cols{mb}MB"] = gtime(cols)
        row[f"cols{mb}MB_maxerr"] = (cols().float() - ref.float()).abs().max().item()
        row[f"slice{mb}MB_maxerr"] = err
    row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
    row["unpack_ratio"] = round(row["unpack"] / row["bf16"], 3)
    out[f"{N}x{K}"] = row
    print(f"{N}x{K}", row, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "prefill_slice.json"), "w"), indent=1)
