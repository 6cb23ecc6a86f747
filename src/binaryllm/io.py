"""Atomic file writes: a file appears whole under its final name, or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_file(path: Path):
    """Context manager: yields a temporary path next to ``path``; whatever the body writes there is
    fsynced and renamed to ``path`` on success, removed on failure."""
    import contextlib

    @contextlib.contextmanager
    def _cm():
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
    return _cm()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_dir(final: Path):
    """Context manager: yields a temporary folder next to ``final``; on success it is renamed to
    ``final`` (replacing nothing: ``final`` must not exist), on failure it is removed."""
    import contextlib

    @contextlib.contextmanager
    def _cm():
        final_p = Path(final)
        final_p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final_p.name}.", suffix=".tmp", dir=final_p.parent))
        try:
            yield tmp
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final_p.exists():
                shutil.rmtree(final_p)
            os.replace(tmp, final_p)
            _fsync_dir(final_p.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _cm()
