"""Bring your own data: multiple-choice or completion rows from a JSONL/CSV file (or any records) as a task.

Two row kinds (a row is multiple choice when it has ``question``, a completion when it has ``continuations``):

* **multiple choice**: ``{"question": str, "choices": [str, ...], "label": int}``, optional ``"id"`` and an
  optional ``"context"`` (a passage shown before the question, as BoolQ's passage);
* **completion**: ``{"context": str, "continuations": [str, ...], "label": int}``, optional ``"id"``.

``label`` is a 0-based index into the choices, or an answer letter (``"A"`` = 0, ``"B"`` = 1, ...; either
case). A quoted number (``"2"``) is refused in JSON, because benchmarks disagree on whether it counts from 0
or 1; in a CSV every cell is text, so there ``2`` is the index 2. Every row needs at least 2 choices, each
with some text; rows may have different numbers of choices (the task then has as many classes as its
longest row). Other fields are ignored. Ids must be unique; a row without one gets ``<file stem>-line<N>``.

Both formats of :class:`~scalabl_pyro.harness.data.Example` are built the way :mod:`scalabl_pyro.harness.data` builds the
built-in benchmarks:

* multiple choice, like ARC/MMLU: ``prompt = letter_prompt(question, choices)``, ``context =
  qa_context(question)`` (``"Question: ...\\nAnswer:"``), ``continuations = " " + choice``; a ``context``
  is put in front of both, followed by a newline, as BoolQ's passage is;
* completion, like WinoGrande: ``context`` and ``continuations`` are used **verbatim** (so write the
  space: ``"The capital of France is"`` + ``" Paris"``), and the letter prompt is ``context``, then
  ``"Which continuation fits best?"``, the letter list and ``"Answer:"``.

Files: ``.jsonl`` is one JSON object per line (blank lines are skipped); ``.csv`` has a header row, then one
row per question, and its choices are either numbered columns ``choice0, choice1, ...`` (trailing empty
cells are dropped, so rows may have fewer choices) or one ``choices`` column holding a JSON list
(``["Paris", "Rome"]``); likewise ``continuation0, ...`` or ``continuations``. A path is one split's data;
a folder holds one file per split (``train.jsonl``, ``validation.csv``, ``test.jsonl``, ...).

``fields`` maps the names above to yours: ``fields={"question": "query", "choices": "options", "label":
"answer"}``; a list field may also name several columns (``{"choices": ["A", "B", "C", "D"]}``), and a
dotted name reaches into a nested record (``{"choices": "choices.text"}``, as in the Hugging Face ARC rows).
Every error names the file and line (or the record), the field and the fix; it is a
:class:`~scalabl_pyro.harness.data.DataFormatError` (a ``ValueError``), or a ``FileNotFoundError`` for a missing
file or split.

Example::

    from scalabl_pyro import load_task, task_from_records

    train = load_task("my_train.jsonl", "train")          # or "my_train.csv", or load_user_task(...)
    test = load_task("my_data/", "test")                   # my_data/test.jsonl (or test.csv)
    hf = task_from_records(datasets.load_dataset("allenai/openbookqa", "main", split="train"), name="obqa",
                           fields={"question": "question_stem", "choices": "choices.text", "label": "answerKey"})
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .records import LETTERS, DataFormatError, Example, SplitNotFoundError, TaskData, letter_prompt, qa_context

__all__ = ["load_user_task", "task_from_records", "is_user_path", "load_if_user_path", "completion_prompt", "FIELDS",
           "SUFFIXES"]

#: File types :func:`load_user_task` reads.
SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")
#: The field names of the schema (the keys ``fields=`` may map).
FIELDS: tuple[str, ...] = ("id", "question", "context", "choices", "continuations", "label")
_LIST_FIELDS = {"choices": "choice", "continuations": "continuation"}  # list field -> numbered column prefix
_SHAPE = ('{"question": "What is 2+2?", "choices": ["3", "4"], "label": 1} or '
          '{"context": "Two plus two is", "continuations": [" three", " four"], "label": 1}')
_MISSING = object()


def is_user_path(name: Any) -> bool:
    """Whether ``name`` is a path to the user's own data rather than a benchmark name.

    True for ``os.PathLike`` objects and for strings with a ``/``, a ``.`` or a leading ``~``
    (benchmark names have none: ``arc_easy``, ``mmlu_anatomy``).

    Example::

        is_user_path("my_train.jsonl"), is_user_path("data/mine"), is_user_path("arc_easy")   # True True False
    """
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and ("/" in name or os.sep in name or "." in name or name.startswith("~"))


def completion_prompt(context: str, continuations: Iterable[str]) -> str:
    """The letter-format prompt of a completion row (WinoGrande style: text, question line, letters).

    Example::

        completion_prompt("Two plus two is", [" three", " four"])
        # 'Two plus two is\\nWhich continuation fits best?\\nA) three\\nB) four\\nAnswer:'
    """
    lines = [context.strip(), "Which continuation fits best?"]
    lines += [f"{w}) {c.strip()}" for w, c in zip(LETTERS, continuations)]
    return "\n".join(lines + ["Answer:"])


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _Row:
    """One raw row plus where it came from; typed access to the schema's fields through ``fields``."""

    def __init__(self, raw: Mapping[str, Any], where: str, fields: Mapping[str, Any], cells: bool):
        self.raw, self.where, self.fields, self.cells = raw, where, fields, cells

    def col(self, key: str) -> Any:
        return self.fields.get(key, key)

    def fail(self, col: str | tuple, msg: str) -> None:
        """Raise naming the row and the field ``col`` (``(col, k)``: item ``k`` of list field ``col``)."""
        name = f"{col[0]!r} item {col[1]}" if isinstance(col, tuple) else repr(col)
        raise DataFormatError(f"{self.where}: field {name} {msg}")

    def missing(self, key: str, what: str = "") -> None:
        col = self.col(key)
        if isinstance(col, str) and col in self.raw:  # the column is there, this row's cell is empty
            self.fail(col, f"is empty{what}; fill it in or drop the row")
        mapped = f" (your name for {key!r}, from fields=)" if col != key else ""
        have = ", ".join(map(repr, list(self.raw)[:12])) or "none"
        raise DataFormatError(f"{self.where}: missing field {col!r}{mapped}{what} (fields present: {have}); add "
                              f"it, or map your column with fields={{{key!r}: 'your_name'}}")

    def lookup(self, col: str) -> Any:
        """The value of column ``col`` (a dotted name reaches into nested records); ``_MISSING`` if absent/empty."""
        if col in self.raw:
            v = self.raw[col]
        elif "." in col and not self.cells:
            v = self.raw
            for part in col.split("."):
                if not isinstance(v, Mapping) or part not in v:
                    return _MISSING
                v = v[part]
        else:
            return _MISSING
        return _MISSING if v is None or (self.cells and isinstance(v, str) and not v.strip()) else v

    def has(self, key: str) -> bool:
        if key in _LIST_FIELDS:
            return self.texts(key, check=False) is not _MISSING
        return self.lookup(self.col(key)) is not _MISSING

    def text(self, key: str, *, required: bool = True, what: str = "") -> str | None:
        col, v = self.col(key), self.lookup(self.col(key))
        if v is _MISSING:
            return self.missing(key, what) if required else None
        if not isinstance(v, str):
            self.fail(col, f"must be text, got {_show(v)}; write it as a JSON string")
        if not v.strip():
            if required:
                self.fail(col, "is empty; it needs some text (fix or drop the row)")
            return None
        return v

    def texts(self, key: str, *, check: bool = True) -> Any:
        """A list field: a list (a JSON list string in a CSV), or numbered / explicitly named columns."""
        spec = self.col(key)
        if isinstance(spec, str):
            v = self.lookup(spec)
            if v is not _MISSING:
                if self.cells and isinstance(v, str):
                    try:
                        v = json.loads(v)
                    except json.JSONDecodeError:
                        self.fail(spec, f"is {v!r}, not a JSON list; in a CSV write it as [\"Paris\", \"Rome\"] or "
                                        f"use the columns {_LIST_FIELDS[key]}0, {_LIST_FIELDS[key]}1, ...")
                if not isinstance(v, list):
                    self.fail(spec, f"must be a list of strings, got {_show(v)}")
                items = [((spec, k), c) for k, c in enumerate(v)]
                return self._check(spec, items, "") if check else items
            if spec != key:  # a renamed list field must be there
                return _MISSING
            cols, k = [], 0
            while f"{_LIST_FIELDS[key]}{k}" in self.raw:
                cols.append(f"{_LIST_FIELDS[key]}{k}")
                k += 1
            if not cols:
                return _MISSING
        else:
            cols = list(spec)
        items = [(c, self.lookup(c)) for c in cols]
        while items and items[-1][1] is _MISSING:  # trailing empty cells: this row has fewer choices
            items.pop()
        if not items:
            return _MISSING
        span = f" (columns {', '.join(c for c, _ in items)})"
        return self._check(key, items, span) if check else items

    def _check(self, what: str, items: list, span: str) -> list[str]:
        for name, c in items:
            if c is _MISSING or (isinstance(c, str) and not c.strip()):
                self.fail(name, f"is empty ({'' if c is _MISSING else c!r}); every choice needs some text "
                                f"(fill it in or drop the choice)")
            if not isinstance(c, str):
                self.fail(name, f"must be text, got {_show(c)}; write every choice as a string")
        if len(items) < 2:
            self.fail(what, f"has {len(items)} choice{'' if len(items) == 1 else 's'}{span}; a row needs at least 2 "
                            f"choices")
        if len(items) > len(LETTERS):
            self.fail(what, f"has {len(items)} choices; at most {len(LETTERS)} (A..Z) are supported")
        return [c for _, c in items]

    def label(self, n: int) -> int:
        col, v = self.col("label"), self.lookup(self.col("label"))
        if v is _MISSING:
            self.missing("label")
        shown = repr(v)
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            self.fail(col, f"must be a 0-based choice index or an answer letter ('A' = 0), got {_show(v)}")
        if isinstance(v, str):
            s = v.strip()
            if len(s) == 1 and s.upper() in LETTERS:
                v = LETTERS.index(s.upper())
                shown = f"{s!r} (= {v})"
            elif re.fullmatch(r"[+-]?\d+", s) and self.cells:
                v = int(s)
                shown = str(v)
            elif re.fullmatch(r"[+-]?\d+", s):
                self.fail(col, f"is the string {s!r}; write the 0-based index as a number ({int(s)}, no quotes) "
                               f"or an answer letter ('A' = 0)")
            else:
                self.fail(col, f"is {v!r}; use a 0-based choice index (0, 1, ...) or an answer letter ('A' = 0)")
        if not 0 <= v < n:
            self.fail(col, f"is {shown} but the row has {n} choices (allowed 0..{n - 1}, or 'A'..'{LETTERS[n - 1]}')")
        return v

    def example(self, default_id: str) -> Example:
        col = self.col("id")
        rid = self.lookup(col)
        if rid is _MISSING or (isinstance(rid, str) and not rid.strip()):
            rid = default_id
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
            self.fail(col, f"must be a string or an integer, got {_show(rid)}")
        has_q, has_c = self.has("question"), self.has("continuations")
        if has_q and has_c:
            raise DataFormatError(f"{self.where}: the row has both {self.col('question')!r} (a multiple-choice "
                                  f"row) and {self.col('continuations')!r} (a completion row); keep one of them")
        if has_c:
            context = self.text("context", what=" (a completion row needs the text its continuations extend)")
            conts = self.texts("continuations")
            label = self.label(len(conts))
            return Example(str(rid), label, tuple(c.strip() for c in conts), completion_prompt(context, conts),
                           context, tuple(conts))
        question = self.text("question", what=f" (or {self.col('continuations')!r} for a completion row)")
        choices = self.texts("choices")
        if choices is _MISSING:
            self.missing("choices")
        label = self.label(len(choices))
        shown = [c.strip() for c in choices]
        passage = self.text("context", required=False)
        head = f"{passage.strip()}\n" if passage else ""
        return Example(str(rid), label, tuple(choices), head + letter_prompt(question, shown),
                       head + qa_context(question), tuple(" " + c for c in shown))


