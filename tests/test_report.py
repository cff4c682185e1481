"""harness/report.py: one report file, one section per grid, replaced in place."""
from __future__ import annotations

import pytest

from scalabl_pyro.harness.report import (REPORT_TITLE, grid_section_key, report_sections, write_grid_section,
                                         write_report_section)


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


def test_grid_section_key_is_the_folder_relative_to_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert grid_section_key("bench/RESULTS.md", "bench/results_reference") == "results_reference"
    assert grid_section_key(tmp_path / "bench/RESULTS.md", tmp_path / "bench/results") == "results"
    assert grid_section_key("bench/RESULTS.md", "runs/x") == "../runs/x"


def test_one_section_per_folder_however_it_is_spelled(tmp_path, monkeypatch):
    """The same output folder, given absolute, relative to the repo root or from inside bench/, has one section;
    a section keyed the old way (relative to the working directory) is re-keyed in place, others are kept."""
    (tmp_path / "bench").mkdir()
    report = tmp_path / "bench" / "RESULTS.md"
    monkeypatch.chdir(tmp_path)
    write_report_section("bench/RESULTS.md", "bench/results_reference", "## Reference\n\nv1\n")  # old-style key
    write_report_section("bench/RESULTS.md", "bench/results", "## Short\n\nshort\n")
    write_grid_section("bench/RESULTS.md", "bench/results_reference", "## Reference\n\nv2\n")
    text = report.read_text()
    assert report_sections(text) == ["results_reference", "bench/results"]
    assert "v1" not in text and text.index("v2") < text.index("short")
    write_grid_section(report, (tmp_path / "bench" / "results_reference").as_posix(), "## Reference\n\nv3\n")
    monkeypatch.chdir(tmp_path / "bench")
    write_grid_section("RESULTS.md", "results_reference", "## Reference\n\nv4\n")
    write_grid_section("RESULTS.md", "results", "## Short\n\nshort 2\n")  # the old 'bench/results', re-keyed
    text = report.read_text()
    assert report_sections(text) == ["results_reference", "results"]
    assert "v3" not in text and "v4" in text and "short 2" in text and text.count("## Reference") == 1
    write_grid_section("RESULTS.md", "other", "## Other\n")
    assert report_sections(report.read_text()) == ["results_reference", "results", "other"]
