"""``convert``: load a model and data, binarize, train, and write the run folder.

Run folder::

    run.yaml            the resolved configuration (defaults < YAML < CLI)
    config.json         the model's Hugging Face config;  tokenizer files
    metrics.jsonl       one JSON line per logged step (step, tokens, phase, t, lr, loss, grad_norm, tokens/s)
    checkpoints/        resumable checkpoints (see train.checkpoint)
    model.safetensors   final latent weights (written when the run finishes)
    binary.json         what was binarized, input scales, folded norms, final t
    summary.json        final metrics (validation loss with sign and with F, the sign-substitution gap);
                        its presence marks a finished run
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

from .. import config as C
from ..api import binarize
from ..data import default_corpus, split_blocks, to_blocks, tokenize_sources
from ..errors import BinaryLLMError
from ..io import atomic_file, atomic_write_text
from ..models import load_model
from .loop import TrainData, Trainer

RESUME_FREE = {"train": {"max_steps", "max_minutes", "log_every", "eval_every", "save_every", "keep_checkpoints", "device"}}


def prepare_data(cfg: C.RunConfig, tokenizer, progress: bool = True) -> TrainData:
    d, L = cfg.data, cfg.train.seq_len
    sources, val_sources = list(d.data), list(d.val_data)
    if not sources:
        corpus = default_corpus(d.cache_dir)
        sources = [str(corpus["train"])]
        if not val_sources:
            val_sources = [str(corpus["val"])]
    toks = tokenize_sources(tokenizer, sources, d.text_field, d.cache_dir, progress)
    if val_sources:
        train = to_blocks(toks, L, "training corpus")
        val = to_blocks(tokenize_sources(tokenizer, val_sources, d.text_field, d.cache_dir, progress), L,
                        "validation corpus")
    else:
        train, val = split_blocks(to_blocks(toks, L, "corpus"), d.val_fraction)
    return TrainData(train=train, val=val)


def _atomic_save_model(model, path: Path) -> None:
    with atomic_file(path) as tmp:
        save_model(model, str(tmp))


def _check_resume(out: Path, cfg: C.RunConfig, explicit: dict) -> C.RunConfig:
    saved = C.load_yaml(out / "run.yaml")
    # --max-steps/--max-minutes limit one invocation: a resume without them runs to the end
    saved.train.max_steps, saved.train.max_minutes = cfg.train.max_steps, cfg.train.max_minutes
    for sec, opts in explicit.items():
        for k, v in opts.items():
            if k in RESUME_FREE.get(sec, set()):
                setattr(getattr(saved, sec), k, getattr(getattr(cfg, sec), k))
            elif getattr(getattr(saved, sec), k) != getattr(getattr(cfg, sec), k):
                raise BinaryLLMError(f"--resume: {sec}.{k} was {getattr(getattr(saved, sec), k)!r} in {out}/run.yaml "
                                     f"but is {getattr(getattr(cfg, sec), k)!r} now; drop the option or use a new --out")
    return saved


def convert(cfg: C.RunConfig, out: str | Path | None, resume: bool = False, progress: bool = True,
            explicit: dict | None = None, callback=None) -> dict:
    """The whole pipeline; returns the summary.  ``explicit``: options the user set (checked on resume)."""
    from . import dist as D
    cfg.validate()
    info = D.setup(cfg.train.device)           # several processes under torchrun, else None
    main = info is None or info.main
    if info is not None and not out:
        raise BinaryLLMError("a multi-GPU run needs --out (its checkpoints are sharded across the ranks)")
    outp = Path(out) if out else None
    if outp is not None:
        if resume:
            if not (outp / "run.yaml").is_file():
                raise BinaryLLMError(f"--resume: {outp} holds no run (no run.yaml); start it without --resume")
            cfg = _check_resume(outp, cfg, explicit or {})
        elif (outp / "run.yaml").is_file():
            raise BinaryLLMError(f"{outp} already holds a run; pass --resume to continue it or choose another --out")
        if info is not None:
            D.barrier(info)                    # every rank has checked before rank 0 writes
        if main:
            outp.mkdir(parents=True, exist_ok=True)
            C.dump_yaml(cfg, outp / "run.yaml")
    t0 = time.time()
    if not progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    model, tok, src = load_model(cfg.model.model, cfg.model.trust_remote_code, cfg.model.revision)
    if info is not None and not main:
        D.barrier(info)                        # rank 0 tokenizes (and caches) first
    data = prepare_data(cfg, tok, progress and main)
    if info is not None and main:
        D.barrier(info)
    teacher = None
    if cfg.train.distill:
        teacher = copy.deepcopy(model)
        if resolve_is_cuda(cfg):
            teacher = teacher.to(torch.bfloat16)
    binarize(model, cfg.binary)
    if outp is not None and main:
        model.config.save_pretrained(outp)
        tok.save_pretrained(outp)
    trainer = Trainer(model, cfg, data, outp, teacher=teacher, progress=progress, dist=info)
    if cfg.train.max_minutes:
        trainer.deadline = t0 + 60 * cfg.train.max_minutes
    summary = dict(trainer.run(resume=resume, callback=callback))
    summary["model"] = src.description
    summary["train_blocks"], summary["val_blocks"] = data.train.shape[0], data.val.shape[0]
    if info is not None:
        summary["world_size"] = info.world
        full = D.full_state_dict(model, trainer.keep_names) if summary.get("finished") else None
        if not main:
            return summary
    if summary.get("finished") and outp is not None:
        summary["wall_seconds_this_invocation"] = round(time.time() - t0, 1)
        if info is not None:
            from safetensors.torch import save_file
            with atomic_file(outp / "model.safetensors") as tmp:
                save_file(full, str(tmp), metadata={"format": "pt"})
        else:
            _atomic_save_model(model, outp / "model.safetensors")
        info = dict(getattr(model, "binaryllm_info", {}))
        info.update({"t_final": summary.get("t_final"), "frozen_form": "sign(W~) * S_l * mean|W~| per row",
                     "base_model": src.description})
        atomic_write_text(outp / "binary.json", json.dumps(info, indent=1))
        atomic_write_text(outp / "summary.json", json.dumps(summary, indent=1))
    return summary


def resolve_is_cuda(cfg: C.RunConfig) -> bool:
    d = cfg.train.device
    return (d == "auto" and torch.cuda.is_available()) or d.startswith("cuda")