def _check_fields(fields: Mapping[str, Any] | None) -> dict[str, Any]:
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields={fields!r} must be a dict mapping schema names to your column names, e.g. "
                        f"{{'question': 'query', 'choices': 'options', 'label': 'answer'}}")
    for key, col in fields.items():
        if key not in FIELDS:
            raise ValueError(f"fields: {key!r} is not a schema field; map any of {', '.join(FIELDS)} to your names")
        ok_list = (key in _LIST_FIELDS and isinstance(col, (list, tuple)) and len(col) > 0
                   and all(isinstance(c, str) and c for c in col))
        if not ok_list and not (isinstance(col, str) and col):
            raise ValueError(f"fields[{key!r}]={col!r} must be a column name" + (
                " or a list of column names (one per choice)" if key in _LIST_FIELDS else ""))
    return dict(fields)


def _check_args(split: Any, limit: Any, fields: Any) -> dict[str, Any]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None (all examples)")
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split={split!r} must be a split name such as 'train', 'validation' or 'test'")
    return _check_fields(fields)


def _build(rows: Iterable[tuple[str, str, Mapping[str, Any]]], *, name: str, split: str, fields, cells: bool,
           empty: str, note: str, limit: int | None, seed: int) -> TaskData:
    examples, seen = [], {}
    for where, default_id, raw in rows:
        ex = _Row(raw, where, fields, cells).example(default_id)
        if ex.id in seen:
            raise DataFormatError(f"{where}: field 'id' is {ex.id!r}, already used at {seen[ex.id]}; ids must be "
                                  f"unique (fix one, or drop the ids and let them be numbered)")
        seen[ex.id] = where
        examples.append(ex)
    if not examples:
        raise DataFormatError(empty)
    words = LETTERS[:max(len(ex.choices) for ex in examples)]
    task = TaskData(name, split.strip(), tuple(examples), words, note=f"{note} ({len(examples)} rows)")
    return task.subset(limit, seed=seed) if limit is not None else task


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataFormatError(f"{path} line {line}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the "
                              f"file as UTF-8") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, str, dict]]:
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                                  f"JSON object such as {_SHAPE}") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{where}: a JSON {type(row).__name__} is not a row; each line must be one JSON "
                                  f"object such as {_SHAPE}")
        yield where, f"{path.stem}-line{lineno}", row


