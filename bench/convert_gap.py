"""Benchmark: what CPT, its final hard-sign phase and the baselines give on SmolLM2-135M at a fixed budget.

Variants are the methods of ``binaryllm compare`` (``binaryllm.compare.METHODS``) plus ``fp-ref``, the
pre-trained model evaluated as it is.  For each variant it runs ``binaryllm convert`` (resuming a run folder that is already there), then measures
held-out perplexity (the default corpus' ``test`` split, never trained or tuned on) of the frozen 1-bit
model, the validation losses with F at the final t and with hard sign (the sign-substitution gap), and the
training throughput.  Usage (GPU):

    python bench/convert_gap.py --runs runs/gap --tokens 5M --variants fp-ref,cpt,cpt-nohard --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import binaryllm as bl  # noqa: E402
from binaryllm import config as C  # noqa: E402
from binaryllm.compare import method_config  # noqa: E402
from binaryllm.data import default_corpus, to_blocks, tokenize_sources  # noqa: E402
from binaryllm.eval import perplexity  # noqa: E402
from binaryllm.models import load_model  # noqa: E402
from binaryllm.train.loop import autocast_for, resolve_device  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "h100.yaml"))
    ap.add_argument("--tokens", default="5M")
    ap.add_argument("--variants", default="fp-ref,cpt,cpt-nohard")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides section.key=value")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    base = C.load_yaml(args.config)
    base.train.tokens = args.tokens
    for kv in args.set:
        k, v = kv.split("=", 1)
        sec, name = k.split(".")
        C.from_dict({sec: {name: v}}, base)
    device = resolve_device(base.train.device)
    amp = autocast_for(device, base.train.amp)
    _, tok, _ = load_model("")
    test = to_blocks(tokenize_sources(tok, [str(default_corpus()["test"])]), base.train.seq_len, "test split")
    ev = dict(batch_size=base.train.batch_size, device=device, autocast=amp)
    for name in args.variants.split(","):
        t0 = time.time()
        if name in ("fp", "fp-ref"):  # the pre-trained model as it is
            model, _, _ = load_model("")
            results[name] = {"test_ppl": perplexity(model.to(device), test, **ev), "tokens": 0}
        else:
            cfg = method_config(base, name)
            out = runs / name
            s = bl.convert(cfg, out, resume=(out / "run.yaml").is_file(), progress=False, explicit={})
            if not s.get("finished"):
                print(f"{name}: stopped at step {s['step']}", flush=True)
                continue
            model, _ = bl.load_run(out, frozen=cfg.binary.method != "fp", device=str(device))
            rec = [json.loads(x) for x in open(out / "metrics.jsonl") if '"train"' in x]
            tps = [r["tokens_per_s"] for r in rec[1:]] or [0]
            results[name] = {k: s.get(k) for k in ("tokens", "val_loss_sign", "val_loss_F", "sign_gap",
                                                   "before_hard_phase", "t_final", "init")}
            results[name]["init"] = {k: v for k, v in (s.get("init") or {}).items() if k != "init_losses"}
            results[name]["test_ppl"] = perplexity(model, test, **ev)
            results[name]["tokens_per_s_median"] = statistics.median(tps)
            results[name]["final_train_loss"] = statistics.mean(r["loss_avg"] for r in rec[-5:])
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(name, json.dumps(results[name]), flush=True)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"{'variant':14s} {'test ppl':>10s} {'gap':>8s} {'tok/s':>8s}")
    for k, v in results.items():
        gap = v.get("sign_gap")
        print(f"{k:14s} {v['test_ppl']:10.2f} {'' if gap is None else f'{gap:8.3f}':>8s} "
              f"{v.get('tokens_per_s_median', 0):8.0f}")


if __name__ == "__main__":
    main()
