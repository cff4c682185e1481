"""Tests for scalabl_pyro.metrics: hand-computed numbers, validation and plots."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from scalabl_pyro.metrics import (
    calibration_bins,
    classification_metrics,
    confidence_auroc,
    ece_accuracy_plot,
    format_table,
    ood_auroc,
    paired_bootstrap,
    reliability_diagram,
    uncertainty_decomposition,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 3x3 example: argmax = [0, 1, 1], labels = [0, 1, 2] -> 2 of 3 correct.
P3 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.3]])
Y3 = torch.tensor([0, 1, 2])

# ECE example, n_bins=5 (edges 0, .2, .4, .6, .8, 1); no confidence sits on an edge.
#   row  conf  pred label correct  bin
#   0    0.90  0    0     1        4
#   1    0.85  0    1     0        4
#   2    0.70  0    0     1        3
#   3    0.65  1    1     1        3
#   4    0.45  0    1     0        2
PE = torch.tensor([[0.9, 0.05, 0.05], [0.85, 0.1, 0.05], [0.7, 0.2, 0.1], [0.1, 0.65, 0.25], [0.45, 0.3, 0.25]])
YE = torch.tensor([0, 1, 0, 1, 1])


def hand_ece(probs, labels, n_bins):
    """Reference ECE from the bins: sum_k count_k / N * |acc_k - conf_k|."""
    b = calibration_bins(probs, labels, n_bins=n_bins)
    occ = b["count"] > 0
    w = b["count"][occ].double() / b["count"].sum()
    return float((w * (b["accuracy"][occ] - b["confidence"][occ]).abs().double()).sum())


def test_classification_metrics_hand_computed_3x3():
    m = classification_metrics(P3, Y3)
    assert m["n"] == 3
    assert m["acc"] == pytest.approx(2 / 3)
    # nll = -(ln 0.7 + ln 0.6 + ln 0.3) / 3 = (0.356675 + 0.510826 + 1.203973) / 3 = 0.690491
    assert m["nll"] == pytest.approx(0.690491, abs=1e-6)
    # brier rows: (.3^2+.2^2+.1^2)=.14, (.1^2+.4^2+.3^2)=.26, (.2^2+.5^2+.7^2)=.78 -> 1.18 / 3
    assert m["brier"] == pytest.approx(1.18 / 3, abs=1e-6)
    assert set(m) == {"acc", "ece", "nll", "brier", "n"}


def test_ece_hand_computed_matches_torchmetrics():
    # bin2: n=1, conf .45, acc 0 -> gap .45;  bin3: n=2, conf .675, acc 1 -> gap .325
    # bin4: n=2, conf .875, acc .5 -> gap .375;  ECE = (.45 + 2*.325 + 2*.375) / 5 = 0.37
    ece = classification_metrics(PE, YE, n_bins=5)["ece"]
    tm = float(multiclass_calibration_error(PE, YE, num_classes=3, n_bins=5, norm="l1"))
    assert ece == pytest.approx(0.37, abs=1e-6)
    assert tm == pytest.approx(0.37, abs=1e-6)
    assert hand_ece(PE, YE, 5) == pytest.approx(0.37, abs=1e-6)


def test_calibration_bins_counts_and_values():
    b = calibration_bins(PE, YE, n_bins=5)
    assert b["count"].tolist() == [0, 0, 1, 2, 2]
    assert torch.isnan(b["confidence"][:2]).all() and torch.isnan(b["accuracy"][:2]).all()
    assert b["confidence"][2:].tolist() == pytest.approx([0.45, 0.675, 0.875], abs=1e-6)
    assert b["accuracy"][2:].tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_confidence_one_goes_in_last_bin():
    p = torch.tensor([[1.0, 0.0], [0.55, 0.45]])
    b = calibration_bins(p, torch.tensor([0, 0]), n_bins=10)
    assert b["count"].tolist() == [0] * 5 + [1, 0, 0, 0, 1]
    assert b["count"].shape == (10,)


def test_ece_matches_torchmetrics_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=g), dim=1)
    labels = torch.randint(0, 4, (500,), generator=g)
    ece = classification_metrics(probs, labels)["ece"]
    assert ece == pytest.approx(hand_ece(probs, labels, 15), abs=1e-6)
    assert ece > 0.01


def test_perfect_calibration_has_zero_ece():
    # 10 rows at conf .7 with 7 correct, 10 rows at conf .9 with 9 correct
    probs = torch.tensor([[0.7, 0.3]] * 10 + [[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 7 + [1] * 3 + [0] * 9 + [1])
    m = classification_metrics(probs, labels)
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["acc"] == pytest.approx(0.8)


def test_zero_probability_gives_finite_nll():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])  # true class of row 0 has p = 0
    m = classification_metrics(probs, torch.tensor([1, 0]))
    assert math.isfinite(m["nll"])
    assert m["nll"] == pytest.approx((-math.log(1e-12) - math.log(0.5)) / 2, rel=1e-6)
    # brier: row0 1 + 1 = 2, row1 .25 + .25 = .5 -> 1.25
    assert m["brier"] == pytest.approx(1.25)


def test_uncertainty_identical_samples_have_zero_mi():
    p = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.1, 0.0]])
    u = uncertainty_decomposition(p.expand(4, 2, 3))
    assert torch.allclose(u["mean_probs"], p)
    assert torch.allclose(u["mutual_information"], torch.zeros(2), atol=1e-6)
    h0 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert u["predictive_entropy"][0].item() == pytest.approx(h0, abs=1e-6)
    assert torch.allclose(u["predictive_entropy"], u["expected_entropy"], atol=1e-6)


def test_uncertainty_opposite_one_hot_samples():
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, N=1, C=2)
    u = uncertainty_decomposition(s)
    assert u["mean_probs"].tolist() == [[0.5, 0.5]]
    assert u["predictive_entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert u["expected_entropy"].item() == 0.0  # xlogy(0, 0) = 0, not nan
    assert u["mutual_information"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert {k: v.shape for k, v in u.items()} == {
        "mean_probs": (1, 2), "predictive_entropy": (1,), "expected_entropy": (1,), "mutual_information": (1,)}
    for v in u.values():
        assert torch.isfinite(v).all()


def test_uncertainty_rejects_wrong_rank():
    with pytest.raises(ValueError, match="3-D"):
        uncertainty_decomposition(torch.ones(2, 3) / 3)


def test_ood_auroc_hand_computed():
    # out 0.8 beats all 3 in-scores (3 pairs); out 0.3 beats only 0.1 (1 pair) -> 4 / 6
    assert ood_auroc(torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.3])) == pytest.approx(4 / 6)
    # ties count half: (0.5 vs 0.5) = .5, 0.5 > 0.2, 0.9 > 0.5, 0.9 > 0.2 -> 3.5 / 4
    assert ood_auroc(torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.9])) == pytest.approx(0.875)
    # perfectly separated / reversed
    assert ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3])) == pytest.approx(1.0)
    assert ood_auroc(torch.tensor([0.3]), torch.tensor([0.1, 0.2])) == pytest.approx(0.0)


def test_ood_auroc_large_scores_not_saturated():
    # raw scores > 1 would be squashed to ties by a sigmoid; ranks keep the order:
    # 150 > 100, 150 < 200, 300 > both -> 3 / 4
    assert ood_auroc(torch.tensor([100.0, 200.0]), torch.tensor([150.0, 300.0])) == pytest.approx(0.75)


def test_ood_auroc_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        ood_auroc(torch.tensor([]), torch.tensor([0.3]))


@pytest.mark.parametrize("probs, labels, match", [
    (torch.tensor([0.5, 0.5]), torch.tensor([0]), "2-D"),
    (P3, torch.tensor([0, 1]), "does not match"),
    (P3, torch.tensor([0, 1, 3]), r"label value 3 out of range.*\[0, 3\)"),
    (P3, torch.tensor([0, -1, 2]), "out of range"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0]), "apply softmax first"),
    (torch.tensor([[0.5, 0.2, 0.1]]), torch.tensor([0]), "does not sum to 1"),
    (torch.tensor([[float("nan"), 0.5, 0.5]]), torch.tensor([0]), "softmax"),
    (P3, torch.tensor([0.0, 1.0, 2.0]), "integer"),
    (torch.ones(2, 1), torch.tensor([0, 0]), "at least 2"),
])
def test_classification_metrics_bad_inputs(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_reliability_diagram_single_and_dict(tmp_path):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(200, 3, generator=g), dim=1)
    labels = torch.randint(0, 3, (200,), generator=g)
    out = reliability_diagram(probs, labels, tmp_path / "single.png", n_bins=10, title="one model")
    assert out == tmp_path / "single.png"
    _assert_png(out)
    flat = torch.full_like(probs, 1 / 3)
    out2 = reliability_diagram({"MAP": probs, "uniform": flat}, labels, tmp_path / "sub" / "multi.png")
    _assert_png(out2)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["multi.png", "single.png", "sub"]  # no temp files left


def test_reliability_diagram_validates(tmp_path):
    with pytest.raises(ValueError, match="softmax"):
        reliability_diagram(torch.randn(4, 3) * 5, torch.zeros(4, dtype=torch.long), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ece_accuracy_plot(tmp_path):
    points = [
        {"method": m, "dataset": d, "acc": a, "ece": e}
        for (m, d, a, e) in [("MAP", "boolq", 0.80, 0.12), ("ScalaBL", "boolq", 0.81, 0.04),
                             ("MAP", "arc-e", 0.70, 0.15), ("ScalaBL", "arc-e", 0.69, 0.05)]
    ]
    out = ece_accuracy_plot(points, tmp_path / "ece_acc.png", title="t")
    assert out == tmp_path / "ece_acc.png"
    _assert_png(out)
    with pytest.raises(ValueError, match="missing key"):
        ece_accuracy_plot([{"method": "MAP", "acc": 0.8, "ece": 0.1}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        ece_accuracy_plot([], tmp_path / "bad.png")


def test_format_table():
    rows = [{"method": "MAP", "acc": 0.81234, "n": 100}, {"method": "ScalaBL", "acc": 0.9}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0] == "| method | acc | n |"
    assert lines[1] == "| --- | --- | --- |"
    assert lines[2] == "| MAP | 0.812 | 100 |"
    assert lines[3] == "| ScalaBL | 0.900 |  |"
    custom = format_table(rows, columns=["acc", "method"], floatfmt=".1%").splitlines()
    assert custom[0] == "| acc | method |" and custom[2] == "| 81.2% | MAP |"
    assert format_table([], columns=["a"]).splitlines() == ["| a |", "| --- |"]
    with pytest.raises(ValueError, match="empty"):
        format_table([])


def test_rows_slightly_above_one_are_not_treated_as_logits():
    # entries up to 1.0005 pass the 1e-3 sum tolerance; they must not trigger torchmetrics' softmax
    probs = torch.tensor([[1.0005, 0.0], [0.3, 0.7]])
    m = classification_metrics(probs, torch.tensor([0, 1]), n_bins=10)
    # bins: conf 1.0 (correct) -> last bin, conf .7 (correct) -> bin 7; ECE = (0 + .3) / 2
    assert m["ece"] == pytest.approx(0.15, abs=1e-6)
    assert m["acc"] == 1.0


def test_paired_bootstrap_difference_and_interval():
    labels = torch.tensor([0, 1, 0, 1])
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    b = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    d = paired_bootstrap(a, b, labels, num_resamples=200, seed=1)
    # full-set differences by hand: acc 1 - 0.5; brier mean(.02,.08,.32,.18) - mean(.32,.72,.32,.72)
    assert d["acc"][0] == pytest.approx(0.5)
    assert d["brier"][0] == pytest.approx(0.15 - 0.52)
    nll_a = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.7)) / 4
    nll_b = -(2 * math.log(0.6) + 2 * math.log(0.4)) / 4
    assert d["nll"][0] == pytest.approx(nll_a - nll_b)
    for k, (diff, lo, hi) in d.items():
        assert lo <= hi or k == "auroc_ok", k
    assert d["brier"][2] < 0  # a beats b on every question: every resample agrees
    again = paired_bootstrap(a, b, labels, num_resamples=200, seed=1)  # seeded (auroc_ok is nan: below)
    assert {k: v for k, v in again.items() if k != "auroc_ok"} == {k: v for k, v in d.items() if k != "auroc_ok"}
    same = paired_bootstrap(a, a, labels, num_resamples=50)
    assert all(v == (0.0, 0.0, 0.0) for k, v in same.items() if k != "auroc_ok")
    assert all(math.isnan(x) for x in d["auroc_ok"])  # a answers every question right: no ranking to judge
    # K runs on the same questions: metrics are averaged over runs before the difference
    two = paired_bootstrap(torch.stack([a, b]), torch.stack([b, b]), labels, num_resamples=20)
    assert two["acc"][0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(a, b[:3], labels)


def test_confidence_auroc_ranks_right_answers_above_wrong_ones_by_hand():
    labels = torch.tensor([0, 0, 0, 0])
    # a: right answers at confidence .9, .8, wrong ones at .7, .6 -> every pair ordered: 1.0
    a = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    # b: right at .6, .7, wrong at .65, .9 -> only (.7 > .65) of the 4 pairs: 0.25
    b = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.35, 0.65], [0.1, 0.9]])
    assert confidence_auroc(a, labels) == pytest.approx(1.0)
    assert confidence_auroc(b, labels) == pytest.approx(0.25)
    tie = torch.tensor([[0.7, 0.3], [0.3, 0.7]])  # right and wrong at the same confidence: half
    assert confidence_auroc(tie, torch.tensor([0, 0])) == pytest.approx(0.5)
    # with two classes a temperature keeps the order of the confidences: the AUROC does not move
    assert confidence_auroc(torch.softmax(b.log() / 3, -1), labels) == pytest.approx(0.25)
    assert math.isnan(confidence_auroc(a, a.argmax(1)))  # all right: undefined
    d = paired_bootstrap(a, b, labels, num_resamples=200, seed=0)
    v, lo, hi = d["auroc_ok"]
    assert v == pytest.approx(0.75) and lo <= v <= hi


def test_reliability_panels_show_the_bins_of_every_method_and_evaluation(tmp_path):
    from scalabl_pyro.metrics import calibration_bins, classification_metrics, reliability_panels

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g) * 3
    labels = torch.randint(0, 4, (200,), generator=g)
    sharp, soft = logits.softmax(-1), (logits / 3).softmax(-1)
    panels = {"in distribution": {"LoRA": (sharp, labels), "ScalaBL": (soft, labels)},
              "shifted": {"LoRA": (sharp[:50], labels[:50])}}  # ScalaBL missing here: an empty panel
    shown = reliability_panels(panels, tmp_path / "sub" / "rel.png", n_bins=10, title="t")
    assert (tmp_path / "sub" / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(shown) == {("in distribution", "LoRA"), ("in distribution", "ScalaBL"), ("shifted", "LoRA")}
    for (ev, m), b in shown.items():
        p, y = panels[ev][m]
        ref = calibration_bins(p, y, n_bins=10)
        assert torch.equal(b["count"], ref["count"]) and b["ece"] == classification_metrics(p, y, n_bins=10)["ece"]
    assert shown["in distribution", "LoRA"]["ece"] > shown["in distribution", "ScalaBL"]["ece"]
    with pytest.raises(ValueError, match="non-empty"):
        reliability_panels({"x": {}}, tmp_path / "y.png")
