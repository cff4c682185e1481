"""The records of every task: :class:`Example` (one question in the letter and the choice-likelihood formats),
:class:`TaskData` (a task's examples and answer words), the formats' text builders and the data errors.

Example::

    ex = Example(id="q1", label=0, choices=("Paris", "Rome"), prompt=letter_prompt("Capital of France?", ("Paris", "Rome")),
                 context=qa_context("Capital of France?"), continuations=(" Paris", " Rome"))
    task = TaskData("mine", "train", (ex,), label_words=("A", "B"))
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["Example", "TaskData", "LETTERS", "DataFormatError", "SplitNotFoundError", "BenchmarkNotFoundError",
           "UnknownDatasetError", "HubUnavailableError", "validate_example", "letter_prompt", "qa_context"]

#: Answer letters used by the letter format (``LETTERS[:num_classes]``).
LETTERS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# ---------------------------------------------------------------------------------------------- errors
class DataFormatError(ValueError):
    """A data row (or file) does not match the expected schema; the message names file and line."""


class SplitNotFoundError(FileNotFoundError):
    """The requested split has no file (and no fallback); the message lists the splits that exist."""


class BenchmarkNotFoundError(FileNotFoundError):
    """The data folder exists but holds no folder for the requested benchmark."""


class UnknownDatasetError(KeyError):
    """The dataset name is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else ""


class HubUnavailableError(ConnectionError):
    """Loading from the Hugging Face Hub failed (offline, unknown split, ...)."""


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Example:
    """One multiple-choice item, in both the letter and the choice-likelihood format.

    :param id: identifier, unique within a split (e.g. ``"Mercury_417466"``, ``"capital:France"``).
    :param label: index of the correct choice in ``choices``.
    :param choices: raw choice texts, for display.
    :param prompt: letter-format prompt; ends with ``"Answer:"``, the next token is ``" A"``, ``" B"``, ...
    :param context: choice-likelihood context shared by all choices (may be ``""`` only for WinoGrande
        items whose blank opens the sentence; the model code prepends BOS).
    :param continuations: text appended verbatim to ``context`` for each choice (e.g. ``" Paris"``);
        one per choice.

    Example::

        ex = Example(id="q1", label=0, choices=("Paris", "Rome"),
                     prompt=letter_prompt("What is the capital of France?", ["Paris", "Rome"]),
                     context=qa_context("What is the capital of France?"),
                     continuations=(" Paris", " Rome"))
    """

    id: str
    label: int
    choices: tuple[str, ...]
    prompt: str
    context: str
    continuations: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "continuations", tuple(self.continuations))


def validate_example(ex: Example, num_classes: int, *, where: str = "") -> None:
    """Check that ``ex`` is a well-formed item of a task with ``num_classes`` classes.

    :param ex: the example to check.
    :param num_classes: number of classes (answer words) of the task.
    :param where: location prefix for the error message (e.g. ``"arc_easy/test.jsonl, line 12"``).
    :raises ValueError: label not an int or out of range, no choices, an empty/whitespace choice, more
        choices than classes, or a continuation count different from the choice count.

    Example::

        validate_example(task[0], task.num_classes, where="arc_easy test item 0")
    """
    at = f"{where}: " if where else ""
    at += f"example {ex.id!r} "
    n = len(ex.choices)
    if n == 0:
        raise ValueError(f"{at}has no choices; every example needs at least one choice text "
                         f"(fix or drop this row)")
    for k, c in enumerate(ex.choices):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{at}choice {k} is {c!r}, an empty or non-text choice; fill in the "
                             f"choice text or drop this row")
    if n > num_classes:
        raise ValueError(f"{at}has {n} choices but the task has only {num_classes} classes; drop the row "
                         f"or give the task more label words (one per possible choice)")
    if isinstance(ex.label, bool) or not isinstance(ex.label, int):
        raise ValueError(f"{at}label {ex.label!r} is not an integer; labels are 0-based choice indices")
    if not 0 <= ex.label < n:
        raise ValueError(f"{at}label {ex.label} is out of range; allowed 0..{n - 1} "
                         f"(it indexes the {n} choices)")
    if len(ex.continuations) != n:
        raise ValueError(f"{at}has {len(ex.continuations)} continuations for {n} choices; build exactly "
                         f"one continuation per choice")
    if not isinstance(ex.prompt, str) or not isinstance(ex.context, str):
        raise ValueError(f"{at}prompt and context must be strings")


