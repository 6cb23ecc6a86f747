"""The GGUF export run by llama.cpp (llama-cpp-python) against our packed PyTorch model, on held-out text.

    python3 bench/gguf_logits.py models/x-1bit [--out x.gguf] [--windows 4] [--seq-len 256]

Exports the packed folder (default row types), then on ``--windows`` windows of the default corpus' test split
compares next-token logits (max |difference|, its size against the logit range, top-1 agreement) and the
perplexity each runtime gives on the same tokens.  Also times llama.cpp's batch-1 decode on this CPU.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed")
    ap.add_argument("--out", default=None, help="GGUF path (default: a temporary file)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="q1_0,q2_0,q4_0,f16")
    a = ap.parse_args()

    import binaryllm
    from binaryllm.data.default import default_corpus
    from binaryllm.export.gguf import export_gguf
    from llama_cpp import Llama

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp()) / "model.gguf"
    t0 = time.time()
    rep = export_gguf(a.packed, out, types=a.types.split(","))
    export_s = time.time() - t0
    model, tok = binaryllm.load(a.packed, dtype=torch.float32)
    text = "\n\n".join(json.loads(line)["text"] for line in open(default_corpus()["test"]))
    ids_all = tok(text[: 200_000]).input_ids
    llm = Llama(str(out), logits_all=True, n_ctx=a.seq_len, n_threads=a.threads, verbose=False)
    diffs, rel, agree, nll_ours, nll_theirs, n = [], [], [], 0.0, 0.0, 0
    try:
        for w in range(a.windows):
            ids = ids_all[w * a.seq_len: (w + 1) * a.seq_len]
            llm.reset()
            llm.eval(ids)
            theirs = torch.tensor(np.array(llm.scores[: len(ids)], dtype=np.float32))
            with torch.no_grad():
                mine = model(input_ids=torch.tensor([ids])).logits[0].float()
            d = (theirs - mine).abs().max().item()
            diffs.append(d)
            rel.append(d / mine.abs().max().item())
            agree.append((theirs.argmax(-1) == mine.argmax(-1)).float().mean().item())
            tgt = torch.tensor(ids[1:])
            nll_ours += torch.nn.functional.cross_entropy(mine[:-1], tgt, reduction="sum").item()
            nll_theirs += torch.nn.functional.cross_entropy(theirs[:-1], tgt, reduction="sum").item()
            n += len(ids) - 1
        # batch-1 decode speed of llama.cpp on this machine
        llm.reset()
        prompt = ids_all[:16]
        llm.eval(prompt)
        t0 = time.time()
        steps = 64
        tok_id = prompt[-1]
        for _ in range(steps):
            llm.eval([tok_id])
            tok_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode_tps = steps / (time.time() - t0)
    finally:
        llm.close()
    res = {"packed": str(a.packed), "gguf_bytes": rep["file_bytes"], "types": rep["types"],
           "binary_bits_per_weight": rep["binary_bits_per_weight"], "dense_fallback": len(rep["dense_fallback"]),
           "export_s": round(export_s, 2), "windows": a.windows, "seq_len": a.seq_len,
           "max_abs_logit_diff": round(max(diffs), 4), "max_rel_logit_diff": round(max(rel), 4),
           "top1_agreement": round(float(np.mean(agree)), 4),
           "ppl_ours": round(float(np.exp(nll_ours / n)), 3), "ppl_llama_cpp": round(float(np.exp(nll_theirs / n)), 3),
           "llama_cpp_decode_tok_s": round(decode_tps, 1), "threads": a.threads}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
