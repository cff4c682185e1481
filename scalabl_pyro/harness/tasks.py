"""The embedded default task: multiple-choice questions about world countries (no files, no network).

A small fact table (:data:`FACTS`: country, capital, continent, currency) is turned into a
:class:`~scalabl_pyro.harness.data.TaskData`:

* **in-distribution** (``shifted=False``): for every country a *capital* question
  ("What is the capital of France?") and a *currency* question ("What is the currency of France?");
* **shifted / OOD** (``shifted=True``, split ``"test"`` only): other question types about the same
  held-out test countries: reverse lookup ("Which country has Paris as its capital?", country choices)
  and continent ("On which continent is France?", continent choices).

Countries (entities) are split into train and test by ``seed``: no test country appears in any train
question, and the distractors of a question are drawn from the countries of its own split only.
Everything is deterministic in ``seed``.

Example::

    from scalabl_pyro.harness.tasks import country_task

    train = country_task("train", seed=0)                  # capital + currency questions
    test = country_task("test", seed=0)                    # same question types, held-out countries
    ood = country_task("test", seed=0, shifted=True)       # reverse-capital + continent questions
    print(len(train), len(test), len(ood), train.num_classes)
    print(train[0].prompt)
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import NamedTuple

from .records import LETTERS, Example, TaskData, letter_prompt, qa_context

__all__ = ["CountryFact", "FACTS", "CONTINENTS", "country_task"]


class CountryFact(NamedTuple):
    """One row of the fact table."""

    country: str
    capital: str
    continent: str
    currency: str


#: The continents used by the continent questions.
CONTINENTS: tuple[str, ...] = ("Africa", "Asia", "Europe", "North America", "Oceania", "South America")

# Countries whose capital, continent or currency is disputed, recently changed or commonly confused are
# left out on purpose (e.g. Bolivia, South Africa, Russia, Turkey, Indonesia, Tanzania, Zimbabwe,
# Bulgaria, Croatia, Kazakhstan, Sri Lanka, Israel, Yemen, Sudan, El Salvador, Panama, microstates whose
# capital has the country's name).
def _read_facts() -> tuple[CountryFact, ...]:
    with (Path(__file__).with_name("countries.csv")).open(encoding="utf-8", newline="") as f:
        return tuple(CountryFact(**row) for row in csv.DictReader(f))


#: The fact table (package data ``harness/countries.csv``): one :class:`CountryFact` per country (unique countries
#: and capitals), in the file's order.
FACTS: tuple[CountryFact, ...] = _read_facts()

# Names that read with "the" inside a sentence ("the capital of the United Kingdom").
_WITH_THE = frozenset({
    "Bahamas", "Central African Republic", "Comoros", "Czech Republic", "Democratic Republic of the Congo",
    "Dominican Republic", "Federated States of Micronesia", "Gambia", "Maldives", "Marshall Islands",
    "Netherlands", "Philippines", "Republic of the Congo", "Seychelles", "Solomon Islands",
    "United Arab Emirates", "United Kingdom", "United States",
})


def _in_sentence(country: str) -> str:
    return f"the {country}" if country in _WITH_THE else country


def _mc_example(qid: str, question: str, answer: str, pool: set[str], *, seed: int, num_choices: int,
                label_words: tuple[str, ...]) -> Example:
    """A question with the answer at a seeded random position among seeded distractors from ``pool``."""
    rng = random.Random(f"countries:{seed}:{qid}")  # str seeds are hashed with SHA-512: stable across runs
    candidates = sorted(v for v in pool if v != answer)
    distractors = rng.sample(candidates, num_choices - 1)
    pos = rng.randrange(num_choices)
    choices = tuple(distractors[:pos] + [answer] + distractors[pos:])
    return Example(id=qid, label=pos, choices=choices,
                   prompt=letter_prompt(question, choices, label_words=label_words),
                   context=qa_context(question), continuations=tuple(" " + c for c in choices))


def _split_countries(seed: int, test_fraction: float) -> tuple[list[CountryFact], list[CountryFact]]:
    names = sorted(f.country for f in FACTS)
    random.Random(f"countries-split:{seed}").shuffle(names)
    n_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    test_names = set(names[:n_test])
    train = [f for f in FACTS if f.country not in test_names]
    test = [f for f in FACTS if f.country in test_names]
    return train, test


def country_task(split: str = "train", *, seed: int = 0, shifted: bool = False, num_choices: int = 4,
                 test_fraction: float = 0.5, distractors: str = "continent") -> TaskData:
    """The embedded countries task (see the module docstring).

    :param split: ``"train"`` or ``"test"``; the two hold disjoint countries.
    :param seed: seeds the country split, the distractors and the answer positions.
    :param shifted: the OOD variant (reverse-capital and continent questions); ``split="test"`` only.
    :param num_choices: choices per question, 2 to 6 (continent questions have 6 continents to draw from).
    :param test_fraction: fraction of countries held out for ``"test"``. The default 0.5 holds out 78 countries (156
        test questions); 0.3 left 94, too few for a 15-bin ECE, whose sampling noise grows as predictions spread
        over more bins.
    :param distractors: ``"continent"`` (default): capital/currency distractors come from countries on the
        answer's continent (in the same split) when there are enough, which makes the questions test knowledge
        rather than continent cues; ``"random"``: from any country of the split.
    :returns: :class:`~scalabl_pyro.harness.data.TaskData` named ``"countries"`` or ``"countries_shifted"``,
        with label words ``("A", "B", ...)``; ids like ``"capital:France"``, ``"currency:France"``,
        ``"capital_of:Paris"``, ``"continent:France"``.

    Example::

        train = country_task("train", seed=0)
        test = country_task("test", seed=0)            # held-out countries, same question types
        ood = country_task("test", seed=0, shifted=True)
        print(train[0].id, train[0].prompt, train[0].label)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: the countries task has splits 'train' and 'test'")
    if shifted and split != "test":
        raise ValueError(f"split={split!r} with shifted=True: the shifted (OOD) variant exists only for the "
                         f"held-out countries, use country_task('test', shifted=True); train on "
                         f"country_task('train') instead")
    if isinstance(num_choices, bool) or not isinstance(num_choices, int) or not 2 <= num_choices <= len(CONTINENTS):
        raise ValueError(f"num_choices={num_choices!r} must be an integer from 2 to {len(CONTINENTS)} "
                         f"(continent questions draw from {len(CONTINENTS)} continents)")
    if distractors not in ("continent", "random"):
        raise ValueError(f"distractors={distractors!r}; allowed: 'continent', 'random'")
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be strictly between 0 and 1 (e.g. 0.5)")

    train, test = _split_countries(seed, test_fraction)
    facts = test if split == "test" else train
    label_words = LETTERS[:num_choices]
    if shifted:
        kinds = {"countries": {f.country for f in facts}, "continents": set(CONTINENTS)}
    else:
        kinds = {"capitals": {f.capital for f in facts}, "currencies": {f.currency for f in facts}}
    for kind, pool in kinds.items():
        if len(pool) < num_choices:
            raise ValueError(f"the {split} split has only {len(pool)} distinct {kind} for num_choices={num_choices}; "
                             f"use fewer choices or a test_fraction nearer 0.5 (got {test_fraction})")

    def mc(qid: str, question: str, answer: str, pool: set[str]) -> Example:
        return _mc_example(qid, question, answer, pool, seed=seed, num_choices=num_choices, label_words=label_words)

    def local(attr: str, f: CountryFact, pool: set[str]) -> set[str]:
        if distractors == "random":
            return pool
        near = {getattr(g, attr) for g in facts if g.continent == f.continent}
        return near if len(near - {getattr(f, attr)}) >= num_choices - 1 else pool

    examples: list[Example] = []
    for f in facts:
        c = _in_sentence(f.country)
        if shifted:
            examples.append(mc(f"capital_of:{f.capital}", f"Which country has {f.capital} as its capital?",
                               f.country, kinds["countries"]))
            examples.append(mc(f"continent:{f.country}", f"On which continent is {c}?", f.continent,
                               kinds["continents"]))
        else:
            examples.append(mc(f"capital:{f.country}", f"What is the capital of {c}?", f.capital,
                               local("capital", f, kinds["capitals"])))
            examples.append(mc(f"currency:{f.country}", f"What is the currency of {c}?", f.currency,
                               local("currency", f, kinds["currencies"])))
    note = (f"embedded fact table: {len(FACTS)} countries, {len(train)} train / {len(test)} test countries "
            f"(seed {seed}, test_fraction {test_fraction}); test countries never appear in train questions; "
            f"distractors come from the same split's countries"
            + (" on the answer's continent where possible" if distractors == "continent" and not shifted else ""))
    if shifted:
        note += "; shifted (OOD) question types: reverse capital lookup and continent"
    return TaskData("countries_shifted" if shifted else "countries", split, tuple(examples), label_words, note=note)
