"""Benchmark: RSS added by loading a packed folder and running one forward pass (CPU).

    python bench/packed_memory.py models/x-1bit [--seq 128] [--via load|from_pretrained]

Prints the process RSS before loading (imports only), after loading, and the peak after one forward pass
of ``--seq`` tokens, next to the size of model.safetensors.  ``load`` = binaryllm.load (model + tokenizer),
``from_pretrained`` = AutoModelForCausalLM.from_pretrained after import binaryllm (model only)."""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--via", choices=["load", "from_pretrained"], default="load")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import binaryllm as bl
    base = rss_mib()
    t0 = time.time()
    if a.via == "load":
        model, _ = bl.load(a.folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.bfloat16)
    loaded = rss_mib()
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, a.seq)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = (Path(a.folder) / "model.safetensors").stat().st_size / 2**20
    print(f"model.safetensors {size:.1f} MiB | via {a.via}: +{loaded - base:.0f} MiB after load "
          f"({(loaded - base) / size:.2f}x the file), peak +{peak - base:.0f} MiB after a {a.seq}-token forward, "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
