"""L2 prefetch A/B: a chain of 7B-shaped packed layers (qkv, o, gate_up, down) with small kernels between them,
captured in a CUDA graph, each mma kernel asking the L2 cache for the next layer's tiles or not; and the same chain
with one layer's weights repeated (L2-resident: the "hot" bound).  Needs the kernel change that was measured and
not kept: ``git apply docs/data/l2-prefetch-experiment.patch`` first.  CUDA only; docs/RESULTS.md (twelfth session).

    PYTHONPATH=src OUT=. python bench/l2_prefetch_chain.py                          # 16 Llama-7B-shaped layers
    PF_MODEL=smollm2 PF_LAYERS=30 PYTHONPATH=src OUT=. python bench/l2_prefetch_chain.py
"""
import json
import os

import torch
from binaryllm.bench import _gpu_time
from binaryllm.export.bits import pack_signs
from binaryllm.kernels import mma_w1a16 as mw

dev = "cuda"
torch.manual_seed(0)
L = int(os.environ.get("PF_LAYERS", "16"))
SH = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
if os.environ.get("PF_MODEL") == "smollm2":
    SH = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
layers = []
for l in range(L):
    ls = []
    for N, K in SH:
        bits = pack_signs(torch.randn(N, K, device=dev))
        ls.append((mw.prepare_tiles(bits, K), ((torch.rand(N, device=dev) + 0.5) / K ** 0.5).half(), N, K))
    layers.append(ls)
flat = [m for ls in layers for m in ls]
out = {"layers": L, "shapes": SH, "device": torch.cuda.get_device_name()}


x0 = torch.randn(1, SH[0][1], device=dev, dtype=torch.bfloat16)


def make_step(pf: bool, gaps: int, hot: bool = False):
    seq = flat if not hot else layers[0] * L
    res = {}

    def step():
        x = x0
        for i, (t, sc, N, K) in enumerate(seq):
            nxt = seq[(i + 1) % len(seq)][0] if pf else None
            y = mw.mma_matmul(x[..., :K], t, sc, N, K, prefetch=nxt)   # q/k/v and gate/up outputs: their first K
            for _ in range(gaps):
                y = y * 0.5
            x = y
        res["y"] = x
    return step, res


for gaps in (0, 2, 6):
    for pf in (False, True):
        for rep in range(2):
            fn, res = make_step(pf, gaps)
            t = _gpu_time([fn], iters=20, reps=7) * 1e6
            key = f"gaps{gaps}_pf{int(pf)}_r{rep}"
            out[key] = round(t, 2)
            print(key, f"{t:.1f} us/step  {t / L:.2f} us/layer", flush=True)
    fn, res = make_step(False, gaps, hot=True)
    t = _gpu_time([fn], iters=20, reps=7) * 1e6
    out[f"gaps{gaps}_hot"] = round(t, 2)
    print(f"gaps{gaps}_hot", f"{t:.1f} us/step  {t / L:.2f} us/layer", flush=True)

# correctness: prefetch changes nothing
outs = []
for pf in (False, True):
    fn, res = make_step(pf, 2)
    fn(); torch.cuda.synchronize(); outs.append(res["y"].clone())
out["identical"] = bool(torch.equal(outs[0], outs[1]))
print("identical", out["identical"])
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "pf.json"), "w"), indent=1)
