"""One Markdown report for several grids: each grid owns a section that its next run replaces in place.

``bench/RESULTS.md`` leads with the reference regime and keeps the short-budget grid below it; both are
written by ``scalabl-pyro benchmark --report bench/RESULTS.md``, each from its own ``--out`` folder.
A section runs from ``<!-- grid: KEY -->`` to ``<!-- end grid: KEY -->`` (``KEY``: the grid's output folder);
text outside the sections (the title, notes written by hand) is kept. A report without any section (the
single-grid format before December 2026) is replaced by the first section written to it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .._utils import atomic_write_text

__all__ = ["write_report_section", "report_sections", "REPORT_TITLE"]

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


def write_report_section(path: str | os.PathLike, key: str, body: str) -> Path:
    """Put ``body`` in the section ``key`` of the report at ``path`` (atomically) and return the path.

    The section is replaced where it stands; a new one is appended after the others. A missing file, or
    one without sections, starts as :data:`REPORT_TITLE` followed by this section.

    :param key: names the section (one line), e.g. the grid's output folder ``"bench/results_reference"``.
    :param body: Markdown of the section (its heading included).
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
    if begin in old:
        head, rest = old.split(begin, 1)
        if end not in rest:
            raise ValueError(f"{path}: section {key!r} has no end marker {end!r}; restore it or delete the section")
        tail = rest.split(end, 1)[1].lstrip("\n")
        return atomic_write_text(path, f"{head}{section}" + (f"\n{tail}" if tail else ""))
    return atomic_write_text(path, f"{old.rstrip()}\n\n{section}")
