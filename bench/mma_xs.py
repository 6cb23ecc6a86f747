"""Batch-1 tile sweep of the mma kernel with and without XS (the activation row read once into shared memory
instead of each round's K slice loaded into registers from global memory).  Back to back in one CUDA graph,
weights cycled past the L2 cache (as ``bench kernels``), every output checked against the dense reference
first.  CUDA only; results in docs/RESULTS.md (thirteenth session).

    # writes ./mma_xs_<set>.json
    PYTHONPATH=src OUT=. python bench/mma_xs.py large|chains|small|stream|cls_tiles|consts|cls|cls8192
"""
import json
import os
import sys

import torch

from binaryllm.bench import _copies, _gpu_time, _rel_err
from binaryllm.export.bits import pack_signs, unpack_signs
from binaryllm.kernels import mma_w1a16 as mw

SETS = {
    "large": ([(8192, 8192), (4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (16384, 16384)],
              [None, (1, 4, 4, 0, 1), (2, 4, 2, 1, 1), (4, 8, 4, 1, 1),
               (1, 4, 4, 0, 1, 1, 1), (2, 4, 4, 1, 1, 1, 1), (2, 8, 4, 1, 1, 1, 1), (4, 8, 4, 1, 1, 1, 1),
               (4, 8, 4, 0, 1, 1, 1), (4, 8, 2, 1, 1, 1, 1), (2, 4, 8, 1, 1, 1, 1), (1, 8, 4, 0, 1, 1, 1),
               (4, 16, 2, 1, 1, 1, 1), (2, 8, 2, 1, 1, 1, 1)]),
    "chains": ([(8192, 8192), (4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (16384, 16384)],
               [None, (1, 4, 4, 0, 1, 1, 1), (2, 4, 4, 1, 1, 1, 1), (1, 8, 4, 0, 1, 1, 1),
                (1, 4, 4, 0, 1, 4, 1), (1, 4, 8, 0, 1, 4, 1), (1, 4, 8, 1, 1, 1, 1), (1, 4, 8, 1, 1, 4, 1),
                (2, 4, 4, 1, 1, 4, 1), (2, 4, 8, 1, 1, 4, 1), (1, 8, 4, 0, 1, 4, 1), (1, 8, 2, 0, 1, 4, 1),
                (2, 8, 4, 1, 1, 4, 1), (1, 2, 8, 0, 1, 4, 1), (1, 4, 2, 0, 1, 4, 1)]),
    # twenty-first session: a warp's whole K slice in one round (every weight load issued before the PDL wait), one
    # chain, no fence (each k-group's tensor-core ops wait for its own words only), against the same with the fence
    "stream": ([(8192, 8192), (16384, 16384), (22016, 4096), (12288, 4096), (4096, 11008)],
               [None, (1, 4, 8, 0, 1, 1, 1), (1, 4, 8, 1, 1, 1, 1), (2, 4, 8, 0, 1, 1, 1), (2, 8, 4, 0, 1, 1, 1),
                (1, 2, 8, 0, 1, 1, 1), (2, 2, 8, 0, 1, 1, 1), (1, 8, 8, 0, 1, 1, 1), (2, 8, 8, 0, 1, 1, 1)]),
    "small": ([(960, 576), (576, 576), (3072, 576), (576, 1536)],
              [None, (1, 4, 2, 0, 1, 4), (1, 4, 2, 0, 1, 4, 1), (1, 2, 2, 0, 1, 4, 1), (1, 8, 2, 0, 1, 4, 1),
               (1, 4, 2, 0, 1, 1, 1), (2, 4, 2, 0, 1, 4, 1), (1, 4, 1, 0, 1, 4, 1), (1, 2, 4, 0, 1, 4, 1)]),
}
# twenty-fifth session: with the class conversion on (the default since then; T summed late), the one-chain tiles of
# "stream" again at the MID sizes that take it: 8192^2 needs 5.90 us for 8x that session's cuBLAS (47.19 us)
SETS["cls_tiles"] = ([(8192, 8192), (22016, 4096)], SETS["stream"][1])


# twenty-second session: the same tiles under other module constants of kernels/mma_w1a16.py (where a plain kernel
# lets the next one launch, the weight rounds it loads before its PDL wait, the early epilogue loads): which of the
# changes since the thirteenth session took the XS 1x4x8 tile at 8192^2 from 6.7 to 9.8 us
CONSTS = ([(8192, 8192), (16384, 16384), (4096, 4096)], [None, (1, 4, 8, 1, 1, 1, 1), (1, 4, 4, 0, 1)],
          [{}, {"PRE_ROUNDS": 0}, {"TRIGGER": 0}, {"TRIGGER": 2}, {"EARLY_EPILOGUE": 0},
           {"PRE_ROUNDS": 0, "TRIGGER": 0}])


# twenty-third session: the class conversion (CLASS_CONV; T summed late: CLASS_T_LATE) and the late row scales of
# the MID range (EARLY_EPILOGUE_MID), each on and off, on the one-chain XS tiles they apply to
CLS = ([(8192, 8192), (22016, 4096)], [None, (1, 4, 8, 0, 1, 1, 1)],
       [{}, {"CLASS_CONV": 1}, {"CLASS_CONV": 1, "CLASS_T_LATE": 1}, {"EARLY_EPILOGUE_MID": 3},
        {"CLASS_CONV": 1, "EARLY_EPILOGUE_MID": 3}])


# the same at 8192^2 and its default tile only, without the last variant (a short call)
CLS_8192 = (CLS[0][:1], CLS[1][:1], CLS[2][:4])


def main(which: str) -> None:
    if which in ("consts", "cls", "cls8192"):
        shapes, configs, variants = {"consts": CONSTS, "cls": CLS, "cls8192": CLS_8192}[which]
        res = {"device": torch.cuda.get_device_name(), "variants": variants, "rows": {}}
        keep = {k: getattr(mw, k) for v in variants for k in v}
        for v in variants:
            print(v or "committed", flush=True)
            for k, val in keep.items():
                setattr(mw, k, v.get(k, val))
            res["rows"][",".join(f"{k}={x}" for k, x in v.items()) or "committed"] = run(shapes, configs)
        for k, val in keep.items():
            setattr(mw, k, val)
    else:
        res = {"device": torch.cuda.get_device_name(), "rows": run(*SETS[which])}
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"mma_xs_{which}.json"), "w"), indent=1)


