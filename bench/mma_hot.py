"""How much of the mma kernel's time is left when its weights cost no HBM traffic?  Patched copies of the kernel
source: "hot" makes every program read program 0's weight tiles (L1/L2 hits; wrong values), "noconv" replaces the
shl + lop3 that turn each pair of sign bits into a +-1 register by one xor (wrong values), "hot_noconv" both.
Back-to-back batch-1 timings (weights cycled past the L2 cache), all in one process.  CUDA only; results in
docs/RESULTS.md (seventeenth session).

    PYTHONPATH=src OUT=. python bench/mma_hot.py            # default tiles of 8192^2 and the Llama-7B shapes
    PYTHONPATH=src OUT=. python bench/mma_hot.py sweep      # real and hot over 8192^2 tiles
"""
import importlib.util
import json
import os
import sys

import torch
from binaryllm.bench import _copies, _gpu_time
from binaryllm.export.bits import pack_signs
from binaryllm.kernels import mma_w1a16 as mw

SRC = open(mw.__file__).read()
WOFF = "woff = ((rt * KB + s * KBL + ch) * 32"
CONV = 'return (f"{{ .reg .b32 t; shl.b32 t, $1, {15 - i}; lop3.b32 $0, t, 0x80008000, {pair:#x}, 0x6a; }}")'


def patched(name: str, hot: bool, noconv: bool):
    """A copy of kernels/mma_w1a16.py with the patches, imported as its own module (its own kernel cache)."""
    src = SRC
    if hot:
        assert WOFF in src
        src = src.replace(WOFF, "woff = (((rt % RT) * KB + s * KBL + ch) * 32")      # program 0's row tiles
    if noconv:
        assert CONV in src
        src = src.replace(CONV, 'return f"xor.b32 $0, $1, {pair ^ (i << 3):#x};"')  # a distinct constant a pair
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mma_{name}.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"binaryllm.kernels.mma_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "binaryllm.kernels"
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    sweep = "sweep" in sys.argv[1:]
    mods = {"real": mw, "hot": patched("hot", True, False)}
    if sweep:
        cases = [(8192, 8192, c) for c in (None, (1, 8, 4, 0, 1), (1, 16, 2, 0, 1), (1, 8, 2, 0, 1), (1, 4, 8, 0, 1),
                                           (1, 4, 4, 0, 1, 1, 1), (1, 8, 4, 0, 1, 1, 1), (1, 16, 2, 0, 1, 1, 1),
                                           (1, 16, 1, 0, 1, 1, 1), (1, 8, 2, 0, 1, 1, 1), (2, 8, 2, 0, 1, 1, 1))]
    else:
        mods.update(hot_noconv=patched("hot_noconv", True, True), noconv=patched("noconv", False, True))
        cases = [(8192, 8192, None), (8192, 8192, (1, 4, 4, 0, 1, 4, 1)), (8192, 8192, (1, 4, 4, 0, 1, 4, 0)),
                 (22016, 4096, None), (4096, 11008, None), (12288, 4096, None), (4096, 4096, None)]
    out = {}
    for N, K, cfg in cases:
        n = _copies(N * K // 8, 64)
        tiles = [mw.prepare_tiles(pack_signs(torch.randn(N, K, device="cuda")), K) for _ in range(n)]
        scale = (torch.rand(N, device="cuda") + 0.5).half()
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        row = {}
        for _ in range(2):
            for name, mod in mods.items():
                def chain(mod=mod, tiles=tiles):
                    for t in tiles:
                        mod.mma_matmul(x, t, scale, N, K, config=cfg)
                row.setdefault(name, []).append(round(_gpu_time([chain], iters=5, reps=7) * 1e6 / n, 2))
        key = f"{N}x{K} {cfg or 'default'}"
        out[key] = row
        print(key, row, flush=True)
        del tiles
    name = "mma-hot-sweep.json" if sweep else "mma-hot.json"
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), name), "w"), indent=1)


if __name__ == "__main__":
    main()
