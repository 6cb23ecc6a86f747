"""Command line: ``binaryllm convert`` and ``binaryllm corpus``.  A thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import sys

from . import config as C
from .errors import BinaryLLMError

DESCRIPTION = "Turn a pre-trained causal LM into a 1-bit model (BinaryLLM: consistent progressive training)."


def _add_config_options(p: argparse.ArgumentParser) -> None:
    for sec, f in C.flat_fields():
        if f.name == "model":
            continue  # positional
        opt = "--" + f.name.replace("_", "-")
        typ = f.type
        default = f.default if f.default is not C.dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata.get('help', '')} [{sec}; default: {default!r}]".replace("%", "%%")
        grp = p._binaryllm_groups[sec]
        if typ == "bool":
            grp.add_argument(opt, dest=f"{sec}.{f.name}", action=argparse.BooleanOptionalAction, default=None,
                             help=help_)
        elif typ.startswith("list"):
            grp.add_argument(opt, dest=f"{sec}.{f.name}", nargs="+", default=None, metavar="X", help=help_)
        else:
            grp.add_argument(opt, dest=f"{sec}.{f.name}", default=None, metavar=f.name.upper(), help=help_)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="binaryllm", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)

    cv = sub.add_parser("convert", help="binarize and train a model (the main job)", description=DESCRIPTION)
    cv.add_argument("model", nargs="?", default=None,
                    help="hub id, local HF folder or .gguf file; omitted = embedded SmolLM2-135M-Instruct")
    cv.add_argument("--out", required=True, help="run folder to write (checkpoints, metrics, final model)")
    cv.add_argument("--config", default=None, help="YAML file with sections model/data/binary/train")
    cv.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    cv.add_argument("--no-progress", action="store_true", help="no progress bar")
    cv._binaryllm_groups = {s: cv.add_argument_group(f"{s} options") for s in C.SECTIONS}
    _add_config_options(cv)

    cp = sub.add_parser("corpus", help="build or describe the embedded default corpus")
    cp.add_argument("action", choices=["build", "info"])
    cp.add_argument("--force", action="store_true", help="rebuild even if it exists")
    cp.add_argument("--cache-dir", default="", help="cache folder (default $BINARYLLM_CACHE or ~/.cache/binaryllm)")
    return ap


def config_from_args(args: argparse.Namespace) -> tuple[C.RunConfig, dict]:
    cfg = C.load_yaml(args.config) if args.config else C.RunConfig()
    explicit: dict = {}
    if args.model is not None:
        explicit.setdefault("model", {})["model"] = args.model
    for key, val in vars(args).items():
        if "." not in key or val is None:
            continue
        sec, name = key.split(".", 1)
        explicit.setdefault(sec, {})[name] = val
    cfg = C.from_dict(explicit, cfg)
    return cfg, explicit


def cmd_convert(args) -> int:
    from .train import convert
    cfg, explicit = config_from_args(args)
    summary = convert(cfg, args.out, resume=args.resume, progress=not args.no_progress, explicit=explicit)
    if not summary.get("finished"):
        print(f"stopped at step {summary['step']} of {summary['total_steps']}; continue with: binaryllm convert "
              f"--resume --out {args.out}")
        return 0
    keys = ("method", "tokens", "val_loss_sign", "val_loss_F", "sign_gap", "val_loss_fp")
    print(json.dumps({k: summary[k] for k in keys if summary.get(k) is not None}, indent=1))
    print(f"1-bit model written to {args.out} (load it with binaryllm.load_run)")
    return 0


def cmd_corpus(args) -> int:
    from .data.default import build_default_corpus
    d = build_default_corpus(args.cache_dir, force=args.force) if args.action == "build" else \
        build_default_corpus(args.cache_dir)
    print(d)
    print((d / "manifest.json").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"convert": cmd_convert, "corpus": cmd_corpus}[args.cmd](args)
    except BinaryLLMError as e:
        print(f"binaryllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binaryllm: interrupted; the last checkpoint is kept: continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