@dataclass(frozen=True)
class TaskData:
    """A classification task: examples plus the answer words of the letter format.

    :param name: canonical task name (``"arc_easy"``, ``"countries"``, ...).
    :param split: split name (``"train"``, ``"test"``, ...).
    :param examples: the items; each is validated against ``num_classes`` on construction.
    :param label_words: answer words, one per class (``("A", "B", "C", "D")``, ``("no", "yes")``).
    :param note: provenance remarks, e.g. how a missing split was derived.

    ``num_classes == len(label_words)``; an example may have fewer choices than classes (ARC has 5
    label words and a few items with 3 or 4 choices: the remaining classes are simply absent).

    Example::

        task = load_task("boolq", "train")
        print(task.note)
        small = task.subset(100, seed=1)
        labels = [ex.label for ex in small]
    """

    name: str
    split: str
    examples: tuple[Example, ...]
    label_words: tuple[str, ...]
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(self.examples))
        object.__setattr__(self, "label_words", tuple(self.label_words))
        lw = self.label_words
        if not lw or any(not isinstance(w, str) or not w.strip() for w in lw):
            raise ValueError(f"task {self.name!r}: label_words={lw!r} must be non-empty strings, one per class")
        if len(set(lw)) != len(lw):
            raise ValueError(f"task {self.name!r}: label_words={lw!r} contains duplicates; use one distinct "
                             f"word per class")
        for i, ex in enumerate(self.examples):
            if not isinstance(ex, Example):
                raise ValueError(f"task {self.name!r} item {i} is a {type(ex).__name__}, not an Example")
            validate_example(ex, len(lw), where=f"task {self.name!r} split {self.split!r} item {i}")

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(label_words)``)."""
        return len(self.label_words)

    @property
    def labels(self) -> tuple[int, ...]:
        """The labels of all examples, in order."""
        return tuple(ex.label for ex in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index):
        """``task[i]`` is an :class:`Example`; ``task[a:b]`` is a :class:`TaskData`."""
        if isinstance(index, slice):
            return TaskData(self.name, self.split, self.examples[index], self.label_words, note=self.note)
        return self.examples[index]

    def __repr__(self) -> str:
        note = f", note={self.note!r}" if self.note else ""
        return (f"TaskData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"label_words={self.label_words!r}{note})")

    def subset(self, n: int, *, seed: int = 0) -> "TaskData":
        """A deterministic random subset of ``n`` examples (all of them if ``n >= len(self)``).

        The chosen examples keep their original order. Same ``seed`` → same subset.

        :param n: number of examples to keep (a positive integer).
        :param seed: seed of the random choice.

        Example::

            dev = task.subset(50, seed=0)
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"subset size n={n!r} must be a positive integer (use n >= len(task) for all)")
        if n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        note = f"random subset of {n} of {len(self)} examples (seed {seed})"
        note = f"{self.note}; {note}" if self.note else note
        return TaskData(self.name, self.split, tuple(self.examples[i] for i in idx), self.label_words,
                        note=note)


# ---------------------------------------------------------------------------------------------- formats
def letter_prompt(question: str, choices: Sequence[str], *, label_words: Sequence[str] = LETTERS) -> str:
    """The letter-format prompt of the reference protocol.

    :param question: question text (surrounding whitespace is stripped).
    :param choices: choice texts (each stripped).
    :param label_words: letters to show, one per choice.

    Example::

        letter_prompt("What is 2+2?", ["3", "4"])
        # 'Question: What is 2+2?\\nChoices:\\nA) 3\\nB) 4\\nAnswer:'
    """
    if len(choices) > len(label_words):
        raise ValueError(f"{len(choices)} choices but only {len(label_words)} label words; pass more label_words")
    lines = [f"Question: {question.strip()}", "Choices:"]
    lines += [f"{w}) {c.strip()}" for w, c in zip(label_words, choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def qa_context(question: str) -> str:
    """The choice-likelihood context ``"Question: {question}\\nAnswer:"``.

    Example::

        qa_context("What is 2+2?")   # 'Question: What is 2+2?\\nAnswer:'
    """
    return f"Question: {question.strip()}\nAnswer:"


# ---------------------------------------------------------------------------------------------- row fields
def _require(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise DataFormatError(f"{where}: missing field {key!r} (fields present: {sorted(row)}); every row "
                              f"needs it, see ../shared/data/README.md for the schema")
    return row[key]


def _require_text(row: Mapping[str, Any], key: str, where: str) -> str:
    v = _require(row, key, where)
    if not isinstance(v, str) or not v.strip():
        raise DataFormatError(f"{where}: field {key!r} must be a non-empty string, got {v!r}; fix or drop the row")
    return v
