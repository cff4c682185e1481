"""harness/report.py: one report file, one section per grid, replaced in place."""
from __future__ import annotations

import pytest

from scalabl_pyro.harness.report import REPORT_TITLE, report_sections, write_report_section


def test_sections_are_replaced_in_place_and_appended_in_order(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nold single-grid table\n")  # the format before sections
    write_report_section(path, "bench/results_reference", "## Reference\n\nref v1\n")
    text = path.read_text()
    assert "old single-grid table" not in text and text.startswith(REPORT_TITLE)
    write_report_section(path, "bench/results", "## Short budget\n\nshort v1\n")
    path.write_text(path.read_text() + "\nA note written by hand.\n")
    write_report_section(path, "bench/results_reference", "## Reference\n\nref v2\n")
    text = path.read_text()
    assert report_sections(text) == ["bench/results_reference", "bench/results"]
    assert "ref v1" not in text and text.index("ref v2") < text.index("short v1") < text.index("by hand")
    assert text.count("# Benchmark results") == 1
    write_report_section(path, "bench/results", "## Short budget\n\nshort v2\n")
    again = path.read_text()
    assert again == text.replace("short v1", "short v2")


def test_broken_section_is_refused_and_file_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_report_section(path, "a", "## A\n")
    broken = path.read_text().replace("<!-- end grid: a -->", "")
    path.write_text(broken + "<!-- grid: b -->\nB\n<!-- end grid: b -->\n")
    before = path.read_text()
    with pytest.raises(ValueError, match="section 'a' has no end marker"):
        write_report_section(path, "a", "## A again\n")
    assert path.read_text() == before
    with pytest.raises(ValueError, match="one-line name"):
        write_report_section(path, "x -->", "## X\n")
