"""One Markdown report for several grids: each grid owns a section that its next run replaces in place.

``bench/RESULTS.md`` leads with the reference regime and keeps the short-budget grid below it; both are
written by ``scalabl-pyro benchmark --report bench/RESULTS.md``, each from its own ``--out`` folder.
A section runs from ``<!-- grid: KEY -->`` to ``<!-- end grid: KEY -->`` (``KEY``: the grid's output folder,
relative to the report's folder, so the same folder gets the same section whatever the working directory
and however it is spelled: :func:`write_grid_section`); text outside the sections (the title, notes written
by hand) is kept. A report without any section (the single-grid format before December 2026) is replaced by
the first section written to it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .._utils import atomic_write_text

__all__ = ["write_report_section", "write_grid_section", "grid_section_key", "report_sections", "REPORT_TITLE"]

REPORT_TITLE = "# Benchmark results\n"
_BEGIN, _END = "<!-- grid: {} -->", "<!-- end grid: {} -->"


def _check_key(key: str) -> str:
    if not key or "-->" in key or "\n" in key:
        raise ValueError(f"report section key {key!r} must be a non-empty one-line name without '-->' "
                         "(the grid's output folder, e.g. 'bench/results')")
    return key


def report_sections(text: str) -> list[str]:
    """The section keys of a report, in the order they appear."""
    return re.findall(r"<!-- grid: (.+?) -->", text)


def write_report_section(path: str | os.PathLike, key: str, body: str, *, replaces: str | None = None) -> Path:
    """Put ``body`` in the section ``key`` of the report at ``path`` (atomically) and return the path.

    The section is replaced where it stands; a new one is appended after the others. A missing file, or
    one without sections, starts as :data:`REPORT_TITLE` followed by this section.

    :param key: names the section (one line), e.g. the grid's output folder ``"bench/results_reference"``.
    :param body: Markdown of the section (its heading included).
    :param replaces: an older key of the same section: when ``key`` is not in the file, the section ``replaces``
        is rewritten in its place under ``key``.
    :raises ValueError: the file holds the section's begin marker without its end marker (edited by hand).

    Example::

        write_report_section("bench/RESULTS.md", "bench/results", "## Short budget\\n\\n| ... |\\n")
    """
    path, key = Path(path), _check_key(key)
    begin, end = _BEGIN.format(key), _END.format(key)
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if not report_sections(old):
        return atomic_write_text(path, f"{REPORT_TITLE}\n{section}")
    target = key if begin in old else replaces if replaces and _BEGIN.format(replaces) in old else None
    if target is not None:
        head, rest = old.split(_BEGIN.format(target), 1)
        if _END.format(target) not in rest:
            raise ValueError(f"{path}: section {target!r} has no end marker {_END.format(target)!r}; restore it or "
                             "delete the section")
        tail = rest.split(_END.format(target), 1)[1].lstrip("\n")
        return atomic_write_text(path, f"{head}{section}" + (f"\n{tail}" if tail else ""))
    return atomic_write_text(path, f"{old.rstrip()}\n\n{section}")


def grid_section_key(report: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The section key of a grid's output folder: its path relative to the report's folder (POSIX separators).

    Example::

        grid_section_key("bench/RESULTS.md", "bench/results_reference")  # 'results_reference'
    """
    out, base = Path(out_dir).resolve(), Path(report).resolve().parent
    try:
        return Path(os.path.relpath(out, base)).as_posix()
    except ValueError:  # another drive (Windows)
        return out.as_posix()


def _names_folder(key: str, report: str | os.PathLike, out_dir: str | os.PathLike) -> bool:
    """Whether an existing key names ``out_dir``: read relative to the working directory, the report's folder or
    any folder above it (keys written before :func:`grid_section_key`, e.g. ``bench/results`` from the repo root)."""
    out, k = Path(out_dir).resolve(), Path(key)
    if k.is_absolute():
        return k.resolve() == out
    return any((base / k).resolve() == out for base in (Path.cwd(), *Path(report).resolve().parents))


def write_grid_section(report: str | os.PathLike, out_dir: str | os.PathLike, body: str) -> Path:
    """Put a grid's section (keyed by :func:`grid_section_key`) in the report; a section written earlier for the
    same folder under another spelling (absolute, or relative to another directory) is replaced and re-keyed.

    Example::

        write_grid_section("bench/RESULTS.md", "/work/main/bench/results", "## Short budget\\n")
    """
    key = grid_section_key(report, out_dir)
    old = Path(report).read_text(encoding="utf-8") if Path(report).exists() else ""
    same = [k for k in report_sections(old) if k != key and _names_folder(k, report, out_dir)]
    return write_report_section(report, key, body, replaces=same[0] if same else None)
