"""Text in, fixed-length token blocks out: read, tokenize once (cached), pack, split, order.

Sources: plain text files, folders of them (recursive), ``.jsonl``/``.json`` lines and ``.parquet`` files
with a text field, or a ``datasets`` name when that library and the network are available.  Each
document is followed by the tokenizer's EOS token; the stream is cut into blocks of ``seq_len`` tokens
and the tail is dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import BinaryLLMError
from ..io import atomic_write_bytes

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".tex", ".pod", ".jsonl", ".json", ".parquet", ""}


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("BINARYLLM_CACHE") or Path.home() / ".cache" / "binaryllm")


def _expand(sources: Iterable[str]) -> list[Path | str]:
    out: list[Path | str] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not f.name.startswith("."))
            if not files:
                raise BinaryLLMError(f"folder {p} holds no text files (.txt, .md, .rst, .jsonl, .parquet)")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        elif os.sep in s or s.startswith(".") or Path(s).suffix:
            raise BinaryLLMError(f"data file {s} does not exist; give existing files or folders to --data")
        else:
            out.append(s)  # a datasets name
    return out


def _read_jsonl(p: Path, field: str) -> Iterator[str]:
    with open(p, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise BinaryLLMError(f"{p}:{i} is not valid JSON; each line of a .jsonl file must be one "
                                     "JSON object") from None
            if not isinstance(rec, dict) or field not in rec:
                raise BinaryLLMError(f"{p}:{i} has no field {field!r}; set --text-field to the field "
                                     "that holds the text")
            yield str(rec[field])


def _read_parquet(p: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BinaryLLMError(f"reading {p} needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(p)
    if field not in table.column_names:
        raise BinaryLLMError(f"{p} has no column {field!r} (columns: {', '.join(table.column_names)}); "
                             "set --text-field")
    for v in table.column(field).to_pylist():
        yield str(v)


def _read_datasets(name: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise BinaryLLMError(f"{name!r} is not a file or folder, and loading it as a datasets name needs "
                             "the datasets library (pip install datasets) and network access") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, ...
        raise BinaryLLMError(f"cannot load dataset {name!r} ({type(e).__name__}); give local text files "
                             "to --data instead") from None
    if field not in ds.column_names:
        raise BinaryLLMError(f"dataset {name!r} has no field {field!r}; set --text-field")
    for v in ds[field]:
        yield str(v)


def read_documents(sources: Iterable[str], text_field: str = "text") -> Iterator[str]:
    for src in _expand(sources):
        if isinstance(src, str):
            yield from _read_datasets(src, text_field)
            continue
        suf = src.suffix.lower()
        if suf in (".jsonl", ".json"):
            yield from _read_jsonl(src, text_field)
        elif suf == ".parquet":
            yield from _read_parquet(src, text_field)
        else:
            try:
                yield src.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise BinaryLLMError(f"cannot read {src} ({e.strerror}); check the path and permissions") from None


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    vocab = tokenizer.get_vocab()
    for tok in sorted(vocab)[:: max(1, len(vocab) // 2048)]:
        h.update(f"{tok}={vocab[tok]};".encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def _sources_fingerprint(sources: list[str], text_field: str) -> str:
    h = hashlib.sha256(text_field.encode())
    for src in _expand(sources):
        if isinstance(src, Path):
            st = src.stat()
            h.update(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
        else:
            h.update(f"datasets:{src};".encode())
    return h.hexdigest()[:16]


def tokenize_sources(tokenizer, sources: list[str], text_field: str = "text", cache_dir: str = "",
                     progress: bool = False) -> np.ndarray:
    """Token ids (int32) of all documents, each followed by EOS; cached on disk by content identity."""
    if not sources:
        raise BinaryLLMError("no data given; pass text files or folders to --data")
    key = f"{tokenizer_fingerprint(tokenizer)}-{_sources_fingerprint(sources, text_field)}"
    path = cache_root(cache_dir) / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BinaryLLMError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    chunks: list[np.ndarray] = []
    docs = read_documents(sources, text_field)
    if progress:
        from tqdm.auto import tqdm
        docs = tqdm(docs, desc="tokenizing", unit="doc")
    batch: list[str] = []

    def flush():
        # a batch lets the fast (Rust) tokenizer use every core
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.append(eos)
            chunks.append(np.asarray(ids, dtype=np.int32))
        batch.clear()
    for doc in docs:
        if doc.strip():
            batch.append(doc)
            if len(batch) >= 256:
                flush()
    if batch:
        flush()
    if not chunks:
        raise BinaryLLMError(f"the corpus {', '.join(map(str, sources))} is empty; give files with text")
    arr = np.concatenate(chunks)
    import io
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return arr


def to_blocks(tokens: np.ndarray, seq_len: int, what: str = "corpus") -> torch.Tensor:
    n = len(tokens) // seq_len
    if n < 1:
        raise BinaryLLMError(f"the {what} has {len(tokens)} tokens, fewer than one block of --seq-len "
                             f"{seq_len}; give more text or lower --seq-len")
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the last ceil(fraction * N) blocks (at least 1) are validation."""
    n = blocks.shape[0]
    n_val = max(1, int(np.ceil(n * val_fraction)))
    if n - n_val < 1:
        raise BinaryLLMError(f"the corpus gives only {n} block(s) of the sequence length: too few to "
                             "split into training and validation; give more text or lower --seq-len")
    return blocks[: n - n_val], blocks[n - n_val:]


class BlockOrder:
    """Seeded epoch-wise shuffled order of training blocks.  Micro-batch k (global, 0-based) is a pure
    function of (seed, k), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        self.n, self.b, self.seed = n_blocks, batch_size, seed
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._perm_cache[epoch]

    def indices(self, k: int) -> torch.Tensor:
        start = k * self.b
        out = []
        while len(out) < self.b:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(self.b - len(out), self.n - pos)
            out.extend(self._perm(epoch)[pos: pos + take].tolist())
        return torch.tensor(out, dtype=torch.long)
