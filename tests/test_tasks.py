"""Tests of the embedded countries task (scalabl_pyro.harness.tasks)."""
from __future__ import annotations

import pytest

from scalabl_pyro.harness.data import TaskData, qa_context
from scalabl_pyro.harness.tasks import CONTINENTS, FACTS, country_task

BY_COUNTRY = {f.country: f for f in FACTS}
BY_CAPITAL = {f.capital: f for f in FACTS}


def _countries(task: TaskData) -> set[str]:
    out = set()
    for ex in task:
        kind, key = ex.id.split(":", 1)
        out.add(BY_CAPITAL[key].country if kind == "capital_of" else key)
    return out


def test_fact_table():
    assert 140 <= len(FACTS) <= 200
    assert len({f.country for f in FACTS}) == len(FACTS) == len({f.capital for f in FACTS})
    assert all(f.continent in CONTINENTS for f in FACTS)
    assert {f.continent for f in FACTS} == set(CONTINENTS)
    assert all(s and s == s.strip() for f in FACTS for s in f)
    assert ("France", "Paris", "Europe", "euro") in FACTS
    assert BY_COUNTRY["Japan"].capital == "Tokyo" and BY_COUNTRY["Canada"].currency == "Canadian dollar"


def test_deterministic_and_seed_dependent():
    assert country_task("train", seed=0) == country_task("train", seed=0)
    assert country_task("test", seed=3, shifted=True) == country_task("test", seed=3, shifted=True)
    assert _countries(country_task("test", seed=0)) != _countries(country_task("test", seed=1))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_disjoint_and_counts(seed):
    train, test = country_task("train", seed=seed), country_task("test", seed=seed)
    ood = country_task("test", seed=seed, shifted=True)
    ctr, cte = _countries(train), _countries(test)
    assert not ctr & cte and ctr | cte == set(BY_COUNTRY)
    assert len(cte) == round(0.5 * len(FACTS)) == 78
    assert len(train) == 2 * len(ctr) and len(test) == 2 * len(cte) and len(ood) == 2 * len(cte)
    assert _countries(ood) == cte
    # every train question names exactly its own (train) country: no test country appears in train
    for ex in train:
        kind, c = ex.id.split(":", 1)
        name = f"the {c}" if f"the {c}?" in ex.prompt else c
        assert ex.prompt.split("\n", 1)[0] == f"Question: What is the {kind} of {name}?"
        assert c not in cte
    # distractors come from the same split only
    train_caps = {BY_COUNTRY[c].capital for c in ctr}
    assert all(set(ex.choices) <= train_caps for ex in train if ex.id.startswith("capital:"))


def test_names_and_formats():
    t = country_task()
    assert t.name == "countries" and t.split == "train" and t.label_words == ("A", "B", "C", "D")
    assert "78 train / 78 test" in t.note
    assert country_task("test", shifted=True).name == "countries_shifted"
    ex = next(e for e in t if e.id.startswith("capital:"))
    q = f"What is the capital of {ex.id.split(':')[1]}?"
    assert ex.prompt == (f"Question: {q}\nChoices:\n"
                         + "".join(f"{w}) {c}\n" for w, c in zip("ABCD", ex.choices)) + "Answer:")
    assert ex.context == qa_context(q) and ex.continuations == tuple(" " + c for c in ex.choices)
    uk = next(e for e in country_task("test", seed=0, shifted=True) if e.id.startswith("continent:"))
    assert uk.prompt.startswith("Question: On which continent is ")


@pytest.mark.parametrize("kw", [{"split": "train"}, {"split": "test"}, {"split": "test", "shifted": True}])
def test_answers_correct_and_distractors_distinct(kw):
    task = country_task(**kw)
    positions = set()
    for ex in task:
        kind, key = ex.id.split(":", 1)
        answer = {"capital": lambda: BY_COUNTRY[key].capital, "currency": lambda: BY_COUNTRY[key].currency,
                  "capital_of": lambda: BY_CAPITAL[key].country,
                  "continent": lambda: BY_COUNTRY[key].continent}[kind]()
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
        assert ex.choices[ex.label] == answer and ex.choices.count(answer) == 1
        assert ex.prompt.endswith("Answer:")
        if kind == "continent":
            assert set(ex.choices) <= set(CONTINENTS)
        positions.add(ex.label)
    assert positions == {0, 1, 2, 3}
    kinds = {ex.id.split(":")[0] for ex in task}
    assert kinds == ({"capital_of", "continent"} if kw.get("shifted") else {"capital", "currency"})


def test_shared_currency_distractors_never_equal_answer():
    for seed in range(3):
        for ex in country_task("train", seed=seed):
            if ex.id.startswith("currency:") and ex.choices[ex.label] == "euro":
                assert ex.choices.count("euro") == 1


def test_num_choices_and_errors():
    t2 = country_task("test", num_choices=2)
    assert t2.num_classes == 2 and all(len(e.choices) == 2 for e in t2)
    t6 = country_task("test", shifted=True, num_choices=6)
    assert all(sorted(e.choices) == sorted(CONTINENTS) for e in t6 if e.id.startswith("continent:"))
    with pytest.raises(ValueError, match="only for the held-out"):
        country_task("train", shifted=True)
    with pytest.raises(ValueError, match="'train' and 'test'"):
        country_task("validation")
    with pytest.raises(ValueError, match="num_choices"):
        country_task(num_choices=7)
    with pytest.raises(ValueError, match="test_fraction"):
        country_task(test_fraction=1.0)
    with pytest.raises(ValueError, match="distinct"):
        country_task("test", test_fraction=0.02, num_choices=6)
    assert len(country_task("test", test_fraction=0.5)) == 2 * 78


def test_continent_distractors_come_from_the_answers_continent():
    from scalabl_pyro.harness.tasks import FACTS
    by_capital = {f.capital: f for f in FACTS}
    task = country_task("test", distractors="continent")
    same = total = 0
    for ex in task.examples:
        if not ex.id.startswith("capital:"):
            continue
        answer = by_capital[ex.choices[ex.label]]
        for c in ex.choices:
            total += 1
            same += by_capital[c].continent == answer.continent
    assert same / total > 0.9  # falls back to any continent only where a continent has too few countries
    rnd = country_task("test", distractors="random")
    assert [e.choices for e in rnd.examples] != [e.choices for e in task.examples]
    with pytest.raises(ValueError, match="distractors"):
        country_task("test", distractors="nearby")
