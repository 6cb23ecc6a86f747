"""Where the unpack + cuBLAS prefill time goes (2048 tokens, CUDA only; docs/RESULTS.md, twelfth session).

    PYTHONPATH=src OUT=. python bench/prefill_diag.py parts     # -> ./prefill_diag.json
    PYTHONPATH=src OUT=. python bench/prefill_diag.py slices    # -> ./prefill_slice.json

parts:  unpack alone, cuBLAS on the unpacked temp, both, both into a preallocated buffer, a plain fill of that
        buffer, and bf16 cuBLAS; each twice, to see the spread.
slices: bf16 vs unpack + cuBLAS vs unpacking in L2-sized slices of rows through the allocator's reused temp,
        each multiplied into its rows of y^T (``mm(out=yT[n0:n1])``) or its columns of y (``out=y[:, n0:n1]``).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from binaryllm.bench import _gpu_time
from binaryllm.export.bits import pack_signs
from binaryllm.kernels.triton_w1a16 import _unpack_kernel, prepare_weight, unpack_dense

dev = "cuda"
M = 2048


def gtime(fn) -> float:
    """µs a call: median of 7 replays of a CUDA graph of 10 calls (``bench._gpu_time``)."""
    return round(_gpu_time([fn], iters=10, reps=7) * 1e6, 2)


def setup(N, K):
    w = torch.randn(N, K, device=dev)
    words = prepare_weight(pack_signs(w), K)
    sc = (torch.rand(N, device=dev) + 0.5).half()
    dense = (torch.where(w > 0, 1.0, -1.0) * sc.float()[:, None]).bfloat16()
    return words, sc, dense, torch.randn(M, K, device=dev, dtype=torch.bfloat16)


def parts(N, K):
    words, sc, dense, x = setup(N, K)
    buf = torch.empty(N, K, device=dev, dtype=torch.bfloat16)

    def unpack_into(o=buf):
        _unpack_kernel[(triton.cdiv(N, 32), triton.cdiv(words.shape[1], 8))](
            words, sc, o, N, K, words.shape[1], words.stride(0), o.stride(0), BLOCK_N=32, WORDS=8)
        return o
    row = {}
    for rep in range(2):
        for name, fn in (("bf16", lambda: F.linear(x, dense)),
                         ("unpack_alone", lambda: unpack_dense(words, sc, K, torch.bfloat16)),
                         ("unpack_into_alone", unpack_into),
                         ("fill_alone", lambda: buf.fill_(1.0)),
                         ("linear_on_buf", lambda: F.linear(x, buf)),
                         ("unpack+linear", lambda: F.linear(x, unpack_dense(words, sc, K, torch.bfloat16))),
                         ("unpack_into+linear", lambda: F.linear(x, unpack_into()))):
            row.setdefault(name, []).append(gtime(fn))
    return row


def slices(N, K):
    words, sc, dense, x = setup(N, K)
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

        def rows_T():
            for n0 in range(0, N, rows_per):
                n1 = min(N, n0 + rows_per)
                torch.mm(unpack_dense(words[n0:n1], sc[n0:n1], K, torch.bfloat16), x.t(), out=yT[n0:n1])
            return yT
        row[f"slice{mb}MB_maxerr"] = (rows_T().t().float() - ref.float()).abs().max().item()
        row[f"slice{mb}MB_yT"] = gtime(rows_T)
        row[f"cols{mb}MB"] = gtime(cols)
        row[f"cols{mb}MB_maxerr"] = (cols().float() - ref.float()).abs().max().item()
    row["unpack_ratio"] = round(row["unpack"] / row["bf16"], 3)
    return row


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "parts"
    if mode not in ("parts", "slices"):
        sys.exit(f"mode {mode!r} is not 'parts' or 'slices'")
    shapes = ([(22016, 4096), (12288, 4096), (8192, 8192), (11008, 4096)] if mode == "parts" else
              [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (12288, 4096), (22016, 4096)])
    out = {}
    for N, K in shapes:
        out[f"{N}x{K}"] = row = (parts if mode == "parts" else slices)(N, K)
        print(f"{N}x{K}", row, flush=True)
    name = "prefill_diag.json" if mode == "parts" else "prefill_slice.json"
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), name), "w"), indent=1)
