"""``binaryllm compare``: every method under matched conditions, one report.

All methods share the base model, data, data order (seed), token budget, sequence length and the
evaluation (same held-out texts, same task items).  Each method's run lives in ``<out>/runs/<method>``
and its evaluation in ``<out>/results/<method>.json``: a finished method is not rerun, an interrupted
one resumes, a failed one is reported in the table and the others go on.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import re
import time
import traceback
from dataclasses import fields
from pathlib import Path

from . import config as C
from .errors import BinaryLLMError
from .eval.tasks import task_label
from .io import atomic_write_bytes, atomic_write_text

METHODS: dict[str, dict] = {
    "fp": {},  # the pre-trained model, untouched: the reference
    "fp-ft": {"binary": {"method": "fp"}},
    "sign": {"binary": {"method": "sign"}},
    "ste": {"binary": {"method": "ste"}},
    "irnet": {"binary": {"method": "irnet"}},
    "cpt": {"binary": {"method": "cpt"}},
    "cpt-nohard": {"binary": {"method": "cpt", "hard_fraction": 0.0}},
    "cpt-noinit": {"binary": {"method": "cpt", "init": False}},
    "cpt-nodual": {"binary": {"method": "cpt", "dual_scale": False}},
    "cpt+distill": {"binary": {"method": "cpt"}, "train": {"distill": True}},
    "ste+distill": {"binary": {"method": "ste"}, "train": {"distill": True}},
    "irnet+distill": {"binary": {"method": "irnet"}, "train": {"distill": True}},
}


def split_methods(text: str) -> list[str]:
    """``"cpt,cpt[t_b=0.16,t_a=1]"`` -> ``["cpt", "cpt[t_b=0.16,t_a=1]"]``: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [m for m in out if m]


def method_overrides(spec: str) -> tuple[str, dict]:
    """``"cpt+distill[distill_weight=0.3]"`` -> ``("cpt+distill", {"train": {"distill_weight": "0.3"}})``.
    A key is an option name (``t_b``) or section.name (``binary.t_b``); values are converted by the option's type.
    This is how a tuning search runs through compare: the same method with one option changed per entry."""
    name, _, rest = spec.partition("[")
    if not rest:
        return spec, {}
    if not rest.endswith("]") or "[" in rest[:-1]:
        raise BinaryLLMError(f"method {spec!r}: write overrides as name[option=value,...] with one pair of brackets")
    over: dict = {}
    for pair in split_methods(rest[:-1]):
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise BinaryLLMError(f"method {spec!r}: {pair!r} is not option=value")
        sec, _, opt = key.rpartition(".")
        secs = [sec] if sec else [x for x, cls in C.SECTIONS.items() if opt in {f.name for f in fields(cls)}]
        if not secs or secs[0] not in C.SECTIONS:
            raise BinaryLLMError(f"method {spec!r}: unknown option {key!r}; see 'binaryllm convert --help'")
        if len(secs) > 1:
            raise BinaryLLMError(f"method {spec!r}: option {opt!r} is in sections {', '.join(secs)}; write one of "
                                 + ", ".join(f"{x}.{opt}" for x in secs))
        over.setdefault(secs[0], {})[opt] = value.strip()
    return name.strip(), over


def method_config(base: C.RunConfig, method: str) -> C.RunConfig:
    name, over = method_overrides(method)
    if name not in METHODS:
        raise BinaryLLMError(f"unknown method {name!r} for compare; known: {', '.join(METHODS)} (each may take "
                             "overrides: cpt[t_b=0.16])")
    if name == "fp" and over:
        raise BinaryLLMError("fp is the untouched pre-trained model: it takes no overrides (fp-ft does)")
    cfg = C.from_dict(over, C.from_dict(METHODS[name], copy.deepcopy(base)))
    cfg.validate()
    return cfg


