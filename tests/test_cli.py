"""The command line: demo/train/evaluate on the tiny model, each verb taking only the options it uses, and clean
errors for bad input."""
import json
import re

import pytest

import scalabl_pyro
from scalabl_pyro.harness.cli import VERB_OPTIONS, main
from scalabl_pyro.harness.experiment import run_dir

TRAIN_TINY = ["--backbone", "tiny", "--steps", "2", "--batch-size", "4", "--train-limit", "8", "--quiet"]
EVAL_TINY = ["--test-limit", "6", "--num-samples", "3", "--quiet"]
TINY = [*TRAIN_TINY[:-1], *EVAL_TINY]  # demo, benchmark and compare-guides train and evaluate


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
    import scalabl_pyro.harness.demo as experiment

    seen = {}
    monkeypatch.setattr(experiment, "demo", lambda out, *, grid, **kw: seen.setdefault("grid", grid) and "table")
    assert main(["demo", "--out", "unused", "--quiet"]) == 0
    g = seen["grid"]
    assert (g.steps, g.prior, g.guide_lr) == (experiment.DEMO_STEPS, experiment.DEMO_PRIOR,
                                              experiment.DEMO_GUIDE_LR) == (200, "s0", 0.05)
    seen.clear()
    assert main(["demo", "--out", "unused", "--quiet", "--guide-lr", "0.01"]) == 0
    assert seen["grid"].guide_lr == 0.01
    assert g.curve_every == experiment.DEMO_CURVE_EVERY
    seen.clear()
    assert main(["demo", "--out", "unused", "--quiet", "--curve-every", "0"]) == 0
    assert seen["grid"].curve_every is None  # 0: no curve
    seen.clear()
    assert main(["demo", "--out", "unused", "--quiet", "--curve-every", "-1"]) == 2
    seen.clear()
    assert main(["demo", "--out", "unused", "--quiet", "--normalize", "tokens"]) == 0
    assert seen["grid"].normalize == "tokens" and g.normalize == "none"


