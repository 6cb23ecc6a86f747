"""The core verbs: ``binarize(model, BinaryConfig())`` -> train -> ``freeze(model)``.

``binarize`` swaps every linear layer inside the decoder blocks for a ``BinaryLinear`` (latent weights
copied from the pre-trained ones) and records what it did on ``model.binaryllm_info``; the model keeps
its class, so transformers' generation, saving of the config and so on are untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import BinaryConfig
from .nn import BinaryLinear, replace_linear

FORMAT_VERSION = 1


def binary_modules(model: nn.Module) -> dict[str, BinaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryLinear)}


def binarize(model: nn.Module, config: BinaryConfig | None = None) -> nn.Module:
    cfg = (config or BinaryConfig()).validate()
    names = replace_linear(model, skip=cfg.skip, sa_grad=cfg.sa_grad, ste_clip=cfg.ste_clip)
    kind = {"cpt": "cpt", "ste": "ste", "irnet": "irnet", "sign": "sign", "fp": "identity"}[cfg.method]
    t0 = cfg.schedule().t(1) if cfg.method == "cpt" else 1.0
    for m in binary_modules(model).values():
        m.kind, m.t = kind, t0
        m.scale_l.requires_grad_(cfg.dual_scale and cfg.method != "fp")
    model.binaryllm_info = {"format_version": FORMAT_VERSION, "method": cfg.method, "modules": names,
                            "input_scales": [], "folded_norms": [], "folded_into_rows": [],
                            "frozen": False}
    return model


def restore_input_scales(model: nn.Module, names: list[str], folded_norms: list[str] = (),
                         folded_into_rows: list[str] = ()) -> None:
    """Give a freshly binarized model the input-scale buffers binary-aware init created (values are
    placeholders until a state dict is loaded), and record them on ``binaryllm_info``."""
    mods = binary_modules(model)
    for n in names:
        mods[n].set_input_scale(torch.ones(mods[n].in_features, device=mods[n].weight.device))
    info = getattr(model, "binaryllm_info", None)
    if info is not None:
        info["input_scales"] = list(names)
        info["folded_norms"] = list(folded_norms)
        info["folded_into_rows"] = list(folded_into_rows)


def set_binarizer(model: nn.Module, kind: str, t: float) -> None:
    for m in binary_modules(model).values():
        m.kind, m.t = kind, float(t)


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Materialize the 1-bit model: each weight becomes sign(W~) (±1) and S_l the merged per-row scale
    S_l * S_a; the layers run hard sign.  The result computes exactly what the packed model computes."""
    for m in binary_modules(model).values():
        signs, scale = m.freeze()
        m.weight.copy_(signs)
        m.scale_l.copy_(scale)
        m.kind = "sign"
        m.weight.requires_grad_(False)
        m.scale_l.requires_grad_(False)
    info = getattr(model, "binaryllm_info", None)
    if info is not None:
        info["frozen"] = True
    return model
