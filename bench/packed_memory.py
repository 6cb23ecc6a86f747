"""Benchmark: RSS added by loading a packed folder and running one forward pass (CPU).

    python bench/packed_memory.py models/x-1bit [--seq 128] [--via load|from_pretrained]

Prints the process RSS before loading (imports only), after loading, and the peak after one forward pass
of ``--seq`` tokens, next to the size of model.safetensors.  ``load`` = binaryllm.load (model + tokenizer),
``from_pretrained`` = AutoModelForCausalLM.from_pretrained after import binaryllm (model only).

transformers maps the safetensors file and the pages of a tensor join the RSS when first touched, i.e. during
the first forward pass, so "while loading" understates the weights: the figure to hold against the issue's
target (peak RAM below 1.3x the packed file plus activations) is the peak after a ``--seq 1`` forward, whose
activations are negligible; larger ``--seq`` shows how activations add to it."""
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
    # ru_maxrss is the process' high-water mark: the baseline must be taken when nothing big was ever allocated
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--via", choices=["load", "from_pretrained"], default="load")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import binaryllm as bl
    from transformers import AutoConfig
    # the baseline includes the model's code: build it once on the meta device (no weights), so that the
    # figures below count what loading the weights costs, not the lazy import of the modeling modules
    with torch.device("meta"):
        cfg = AutoConfig.from_pretrained(a.folder)
        del cfg.quantization_config
        AutoModelForCausalLM.from_config(cfg)
    base = rss_mib()
    t0 = time.time()
    if a.via == "load":
        model, _ = bl.load(a.folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.bfloat16)
    loaded = rss_mib()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, a.seq)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = (Path(a.folder) / "model.safetensors").stat().st_size / 2**20
    print(f"model.safetensors {size:.1f} MiB | via {a.via}: peak +{load_peak - base:.0f} MiB while loading "
          f"({(load_peak - base) / size:.2f}x the file), +{loaded - base:.0f} MiB held after load "
          f"({(loaded - base) / size:.2f}x), peak +{peak - base:.0f} MiB after a {a.seq}-token forward "
          f"(activations and their allocator slack: +{peak - max(load_peak, loaded):.0f} MiB), {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
