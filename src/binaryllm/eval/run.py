"""``binaryllm eval``: perplexity on texts and zero-shot accuracy on tasks for a model, a run folder or a
packed folder, with a table on screen and JSON for machines."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import default_corpus, tokenize_sources
from ..errors import BinaryLLMError
from ..models import load_model
from ..train.loop import autocast_for, resolve_device
from .harness import score_items
from .ppl import text_perplexity
from .tasks import load_task, task_label

PPL_NAMES = {  # datasets names of the usual perplexity sets (need the datasets library and a cache/network)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
}


@dataclass
class EvalConfig:
    ppl: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    seq_len: int = 2048
    stride: int = 0
    batch_size: int = 8
    limit: int = 0
    device: str = "auto"
    amp: str = "auto"


def open_model(spec: str, device: str = "cpu"):
    """(model, tokenizer, description) for a run folder (frozen 1-bit), or anything load_model takes."""
    p = Path(spec) if spec else None
    if p is not None and (p / "run.yaml").is_file():
        from ..runs import load_run
        model, tok = load_run(p, frozen=True, device=device)
        return model, tok, f"run {p} (frozen 1-bit)"
    if p is not None and (p / "config.json").is_file():
        qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
        if qc.get("quant_method") == "binaryllm":
            from .. import load as load_packed  # provided by the export module
            model, tok = load_packed(p, device=device)
            return model, tok, f"packed {p}"
    model, tok, src = load_model(spec)
    return model.to(device), tok, src.description


def _ppl_tokens(name: str, tokenizer, cache_dir: str = "") -> torch.Tensor:
    if name in ("default-test", "default-val"):
        return torch.from_numpy(tokenize_sources(tokenizer, [str(default_corpus()[name.split("-")[1]])]).astype(np.int64))
    if name in PPL_NAMES:
        try:
            import datasets
        except ImportError:
            raise BinaryLLMError(f"perplexity set {name} needs the datasets library (pip install datasets) and its "
                                 "data in the cache or network access; give a local text file instead") from None
        path, conf, split, fld = PPL_NAMES[name]
        try:
            ds = datasets.load_dataset(path, conf, split=split)
        except Exception as e:
            raise BinaryLLMError(f"cannot load {name} ({type(e).__name__}); give a local text file instead") from None
        text = "\n\n".join(ds[fld])
        return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    # a text file: joined and tokenized once, as in the GPTQ protocol
    return torch.from_numpy(tokenize_sources(tokenizer, [name], cache_dir=cache_dir).astype(np.int64))


def check_tokenizer(model, tokenizer) -> None:
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.num_embeddings:
        raise BinaryLLMError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{emb.num_embeddings}: they do not belong together; use the model's own tokenizer")


def evaluate(model, tokenizer, cfg: EvalConfig, progress: bool = True) -> dict:
    device = resolve_device(cfg.device)
    amp = autocast_for(device, cfg.amp)
    check_tokenizer(model, tokenizer)
    for t in cfg.tasks:  # fail on a bad task name before spending time on perplexity
        if not t.endswith(".jsonl"):
            load_task(t, limit=1)
    model = model.to(device).eval()
    res: dict = {"ppl": {}, "tasks": {}, "config": asdict(cfg)}
    t0 = time.time()
    for name in cfg.ppl:
        toks = _ppl_tokens(name, tokenizer)
        res["ppl"][name] = text_perplexity(model, toks, cfg.seq_len, cfg.stride, cfg.batch_size, device, amp,
                                           progress)
    for name in cfg.tasks:
        items = load_task(name, cfg.limit)
        t1 = time.time()
        r = score_items(model, tokenizer, items, batch_size=max(cfg.batch_size, 8) * 4, device=device,
                        autocast=amp, max_len=cfg.seq_len, progress=progress)
        r["seconds"] = round(time.time() - t1, 2)
        res["tasks"][task_label(name)] = r
    if res["tasks"]:
        res["avg_acc"] = sum(r["acc"] for r in res["tasks"].values()) / len(res["tasks"])
    res["seconds"] = round(time.time() - t0, 2)
    return res


def format_table(res: dict) -> str:
    lines = ["| metric | value |", "| --- | ---: |"]
    for k, v in res["ppl"].items():
        lines.append(f"| ppl {k} | {v['ppl']:.2f} |")
    for k, v in res["tasks"].items():
        lines.append(f"| {k} acc / acc_norm (n={v['n']}) | {v['acc']:.2f} / {v['acc_norm']:.2f} |")
    if "avg_acc" in res:
        lines.append(f"| average acc | {res['avg_acc']:.2f} |")
    return "\n".join(lines)
