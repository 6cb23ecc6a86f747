"""``pack``: the frozen 1-bit model as a Hugging Face folder with really packed weights.

Folder::

    config.json         the model config + quantization_config (quant_method "binaryllm", format_version,
                        bit_order, the binarized modules with their shapes and which have input scales)
    model.safetensors   per binarized module: <name>.weight (uint8 sign bits, 8 weights a byte, shape
                        (out, ceil(in/8)), see bits.py), <name>.weight_scale (fp16, per row),
                        <name>.input_scale (fp16, where kept), <name>.bias; every other tensor in bf16

The packed bits sit under the layer's own ``weight`` name on purpose: transformers without binaryllm
then meets a uint8 (out, in/8) tensor where it expects an (out, in) weight and refuses to load, instead of
silently building a model with random binarized layers (which it does for tensors it does not know).
    tokenizer files

The binarized layers cost 1 bit a weight + 16 bits a row (+ 16 bits an input channel where kept).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..api import binary_modules
from ..errors import BinaryLLMError
from ..io import atomic_dir
from ..nn.packed import PackedBinaryLinear
from .bits import BIT_ORDER

QUANT_METHOD = "binaryllm"
FORMAT_VERSION = 1


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def pack(model: nn.Module) -> nn.Module:
    """Replace every BinaryLinear by a PackedBinaryLinear holding its frozen form (in place)."""
    mods = binary_modules(model)
    if not mods:
        raise BinaryLLMError("the model has no binarized layers to pack; binarize and train it first")
    for name, m in mods.items():
        _set_module(model, name, PackedBinaryLinear.from_binary(m))
    return model


def packed_modules(model: nn.Module) -> dict[str, PackedBinaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedBinaryLinear)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    packed = {f"{n}.": m for n, m in packed_modules(model).items()}
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and key in seen:  # tied (e.g. lm_head = embeddings): stored once
            continue
        seen[key] = k
        if not any(k.startswith(p) for p in packed) and v.is_floating_point():
            v = v.to(torch.bfloat16)
        out[k] = v.detach().contiguous().cpu()
    return out


def size_report(state: dict[str, torch.Tensor], packed_names: list[str]) -> dict[str, int]:
    part = {f"{n}.{suffix}": key for n in packed_names for suffix, key in
            (("weight", "packed_bits"), ("weight_scale", "row_scales"), ("input_scale", "input_scales"))}
    rep = {"packed_bits": 0, "row_scales": 0, "input_scales": 0, "other": 0}
    for k, v in state.items():
        rep[part.get(k, "other")] += v.numel() * v.element_size()
    rep["total"] = sum(rep.values())
    return rep


def save_packed(model: nn.Module, tokenizer, out: str | Path) -> dict:
    """Write the packed folder atomically; returns the size report (bytes) and the bf16 size."""
    from safetensors.torch import save_file
    mods = packed_modules(model)
    if not mods:
        raise BinaryLLMError("save_packed needs a packed model: call binaryllm.pack(model) first")
    if any(m._fused is not None for m in mods.values()):
        raise BinaryLLMError("this model's projections are fused for decoding (shared storage safetensors cannot "
                             "write): call binaryllm.nn.unfuse_projections(model) before saving")
    state = _state(model)
    qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bit_order": BIT_ORDER,
          "modules": {n: {"in_features": m.in_features, "out_features": m.out_features,
                          "input_scale": m.input_scale is not None, "bias": m.bias is not None}
                      for n, m in mods.items()}}
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qc
    with atomic_dir(Path(out)) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "quant_method": QUANT_METHOD,
                                                                    "format_version": str(FORMAT_VERSION)})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    rep = size_report(state, list(mods))
    rep["bf16_equivalent"] = sum(p.numel() for p in _unique_params(model)) * 2 + sum(
        m.in_features * m.out_features * 2 + (m.out_features * 2 if m.bias is not None else 0) for m in mods.values())
    return rep


def _unique_params(model):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def read_packed_config(folder: str | Path) -> tuple[Path, Path, dict]:
    """(config.json path, model.safetensors path, the config as a dict) of a packed folder, after checking that
    both files exist, the config is JSON, and its quantization_config is binaryllm's of this format version."""
    folder = Path(folder)
    cfg_file, st_file = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.is_file() or not st_file.is_file():
        raise BinaryLLMError(f"{folder} is not a packed binaryllm folder (needs config.json and model.safetensors; "
                             f"make one with binaryllm pack)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BinaryLLMError(f"{cfg_file} is not valid JSON ({e.msg}); re-export with binaryllm pack") from None
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise BinaryLLMError(f"{cfg_file} has no binaryllm quantization_config; it is not a packed folder "
                             f"(make one with binaryllm pack)")
    if qc.get("format_version") != FORMAT_VERSION:
        raise BinaryLLMError(f"{cfg_file} has format_version {qc.get('format_version')}; this binaryllm reads "
                             f"{FORMAT_VERSION}: upgrade binaryllm or re-export the model")
    return cfg_file, st_file, raw


def load_packed(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer) from a packed folder, the binarized layers as PackedBinaryLinear.

    The folder is checked from its config and the safetensors header first (clear one-line errors), then
    loaded by transformers' ``from_pretrained`` through binaryllm's registered quantizer: the model is built on
    the meta device and only the packed tensors are materialised, never a dense copy of the weights."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(path)
    cfg_file, st_file, raw = read_packed_config(p)
    qc = raw["quantization_config"]
    try:
        with safe_open(str(st_file), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise BinaryLLMError(f"{st_file} is damaged or truncated ({e}); re-export with binaryllm pack") from None
    for name, spec in qc["modules"].items():
        for part in ("weight", "weight_scale") + (("input_scale",) if spec["input_scale"] else ()):
            if f"{name}.{part}" not in shapes:
                raise BinaryLLMError(f"{st_file} lacks {name}.{part}; the file is incomplete: re-export it")
        want = (spec["out_features"], (spec["in_features"] + 7) // 8)
        if shapes[f"{name}.weight"] != want:
            raise BinaryLLMError(f"{st_file}: {name}.weight has shape {shapes[f'{name}.weight']}, the config says "
                                 f"{spec['out_features']}x{spec['in_features']} weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except BinaryLLMError:
        raise
    except Exception as e:
        raise BinaryLLMError(f"{st_file} does not match the model in {cfg_file} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); re-export it") from None
    tok = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").is_file() else None
    return model.to(device).eval(), tok

