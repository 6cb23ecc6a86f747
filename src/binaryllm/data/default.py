"""The embedded default corpus, assembled from Debian packages on this machine.

Sources (all English): the King James Bible (``bible-kjv`` + ``bible-kjv-text``, read with the ``bible``
tool, one document per chapter), ``fortunes`` (one document per fortune), the Python documentation
sources (``python3.11-doc``: ``html/_sources/*.rst.txt``) and the Perl manual (``perl-doc``: ``*.pod``).

Documents go to train / val / test by a hash of their source and index (2% val, 2% test), so the split is
the same on every machine that has the same packages.  ``test`` is held-out text that training never
sees and that is not used for tuning either; ``val`` is for validation during training and tuning.
"""
from __future__ import annotations

import glob
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

from ..errors import BinaryLLMError
from ..io import atomic_write_text
from .corpus import cache_root

APT_PACKAGES = ["bible-kjv", "fortunes", "python3.11-doc", "perl-doc"]
SPLITS = ("train", "val", "test")
MIN_BYTES = 20_000_000
FORMAT = 1


def default_corpus_dir(cache_dir: str = "") -> Path:
    return cache_root(cache_dir) / "corpus" / "default"


def _bible() -> Iterator[tuple[str, str]]:
    exe = shutil.which("bible")
    if not exe:
        return
    out = subprocess.run([exe, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapter, verses = None, []
    for line in out.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+)\s+(.*)$", line)
        if not m:
            if verses and line.strip():
                verses[-1] += " " + line.strip()
            continue
        key = f"{m.group(1)}{m.group(2)}"
        if key != chapter and verses:
            yield f"bible:{chapter}", "\n".join(verses)
            verses = []
        chapter = key
        verses.append(m.group(4).strip())
    if verses:
        yield f"bible:{chapter}", "\n".join(verses)


def _fortunes() -> Iterator[tuple[str, str]]:
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        p = Path(path)
        if p.suffix in (".dat", ".u8") or p.is_symlink() or not p.is_file():
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r".\x08", "", text)  # overstriking (x BACKSPACE x)
        for i, entry in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            entry = entry.strip("\n")
            if entry.strip():
                yield f"fortunes:{p.name}:{i}", entry


def _files(pattern: str, tag: str) -> Iterator[tuple[str, str]]:
    seen: set[Path] = set()
    for path in sorted(glob.glob(pattern, recursive=True)):
        real = Path(path).resolve()  # the same file may be reachable through a versioned symlink
        if real in seen:
            continue
        seen.add(real)
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield f"{tag}:{Path(path).name}", text


def iter_sources() -> Iterator[tuple[str, str]]:
    yield from _bible()
    yield from _fortunes()
    yield from _files("/usr/share/doc/python3.*/html/_sources/**/*.rst.txt", "python-doc")
    yield from _files("/usr/share/perl/*/pod/*.pod", "perl-doc")


def split_of(doc_id: str) -> str:
    b = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) % 100
    return "test" if b < 2 else "val" if b < 4 else "train"


def build_default_corpus(cache_dir: str = "", force: bool = False, min_bytes: int = MIN_BYTES) -> Path:
    """Write train/val/test.jsonl and manifest.json; returns the folder."""
    out = default_corpus_dir(cache_dir)
    if not force and (out / "manifest.json").is_file():
        return out
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    sizes: dict[str, int] = {s: 0 for s in SPLITS}
    per_source: dict[str, int] = {}
    for doc_id, text in iter_sources():
        s = split_of(doc_id)
        parts[s].append(json.dumps({"text": text, "source": doc_id}, ensure_ascii=False))
        n = len(text.encode("utf-8"))
        sizes[s] += n
        src = doc_id.split(":")[0]
        per_source[src] = per_source.get(src, 0) + n
    total = sum(sizes.values())
    if total < min_bytes:
        raise BinaryLLMError(
            f"the default corpus needs at least {min_bytes // 1_000_000} MB of text but found "
            f"{total / 1e6:.1f} MB; install the Debian packages: apt-get install -y {' '.join(APT_PACKAGES)}")
    for s in SPLITS:
        atomic_write_text(out / f"{s}.jsonl", "\n".join(parts[s]) + "\n")
    manifest = {"format": FORMAT, "bytes": sizes, "documents": {s: len(parts[s]) for s in SPLITS},
                "bytes_per_source": per_source, "split_rule": "sha1(doc id) % 100: <2 test, <4 val"}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return out


def default_corpus(cache_dir: str = "") -> dict[str, Path]:
    """Paths of the default corpus splits, building it if the source packages are installed."""
    d = build_default_corpus(cache_dir)
    return {s: d / f"{s}.jsonl" for s in SPLITS}
