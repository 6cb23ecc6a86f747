"""``export_gguf``: a packed binaryllm folder -> one GGUF file that plain llama.cpp runs.

Binarized layers are written in llama.cpp's exact 1-bit/2-bit block types; a row of ``in`` weights is cut into
blocks along ``in`` and every block gets the row's fp16 scale ``d``, so each type reproduces ``±d`` exactly:

=======  =====  ============  =====================================  ==========================
type     block  bytes/block   a weight decodes to                    bits/weight
=======  =====  ============  =====================================  ==========================
Q1_0     128    2 + 16        bit ? +d : -d                          1.125
Q2_0      64    2 + 16        (q - 1) * d, q in 0..3; we use 0 / 2   2.25
Q4_0      32    2 + 16        (q - 8) * d, q in 0..15; we use 7 / 9  4.5
F16        1    2             the value (±d is an fp16 number)       16
=======  =====  ============  =====================================  ==========================

Each row takes the first type of ``types`` (default all four, in this order) whose block divides its length:
Q1_0 where ``in % 128 == 0``; else Q2_0 (the smallest exact type for ``in % 64 == 0``, e.g. SmolLM2's 576);
else Q4_0 (older llama.cpp builds lack Q2_0: pass ``types=("q1_0", "q4_0", "f16")``); else F16.  llama.cpp
computes these matmuls against activations it rounds to 8 bits (Q8_0), so its logits differ a little from
ours: tests and ``bench/gguf_logits.py`` measure by how much.

Input scales left by binary-aware init cannot be applied by a plain llama.cpp graph.  binaryllm's init folds
them all (into norms and upstream rows) for the supported architectures, so a packed folder normally has none;
an old folder that still has one is written with that layer as dense F16 (scale and input scale multiplied in),
with a warning.  Everything else keeps its stored precision: norms in F32, embeddings / output in BF16.

Supported: ``model_type`` llama and mistral (llama.cpp arch ``llama``: q/k rows re-ordered for its
interleaved rotary embedding), qwen2 and qwen3; tokenizers in GPT-2 byte-level BPE form (``tokenizer.json``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import BinaryLLMError
from ..io import atomic_file

# model_type -> (gguf MODEL_ARCH member, q/k rows permuted for llama.cpp's interleaved rope)
ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
         "qwen3": ("QWEN3", False)}
BLOCK = {"q1_0": 128, "q2_0": 64, "q4_0": 32, "f16": 1}
GGML_Q2_0 = 42           # llama.cpp's type id; the gguf package (0.19) does not know it yet


# ---- block encoders: sign bits (out, in/8 bytes, lsb first, 1 = +1) + fp16 row scale -> raw GGML rows ----

def _signs01(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits, axis=1, bitorder="little")[:, :n]


def _with_scale(qs: np.ndarray, scale16: np.ndarray) -> np.ndarray:
    out, nb, _ = qs.shape
    d = np.broadcast_to(scale16.astype("<f2").view(np.uint8).reshape(out, 1, 2), (out, nb, 2))
    return np.concatenate([d, qs], axis=2).reshape(out, -1)


def encode_rows(kind: str, bits: np.ndarray, scale16: np.ndarray, n: int) -> np.ndarray:
    """Raw bytes (out, n / block * bytes_per_block) of llama.cpp type ``kind``, or an fp16 matrix for f16."""
    out = bits.shape[0]
    if kind == "q1_0":   # same bit order as ours: 16 bytes of a row per block
        return _with_scale(np.ascontiguousarray(bits[:, : n // 8]).reshape(out, n // 128, 16), scale16)
    s = _signs01(bits, n)
    if kind == "q2_0":   # element j of a block: bits 2*(j%4).. of byte j//4; code 2 = +d, 0 = -d
        codes = (s * 2).reshape(out, n // 4, 4).astype(np.uint8) << np.array([0, 2, 4, 6], np.uint8)
        return _with_scale(codes.sum(axis=2, dtype=np.uint8).reshape(out, n // 64, 16), scale16)
    if kind == "q4_0":   # element j < 16: low nibble of byte j; element j + 16: high nibble; 9 = +d, 7 = -d
        q = (7 + 2 * s).astype(np.uint8).reshape(out, n // 32, 2, 16)
        return _with_scale(q[:, :, 0] | (q[:, :, 1] << 4), scale16)
    if kind == "f16":
        return (s.astype(np.float32) * 2 - 1) * scale16.astype(np.float32)[:, None]
    raise ValueError(kind)


def decode_rows(kind: str, raw: np.ndarray, n: int) -> np.ndarray:
    """The inverse, for tests: raw GGML rows -> float32 (out, n) weights, following llama.cpp's dequantizers."""
    if kind == "f16":
        return raw.astype(np.float32)
    out, blk = raw.shape[0], BLOCK[kind]
    b = raw.reshape(out, n // blk, 18)
    d = b[:, :, :2].copy().view("<f2").astype(np.float32)            # (out, nb, 1)
    qs = b[:, :, 2:]
    if kind == "q1_0":
        v = np.unpackbits(qs, axis=2, bitorder="little").astype(np.float32) * 2 - 1
    elif kind == "q2_0":
        q = (qs[:, :, :, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        v = q.reshape(out, n // blk, blk).astype(np.float32) - 1
    else:
        v = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float32) - 8
    return (v * d).reshape(out, n)


def row_type(n: int, types) -> str:
    for t in types:
        if n % BLOCK[t] == 0:
            return t
    raise BinaryLLMError(f"no GGUF type in {list(types)} fits rows of {n} weights; add f16 to the types")


def _qk_perm(rows: int, head_dim: int) -> np.ndarray:
    """Row order for llama.cpp's rope: within a head, HF's halves [0..h/2), [h/2..h) become interleaved pairs."""
    r = np.arange(rows)
    h, rest = divmod(r, head_dim)
    i, c = divmod(rest, 2)
    return h * head_dim + c * (head_dim // 2) + i


# ---- tokenizer ----

def _pre_tokenizer_name(tj: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, read from its structure (None: unknown)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    return None


def _add_tokenizer(w, folder: Path, n_vocab: int, pre: str | None) -> dict:
    import gguf
    tj_file = folder / "tokenizer.json"
    if not tj_file.is_file():
        raise BinaryLLMError(f"{folder} has no tokenizer.json; GGUF export needs the tokenizer (re-run pack)")
    tj = json.loads(tj_file.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BinaryLLMError(f"{tj_file}: only GPT-2 style byte-level BPE tokenizers can be exported to GGUF so far "
                             f"(this one is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise BinaryLLMError(f"{tj_file} has token ids up to {max(vocab.values())} but the model only {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for tok, i in vocab.items():
        tokens[i] = tok
        a = added.get(tok)
        types[i] = (gguf.TokenType.NORMAL if a is None else
                    gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if pre is None:
        pre = _pre_tokenizer_name(tj)
        if pre is None:
            warnings.warn(f"{tj_file}: pre-tokenizer not recognised; writing llama.cpp's 'default' (pass "
                          f"tokenizer_pre= / --tokenizer-pre to name the right one)", stacklevel=2)
            pre = "default"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    cfg_file = folder / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    ids = {}
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        t = tc.get(f"{key}_token")
        t = t.get("content") if isinstance(t, dict) else t
        if t in vocab:
            add(vocab[t])
            ids[key] = vocab[t]
    # whether the Hugging Face tokenizer puts BOS/EOS around a text: ask it
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder)
        enc = tok("a").input_ids
        w.add_add_bos_token(bool(enc) and "bos" in ids and enc[0] == ids["bos"])
        w.add_add_eos_token(bool(enc) and "eos" in ids and enc[-1] == ids["eos"] and len(enc) > 1)
    except Exception as e:  # a tokenizer transformers cannot open: leave llama.cpp's defaults
        warnings.warn(f"could not open the tokenizer in {folder} with transformers ({e}); BOS/EOS flags not set",
                      stacklevel=2)
    tmpl = folder / "chat_template.jinja"
    if tmpl.is_file():
        w.add_chat_template(tmpl.read_text())
    elif isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])
    return {"pre": pre, "tokens": len(vocab), **{f"{k}_id": v for k, v in ids.items()}}


# ---- the export ----

def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    rs = getattr(cfg, "rope_scaling", None) or {}
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind != "default":
        raise BinaryLLMError(f"rope_type {kind!r} is not supported by binaryllm's GGUF export yet")
    return float(rp.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def export_gguf(folder: str | Path, out: str | Path, types=("q1_0", "q2_0", "q4_0", "f16"),
                tokenizer_pre: str | None = None, name: str | None = None, progress: bool = False) -> dict:
    """Write ``out`` (atomically) from the packed folder; returns a report (types used, sizes, bits/weight)."""
    import gguf
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    from .packed import read_packed_config
    folder = Path(folder)
    cfg_file, st_file, raw_cfg = read_packed_config(folder)
    qc = raw_cfg["quantization_config"]
    types = tuple(t.lower() for t in types)
    bad = [t for t in types if t not in BLOCK]
    if bad:
        raise BinaryLLMError(f"unknown GGUF row type(s) {bad}; choose from {list(BLOCK)}")
    mt = raw_cfg.get("model_type")
    if mt not in ARCHS:
        raise BinaryLLMError(f"{cfg_file}: model_type {mt!r} has no GGUF export yet (supported: {sorted(ARCHS)})")
    cfg = AutoConfig.from_pretrained(folder)
    arch_member, permute_qk = ARCHS[mt]
    arch = getattr(gguf.MODEL_ARCH, arch_member)
    n_layer = cfg.num_hidden_layers
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(arch, n_layer)
    modules = qc["modules"]
    try:
        fh = safe_open(str(st_file), framework="pt")
        keys = list(fh.keys())
    except (SafetensorError, OSError) as e:
        raise BinaryLLMError(f"{st_file} is damaged or truncated ({e}); re-export with binaryllm pack") from None

    def get(k: str) -> torch.Tensor:
        try:
            return fh.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise BinaryLLMError(f"{st_file}: cannot read {k} ({e}); the file is damaged: re-export it") from None

    report = {"arch": gguf.MODEL_ARCH_NAMES[arch], "types": {}, "binary_weights": 0, "binary_bytes": 0,
              "dense_fallback": []}
    with atomic_file(Path(out)) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        w.add_name(name or folder.name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q1_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report["tokenizer"] = _add_tokenizer(w, folder, cfg.vocab_size, tokenizer_pre)

        skip = {f"{m}.{p}" for m in modules for p in ("weight_scale", "input_scale")}
        for k in keys:
            if k in skip:
                continue
            mod = k[: -len(".weight")] if k.endswith(".weight") and k[: -len(".weight")] in modules else None
            gname = names.get_name(k, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise BinaryLLMError(f"{st_file}: tensor {k} has no place in llama.cpp's {report['arch']} graph")
            perm = None
            if permute_qk and (gname.endswith("attn_q.weight") or gname.endswith("attn_k.weight")
                               or gname.endswith("attn_q.bias") or gname.endswith("attn_k.bias")):
                perm = _qk_perm(get(k).shape[0], head_dim)
            if mod is None:
                t = get(k)
                if perm is not None:
                    t = t[torch.from_numpy(perm)]
                if t.dim() == 1 or t.dtype == torch.float32:
                    w.add_tensor(gname, t.float().numpy())
                else:  # bf16 (embeddings, output, unbinarized layers): kept bit for bit
                    w.add_tensor(gname, t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16),
                                 raw_dtype=gguf.GGMLQuantizationType.BF16)
                continue
            spec = modules[mod]
            n_in, n_out = spec["in_features"], spec["out_features"]
            bits = get(k).numpy()
            if bits.shape != (n_out, (n_in + 7) // 8) or f"{mod}.weight_scale" not in keys:
                raise BinaryLLMError(f"{st_file}: {mod} has bits of shape {tuple(bits.shape)} or no weight_scale; "
                                     f"the config says {n_out}x{n_in}: re-export it")
            scale16 = get(f"{mod}.weight_scale").to(torch.float16).numpy()
            if perm is not None:
                bits, scale16 = bits[perm], scale16[perm]
            if spec.get("input_scale"):
                s_in = get(f"{mod}.input_scale").float().numpy()
                dense = (_signs01(bits, n_in).astype(np.float32) * 2 - 1) * scale16.astype(np.float32)[:, None]
                w.add_tensor(gname, (dense * s_in[None, :]).astype(np.float16))
                report["dense_fallback"].append(mod)
                warnings.warn(f"{mod} has an input scale llama.cpp cannot apply: written as dense F16 "
                              f"(re-run convert with this binaryllm to fold it)", stacklevel=2)
                kind, nbytes = "f16", n_out * n_in * 2
            else:
                kind = row_type(n_in, types)
                data = encode_rows(kind, bits, scale16, n_in)
                if kind == "f16":
                    w.add_tensor(gname, data.astype(np.float16))
                elif kind == "q2_0" and not hasattr(gguf.GGMLQuantizationType, "Q2_0"):
                    w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType.I8)   # bytes as they are,
                    info = w.tensors[-1][gname]                                        # then the true type
                    w.tensors[-1][gname] = type(info)(shape=(n_out, n_in), dtype=GGML_Q2_0, nbytes=info.nbytes,
                                                      tensor=info.tensor)
                else:
                    w.add_tensor(gname, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind.upper()))
                nbytes = data.nbytes
            report["types"][kind] = report["types"].get(kind, 0) + 1
            report["binary_weights"] += n_in * n_out
            report["binary_bytes"] += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
    report["binary_bits_per_weight"] = round(8 * report["binary_bytes"] / max(report["binary_weights"], 1), 4)
    report["file_bytes"] = Path(out).stat().st_size
    return report