def case(N: int, K: int, dev: str = "cuda"):
    """(tiles, row scales, x, dense reference of the first tiles, generator, packed sign bits of every copy) of an
    (N, K) matrix at batch 1: enough random copies of the weights to cycle past the L2 cache, seeded by the shape."""
    n = _copies(N * K // 8, 64)
    g = torch.Generator(device=dev).manual_seed(N + K)
    bits = [pack_signs(torch.randn(N, K, device=dev, generator=g)) for _ in range(n)]
    ts = [mw.prepare_tiles(b, K) for b in bits]
    sc = (torch.rand(N, device=dev, generator=g) + 0.5).half()
    x = torch.randn(1, K, device=dev, generator=g).to(torch.bfloat16)
    return ts, sc, x, (x.float() @ unpack_signs(bits[0], K, torch.float32).t()) * sc.float(), g, bits


def bf16_us(x: torch.Tensor, N: int, K: int, g: torch.Generator) -> float:
    """cuBLAS bf16 ``linear`` of x with random (N, K) weights, µs a call: back to back in one CUDA graph, enough
    copies of the weights to cycle past L2 (the probes' baseline in the same process)."""
    dense = [torch.randn(N, K, device=x.device, dtype=torch.bfloat16, generator=g)
             for _ in range(_copies(N * K * 2, 8))]
    return round(_gpu_time([lambda: [torch.nn.functional.linear(x, w) for w in dense]], 5, 7) * 1e6 / len(dense), 2)


def each_spec(res: dict, specs, measure, filename: str) -> dict:
    """res[spec] = measure(spec) for every spec (FAIL and the error where it raises), each row printed; then res
    to ./``filename`` (in $OUT)."""
    for spec in specs:
        try:
            res[spec] = measure(spec)
        except Exception as e:
            res[spec] = f"FAIL {type(e).__name__}: {str(e)[:300]}"
        print(spec, res[spec], flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), filename), "w"), indent=1)
    return res


def probe_specs(name: str, specs, ints: int, flag_names, measure) -> dict:
    """The batch-1 probes' driver (lut_probe, bmma_probe).  A spec is "NxK" then ``ints`` integer tile fields, then
    optionally comma-separated integer flags named by ``flag_names``, all joined by ":".  Per shape: ``case`` and
    its cuBLAS bf16 and ``mma`` baselines, once; per spec: ``measure(N, K, tile, flags, case, row)``, stored under
    "<name> <tile>[ <flags>]" (FAIL and the error where it raises).  Every row is printed; ./<name>_probe.json
    (in $OUT)."""
    res = {"device": torch.cuda.get_device_name()}
    for spec in specs:
        shape, *f = spec.split(":")
        N, K = map(int, shape.split("x"))
        tile = [int(v) for v in f[:ints]]
        flags = dict(zip(flag_names, map(int, f[ints].split(",")))) if len(f) > ints else {}
        key = f"{name} " + ":".join(f[:ints]) + (f" {f[ints]}" if len(f) > ints else "")
        row = res.setdefault(shape, {})
        c = case(N, K)
        ts, sc, x, ref, g, bits = c
        if "bf16" not in row:
            row["bf16"] = bf16_us(x, N, K, g)
            row["mma"] = round(_gpu_time([lambda: [mw.mma_matmul(x, t, sc, N, K) for t in ts]], 5, 7) * 1e6 / len(ts),
                               2)
        try:
            row[key] = measure(N, K, tile, flags, c, row)
        except Exception as e:
            row[key] = f"FAIL {type(e).__name__}: {str(e)[:300]}"
        print(shape, row, flush=True)
        ts.clear()
        bits.clear()
        torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"{name}_probe.json"), "w"), indent=1)
    return res


def run(shapes, configs) -> dict:
    out = {}
    for N, K in shapes:
        ts, sc, x, ref, *_ = case(N, K)
        n = len(ts)
        row = {}
        for rep in range(2):
            for cfg in configs:
                key = "default" if cfg is None else ",".join(map(str, cfg))
                if isinstance(row.get(key), str):          # wrong or failed on the first pass
                    continue
                try:
                    if rep == 0:
                        err = _rel_err(mw.mma_matmul(x, ts[0], sc, N, K, config=cfg), ref)
                        if err > 1e-2:
                            row[key] = f"WRONG {err:.3g}"
                            continue

                    def chain(cfg=cfg, ts=ts):
                        for t in ts:
                            mw.mma_matmul(x, t, sc, N, K, config=cfg)
                    row.setdefault(key, []).append(round(_gpu_time([chain], iters=5, reps=7) * 1e6 / n, 2))
                except Exception as e:  # a tile that does not build on this shape
                    row[key] = f"FAIL {type(e).__name__}: {str(e)[:160]}"
        print(f"{N}x{K}", row, flush=True)
        out[f"{N}x{K}"] = row
        del ts
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "large")
