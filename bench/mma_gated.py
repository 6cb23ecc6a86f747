"""The gated epilogue of the mma kernel (paired tiles, silu(gate) * up made in the gate/up kernel) alone and in a
gate/up -> down chain, against the plain kernel: batch 1, back to back in one CUDA graph, weights cycled past the
L2 cache (as ``bench kernels``), outputs checked first.  CUDA only; results in docs/RESULTS.md (fourteenth
session).

    PYTHONPATH=src OUT=. python bench/mma_gated.py            # writes ./mma_gated.json
"""
import json
import os

import torch

from binaryllm.bench import _copies, _gpu_time, _rel_err
from binaryllm.export.bits import pack_signs, unpack_signs
from binaryllm.kernels import mma_w1a16 as mw
from binaryllm.kernels import silu_mul

MLPS = {"llama-7b": (4096, 11008), "smollm2-135m": (576, 1536)}


def main() -> None:
    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "rows": {}}
    for name, (D, P) in MLPS.items():
        n = _copies((2 * P * D + D * P) // 8, 64)
        g = torch.Generator(device=dev).manual_seed(P)
        gu_bits = [pack_signs(torch.randn(2 * P, D, device=dev, generator=g)) for _ in range(n)]
        dn_bits = [pack_signs(torch.randn(D, P, device=dev, generator=g)) for _ in range(n)]
        plain = [mw.prepare_tiles(b, D) for b in gu_bits]
        paired = [mw.prepare_tiles(b, D, pairs=P) for b in gu_bits]
        down = [mw.prepare_tiles(b, P) for b in dn_bits]
        s_gu = (torch.rand(2 * P, device=dev, generator=g) + 0.5).half()
        s_dn = (torch.rand(D, device=dev, generator=g) + 0.5).half()
        x = torch.randn(1, D, device=dev, generator=g).to(torch.bfloat16)
        ref = silu_mul(((x.float() @ unpack_signs(gu_bits[0], D).t()) * s_gu.float()).to(x.dtype), P)
        err = _rel_err(mw.mma_matmul(x, paired[0], s_gu, 2 * P, D, pairs=P, gated=True), ref.float())
        assert err < 1e-2, err
        h = ref.contiguous()

        def gu_plain():
            for t in plain:
                mw.mma_matmul(x, t, s_gu, 2 * P, D)

        def gu_gated():
            for t in paired:
                mw.mma_matmul(x, t, s_gu, 2 * P, D, pairs=P, gated=True)

        def chain_plain():      # gate/up, then down on a fixed input: two kernels, no gating (its lower bound)
            for t, d in zip(plain, down):
                mw.mma_matmul(x, t, s_gu, 2 * P, D)
                mw.mma_matmul(h, d, s_dn, D, P)

        def chain_gated():      # gated gate/up, then down on its output
            for t, d in zip(paired, down):
                mw.mma_matmul(mw.mma_matmul(x, t, s_gu, 2 * P, D, pairs=P, gated=True), d, s_dn, D, P)

        row = {}
        for rep in range(3):
            for label, fn in (("gate_up plain", gu_plain), ("gate_up gated", gu_gated),
                              ("chain plain (no gating)", chain_plain), ("chain gated", chain_gated)):
                row.setdefault(label, []).append(round(_gpu_time([fn], iters=5, reps=7) * 1e6 / n, 2))
        print(name, row, flush=True)
        res["rows"][name] = row
        torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "mma_gated.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
