"""What the generation loop around the decode step costs, in one process: one compiled step of a random-weight
model (packed, or bf16 with "bf16"), captured once, and the same greedy steps run several ways, timed by the host
clock from the first launch to the last token on the device (as a caller of ``generate`` sees them):

* ``host``: the loop ``generate`` had before chunks (twentieth session and earlier): per token an argmax, a copy of
  the token and a fill of the position launched from Python, and one replay of the plain step's graph;
* ``greedy1``: ``StaticDecoder.greedy(1)`` per token: one replay of a graph that holds the step, the argmax and
  the feedback of the token and the position;
* ``greedyK`` for each K given: ``greedy(K)``, K steps per replay (``generate``'s default chunk is 8);
* ``greedy1-torch``, ``greedyK-torch``: the same with ``torch.argmax`` and three copies after each step's logits,
  as before the one-kernel pick (``kernels/pick.py``, twenty-second session);
* ``step``: the plain step's graph replayed back to back (no argmax, no feedback: the floor).

Every loop starts at the same token and position and must give the same tokens.  Blocks of the loops rotate, and
the medians are reported.  CUDA only; results in docs/RESULTS.md (twenty-first session).

    PYTHONPATH=src OUT=. python bench/decode_loop.py llama-7b packed 8 4 24     # each K must divide 120
"""
import json
import os
import statistics
import sys
import time

import torch
import torch._dynamo

from binaryllm import bench
from binaryllm.decode import StaticDecoder

STEPS, PROMPT, MAX_LEN = 120, 16, 144          # positions 16..135 of a cache of 144 (bench decode's)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-7b"
    kind = sys.argv[2] if len(sys.argv) > 2 else "packed"
    ks = [int(k) for k in sys.argv[3:]] or [8]
    if any(STEPS % k for k in ks):
        raise SystemExit(f"every K must divide {STEPS}")
    torch._dynamo.reset()
    model = bench.random_model(name, torch.bfloat16, "cuda").eval()
    if kind == "packed":
        bench.random_packed_(model)
    dec = StaticDecoder(model, MAX_LEN, compile=True, chunk=max(ks))
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    first = dec.generate(ids, 2)[:, :1]             # compiles the step; the prefill's token starts every loop

    def start():
        dec.ids.copy_(first)
        dec.pos.fill_(PROMPT)

    def host():
        nxt, toks = first[:, 0], []
        for i in range(STEPS):
            dec.ids.copy_(nxt[:, None])
            dec.pos.fill_(PROMPT + i)
            nxt = dec.step().argmax(-1)
            toks.append(nxt)
        return torch.stack(toks, 1)

    kinds = {"": (dec._pick, {}), "-torch": (None, {})}     # the one-kernel pick (kernels/pick.py), or argmax + copies

    def greedy(k, how=""):
        def run():
            dec._pick, dec._greedy = kinds[how]                  # each way keeps its own captured graphs
            return torch.cat([dec.greedy(k).clone() for _ in range(STEPS // k)], 1)
        return run

    def step():
        for _ in range(STEPS):
            dec._graph.replay()

    loops = {"host": host, **{f"greedy{k}{how}": greedy(k, how) for k in sorted({1, *ks})
                              for how in (kinds if dec._pick is not None else [""])}, "step": step}
    tokens = {}
    for label, fn in loops.items():              # captures each graph, and checks the tokens
        start()
        out = fn()
        if out is not None:
            tokens[label] = out
    ref = tokens["host"]
    same = {k: bool(torch.equal(v, ref)) for k, v in tokens.items()}
    print("same tokens as host:", same, flush=True)
    us = {}
    labels = list(loops)
    for b in range(7):
        for label in labels[b % len(labels):] + labels[:b % len(labels)]:
            start()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loops[label]()
            torch.cuda.synchronize()
            us.setdefault(label, []).append(round((time.perf_counter() - t0) * 1e6 / STEPS, 1))
    med = {k: statistics.median(v) for k, v in us.items()}
    res = {"model": name, "kind": kind, "steps": STEPS, "max_len": MAX_LEN, "device": torch.cuda.get_device_name(),
           "same_tokens": same, "us_per_token": us, "median_us": med,
           "tok_s": {k: round(1e6 / v, 1) for k, v in med.items()}}
    for k, v in med.items():
        print(f"{k:10s} {v:9.1f} us/token {1e6 / v:9.1f} tok/s", flush=True)
    out = os.path.join(os.environ.get("OUT", "."), f"decode-loop-{name}-{kind}.json")
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
