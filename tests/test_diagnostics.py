"""harness/diagnostics.py: each run's over-confidence and posterior record, against hand computations."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from scalabl_pyro.harness.diagnostics import DIAGNOSTIC_COLUMNS, kl_tail_change, run_diagnostics
from scalabl_pyro.harness.report import write_tables


def test_kl_tail_change_by_hand():
    kls = [4, 3, 2, 2, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]  # last fifth (1.1, 1.0) against the fifth before (1.3, 1.2)
    assert kl_tail_change(kls) == pytest.approx((1.05 - 1.25) / 1.25)
    assert kl_tail_change([1.0] * 10) == 0.0
    assert math.isnan(kl_tail_change([3.0, 2.0, 1.0]))  # too few points to say
    assert kl_tail_change([5, 4, float("nan"), 3, 3, 3, 2]) == pytest.approx((2 - 3) / 3)  # nan dropped: 6 points


def _run(tmp_path, method, seed, probs, labels, *, history=None, point=None):
    folder = tmp_path / f"arc_easy.{method}.seed{seed}"
    folder.mkdir()
    acc = float((probs.argmax(-1) == labels).float().mean())
    r = {"dataset": "arc_easy", "method": method, "seed": seed, "extra_params": 0,
         "metrics": {"arc_easy": {"acc": acc, "ece": 0.1 * (seed + 1), "nll": 1.0 + seed, "brier": 0.5, "n": 4,
                                  "mean_mi": 0.02 * (seed + 1),
                                  "num_samples": 1 if method == "mle" else 10}},
         "history": history, "point_metrics": {"arc_easy": point} if point else None}
    save_file({"arc_easy.mean_probs": probs, "arc_easy.labels": labels}, str(folder / "predictions.safetensors"))
    (folder / "result.json").write_text(json.dumps(r))
    return r


def test_run_diagnostics_by_hand(tmp_path):
    labels = torch.tensor([0, 1, 0, 1])
    confident = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # conf 0.75, acc 0.5
    post = {"m1": {"mean_abs": 2.0, "std": 0.2, "prior_mean_abs": 1.0, "prior_std": 1.0},  # rel 0.1, moved 2
            "m2": {"mean_abs": 1.0, "std": 0.3, "prior_mean_abs": 1.0, "prior_std": 1.0},  # rel 0.3, moved 1
            "m3": {"mean_abs": 0.5, "std": 0.5, "prior_mean_abs": 1.0, "prior_std": 1.0}}  # rel 1.0, moved 0.5
    hist = {"monitor_steps": list(range(10)), "kl": [4, 3, 2, 2, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0], "scale": [0.1] * 10,
            "posterior": post}
    results = [
        _run(tmp_path, "mle", 0, confident, labels),
        _run(tmp_path, "scalabl", 0, confident * 0 + 0.5, labels, history=hist,
             point={"ece": 0.3, "nll": 2.0, "acc": 0.5}),
        _run(tmp_path, "scalabl", 1, confident, labels),  # an older run: no history, no point metrics
    ]
    rows = {r["method"]: r for r in run_diagnostics(tmp_path, results)}
    mle, sb = rows["mle"], rows["scalabl"]
    assert set(mle) == set(DIAGNOSTIC_COLUMNS)
    assert (mle["acc"], mle["conf"], mle["gap"]) == ("0.500", "0.750", "+0.250")
    assert mle["auroc_ok"] == "0.750"  # right answers at 0.9 and 0.7, wrong at 0.8 and 0.6: 3 of 4 pairs ordered
    assert sb["auroc_ok"] == "0.625"  # (0.5 for all-tied confidences + 0.75) / 2
    assert mle["mi"] == mle["kl_end"] == mle["rel_noise"] == mle["ece_point"] == ""  # no guide: blank
    assert sb["seeds"] == 2 and sb["conf"] == "0.625" and sb["gap"] == "+0.125"  # (0.5 + 0.75) / 2 - 0.5
    assert sb["mi"] == "0.03"  # (0.02 + 0.04) / 2: every sampled run has it
    assert sb["kl_end"] == "1" and sb["kl_tail"] == "-16%"
    assert sb["rel_noise"] == "0.300" and sb["s_moved"] == "1.000"  # medians over the modules
    assert (sb["ece_point"], sb["nll_point"]) == ("0.300", "2.000")
    assert (sb["ece"], sb["nll"]) == ("0.150", "1.500")  # both seeds


def test_report_gets_the_reading_table(tmp_path):
    labels = torch.tensor([0, 1])
    results = [_run(tmp_path, "mle", 0, torch.tensor([[0.9, 0.1], [0.9, 0.1]]), labels)]
    write_tables(tmp_path, results)
    text = (tmp_path / "results.md").read_text()
    assert "Reading the runs" in text and "| arc_easy | mle | 1 | 0.500 | 0.900 | +0.400 |" in text
