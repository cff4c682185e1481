"""The command line: demo/train/evaluate on the tiny model, and clean errors for bad input."""
import json

import pytest

from scalabl_pyro.cli import main
from scalabl_pyro.experiment import run_dir

TINY = ["--backbone", "tiny", "--steps", "2", "--batch-size", "4", "--train-limit", "8", "--test-limit", "6",
        "--num-samples", "3", "--quiet"]


def test_demo_and_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "| countries | scalabl |" in text and "| countries_shifted | mle |" in text
    assert "prior Normal(s0, 1)" in text  # the demo's prior (chosen on validation), unless --prior says otherwise
    assert json.loads((run_dir(out, "countries", "scalabl", 0) / "result.json").read_text())["grid"]["prior"] == "s0"
    assert "2 steps" in text  # --steps overrides the demo's budget
    assert main(["demo", "--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), *TINY, "--overwrite"]) == 0


def test_demo_defaults_to_its_own_budget_and_prior(monkeypatch):
    import scalabl_pyro.experiment as experiment

    seen = {}
    monkeypatch.setattr(experiment, "demo", lambda out, *, grid, **kw: seen.setdefault("grid", grid) and "table")
    assert main(["demo", "--out", "unused", "--quiet"]) == 0
    g = seen["grid"]
    assert (g.steps, g.prior, g.guide_lr) == (experiment.DEMO_STEPS, experiment.DEMO_PRIOR,
                                              experiment.DEMO_GUIDE_LR) == (200, "s0", 0.05)
    seen.clear()
    assert main(["demo", "--out", "unused", "--quiet", "--guide-lr", "0.01"]) == 0
    assert seen["grid"].guide_lr == 0.01


def test_train_then_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--r", "4", *TINY]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "ScalaBL" and info["guide"] == "normal" and len(info["latent_sites"]) == 5
    assert main(["evaluate", str(run), *TINY]) == 0
    metrics = json.loads((run / "eval_countries_test" / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["num_samples"] == 3
    assert main(["train", "--out", str(run), "--r", "4", *TINY]) == 2  # refuses to overwrite
    assert "already holds a run" in capsys.readouterr().err


def test_benchmark_runs_then_reports_without_running(tmp_path, capsys):
    out, report = tmp_path / "grid", tmp_path / "RESULTS.md"
    assert main(["benchmark", "--out", str(out), "--report", str(report), "--device", "cpu", *TINY]) == 0
    assert sorted(p.parent.name.split(".")[1] for p in out.glob("countries.*.seed0/result.json")) == ["mle", "scalabl"]
    result = json.loads((run_dir(out, "countries", "mle", 0) / "result.json").read_text())
    assert "cores" in result["hardware"] and "torch" in result["hardware"]
    # a run copied in from another machine shows up in the rebuilt report, and nothing is run again
    (run_dir(out, "countries", "scalabl", 0) / "result.json").unlink()
    (out / "results.md").unlink()
    assert main(["benchmark", "--out", str(out), "--report", str(report), "--no-run", *TINY]) == 0
    assert not (run_dir(out, "countries", "scalabl", 0) / "result.json").exists()
    assert "| countries | countries | mle |" in (out / "results.md").read_text()
    assert "Finished runs: 1 of 2" in report.read_text() and "(1 runs)" in report.read_text()
    # with no finished run the report still says where things stand
    empty = tmp_path / "empty"
    assert main(["benchmark", "--out", str(empty), "--report", str(report), "--no-run", *TINY]) == 0
    assert "No finished runs" in capsys.readouterr().out
    assert "Finished runs: 0 of 2" in report.read_text() and "No finished runs yet." in report.read_text()
    # a finished run made with other settings is refused, with the way out
    assert main(["benchmark", "--out", str(out), "--no-run", *TINY, "--steps", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_benchmark_only_flags_run_a_subset(tmp_path):
    out = tmp_path / "grid"
    assert main(["benchmark", "--out", str(out), "--device", "cpu", *TINY, "--seeds", "0,1",
                 "--only-methods", "mle", "--only-seeds", "1"]) == 0
    assert [p.parent.name for p in out.glob("*/result.json")] == [run_dir(out, "countries", "mle", 1).name]
    assert json.loads((out / "grid.json").read_text())["seeds"] == [0, 1]
    assert main(["benchmark", "--out", str(out), *TINY, "--only-seeds", "one"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "openbookqaa"], "openbookqa"),
    (["evaluate", "/nonexistent/run"], "not a run directory"),
    (["train", "--backbone", "/nonexistent/model"], "Could not load the model"),
    (["demo", "--scoring", "choice", "--steps", "0"], "steps"),
    (["demo", "--seeds", "0,x"], "give integers separated by commas"),
    (["demo", "--device", "gpu0"], "is not a device"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    code = main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) if argv[0] != "evaluate" else main(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
