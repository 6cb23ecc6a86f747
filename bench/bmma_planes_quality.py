"""What writing x as P bit planes (``kernels/bmma_w1a16.py``: one power-of-two scale a row, q = rint(x 2^sh),
|q| < 2^(P-1)) costs a real model: every linear layer of the transformer blocks of SmolLM2-135M (full precision,
the dequantized GGUF) sees its input rounded to bf16 and then to the P-bit grid of its row, against the same model
with the inputs rounded to bf16 only (what the ``mma`` kernel reads).  Reports the held-out perplexity (the default
corpus' test split, non-overlapping windows) and how often the next-token argmax changes.  CPU is enough.

    PYTHONPATH=src python bench/bmma_planes_quality.py [windows] [seq_len]     # ./bmma_planes_quality.json
"""
import json
import math
import os
import sys

import torch

from binaryllm.eval.run import _ppl_tokens
from binaryllm.models import load_model


def to_grid(x: torch.Tensor, planes: int) -> torch.Tensor:
    """x (..., K) -> bf16, then each row to its P-bit grid (the prep kernel's q 2^-sh), back in x's dtype."""
    xb = x.bfloat16().float()
    if planes == 0:
        return xb.to(x.dtype)
    m = xb.abs().amax(-1, keepdim=True)
    e = torch.where(m >= 2.0 ** -126, torch.frexp(m).exponent, torch.full_like(m, -126, dtype=torch.int32))
    sh = torch.clamp(planes - 1 - e, max=127).double()
    p2 = torch.exp2(sh)                                       # exact: integer powers of two
    return (torch.round(xb.double() * p2) / p2).to(x.dtype)


def main(windows: int = 16, seq_len: int = 512) -> None:
    model, tok, src = load_model("")
    model.eval()
    ids = _ppl_tokens("default-test", tok)[: windows * seq_len].view(windows, seq_len)
    planes = {"p": 0}
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for m in layers:
        m.register_forward_pre_hook(lambda mod, args: (to_grid(args[0], planes["p"]),))
    res = {"model": src.description, "layers": len(layers), "windows": windows, "seq_len": seq_len}
    ref_top = None
    for p in (0, 32, 24, 16, 12):
        planes["p"] = p
        nll, top = 0.0, []
        with torch.no_grad():
            for w in ids:
                logits = model(w[None]).logits[0].float()
                nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
                top.append(logits.argmax(-1))
        top = torch.cat(top)
        ref_top = top if p == 0 else ref_top
        key = "bf16 inputs" if p == 0 else f"P = {p}"
        res[key] = {"ppl": round(math.exp(nll / (windows * (seq_len - 1))), 4),
                    "argmax_changed": round(float((top != ref_top).float().mean()), 5)}
        print(key, res[key], flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "bmma_planes_quality.json"), "w"), indent=1)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
