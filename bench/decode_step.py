"""The batch-1 decode step alone, without the generation loop around it: compiled, graph-captured steps
(``binaryllm.decode.StaticDecoder``) of random-weight models, each captured once, their graph replays timed in
rotating blocks of 50 (CUDA events) in one process, so that clock drift hits every variant alike (the
``bench decode`` figures, one generate call after another, moved by up to 20% between runs).  CUDA only; results
in docs/RESULTS.md (thirteenth session).

    # packed step with the committed tiles ("default") against other one-row tile tables for the mma kernel,
    # {"name": {"NxK": [RT, warps, CH, FENCE, PDL, CHAINS, XS], ...}, ...}
    PYTHONPATH=src OUT=. python bench/decode_step.py tiles llama-7b 8 variants.json [max_len]
    # the bf16 step against the packed one
    PYTHONPATH=src OUT=. python bench/decode_step.py bf16 llama-7b 6 [max_len]
    # the packed step with the compile pass that makes silu(gate) * up in the gate/up projection's kernel against
    # the step without it (kernels/fusion.py), and with "bf16" the bf16 step too
    PYTHONPATH=src OUT=. python bench/decode_step.py glu llama-7b 6 [max_len [bf16]]
    # every graph pass (gating, and residual add + RMSNorm into the packed kernels) against the gating alone and
    # none
    PYTHONPATH=src OUT=. python bench/decode_step.py passes llama-7b 6 [max_len [bf16]]
    # the rotary embedding and the cache writes made in the attention kernel (the pass fuse_rope) against the step
    # without it, packed and bf16 (the bf16 step takes the same attention); prints the greedy tokens and logits of
    # each arm
    PYTHONPATH=src OUT=. python bench/decode_step.py rope llama-7b 6 [max_len]
    # where the large gated kernel lets the next kernel launch (kernels/mma_w1a16.py TRIG), with or without PDL on
    # its own launch, and optionally the bf16 step (seventeenth session)
    PYTHONPATH=src OUT=. python bench/decode_step.py trigger llama-7b 8 [max_len [bf16]]
    # the step with module constants of kernels/mma_w1a16.py (or attention.NAME, fusion.NAME, bmma.NAME) changed, one
    # variant per argument (NAME=VALUE[,...], a tuple as 1:2:8; gemv=0: the lm_head through cuBLAS; "bf16" adds the
    # bf16 step), against the committed values ("default")
    PYTHONPATH=src OUT=. python bench/decode_step.py consts llama-7b 8 144 EARLY_EPILOGUE=0 [bf16]
    # the rotary angles' one-column matmul as a product (fuse_outer, twenty-second session) against the GEMM
    PYTHONPATH=src OUT=. python bench/decode_step.py outer llama-7b 8 144
    # where the packed step's time goes: ten graph replays under torch.profiler (a synchronize between them); the
    # last step's kernels in order (start, duration, and how far each moved the step's end), and per kernel of a
    # block (labelled by name and its place after the block's attention) the means over the blocks
    PYTHONPATH=src OUT=. python bench/decode_step.py timeline llama-7b 1 144
"""
import json
import os
import statistics
import sys

import torch
import torch._dynamo

from binaryllm import bench
from binaryllm.decode import StaticDecoder
from binaryllm.kernels import mma_w1a16 as mw


def capture(model, max_len: int, gemv: bool | None = None) -> StaticDecoder:
    torch._dynamo.reset()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    dec = StaticDecoder(model, max_len, compile=True, gemv=gemv)
    dec.tokens = dec.generate(ids, 4)[0].tolist()     # compiles the step and runs it at positions 16-18
    dec.step()                                        # the plain step's graph (position 19), which is timed
    return dec


def time_blocks(decs: dict, blocks: int) -> dict:
    us = {}
    labels = list(decs)
    for b in range(blocks):
        for label in labels[b % len(labels):] + labels[:b % len(labels)]:
            g = decs[label]._graph
            for _ in range(3):
                g.replay()
            t = bench._event_time(lambda: [g.replay() for _ in range(50)], 50)
            us.setdefault(label, []).append(round(t * 1e6, 1))
    med = {k: statistics.median(v) for k, v in us.items()}
    return {"us": us, "median_us": med, "step_tok_s": {k: round(1e6 / v, 1) for k, v in med.items()}}


