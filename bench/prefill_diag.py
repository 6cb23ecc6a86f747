"""Where the unpack + cuBLAS prefill time goes: unpack alone, cuBLAS on the unpacked temp, both, both into a
preallocated buffer, a plain fill of that buffer, and bf16 cuBLAS; each twice, to see the spread.  CUDA only;
docs/RESULTS.md (twelfth session).

    PYTHONPATH=src OUT=. python bench/prefill_diag.py          # writes ./prefill_diag.json
"""
import json, os, statistics
import torch, triton
import torch.nn.functional as F
from binaryllm.export.bits import pack_signs
from binaryllm.kernels.triton_w1a16 import prepare_weight, unpack_dense, _unpack_kernel

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
    return round(statistics.median(ts), 2)


out = {}
for N, K in [(22016, 4096), (12288, 4096), (8192, 8192), (11008, 4096)]:
    w = torch.randn(N, K, device=dev)
    words = prepare_weight(pack_signs(w), K)
    sc = (torch.rand(N, device=dev) + 0.5).half()
    dense = (torch.where(w > 0, 1.0, -1.0) * sc.float()[:, None]).bfloat16()
    buf = torch.empty(N, K, device=dev, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)

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
    out[f"{N}x{K}"] = row
    print(f"{N}x{K}", row, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "prefill_diag.json"), "w"), indent=1)
