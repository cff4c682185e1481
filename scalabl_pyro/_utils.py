"""Small helpers shared by every module: atomic file writes.

Results are never half-written: each writer goes to a temporary file in the
same directory and is moved into place with :func:`os.replace`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "atomic_dir", "fsync_tree"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    Example::

        with atomic_path("out/fig.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file, or a directory with every file under it) to disk; best effort where the OS
    cannot fsync a directory (Windows)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path if path.is_dir() else path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory next to ``path``; on success flush it and rename it to ``path``.

    Without ``replace``, ``path`` must not exist yet (a directory cannot be atomically replaced by another).
    With ``replace``, an existing ``path`` is first renamed aside and deleted once the new one is in place
    (restored if the rename fails). On any error the temporary directory is removed, so ``path`` is either
    the old version, absent, or complete.

    Example::

        with atomic_dir("ckpt/step-00000040") as tmp:
            save_file(tensors, tmp / "params.safetensors")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old)
        try:
            os.replace(tmp, path)  # fails (OSError) rather than merge into an existing non-empty directory
        except OSError:
            if old is not None:
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