def method_dir(method: str) -> str:
    """A file-system-safe name for a method spec (its run folder and results file)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", method).strip("_")


def bits_per_weight(model) -> float:
    """Storage of the binarized layers: 1 bit a weight + fp16 per-row scale + fp16 input scale if any;
    16 for a model with no binarized layers (bf16)."""
    from .api import binary_modules
    mods = binary_modules(model)
    if not mods:
        return 16.0
    weights = bits = 0
    for m in mods.values():
        n = m.in_features * m.out_features
        weights += n
        bits += n + 16 * m.out_features + (16 * m.in_features if m.input_scale is not None else 0)
    return bits / weights


def run_method(method: str, base: C.RunConfig, out: Path, ecfg, progress: bool) -> dict:
    from .eval.run import evaluate, open_model
    from .train import convert
    res_file = out / "results" / f"{method_dir(method)}.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    rec: dict = {"method": method}
    device = "cpu"
    if method == "fp":
        model, tok, _ = open_model(base.model.model, device)
    else:
        cfg = method_config(base, method)
        run = out / "runs" / method_dir(method)
        if not (run / "summary.json").is_file():
            s = convert(cfg, run, resume=(run / "run.yaml").is_file(), progress=progress, explicit={})
            if not s.get("finished"):
                raise BinaryLLMError(f"{method} stopped at step {s['step']} of {s['total_steps']} (not finished): run "
                                     "compare again to continue")
        summary = json.loads((run / "summary.json").read_text())
        rec.update({k: summary.get(k) for k in ("tokens", "val_loss_sign", "val_loss_F", "sign_gap",
                                                "wall_seconds_this_invocation")})
        rec["sign_gap_before_hard_phase"] = (summary.get("before_hard_phase") or {}).get("gap")
        from .runs import load_run
        model, tok = load_run(run, frozen=cfg.binary.method != "fp")
        mfile = run / "metrics.jsonl"  # absent for methods without training steps (sign)
        rec["metrics"] = [json.loads(x) for x in open(mfile) if '"train"' in x] if mfile.is_file() else []
        rates = sorted(x["tokens_per_s"] for x in rec["metrics"][1:])    # the first window compiles
        rec["train_tokens_per_s"] = rates[len(rates) // 2] if rates else None
    rec["bits_per_weight"] = bits_per_weight(model)
    rec["eval"] = evaluate(model, tok, ecfg, progress)
    res_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res_file, json.dumps(rec))
    return rec


def compare(base: C.RunConfig, methods: list[str], out: str | Path, ecfg, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base.validate()
    for m in methods:
        method_config(base, m)  # unknown names fail before any work
    C.dump_yaml(base, out / "base.yaml")
    # --max-minutes bounds the whole invocation: each method trains in what is left, the rest wait for the next one
    deadline = time.time() + 60 * base.train.max_minutes if base.train.max_minutes else None
    results: dict[str, dict] = {}
    for m in methods:
        try:
            mbase = base
            if deadline is not None:
                left = (deadline - time.time()) / 60
                if left <= 0 and not (out / "results" / f"{method_dir(m)}.json").is_file():
                    results[m] = {"method": m, "error": "not started: --max-minutes used up; run compare again"}
                    continue
                mbase = copy.deepcopy(base)
                mbase.train.max_minutes = max(left, 1e-9)
            results[m] = run_method(m, mbase, out, ecfg, progress)
        except (BinaryLLMError, RuntimeError, ValueError, OSError) as e:
            results[m] = {"method": m, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            (out / "results").mkdir(exist_ok=True)
            atomic_write_text(out / "results" / f"{method_dir(m)}.error.txt", traceback.format_exc())
    write_report(results, out, ecfg)
    return results


def ppl_label(name: str) -> str:
    return Path(name).name if Path(name).is_file() else name


def _rows(results: dict, ecfg) -> tuple[list[str], list[list]]:
    ppl_names = list(ecfg.ppl)
    tasks = [task_label(t) for t in ecfg.tasks]
    header = ["method", "bits/weight"] + [f"ppl {ppl_label(p)}" for p in ppl_names] + tasks + (["avg acc"] if tasks else [])
    header += ["ppl ratio to fp", "acc ratio to fp"] if "fp" in results else []
    header += ["sign gap (nats)", "gap before hard phase", "train tokens/s"]
    fp = results.get("fp", {}).get("eval")
    rows = []
    for m, r in results.items():
        if "error" in r:
            rows.append([m, "failed: " + r["error"]] + [""] * (len(header) - 2))
            continue
        e = r["eval"]
        row = [m, round(r["bits_per_weight"], 3)] + [round(e["ppl"][p]["ppl"], 2) for p in ppl_names]
        row += [round(e["tasks"][t]["acc"], 2) for t in tasks]
        if tasks:
            row.append(round(e["avg_acc"], 2))
        if "fp" in results:
            ok = fp is not None
            row.append(round(e["ppl"][ppl_names[0]]["ppl"] / fp["ppl"][ppl_names[0]]["ppl"], 3) if ok and ppl_names else "")
            row.append(round(e["avg_acc"] / fp["avg_acc"], 3) if ok and tasks and fp["avg_acc"] else "")
        row += [_r(r.get("sign_gap"), 3), _r(r.get("sign_gap_before_hard_phase"), 3),
                _r(r.get("train_tokens_per_s"), 0)]
        rows.append(row)
    # what guessing uniformly scores on the same items: at small scale the models' accuracies sit close to it
    any_eval = next((r["eval"] for r in results.values() if "error" not in r), None)
    if tasks and any_eval and all("chance" in any_eval["tasks"][t] for t in tasks):
        ch = [any_eval["tasks"][t]["chance"] for t in tasks]
        avg = sum(ch) / len(ch)
        row = ["chance (uniform guess)", ""] + [""] * len(ppl_names) + [round(c, 2) for c in ch] + [round(avg, 2)]
        if "fp" in results:
            row += ["", round(avg / fp["avg_acc"], 3) if fp is not None and fp.get("avg_acc") else ""]
        rows.append(row + [""] * (len(header) - len(row)))
    return header, rows


def _r(x, nd):
    return "" if x is None else (round(x) if nd == 0 else round(x, nd))


def write_report(results: dict, out: Path, ecfg) -> None:
    header, rows = _rows(results, ecfg)
    md = ["# binaryllm compare", "", "Matched conditions: same base model, data, order, token budget, sequence "
          "length, seed and evaluation items (`base.yaml`). Zero-shot columns are acc (%); acc_norm is in "
          "results.json. Sign gap: validation loss with hard sign minus with F at the final t (CPT runs), at the "
          "end and when the final hard-sign phase began; train tokens/s: median over the logged windows.", "",
          "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    md += ["", "![training loss](loss.png)", "![perplexity](ppl.png)", "![zero-shot](zeroshot.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    slim = {m: {k: v for k, v in r.items() if k != "metrics"} for m, r in results.items()}
    atomic_write_text(out / "results.json", json.dumps(slim, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    plot_report(results, out, ecfg)


def plot_report(results: dict, out: Path, ecfg) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = {m: r for m, r in results.items() if "error" not in r}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax2 = None
    for m, r in ok.items():
        rec = r.get("metrics") or []
        if rec:
            ax.plot([x["tokens"] for x in rec], [x["loss_avg"] for x in rec], label=m, lw=1)
            if ax2 is None and any(x.get("kind") == "cpt" for x in rec):
                ax2 = ax.twinx()
                ax2.step([x["tokens"] for x in rec], [x["t"] for x in rec], color="grey", ls="--", lw=1,
                         where="post")
                ax2.set_yscale("log")
                ax2.set_ylabel("t (CPT schedule, dashed)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per method")
    ax.legend(fontsize=8)
    save(fig, "loss.png")

    ppl_name = ecfg.ppl[0] if ecfg.ppl else None
    fig, ax = plt.subplots(figsize=(8, 4))
    if ppl_name:
        names = list(ok)
        vals = [ok[m]["eval"]["ppl"][ppl_name]["ppl"] for m in names]
        ax.bar(names, vals, color="tab:blue")
        ax.set_yscale("log")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(f"perplexity on {ppl_label(ppl_name)} (log)")
    ax.set_title("Held-out perplexity")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    save(fig, "ppl.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    tasks = [task_label(t) for t in ecfg.tasks]
    if tasks and ok:
        width = 0.8 / len(ok)
        for i, (m, r) in enumerate(ok.items()):
            ax.bar([j + i * width for j in range(len(tasks))], [r["eval"]["tasks"][t]["acc"] for t in tasks],
                   width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
    ax.set_title("Zero-shot accuracy")
    save(fig, "zeroshot.png")
