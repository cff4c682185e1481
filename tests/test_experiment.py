"""The grid runner: results per run, resume without redoing finished runs, tables, demo."""
import json

import pytest

from scalabl_pyro.harness import demo as demo_mod
from scalabl_pyro.harness import experiment
from scalabl_pyro.harness.demo import demo
from scalabl_pyro.harness.experiment import GridConfig, load_results, run_dir, run_grid, summarize
from scalabl_pyro.harness.report import report_sections


def tiny_grid(**kw):
    base = dict(backbone="tiny", methods=("mle", "scalabl"), steps=2, batch_size=4, train_limit=8, test_limit=6,
                num_samples=3)
    base.update(kw)
    return GridConfig(**base)


def test_grid_writes_results_and_resumes(tmp_path, monkeypatch):
    grid = tiny_grid()
    run_grid(grid, tmp_path, progress=False)
    results = load_results(tmp_path)
    assert sorted(r["method"] for r in results) == ["mle", "scalabl"]
    r = next(r for r in results if r["method"] == "scalabl")
    assert set(r["metrics"]) == {"countries", "countries_shifted"}
    m = r["metrics"]["countries"]
    assert m["n"] == 6 and 0 <= m["acc"] <= 1 and m["nll"] > 0 and m["num_samples"] == 3
    assert 0 <= r["metrics"]["countries_shifted"]["auroc_entropy"] <= 1
    assert r["extra_params"] == 2 * grid.r * 5  # 2r per adapted module (5 on the tiny model)
    h = r["history"]  # fit's posterior monitoring: after the first step and every max(1, steps // 100) steps
    assert h["monitor_steps"] == [0, 1] and len(h["kl"]) == len(h["scale"]) == 2 and all(k > 0 for k in h["kl"])
    assert h["scale"][0] == pytest.approx(0.05, rel=0.2)  # AutoNormal's init_scale, one step in
    post = h["posterior"]  # the final posterior per adapted module (posterior_scales), for reading a cell afterwards
    assert len(post) == 5 and all(set(v) == {"mean_abs", "std", "prior_mean_abs", "prior_std"} for v in post.values())
    assert all(v["std"] == pytest.approx(0.05, rel=0.3) and v["prior_std"] == 1.0 for v in post.values())
    assert all(v["mean_abs"] == pytest.approx(v["prior_mean_abs"], rel=0.2) for v in post.values())  # s0, 2 steps on
    pm = r["point_metrics"]["countries"]  # the same model at its posterior median: one "sample", no disagreement
    assert pm["num_samples"] == 1 and pm["mean_mi"] == pytest.approx(0, abs=1e-6) and pm["n"] == 6
    assert next(r for r in results if r["method"] == "mle")["history"] is None
    assert next(r for r in results if r["method"] == "mle")["point_metrics"] is None
    assert r["temperature"] is None  # recorded only for the methods that fit one
    for name in ("results.md", "results.csv", "ece_vs_acc.png", "grid.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert (run_dir(tmp_path, "countries", "scalabl", 0) / "reliability.png").read_bytes()[:4] == b"\x89PNG"

    # Interrupted grid: delete one run; a rerun redoes only that one.
    (run_dir(tmp_path, "countries", "mle", 0) / "result.json").unlink()
    before = (run_dir(tmp_path, "countries", "scalabl", 0) / "result.json").stat().st_mtime_ns
    calls = []
    real = experiment.run_one
    monkeypatch.setattr(experiment, "run_one", lambda g, m, *a, **k: calls.append(m) or real(g, m, *a, **k))
    run_grid(grid, tmp_path, progress=False)
    assert calls == ["mle"]
    assert (run_dir(tmp_path, "countries", "scalabl", 0) / "result.json").stat().st_mtime_ns == before

    # Other settings in the same folder: refused before anything runs, naming the runs and the settings.
    calls.clear()
    other = tiny_grid(normalize="tokens", steps=3)
    with pytest.raises(experiment.GridMismatchError,
                       match=r"(?s)2 finished run\(s\).*countries.mle.seed0: normalize='none' \(grid: 'tokens'\), "
                             r"steps=2 \(grid: 3\).*--overwrite"):
        run_grid(other, tmp_path, progress=False)
    with pytest.raises(experiment.GridMismatchError):
        experiment.report_grid(other, tmp_path)
    assert calls == []
    # Settings that do not change a run's numbers (here the methods list) are no mismatch.
    experiment.report_grid(tiny_grid(methods=("mle",)), tmp_path)

    # The report: one section keyed by the output folder, headed by the grid's title, replaced on rewrite.
    report = tmp_path / "RESULTS.md"
    experiment.report_grid(tiny_grid(title="Tiny grid"), tmp_path, report=report)
    experiment.report_grid(tiny_grid(title="Tiny grid, again"), tmp_path, report=report)
    text = report.read_text()
    assert report_sections(text) == ["."] and "## Tiny grid, again\n" in text  # the folder, relative to the report
    assert "## Tiny grid\n" not in text and "| countries | countries | scalabl |" in text


def test_grid_only_runs_some_cells_and_keeps_the_whole_grid(tmp_path, monkeypatch):
    grid = tiny_grid(seeds=(0, 1), ood={})
    calls = []
    monkeypatch.setattr(experiment, "run_one", lambda g, m, d, s, *a, **k: calls.append((d, m, s)))
    run_grid(grid, tmp_path, progress=False, only={"methods": ["scalabl"], "seeds": [1]})
    assert calls == [("countries", "scalabl", 1)]
    # grid.json (and so the report's "of N runs" and its regenerate command) still describes the whole grid
    assert GridConfig.load(tmp_path / "grid.json") == grid
    with pytest.raises(ValueError, match=r"seeds \[2\] are not in the grid \(\[0, 1\]\)"):
        run_grid(grid, tmp_path, progress=False, only={"seeds": [2]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dataset'\].*'datasets'"):
        run_grid(grid, tmp_path, progress=False, only={"dataset": ["countries"]})
    assert len(calls) == 1


def test_grid_with_worker_processes_matches_sequential(tmp_path):
    grid = tiny_grid(methods=("mle", "scalabl", "map"), seeds=(0,))
    run_grid(grid, tmp_path / "seq", progress=False)
    run_grid(grid, tmp_path / "par", progress=False, workers=2)
    seq = {r["method"]: r["metrics"] for r in load_results(tmp_path / "seq")}
    par = {r["method"]: r["metrics"] for r in load_results(tmp_path / "par")}
    assert sorted(par) == ["map", "mle", "scalabl"]
    for method, metrics in seq.items():  # same seeds, same data: the same numbers in another process
        for k in ("acc", "ece", "nll", "brier"):
            assert par[method]["countries"][k] == pytest.approx(metrics["countries"][k], abs=1e-5)
    main_table = (tmp_path / "par" / "results.md").read_text().split("Paired differences")[0]
    assert main_table.count("| countries | countries |") == 3


def test_grid_workers_report_failures_and_keep_the_rest(tmp_path):
    grid = tiny_grid(methods=("mle",), datasets=("countries", "no_such_set"), ood={})
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 runs failed.*no_such_set.mle.seed0"):
        run_grid(grid, tmp_path, progress=False, workers=2)
    assert [r["dataset"] for r in load_results(tmp_path)] == ["countries"]


def test_summarize_mean_and_std():
    mk = lambda seed, acc: {"dataset": "d", "method": "mle", "seed": seed, "extra_params": 0,  # noqa: E731
                            "metrics": {"d": {"n": 4, "acc": acc, "ece": 0.1, "nll": 1.0, "brier": 0.5}}}
    rows = summarize([mk(0, 0.5), mk(1, 0.7)])
    assert rows[0]["acc"] == "0.600 ± 0.100" and rows[0]["seeds"] == 2 and rows[0]["ece"] == "0.100 ± 0.000"


def test_demo_refuses_existing_results(tmp_path):
    grid = tiny_grid(methods=("mle",))
    table = demo(tmp_path, grid=grid, progress=False)
    assert "| countries | mle |" in table
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="overwrite"):
        demo(tmp_path, grid=grid, progress=False)


def test_demo_reports_paired_differences_over_seeds(tmp_path):
    from safetensors.torch import load_file

    from scalabl_pyro.metrics import classification_metrics

    grid = tiny_grid(seeds=(0, 1))
    table = demo(tmp_path, grid=grid, progress=False)
    assert "scalabl - mle, mean over 2 seed(s), with a 95% paired bootstrap interval" in table
    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    # the printed difference is the seed-mean metric of scalabl minus that of mle on the same questions
    nll = {m: [] for m in ("mle", "scalabl")}
    for m in nll:
        for k in (0, 1):
            saved = load_file(str(run_dir(tmp_path, "countries", m, k) / "predictions.safetensors"))
            nll[m].append(classification_metrics(saved["countries.mean_probs"], saved["countries.labels"])["nll"])
    expected = sum(nll["scalabl"]) / 2 - sum(nll["mle"]) / 2
    row = next(line for line in table.splitlines()[-3:] if line.startswith("| countries |"))
    assert row.split("|")[4].strip().startswith(f"{expected:+.3f} [")


def test_grid_config_validation_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        GridConfig(methods=("mle", "bogus"))
    with pytest.raises(ValueError, match="scoring"):
        GridConfig(scoring="words")
    with pytest.raises(ValueError, match="kl_anneal"):
        GridConfig(kl_anneal=1.5)
    with pytest.raises(ValueError, match="prior='flat': allowed are 's0'"):
        GridConfig(prior="flat")
    g = tiny_grid(ood={"openbookqa": ["arc_easy"]}, kl_anneal=0.25)
    g.save(tmp_path / "g.json")
    assert GridConfig.load(tmp_path / "g.json") == g
    assert json.loads((tmp_path / "g.json").read_text())["ood"] == {"openbookqa": ["arc_easy"]}
    # the run settings every caller (runs, compare-guides, bench scripts) builds from one grid
    tc, mc = g.train_config(seed=3), g.model_config()
    assert (tc.steps, tc.batch_size, tc.lr, tc.guide_lr, tc.kl_anneal, tc.seed) == (2, 4, g.lr, g.guide_lr, 0.25, 3)
    assert (mc.r, mc.scoring, mc.normalize) == (g.r, g.scoring, g.normalize)


def test_grid_kl_anneal_and_prior_reach_fit(tmp_path, monkeypatch):
    seen = []
    real = experiment.train_method
    monkeypatch.setattr(experiment, "train_method",
                        lambda *a, **k: seen.append((k["train_config"].kl_anneal, k["prior"])) or real(*a, **k))
    run_grid(tiny_grid(methods=("scalabl",), kl_anneal=0.5, ood={}), tmp_path / "a", progress=False)
    run_grid(tiny_grid(methods=("scalabl",), prior="normal", ood={}), tmp_path / "b", progress=False)
    assert seen == [(0.5, "s0"), (0.0, "normal")]  # the default prior is "s0"
    assert load_results(tmp_path / "a")[0]["grid"]["kl_anneal"] == 0.5
    assert load_results(tmp_path / "b")[0]["grid"]["prior"] == "normal"


def test_label_words_must_agree():
    from scalabl_pyro.harness.data import TaskData
    a = TaskData("a", "test", (), ("A", "B", "C", "D"))
    b = TaskData("b", "test", (), ("no", "yes"))
    with pytest.raises(ValueError, match="answer words"):
        experiment._label_words([a, b])
    c = TaskData("c", "test", (), ("A", "B", "C", "D", "E"))
    assert experiment._label_words([a, c]) == ("A", "B", "C", "D", "E")


def test_compare_guides_honours_the_grid_prior(tmp_path, monkeypatch):
    seen = []
    real = demo_mod.resolve_prior
    monkeypatch.setattr(demo_mod, "resolve_prior", lambda p, net: seen.append(p) or real(p, net))
    rows = demo_mod.compare_guides(tmp_path, guides=("normal", "delta"), grid=tiny_grid(prior="s0"), progress=False)
    assert seen == ["s0", "s0"]
    assert [r["guide"] for r in rows] == ["normal", "delta"]
    assert rows[0]["guide_params"] == 2 * 8 * 5 and rows[1]["guide_params"] == 8 * 5  # r=8, 5 sites: loc+scale / loc
    assert (tmp_path / "guides.md").read_text().count("\n| ") == 3  # header row + two guides


def test_grid_budget_in_epochs_gives_each_data_set_its_steps(tmp_path, monkeypatch):
    seen = []
    real = experiment.train_method
    monkeypatch.setattr(experiment, "train_method",
                        lambda *a, **k: seen.append((len(a[2]), k["train_config"].steps)) or real(*a, **k))
    grid = tiny_grid(methods=("mle",), steps=200, epochs=1.5, train_limit=10, ood={})
    run_grid(grid, tmp_path, progress=False)
    assert seen == [(10, 4)]  # ceil(1.5 * 10 / 4) = 4 steps
    r = load_results(tmp_path)[0]
    assert (r["steps"], r["epochs"], r["grid"]["epochs"]) == (4, 1.6, 1.5)
    assert grid.budget() == "1.5 epochs x batch 4" and tiny_grid().budget() == "2 steps x batch 4"
    with pytest.raises(experiment.GridMismatchError, match=r"epochs=1.5 \(grid: 2\)"):
        run_grid(tiny_grid(methods=("mle",), steps=200, epochs=2, train_limit=10, ood={}), tmp_path, progress=False)


@pytest.mark.parametrize("kw, match", [({"epochs": 0}, "epochs=0 must be a positive number"),
                                       ({"epochs": "4"}, "epochs='4' must be a positive number"),
                                       ({"epochs": 4, "steps": 300}, "as steps or as epochs, not both")])
def test_grid_epochs_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        GridConfig(**kw)
    with pytest.raises(ValueError, match="pass num_examples"):
        GridConfig(epochs=2).train_config()


def test_grid_tables_give_paired_differences_against_lora_and_temperature(tmp_path):
    from safetensors.torch import load_file

    from scalabl_pyro.harness import paired_differences
    from scalabl_pyro.metrics import classification_metrics, confidence_auroc

    grid = tiny_grid(methods=("mle", "temperature", "scalabl", "scalabl_temperature"), seeds=(0, 1), train_limit=10,
                     ood={})
    run_grid(grid, tmp_path, progress=False, only={"methods": ["mle", "scalabl"]})
    run_grid(grid, tmp_path, progress=False, only={"methods": ["temperature", "scalabl_temperature"], "seeds": [1]})
    rows = paired_differences(tmp_path, load_results(tmp_path))
    assert [(r["pair"], r["seeds"]) for r in rows] == [("scalabl - mle", 2), ("scalabl - temperature", 1)]
    ece, auroc = {}, {}
    for m, k in (("scalabl", 1), ("temperature", 1)):
        saved = load_file(str(run_dir(tmp_path, "countries", m, k) / "predictions.safetensors"))
        ece[m] = classification_metrics(saved["countries.mean_probs"], saved["countries.labels"])["ece"]
        auroc[m] = confidence_auroc(saved["countries.mean_probs"], saved["countries.labels"])
    v, lo, hi = rows[1]["ece_diff"]
    assert v == pytest.approx(ece["scalabl"] - ece["temperature"], abs=1e-6) and lo <= v <= hi
    v = rows[1]["auroc_ok_diff"][0]  # the ranking of right vs wrong answers, nan where all are right (or wrong)
    assert v == pytest.approx(auroc["scalabl"] - auroc["temperature"], abs=1e-6, nan_ok=True)
    text = (tmp_path / "results.md").read_text()
    assert "Paired differences, ScalaBL minus plain LoRA" in text and "| scalabl - temperature | 1 | 6 |" in text
    assert "| auroc_ok |" in text.split("Paired differences")[1].split("\n\n")[1]  # the pairs' header
    for pair in ("scalabl_temperature - scalabl", "scalabl_temperature - temperature"):  # both remedies together
        assert f"| {pair} | 1 | 6 |" in text
    assert all(r["temperature"] > 0 for r in load_results(tmp_path) if r["method"].endswith("temperature"))
    # the temperature methods also keep their predictions' metrics before T: the saved (tempered) average,
    # untempered by hand (softmax of T * log p), gives them back, and ScalaBL's samples keep their MI there
    from scalabl_pyro.harness.diagnostics import run_diagnostics
    r = next(r for r in load_results(tmp_path) if r["method"] == "scalabl_temperature")
    saved = load_file(str(run_dir(tmp_path, "countries", "scalabl_temperature", 1) / "predictions.safetensors"))
    import torch
    raw = torch.softmax(r["temperature"] * saved["countries.mean_probs"].double().log(), -1)
    before = r["untempered_metrics"]["countries"]
    assert classification_metrics(raw, saved["countries.labels"])["nll"] == pytest.approx(before["nll"], abs=1e-4)
    assert before["num_samples"] == 3 and before["mean_mi"] > 0 and r["metrics"]["countries"]["mean_mi"] == 0
    diag = {d["method"]: d for d in run_diagnostics(tmp_path, load_results(tmp_path))}
    assert diag["scalabl_temperature"]["mi"] == f"{before['mean_mi']:.3g}"  # the table's text
    assert next(r for r in load_results(tmp_path) if r["method"] == "mle")["untempered_metrics"] is None
    # reliability figure per training set: the seed where most of mle/temperature/scalabl/scalabl_temperature ran
    assert "[countries, seed 1](countries.reliability.png)" in text
    assert (tmp_path / "countries.reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_differences_refuse_runs_on_other_questions(tmp_path):
    from safetensors.torch import load_file, save_file

    from scalabl_pyro.harness import paired_differences

    run_grid(tiny_grid(ood={}), tmp_path, progress=False)
    path = run_dir(tmp_path, "countries", "mle", 0) / "predictions.safetensors"
    t = load_file(str(path))
    t["countries.labels"] = (t["countries.labels"] + 1) % 4
    save_file(t, str(path))
    with pytest.raises(ValueError, match="countries.mle.seed0 was evaluated on other countries questions"):
        paired_differences(tmp_path, load_results(tmp_path), against=("mle",))
    path.unlink()  # a run from before predictions were saved: no paired row, no error
    assert paired_differences(tmp_path, load_results(tmp_path), against=("mle",)) == []


@pytest.mark.filterwarnings("ignore::scalabl_pyro.convergence.ConvergenceWarning")  # 6 steps: not meant to converge
def test_heldout_curve_is_recorded_and_leaves_the_run_unchanged(tmp_path):
    import torch
    from safetensors.torch import load_file

    from scalabl_pyro.metrics import classification_metrics

    # 8 training questions, batch 4: 2 steps per epoch, so a curve every epoch has points at steps 2, 4, 6
    plain = tiny_grid(steps=6, ood={})
    curved = tiny_grid(steps=6, ood={}, curve_every=1.0, curve_limit=4)
    run_grid(plain, tmp_path / "plain", progress=False)
    run_grid(curved, tmp_path / "curved", progress=False)
    a = {r["method"]: r for r in load_results(tmp_path / "plain")}
    b = {r["method"]: r for r in load_results(tmp_path / "curved")}
    for method in ("mle", "scalabl"):
        assert a[method]["curve"] is None
        curve = b[method]["curve"]
        assert [(c["step"], c["epoch"], c["n"]) for c in curve] == [(2, 1.0, 4), (4, 2.0, 4), (6, 3.0, 4)]
        # forked RNG, dropout off: the same training trajectory and test numbers with or without the curve
        assert b[method]["final_loss"] == pytest.approx(a[method]["final_loss"], abs=1e-6)
        for k in ("acc", "ece", "nll", "brier"):
            assert b[method]["metrics"]["countries"][k] == pytest.approx(a[method]["metrics"]["countries"][k], abs=1e-6)
    # plain LoRA is deterministic: its last curve point is the final model on the first 4 test questions
    saved = load_file(str(run_dir(tmp_path / "curved", "countries", "mle", 0) / "predictions.safetensors"))
    expected = classification_metrics(saved["countries.mean_probs"][:4], saved["countries.labels"][:4])
    for k in ("acc", "ece", "nll", "brier"):
        assert b["mle"]["curve"][-1][k] == pytest.approx(expected[k], abs=1e-5)
    assert torch.isfinite(torch.tensor([c["mean_conf"] for c in b["scalabl"]["curve"]])).all()


def test_curve_options_are_validated_and_skipped_where_unsupported(tmp_path):
    with pytest.raises(ValueError, match=r"curve_every=0 must be a positive number of epochs"):
        tiny_grid(curve_every=0)
    with pytest.raises(ValueError, match=r"curve_limit=0 must be a positive number of questions"):
        tiny_grid(curve_limit=0)
    grid = tiny_grid(methods=("ensemble",), ood={}, curve_every=1.0)
    assert GridConfig.from_dict(grid.to_dict()) == grid  # round trip through grid.json
    r = experiment.run_one(grid, "ensemble", "countries", 0, tmp_path, progress=False)
    assert r["curve"] is None  # several models: no curve, and no error


def test_demo_plots_heldout_curves(tmp_path):
    grid = tiny_grid(steps=4, curve_every=1.0, curve_limit=4)
    demo(tmp_path, grid=grid, progress=False)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert demo_mod.demo_grid().curve_every == demo_mod.DEMO_CURVE_EVERY


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["scalabl", "ensemble"])
def test_killed_run_resumes_from_its_checkpoint_with_the_same_numbers(tmp_path, monkeypatch, method):
    """A grid cell killed mid-training resumes from its checkpoint (the ensemble: inside its first member) and
    ends with the numbers of an uninterrupted run; the checkpoint folder is gone once the result is written."""
    from scalabl_pyro.harness import methods

    grid = tiny_grid(methods=(method,), steps=6, ood={})
    ref = experiment.run_one(grid, method, "countries", 0, tmp_path / "ref", progress=False)
    assert ref["resumed_from"] is None and not (tmp_path / "ref" / ".checkpoints").exists()

    real_fit = methods.fit

    def dying_fit(*args, **kwargs):
        def callback(step, loss):
            if step == 4:
                raise _Killed
        return real_fit(*args, callback=callback, **kwargs)

    monkeypatch.setattr(methods, "fit", dying_fit)
    with pytest.raises(_Killed):
        experiment.run_one(grid, method, "countries", 0, tmp_path / "run", progress=False)
    ck = experiment.checkpoint_dir(tmp_path / "run", "countries", method, 0)
    assert sorted(p.name for p in ck.rglob("step-*")) == ["step-00000004"]  # one per step (6 steps // 10 -> 1)
    assert not (run_dir(tmp_path / "run", "countries", method, 0) / "result.json").exists()
    monkeypatch.setattr(methods, "fit", real_fit)
    res = experiment.run_one(grid, method, "countries", 0, tmp_path / "run", progress=False)
    assert res["resumed_from"] == [4]
    assert res["steps"] == ref["steps"] == 6
    for k, v in ref["metrics"]["countries"].items():
        assert res["metrics"]["countries"][k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), k
    assert res["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-6)
    assert not (tmp_path / "run" / ".checkpoints").exists()


def test_stale_checkpoint_is_named_and_overwrite_discards_it(tmp_path, monkeypatch):
    """A checkpoint left by the same cell under another budget is refused, naming the folder and the fixes."""
    from scalabl_pyro.harness import methods

    real_fit = methods.fit

    def dying_fit(*args, **kwargs):
        return real_fit(*args, callback=lambda step, loss: (_ for _ in ()).throw(_Killed) if step == 1 else None,
                        **kwargs)

    monkeypatch.setattr(methods, "fit", dying_fit)
    with pytest.raises(_Killed):
        experiment.run_one(tiny_grid(methods=("mle",), steps=2, ood={}), "mle", "countries", 0, tmp_path,
                           progress=False)
    monkeypatch.setattr(methods, "fit", real_fit)
    ck = experiment.checkpoint_dir(tmp_path, "countries", "mle", 0)
    assert ck.is_dir()
    grid = tiny_grid(methods=("mle",), steps=3, ood={})
    with pytest.raises(experiment.CheckpointMismatchError,
                       match=r"countries.mle.seed0: its checkpoint in .*steps.*delete that folder.*--overwrite"):
        experiment.run_one(grid, "mle", "countries", 0, tmp_path, progress=False)
    res = experiment.run_one(grid, "mle", "countries", 0, tmp_path, progress=False, overwrite=True)
    assert res["resumed_from"] is None and res["steps"] == 3 and not ck.exists()