def consts(name: str, blocks: int, max_len: int, variants: dict, bf16: bool) -> dict:
    """The packed step captured once per variant ({label: {NAME: value}}, module constants of kernels/mma_w1a16.py
    or, as attention.NAME, fusion.NAME or bmma.NAME, kernels/attention.py, fusion.py or bmma_w1a16.py, set before
    the capture and restored after; "gemv" 0: the lm_head through cuBLAS, not kernels/dense.py), timed in one
    process with the bf16 step if ``bf16``."""
    from binaryllm.kernels import attention, bmma_w1a16, fusion

    def where(k):
        mod, _, attr = k.rpartition(".")
        return ({"attention": attention, "fusion": fusion, "bmma": bmma_w1a16}[mod] if mod else mw), attr
    model = bench.random_model(name, torch.bfloat16, "cuda").eval()
    bench.random_packed_(model)
    keep = {k: getattr(*where(k)) for v in variants.values() for k in v if k != "gemv"}
    decs = {}
    for label, v in variants.items():
        for k, val in keep.items():
            setattr(*where(k), type(val)(v.get(k, val)))
        decs[label] = capture(model, max_len, bool(v.get("gemv", 1)))       # fixed in the captured graph
        print(label, "tokens", decs[label].tokens, flush=True)
    for k, val in keep.items():
        setattr(*where(k), val)
    if bf16:                # the bf16 step with the lm_head each way the variants run it
        model = None
        for g in sorted({bool(v.get("gemv", 1)) for v in variants.values()}, reverse=True):
            decs["bf16" if g else "bf16,gemv=0"] = capture(bench.random_model(name, torch.bfloat16, "cuda").eval(),
                                                           max_len, g)
    res = {"variants": variants, **time_blocks(decs, blocks)}
    res["speedup_vs_default"] = {k: round(res["median_us"]["default"] / v, 3) for k, v in res["median_us"].items()}
    if bf16:
        res["ratio_bf16"] = {k: round(res["median_us"]["bf16"] / v, 3) for k, v in res["median_us"].items()}
    return res