def _csv_rows(path: Path, text: str, fields: Mapping[str, Any] | None) -> Iterator[tuple[str, str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header, prev = None, 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFormatError(f"{path} line {reader.line_num}: not valid CSV ({e}); quote cells that hold "
                                  f"commas, quotes or line breaks") from None
        start, prev = prev + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            dup = sorted({c for c in header if header.count(c) > 1})
            if dup or "" in header:
                raise DataFormatError(f"{path} line {start}: the header row has " + (
                    f"repeated column names {dup}" if dup else "an empty column name") + "; give every column a "
                    "distinct name (question, choice0, choice1, ..., label)")
            for key, cols in (fields or {}).items():  # columns named one by one must all be there
                for c in [] if isinstance(cols, str) else [c for c in cols if c not in header]:
                    raise DataFormatError(f"{path} line {start}: the header has no column {c!r} (named in "
                                          f"fields[{key!r}]); columns there: {', '.join(header)}")
            head_line = start
            continue
        if len(cells) != len(header):
            raise DataFormatError(f"{path} line {start}: {len(cells)} cells but the header (line {head_line}) has "
                                  f"{len(header)} columns; quote cells that contain commas, and close every opening "
                                  f"quote")
        yield f"{path} line {start}", f"{path.stem}-line{start}", dict(zip(header, cells))


def load_user_task(path: str | os.PathLike, split: str = "train", *, fields: Mapping[str, Any] | None = None,
                   limit: int | None = None, seed: int = 0) -> TaskData:
    """Load your own multiple-choice or completion data (a ``.jsonl``/``.csv`` file or a folder) as a task.

    ``load_task(path, split, ...)`` calls this for any name :func:`is_user_path` calls a path.

    :param path: a ``.jsonl`` or ``.csv`` file, which **is** the split's data (``split`` only names it), or a
        folder holding ``<split>.jsonl`` or ``<split>.csv``.
    :param split: the split's name; picks the file in a folder.
    :param fields: your names for the schema's fields (see the module docs), e.g. ``{"label": "answer"}``.
    :param limit: keep a seeded random subset of this many rows; :param seed: its seed.
    :returns: a :class:`~scalabl_pyro.harness.data.TaskData` named after the file's stem (or the folder), with label
        words ``A, B, ...`` (as many as the longest row has choices).
    :raises DataFormatError: a bad row (file, line, field and fix in the message), an empty file or an
        unknown file type. :raises FileNotFoundError: no such file (``SplitNotFoundError``: no such split file).

    Example::

        task = load_user_task("my_train.jsonl", "train")
        task = load_user_task("quiz.csv", "test", fields={"question": "prompt", "label": "answer"})
        task = load_user_task("my_data", "validation")        # my_data/validation.jsonl or .csv
    """
    fields = _check_args(split, limit, fields)
    shown = os.fspath(path)
    p = Path(shown).expanduser()
    name = p.stem
    if p.is_dir():
        found = [p / f"{split}{s}" for s in SUFFIXES if (p / f"{split}{s}").is_file()]
        if len(found) > 1:
            raise DataFormatError(f"{shown}: both {found[0].name} and {found[1].name} exist for split {split!r}; "
                                  f"keep one of them")
        if not found:
            have = sorted(f.name for f in p.iterdir() if f.suffix.lower() in SUFFIXES)
            raise SplitNotFoundError(f"{shown}: no {split}.jsonl or {split}.csv for split {split!r} (split files "
                                     f"there: {', '.join(have) or 'none'}); name the files <split>.jsonl or "
                                     f"<split>.csv, or pass a file path")
        name, p, shown = p.resolve().name, found[0], os.path.join(shown, found[0].name)
    elif not p.exists():
        raise FileNotFoundError(f"{shown}: no such file or folder; pass a .jsonl or .csv file, or a folder holding "
                                f"<split>.jsonl files (train.jsonl, test.jsonl, ...)")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataFormatError(f"{shown}: unknown file extension {p.suffix or '(none)'!r}; use .jsonl (one JSON "
                              f"object per line) or .csv (a header row, then one row per question)")
    try:
        text = _decode(Path(shown), p.read_bytes())
    except OSError as e:
        raise DataFormatError(f"{shown}: cannot be read ({e.strerror or e}); check the path and its "
                              f"permissions") from None
    shown_path = Path(shown)
    if suffix == ".jsonl":
        rows = _jsonl_rows(shown_path, text)
        empty = f"{shown} is empty: no rows; expected one JSON object per line such as {_SHAPE}"
    else:
        rows = _csv_rows(shown_path, text, fields)
        empty = (f"{shown} is empty: no rows; expected a header row (e.g. question,choice0,choice1,label) and "
                 f"then one row per question")
    return _build(rows, name=name, split=split, fields=fields, cells=suffix == ".csv", empty=empty,
                  note=f"own data from {shown}", limit=limit, seed=seed)


def load_if_user_path(name: Any, split: str, *, data_dir=None, hub: bool = False, fields=None, limit=None,
                      seed: int = 0) -> TaskData | None:
    """:func:`~scalabl_pyro.harness.data.load_task`'s dispatch: :func:`load_user_task` if ``name`` is a path, else ``None``.

    :raises ValueError: ``data_dir``/``hub`` with a path (they only locate the built-in benchmarks), or
        ``fields`` with a benchmark name (it maps the columns of your own files).

    Example::

        load_if_user_path("arc_easy", "test")          # None: a benchmark name, load_task goes on
    """
    if not is_user_path(name):
        if fields is not None:
            raise ValueError(f"fields= maps the columns of your own data files; {name!r} is a built-in benchmark "
                             f"(drop fields, or pass the path of your file)")
        return None
    if data_dir is not None or hub:
        raise ValueError(f"{os.fspath(name)!r} is a path to your own data, used as it is: drop "
                         f"{'data_dir' if data_dir is not None else 'hub=True'}, which only locates the built-in "
                         f"benchmarks")
    return load_user_task(name, split, fields=fields, limit=limit, seed=seed)


def task_from_records(records: Iterable[Mapping[str, Any]], *, name: str = "records", split: str = "train",
                      fields: Mapping[str, Any] | None = None, limit: int | None = None, seed: int = 0) -> TaskData:
    """A task from in-memory rows: dicts, or a Hugging Face ``datasets.Dataset`` (its rows are dicts).

    Same schema, ``fields`` mapping and checks as :func:`load_user_task`; errors name ``<name> <split> row <i>``
    (0-based) and the field. Values keep their types, so a label must be an ``int`` or a letter.

    Example::

        import datasets
        ds = datasets.load_dataset("allenai/openbookqa", "main", split="train")
        task = task_from_records(ds, name="obqa", fields={"question": "question_stem", "choices": "choices.text",
                                                          "label": "answerKey"})
        rows = [{"question": "2+2?", "choices": ["3", "4"], "label": "B"}]
        task = task_from_records(rows, name="toy", split="test")
    """
    fields = _check_args(split, limit, fields)

    def rows():
        for i, row in enumerate(records):
            where = f"{name} {split} row {i}"
            if not isinstance(row, Mapping):
                raise DataFormatError(f"{where}: a {type(row).__name__} is not a row; pass dicts such as {_SHAPE}")
            yield where, f"{name}-{i}", row

    return _build(rows(), name=name, split=split, fields=fields, cells=False, note=f"own records {name!r}",
                  empty=f"{name} {split}: no rows; pass at least one record such as {_SHAPE}", limit=limit, seed=seed)

