"""The experiment harness, on top of the library core and the baselines (never imported by them).

* :mod:`~scalabl_pyro.harness.data`: benchmark data sets as :class:`~scalabl_pyro.harness.data.TaskData`
  (local JSONL under ``../shared/data`` or the hub), :mod:`~scalabl_pyro.harness.userdata` (your own
  ``.jsonl``/``.csv``), :mod:`~scalabl_pyro.harness.tasks` (the embedded countries task);
* :mod:`~scalabl_pyro.harness.methods`: every method of the benchmark behind :func:`train_method`;
* :mod:`~scalabl_pyro.harness.experiment`: grids, the demo, reports (:mod:`~scalabl_pyro.harness.runs`: where a
  run's files live; :mod:`~scalabl_pyro.harness.paired`, :mod:`~scalabl_pyro.harness.diagnostics`,
  :mod:`~scalabl_pyro.harness.report`);
* :mod:`~scalabl_pyro.harness.cli`: the ``scalabl-pyro`` command.

Example::

    from scalabl_pyro.harness.methods import train_method
    t = train_method("scalabl", lambda: load_backbone("smollm2"), train.examples, label_words=train.label_words)
"""
from .paired import paired_differences
from .report import grid_section_key, report_sections, write_grid_section, write_report_section

__all__ = ["paired_differences", "grid_section_key", "report_sections", "write_grid_section", "write_report_section"]
