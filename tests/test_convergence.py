"""scalabl_pyro.convergence: the held-out curve callback (the KL / scale monitor is tested in test_train)."""
import json

import pyro
import pytest
import torch

from scalabl_pyro import TrainConfig, fit, predict
from scalabl_pyro.convergence import HeldoutCurve
from scalabl_pyro.guides import default_guide
from scalabl_pyro.metrics import classification_metrics, heldout_curves_plot


def _train(make_model, examples, *, curve_every=None, steps=12, path=None, **cfg):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = make_model("letter", num_data=16)
    guide = default_guide(model)
    curve = None
    if curve_every:
        curve = HeldoutCurve(model, guide, examples[16:], every=curve_every, num_data=16, batch_size=4,
                             num_samples=3, seed=5, path=path)
    fit(model, guide, examples[:16], config=TrainConfig(steps=steps, batch_size=4, guide_lr=0.05, **cfg),
        progress=False, callback=curve, warn_unconverged=False)
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return model, guide, curve, params


def test_curve_records_every_epoch_and_matches_a_direct_prediction(make_model, examples):
    model, guide, curve, _ = _train(make_model, examples, curve_every=4)
    assert [r["step"] for r in curve.records] == [4, 8, 12]
    assert [r["epoch"] for r in curve.records] == [1.0, 2.0, 3.0]  # 4 steps x batch 4 = 16 = one epoch
    torch.manual_seed(5)  # the curve's seed: the same posterior draws as its last evaluation
    pred = predict(model, guide, examples[16:], num_samples=3)
    want = classification_metrics(pred.mean_probs, pred.labels)
    last = curve.records[-1]
    for k in ("acc", "ece", "nll", "brier"):
        assert last[k] == pytest.approx(want[k], abs=1e-6)
    assert last["mean_conf"] == pytest.approx(float(pred.mean_probs.max(-1).values.mean()), abs=1e-6)
    assert last["mean_mi"] == pytest.approx(float(pred.mutual_information.mean()), abs=1e-7)
    assert last["num_samples"] == 3 and last["n"] == len(examples) - 16


def test_curve_leaves_the_training_trajectory_alone(make_model, examples):
    _, _, _, with_curve = _train(make_model, examples, curve_every=2)
    _, _, _, without = _train(make_model, examples)
    assert with_curve.keys() == without.keys()
    assert all(torch.equal(with_curve[k], without[k]) for k in without)


def test_curve_file_is_written_and_reloaded_and_later_records_are_replaced(make_model, examples, tmp_path):
    path = tmp_path / "curve.json"
    model, guide, curve, _ = _train(make_model, examples, curve_every=4, path=path)
    assert json.loads(path.read_text())["records"] == curve.records
    again = HeldoutCurve(model, guide, examples[16:], every=4, num_data=16, batch_size=4, num_samples=3, seed=5,
                         path=path)
    assert again.records == curve.records  # a resumed run starts from what is on disk
    rec = again.record(8)  # re-evaluating step 8 (a resume from a step-8 checkpoint) drops steps 8 and 12
    assert [r["step"] for r in again.records] == [4, 8] and again.records[-1] == rec
    assert [r["step"] for r in json.loads(path.read_text())["records"]] == [4, 8]


def test_curve_evaluates_with_lora_dropout_off_and_turns_it_back_on(make_model, examples):
    model = make_model("letter", num_data=16, bayes=False, lora_dropout=0.5)
    drops = [m for m in model.net.peft_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops
    for m in drops:
        m.train()
    curve = HeldoutCurve(model, None, examples[16:], every=1, num_data=16)
    a, b = curve.record(1), curve.record(1)
    assert a["nll"] == b["nll"]  # deterministic: dropout was off while predicting
    assert all(m.training for m in drops)


@pytest.mark.parametrize("kwargs, match", [({"every": 0}, "every=0 must be a positive integer"),
                                           ({"every": 2, "examples": []}, "no held-out examples")])
def test_curve_bad_arguments(make_model, examples, kwargs, match):
    model = make_model("letter", bayes=False)
    kw = {"examples": examples, "num_data": 24, **kwargs}
    with pytest.raises(ValueError, match=match):
        HeldoutCurve(model, None, kw.pop("examples"), **kw)


def test_heldout_curves_plot(tmp_path):
    recs = [{"epoch": e, "ece": 0.1 * e, "nll": 0.5 + e} for e in (1, 2, 3)]
    path = heldout_curves_plot({"plain LoRA": recs, "ScalaBL": recs[:2]}, tmp_path / "c.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"'x': records lack \['nll'\]"):
        heldout_curves_plot({"x": [{"epoch": 1, "ece": 0.1}]}, tmp_path / "d.png")
    with pytest.raises(ValueError, match="non-empty"):
        heldout_curves_plot({"x": []}, tmp_path / "e.png")
