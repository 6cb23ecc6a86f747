"""Open a finished run folder as a model: ``load_run("runs/x")`` gives the frozen 1-bit model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .api import binarize, binary_modules, freeze, restore_input_scales
from .config import load_yaml
from .errors import BinaryLLMError


def load_run(path: str | Path, frozen: bool = True, device: str = "cpu"):
    """(model, tokenizer) from a run folder written by ``convert``.  ``frozen``: hard sign (the 1-bit
    model); otherwise the latent model with the binarizer it finished with."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    p = Path(path)
    if not (p / "run.yaml").is_file():
        raise BinaryLLMError(f"{p} is not a binaryllm run folder (no run.yaml)")
    if not (p / "summary.json").is_file() or not (p / "model.safetensors").is_file():
        raise BinaryLLMError(f"{p} holds no finished run (no summary.json/model.safetensors); finish it with "
                             f"'binaryllm convert --resume --out {p}'")
    cfg = load_yaml(p / "run.yaml")
    info = json.loads((p / "binary.json").read_text())
    hf_cfg = AutoConfig.from_pretrained(p)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    binarize(model, cfg.binary)
    restore_input_scales(model, info.get("input_scales", []), info.get("folded_norms", []),
                         info.get("folded_into_rows", []))
    missing, unexpected = load_model(model, str(p / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise BinaryLLMError(f"{p / 'model.safetensors'} does not match the model: {(missing + unexpected)[0]}")
    tok = AutoTokenizer.from_pretrained(p)
    if frozen:
        freeze(model)
    elif info.get("t_final"):
        for m in binary_modules(model).values():
            m.t = info["t_final"]
    return model.to(device).eval(), tok
