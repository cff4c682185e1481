"""The experiment harness: grids, reports and the CLI's building blocks, on top of the library core.

Modules here import from the core (``scalabl_pyro.metrics``, ``.predictive``...) and from the baselines, never
the other way round. (The older harness modules, ``experiment``, ``data``, ``tasks``, ``userdata`` and ``cli``,
still sit at the package's top level; they move here as they are touched.)
"""
from .paired import paired_differences
from .report import report_sections, write_report_section

__all__ = ["paired_differences", "report_sections", "write_report_section"]
