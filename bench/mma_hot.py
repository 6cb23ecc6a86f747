"""How much of the mma kernel's time is left when its weights cost no HBM traffic?  Patched copies of the kernel
source: "hot" makes every program read program 0's weight tiles (L1/L2 hits; wrong values), "noconv" replaces the
shl + lop3 (or, with the class conversion, the lop3 of a shifted word) that turn each pair of sign bits into a
register of the A operand by one xor (wrong values), "hot_noconv" both.  With CLASS_CONV=1 in the environment
every arm has the kernel's class conversion on (CLASS_CONV in kernels/mma_w1a16.py), and "sign" / "hot_sign" are
the kernel without it (eighteenth session).
Back-to-back batch-1 timings (weights cycled past the L2 cache), all in one process.  CUDA only; results in
docs/RESULTS.md (seventeenth session).

    PYTHONPATH=src OUT=. python bench/mma_hot.py            # default tiles of 8192^2 and the Llama-7B shapes
    PYTHONPATH=src OUT=. python bench/mma_hot.py sweep      # real and hot over 8192^2 tiles
    CLASS_CONV=1 PYTHONPATH=src OUT=. python bench/mma_hot.py   # the class conversion against the sign one
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
CONV = 'return f"{{ .reg .b32 t; shl.b32 t, $1, {15 - i}; lop3.b32 $0, t, 0x80008000, {pair:#x}, 0x6a; }}"'
CLASS = "CLASS_CONV = False"
CONV_CLS = 'return f"lop3.b32 $0, $1, {mask:#x}, {const:#x}, {lut:#x};"'


def patched(name: str, hot: bool, noconv: bool, cls: bool = False):
    """A copy of kernels/mma_w1a16.py with the patches, imported as its own module (its own kernel cache); ``cls``:
    with CLASS_CONV on."""
    src = SRC
    if cls:
        assert CLASS in src
        src = src.replace(CLASS, "CLASS_CONV = True")
    if hot:
        assert WOFF in src
        src = src.replace(WOFF, "woff = (((rt % RT) * KB + s * KBL + ch) * 32")      # program 0's row tiles
    if noconv:
        assert CONV in src and CONV_CLS in src
        src = src.replace(CONV, 'return f"xor.b32 $0, $1, {pair ^ (i << 3):#x};"')  # a distinct constant a pair
        src = src.replace(CONV_CLS, 'return f"xor.b32 $0, $1, {const ^ (c << 3):#x};"')
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mma_{name}.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"binaryllm.kernels.mma_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "binaryllm.kernels"
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    sweep = "sweep" in sys.argv[1:]
    cls = bool(os.environ.get("CLASS_CONV"))          # the kernel with its class conversion on, against "sign"
    mw.CLASS_CONV = cls
    mods = {"real": mw, "hot": patched("hot", True, False, cls)}
    if sweep:
        cases = [(8192, 8192, c) for c in (None, (1, 8, 4, 0, 1), (1, 16, 2, 0, 1), (1, 8, 2, 0, 1), (1, 4, 8, 0, 1),
                                           (1, 4, 4, 0, 1, 1, 1), (1, 8, 4, 0, 1, 1, 1), (1, 16, 2, 0, 1, 1, 1),
                                           (1, 16, 1, 0, 1, 1, 1), (1, 8, 2, 0, 1, 1, 1), (2, 8, 2, 0, 1, 1, 1))]
    else:
        mods.update(hot_noconv=patched("hot_noconv", True, True, cls), noconv=patched("noconv", False, True, cls))
        if cls:
            mods.update(sign=patched("sign", False, False), hot_sign=patched("hot_sign", True, False))
        cases = [(8192, 8192, None), (8192, 8192, (1, 4, 4, 0, 1, 4, 1)), (8192, 8192, (1, 4, 4, 0, 1, 4, 0)),
                 (8192, 8192, (1, 8, 2, 0, 1, 4, 1)), (8192, 8192, (2, 4, 2, 0, 1, 1, 1)),
                 (8192, 8192, (2, 2, 8, 0, 1, 1, 1)), (22016, 4096, None), (4096, 11008, None), (12288, 4096, None),
                 (4096, 4096, None)]
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
    name = "mma-hot-sweep.json" if sweep else "mma-hot-class.json" if cls else "mma-hot.json"
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), name), "w"), indent=1)


if __name__ == "__main__":
    main()