def timeline(dec: StaticDecoder, steps: int = 10) -> dict:
    """The step's kernels from torch.profiler (CUPTI sees the kernels of a graph replay): the last of ``steps``
    replays, each kernel's start and duration (us, from the step's first kernel) and ``adv``, how far its end moved
    the latest end so far (the advances add up to the step's span); and per kernel of a block, labelled by its name
    and its place counted from the block's attention kernel, the mean duration and advance over the blocks."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec._graph.replay()
            torch.cuda.synchronize()
    evs = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    first, end = 0, evs[0][1]                     # the last step starts after a gap of over 50 us (a synchronize)
    for i in range(1, len(evs)):
        first, end = (i, evs[i][1]) if evs[i][0] - end > 50 else (first, max(end, evs[i][1]))
    evs = evs[first:]
    t0, end, rows, place = evs[0][0], evs[0][0], [], None
    for s, e, n in evs:
        place = 0 if "attn" in n else (None if place is None else place + 1)
        rows.append({"name": n[:60], "start": round(s - t0, 2), "dur": round(e - s, 2),
                     "adv": round(max(e - end, 0.0), 2), "place": place})
        end = max(end, e)
    per = {}
    for r in rows:
        if r["place"] is not None:
            per.setdefault(f"{r['place']}:{r['name'][:40]}", []).append((r["dur"], r["adv"]))
    blocks = {k: {"n": len(v), "dur": round(statistics.mean(d for d, _ in v), 2),
                  "adv": round(statistics.mean(a for _, a in v), 2)} for k, v in per.items()}
    for r in rows:
        print(f"{r['start']:9.2f} {r['dur']:7.2f} {r['adv']:7.2f}  {r['name']}")
    print(json.dumps(blocks, indent=1), flush=True)
    return {"span_us": round(end - t0, 2), "kernels": len(rows), "per_block_place": blocks, "rows": rows}


def main() -> None:
    mode, name, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    decs = {}
    with torch.no_grad():
        if mode == "tiles":
            variants = json.load(open(sys.argv[4]))
            max_len = int(sys.argv[5]) if len(sys.argv) > 5 else 64
            model = bench.random_model(name, torch.bfloat16, "cuda").eval()
            bench.random_packed_(model)
            default = mw.default_config
            for label, table in [("default", None)] + list(variants.items()):
                t = {tuple(map(int, k.split("x"))): tuple(v) for k, v in (table or {}).items()}
                mw.default_config = lambda M, N, K, norm=False, t=t: (t[(N, K)] if M == 1 and (N, K) in t
                                                                     else default(M, N, K, norm))
                decs[label] = capture(model, max_len)       # the tiles are fixed in the captured graph
            mw.default_config = default
            res = {"variants": variants, **time_blocks(decs, blocks)}
            res["speedup_vs_default"] = {k: round(res["median_us"]["default"] / v, 3)
                                         for k, v in res["median_us"].items()}
        elif mode == "bf16":
            max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 144
            for label in ("bf16", "packed"):
                model = bench.random_model(name, torch.bfloat16, "cuda").eval()
                if label == "packed":
                    bench.random_packed_(model)
                decs[label] = capture(model, max_len)
            res = time_blocks(decs, blocks)
            res["ratio"] = round(res["median_us"]["bf16"] / res["median_us"]["packed"], 3)
        elif mode in ("glu", "passes"):
            # glu: the gating pass alone against no pass; passes: every graph pass (kernels/fusion.py) against
            # the gating pass alone and none
            max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 144
            import binaryllm.decode as decode
            real = decode.compile_options
            model = bench.random_model(name, torch.bfloat16, "cuda").eval()
            bench.random_packed_(model)
            variants = {"glu": (True, False), "no-glu": (False, False)} if mode == "glu" else \
                {"all": (True, True), "glu": (True, False), "none": (False, False)}
            for label, (glu, norm) in variants.items():
                decode.compile_options = lambda tune=False, glu=glu, norm=norm: real(tune, glu=glu, norm=norm)
                decs[label] = capture(model, max_len)
                p = decs[label].compile_options.get("post_grad_custom_post_pass")
                print(label, "rewrites", p.counts if p is not None else None, flush=True)
            decode.compile_options = real
            if "bf16" in sys.argv[5:]:
                decs["bf16"] = capture(bench.random_model(name, torch.bfloat16, "cuda").eval(), max_len)
            res = time_blocks(decs, blocks)
            base = "no-glu" if mode == "glu" else "none"
            res["speedup_vs_" + base] = {k: round(res["median_us"][base] / v, 3) for k, v in res["median_us"].items()}
            if "bf16" in decs:
                res["ratio_bf16"] = {k: round(res["median_us"]["bf16"] / res["median_us"][k], 3) for k in variants}
        elif mode == "outer":
            # the rotary angles' one-column matmul as a product (kernels/fusion.py fuse_outer) against the GEMM
            max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 144
            import binaryllm.decode as decode
            real = decode.compile_options
            model = bench.random_model(name, torch.bfloat16, "cuda").eval()
            bench.random_packed_(model)
            out = {}
            for label, outer in (("outer", True), ("no-outer", False)):
                decode.compile_options = lambda tune=False, o=outer: real(tune, outer=o)
                decs[label] = capture(model, max_len)
                out[label] = decs[label].out.float().clone()
                p = decs[label].compile_options.get("post_grad_custom_post_pass")
                print(label, "rewrites", p.counts, "tokens", decs[label].tokens, flush=True)
            decode.compile_options = real
            print("same logits:", torch.equal(out["outer"], out["no-outer"]), flush=True)
            res = time_blocks(decs, blocks)
            res["speedup_vs_no-outer"] = round(res["median_us"]["no-outer"] / res["median_us"]["outer"], 4)
        elif mode == "rope":
            max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 144
            import binaryllm.decode as decode
            real = decode.compile_options
            out = {}
            for kind in ("packed", "bf16"):
                model = bench.random_model(name, torch.bfloat16, "cuda").eval()
                if kind == "packed":
                    bench.random_packed_(model)
                for rope in (True, False):
                    label = kind + ("" if rope else "-norope")
                    decode.compile_options = lambda tune=False, r=rope: real(tune, rope=r)
                    decs[label] = capture(model, max_len)
                    p = decs[label].compile_options.get("post_grad_custom_post_pass")
                    out[label] = decs[label].out.float().clone()
                    print(label, "rewrites", p.counts if p is not None else None, "tokens", decs[label].tokens,
                          flush=True)
                diff = (out[kind] - out[kind + "-norope"]).abs().max().item()
                print(kind, "logits max |diff| with and without", diff, "of max", out[kind].abs().max().item(),
                      flush=True)
                model = None
            decode.compile_options = real
            res = time_blocks(decs, blocks)
            res["speedup_vs_norope"] = {k: round(res["median_us"][k + "-norope"] / res["median_us"][k], 3)
                                        for k in ("packed", "bf16")}
            res["ratio_bf16"] = {k: round(res["median_us"]["bf16" + k] / res["median_us"]["packed" + k], 3)
                                 for k in ("", "-norope")}
        elif mode in ("trigger", "consts"):
            # consts: module constants of kernels/mma_w1a16.py (attention.NAME, fusion.NAME) per variant,
            # from the arguments; trigger: where the large gated kernel (Llama-7B's gate/up) lets the down projection
            # launch, and whether it is launched with PDL itself (GATED_PDL, TRIGGER, GATED_TRIGGER)
            max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 144
            if mode == "trigger":
                variants = {"gate/up no trigger": (0, 1, 0), "gate/up trigger after wait": (0, 1, 1),
                            "gate/up trigger after loop": (0, 1, 2), "gate/up PDL, trigger after wait": (1, 1, 1),
                            "gate/up PDL, trigger after loop": (1, 1, 2), "every trigger after loop": (0, 2, 2)}
                variants = {k: dict(zip(("GATED_PDL", "TRIGGER", "GATED_TRIGGER"), v)) for k, v in variants.items()}
            else:
                variants = {a: {k: tuple(map(int, v.split(":"))) if ":" in v else int(v)
                                for k, v in (kv.split("=") for kv in a.split(","))}
                            for a in sys.argv[5:] if a != "bf16"}
            res = consts(name, blocks, max_len, {"default": {}, **variants}, "bf16" in sys.argv[5:])
        elif mode == "timeline":
            max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 144
            model = bench.random_model(name, torch.bfloat16, "cuda").eval()
            bench.random_packed_(model)
            res = timeline(capture(model, max_len))
        else:
            raise SystemExit(f"mode {mode!r} is not tiles, bf16, glu, passes, outer, rope, trigger, consts or timeline")
    res.update(model=name, max_len=max_len, device=torch.cuda.get_device_name())
    print(json.dumps({k: v for k, v in res.items() if k not in ("us", "rows")}), flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"decode_step-{mode}-{name}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
