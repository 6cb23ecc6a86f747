"""Resumable checkpoints in safetensors + JSON (never pickle), written atomically.

Layout of ``<run>/checkpoints/``::

    step-00000120/   model.safetensors  optimizer.safetensors  rng.safetensors  state.json
    latest           text file naming the newest complete step folder (replaced atomically)

A step folder is written under a temporary name and renamed when complete, then ``latest`` is updated;
a crash at any point leaves the previous checkpoint intact and findable.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import BinaryLLMError
from ..io import atomic_dir, atomic_write_text

STATE_VERSION = 1


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": meta}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def set_rng_state(st: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(st["cpu"])
    cuda = [st[k] for k in sorted(k for k in st if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    ckpt_dir = Path(ckpt_dir)
    name = f"step-{step:08d}"
    final = ckpt_dir / name
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            t, meta = _optimizer_to_flat(optimizer)
            save_file(t, str(tmp / "optimizer.safetensors"))
            state = {**state, "optimizer": meta}
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"version": STATE_VERSION, **state}, indent=1))
    atomic_write_text(ckpt_dir / "latest", name + "\n")
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(keep, 1))]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    ptr = ckpt_dir / "latest"
    if ptr.is_file():
        p = ckpt_dir / ptr.read_text().strip()
        if (p / "state.json").is_file():
            return p
    # fall back to the newest complete folder (e.g. the pointer update was interrupted)
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def read_state(ckpt: Path) -> dict:
    try:
        st = json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BinaryLLMError(f"checkpoint {ckpt} is damaged ({e}); delete it to resume from the one "
                             "before") from None
    if st.get("version") != STATE_VERSION:
        raise BinaryLLMError(f"checkpoint {ckpt} has state version {st.get('version')}, this binaryllm "
                             f"reads {STATE_VERSION}; resume it with the binaryllm that wrote it")
    return st


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    ckpt = Path(ckpt)
    st = read_state(ckpt)
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except Exception as e:
        raise BinaryLLMError(f"cannot read {ckpt / 'model.safetensors'} ({type(e).__name__}); the "
                             "checkpoint is damaged: delete its folder to resume from the one before") from None
    bad = [k for k in list(missing) + list(unexpected)]
    if bad:
        raise BinaryLLMError(f"{ckpt / 'model.safetensors'} does not match the model ({bad[0]} ...); was the "
                             "run made with another model or binarization config?")
    if optimizer is not None and "optimizer" in st:
        _optimizer_from_flat(optimizer, load_file(str(ckpt / "optimizer.safetensors")), st["optimizer"])
    set_rng_state(load_file(str(ckpt / "rng.safetensors")))
    return st
