"""Training and validation loss of several runs on one figure, from their metrics.jsonl files.

    python bench/plot_runs.py --out docs/figures/study-100M-loss.png \
        cpt=docs/data/study-100M-cpt-metrics.jsonl ste=docs/data/study-100M-ste-metrics.jsonl ...

Left: the training loss (the logged running average) against tokens; right: the validation loss at each
evaluation (the step's token count is read from the training records: same tokens per step throughout).
"""
from __future__ import annotations

import argparse
import json


def read(path: str) -> tuple[list, list, list, list]:
    """(training tokens, training loss, validation tokens, validation loss) of one run."""
    train_x, train_y, train_step, ev_step, ev_y = [], [], [], [], []
    for line in open(path):
        r = json.loads(line)
        if r.get("type") == "train":
            train_x.append(r["tokens"])
            train_step.append(r["step"])
            train_y.append(r.get("loss_avg", r["loss"]))
        elif r.get("type") == "eval":
            v = r.get("val_loss", r.get("val_loss_sign"))     # convert logs both F and hard-sign losses
            if v is not None:
                ev_step.append(r["step"])
                ev_y.append(v)
    if not train_x:
        raise SystemExit(f"{path}: no training records: is this a binaryllm metrics.jsonl?")
    per_step = train_x[-1] / (train_step[-1] + 1)
    return train_x, train_y, [(s + 1) * per_step for s in ev_step], ev_y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in args.runs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"{spec!r}: write each run as LABEL=path/to/metrics.jsonl")
        tx, ty, ex, ey = read(path)
        a.plot([x / 1e6 for x in tx], ty, label=label, lw=1)
        b.plot([x / 1e6 for x in ex], ey, marker="o", label=label)
    a.set(xlabel="training tokens (M)", ylabel="training loss (running mean)", title="training")
    b.set(xlabel="training tokens (M)", ylabel="validation loss (nats)", title="validation")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