def test_train_then_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--r", "4", "--normalize", "chars", *TRAIN_TINY]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["class"] == "ScalaBL" and info["guide"]["kind"] == "normal"
    assert len(info["latent_sites"]) == 5
    assert info["config"]["normalize"] == "chars" and info["config"]["scoring"] == "choice"  # --normalize is used
    assert main(["evaluate", str(run), *EVAL_TINY]) == 0
    metrics = json.loads((run / "eval_countries_test" / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["num_samples"] == 3
    assert main(["train", "--out", str(run), "--r", "4", *TRAIN_TINY]) == 2  # refuses to overwrite
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes (pip install 'scalabl_pyro[quant]')")
def test_train_quantize_then_evaluate_reloads_the_quantized_backbone(tmp_path):
    """train --quantize 4bit on a saved (pretrained) backbone: run.json records it, and load_run / evaluate reload
    the backbone in 4-bit (the adapters were trained on those weights)."""
    from scalabl_pyro.backbones import tiny_llama
    from scalabl_pyro.io import load_run

    backbone = tmp_path / "pretrained"
    lm, tok = tiny_llama(hidden_size=64)
    lm.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    run = tmp_path / "run"
    args = ["--backbone", str(backbone), *TRAIN_TINY[2:]]
    assert main(["train", "--out", str(run), "--r", "4", "--quantize", "4bit", *args]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["meta"]["quantization"] == "4bit" and info["meta"]["fsdp"] is False
    model, guide, _ = load_run(run)
    assert type(model.net.decoder.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert main(["evaluate", str(run), *EVAL_TINY]) == 0


def test_train_partial_bayesian_method(tmp_path, capsys):
    run = tmp_path / "last2"
    assert main(["train", "--out", str(run), "--method", "scalabl_last2", "--guide-lr", "0.05", "--r", "4",
                 *TRAIN_TINY]) == 0
    info = json.loads((run / "run.json").read_text())
    stochastic = info["model"]["options"]["stochastic"]
    assert stochastic[-1] == "lm_head" and info["latent_sites"] == [f"lora.{m}.s" for m in stochastic]
    assert main(["evaluate", str(run), *EVAL_TINY]) == 0


def test_plain_lora_run_refuses_what_it_would_ignore(tmp_path, capsys):
    run = tmp_path / "mle"
    assert main(["train", "--out", str(run), "--method", "mle", "--r", "4", *TRAIN_TINY]) == 0
    assert json.loads((run / "run.json").read_text())["guide"] is None
    capsys.readouterr()
    assert main(["evaluate", str(run), *EVAL_TINY]) == 2  # a plain LoRA run has no posterior to sample
    err = capsys.readouterr().err
    assert "--num-samples" in err and "plain LoRA" in err and "drop --num-samples" in err
    assert main(["evaluate", str(run), "--test-limit", "6", "--quiet"]) == 0
    assert json.loads((run / "eval_countries_test" / "metrics.json").read_text())["num_samples"] == 1


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
    (["demo", "--prior", "s0:-1"], "optionally with ':<scale>'"),
    (["train", "--prior", "laplace"], "allowed are 's0'"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    code = main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) if argv[0] != "evaluate" else main(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- an honest CLI
SHARED = sorted({k for keys in VERB_OPTIONS.values() for k in keys})


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"scalabl-pyro {scalabl_pyro.__version__}"


@pytest.mark.parametrize("verb", sorted(VERB_OPTIONS))
def test_help_shows_only_the_options_a_verb_uses_and_an_example(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"  scalabl-pyro {verb} " in out.split("examples:")[1]
    for key in SHARED:
        shown = re.search(rf"(?<![\w-]){re.escape(_flag(key))}(?![\w-])", out) is not None
        assert shown == (key in VERB_OPTIONS[verb]), (verb, key)
    options = out.split("options:")[1].split("examples:")[0]
    for line in options.splitlines():  # every option has a help text next to (or under) it
        if line.startswith("  --") and len(line.split()) == 1:
            assert options.split(line)[1].splitlines()[1].startswith(" " * 10), line


@pytest.mark.parametrize("argv", [
    ["demo", "--data-dir", "x"], ["demo", "--r", "4"],
    ["train", "--num-samples", "3"], ["train", "--test-limit", "6"], ["train", "--seeds", "0,1"],
    ["evaluate", "RUN", "--steps", "2"], ["evaluate", "RUN", "--backbone", "tiny"], ["evaluate", "RUN", "--lr", "1"],
    ["evaluate", "RUN", "--prior", "s0"], ["evaluate", "RUN", "--train-limit", "8"],
    ["evaluate", "RUN", "--normalize", "tokens"],
    ["benchmark", "--r", "4"], ["benchmark", "--seed", "1"], ["benchmark", "--method", "mle"],
    ["compare-guides", "--seeds", "0,1"], ["compare-guides", "--data-dir", "x"],
    ["compare-guides", "--dataset", "boolq"],
])
def test_each_verb_refuses_options_it_does_not_use(argv, tmp_path, capsys):
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    flag = argv[-2]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"scalabl-pyro {argv[0]}: error: unrecognized arguments: {flag}" in err
    assert f"not of {argv[0]}" in err and f"'scalabl-pyro {argv[0]} --help'" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "mle", "--guide", "lowrank"], "--guide only applies to the Bayesian method"),
    (["train", "--method", "map", "--prior", "s0", "--guide-lr", "0.1"], "--prior, --guide-lr only apply"),
    (["train", "--method", "mle", "--kl-anneal", "0.2"], "drop it, or use --method scalabl"),
    (["train", "--scoring", "letter", "--normalize", "tokens"], "--normalize tokens only applies to choice scoring"),
    (["demo", "--scoring", "letter", "--normalize", "chars"], "--normalize chars only applies to choice scoring"),
    (["compare-guides", "--scoring", "letter", "--normalize", "tokens"], "use --scoring choice"),
    (["benchmark", "--scoring", "letter", "--normalize", "tokens"], "but --scoring letter"),
    (["compare-guides", "--guides", "normal,bogus"], "unknown guide(s) 'bogus'"),
    (["train", "--data-dir", "some/dir"], "countries is generated by the package: drop --data-dir"),
    (["benchmark", "--no-run", "--workers", "2"], "--no-run only rebuilds the tables"),
    (["benchmark", "--no-run", "--device", "cpu", "--only-seeds", "0"], "so --device, --only-seeds would change"),
    (["benchmark", "--no-run", "--overwrite"], "drop it, or drop --no-run"),
    (["benchmark", "--workers", "0"], "--workers 0"),
    (["train", "--steps", "5", "--epochs", "2"], "--steps 5 and --epochs 2 both set the budget: give one"),
    (["benchmark", "--steps", "5", "--epochs", "2"], "both set the budget"),
    (["demo", "--epochs", "0"], "--epochs 0: give a positive number"),
    (["train", "--fsdp"], "launch with torchrun"),
    (["train", "--fsdp", "--quantize", "4bit"], "--quantize and --fsdp do not combine"),
    (["train", "--quantize", "8bit", "--backbone", "tiny"], "'tiny' is built in memory"),
])
def test_ignored_combinations_are_refused(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"scalabl-pyro {argv[0]}: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "x").exists()  # refused before anything ran


def test_benchmark_letter_scoring_from_config_with_normalize(tmp_path, capsys):
    from scalabl_pyro.harness.experiment import GridConfig

    cfg = GridConfig(scoring="letter").save(tmp_path / "grid.json")
    assert main(["benchmark", "--config", str(cfg), "--normalize", "tokens", "--out", str(tmp_path / "x")]) == 2
    assert f"scoring='letter' in {cfg}" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["benchmark", "compare-guides"])
def test_normalize_reaches_the_grid(verb, monkeypatch, tmp_path):
    import scalabl_pyro.harness.demo as demo
    import scalabl_pyro.harness.experiment as experiment

    seen = {}
    monkeypatch.setattr(experiment, "run_grid", lambda grid, out, **kw: seen.setdefault("grid", grid) and [])
    monkeypatch.setattr(demo, "compare_guides",
                        lambda out, *, grid, **kw: seen.setdefault("grid", grid) and [{"guide": "normal"}])
    assert main([verb, "--out", str(tmp_path / "x"), "--normalize", "tokens", "--quiet"]) == 0
    assert seen["grid"].normalize == "tokens" and seen["grid"].model_config().normalize == "tokens"


def test_train_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    import scalabl_pyro.checkpoint as checkpoint

    args = ["--r", "4", "--backbone", "tiny", "--steps", "6", "--batch-size", "4", "--train-limit", "8", "--quiet",
            "--checkpoint-every", "2"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(["train", "--out", str(whole), *args]) == 0
    assert not (whole / "checkpoint").exists()  # the finished run replaces its checkpoint
    save = checkpoint.save_checkpoint

    def stop_after_step_4(*a, step, **kw):
        save(*a, step=step, **kw)
        if step == 4:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(checkpoint, "save_checkpoint", stop_after_step_4)
    assert main(["train", "--out", str(run), *args]) == 130  # Ctrl-C: exit code 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert (run / "checkpoint" / "step-00000004").is_dir() and not (run / "run.json").exists()
    capsys.readouterr()
    assert main(["train", "--out", str(run), *args]) == 2  # neither --resume nor --overwrite
    assert "--resume to continue it" in capsys.readouterr().err
    assert main(["train", "--out", str(run), *args, "--resume"]) == 0
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (whole, run))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    a, b = (load_file(str(d / "guide.safetensors")) for d in (whole, run))
    assert all(a[k].equal(b[k]) for k in a)
    assert main(["train", "--out", str(tmp_path / "fresh"), *args, "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_epochs_set_the_budget_per_training_set(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--backbone", "tiny", "--batch-size", "4", "--train-limit", "10", "--quiet", "--r", "4"]
    assert main(["train", "--out", str(run), "--epochs", "1.5", *args]) == 0
    assert "10 examples, 4 steps" in capsys.readouterr().out  # ceil(1.5 * 10 / 4)
    assert json.loads((run / "run.json").read_text())["train_config"]["steps"] == 4
    out = tmp_path / "grid"
    assert main(["benchmark", "--out", str(out), "--device", "cpu", "--epochs", "1.5", "--only-methods", "mle",
                 *[a for a in TINY if a not in ("--steps", "2")]]) == 0
    r = json.loads((run_dir(out, "countries", "mle", 0) / "result.json").read_text())
    assert (r["grid"]["epochs"], r["steps"]) == (1.5, 3)  # train_limit 8 in TINY: ceil(1.5 * 8 / 4)
