"""Multiple-choice benchmark data as classification tasks.

Every benchmark is turned into a :class:`TaskData`: a tuple of :class:`Example` items plus the task's
answer words. Each example carries the question in **two formats**, so that the model code can score it
either way:

* **letter format** (``Example.prompt``): the reference protocol. The prompt lists the choices as
  ``A) ...``, ``B) ...`` and ends with ``"Answer:"``; the class logits are the next-token logits of
  ``" A"``, ``" B"``, ... (``" no"``/``" yes"`` for BoolQ).
* **choice-likelihood format** (``Example.context`` + ``Example.continuations``), as LM evaluation
  harnesses do: the score of choice ``k`` is ``log p(continuations[k] | context)``.

Local files (the normal case, no network) are the uniform JSON Lines files described in
``../shared/data/README.md``: one folder per benchmark, ``<split>.jsonl`` inside, and
``mmlu/<subject>/<split>.jsonl`` for MMLU. They are pre-validated line by line (so that a broken row is
reported with its file and line number) and then read with ``datasets.load_dataset("json", ...)``.
With ``hub=True``, or when no local data folder exists, the same benchmarks are fetched from the Hugging
Face Hub and mapped to the uniform schema by small row normalizers.

Example::

    from scalabl_pyro.harness.data import load_task, available_datasets

    task = load_task("arc_easy", "test", limit=200, seed=0)
    print(task.name, task.split, len(task), task.num_classes)   # arc_easy test 200 5
    ex = task[0]
    print(ex.prompt)          # Question: ...\\nChoices:\\nA) ...\\n...\\nAnswer:
    print(ex.context, ex.continuations)
"""
from __future__ import annotations

import difflib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .hubrows import (HUB_NORMALIZERS, normalize_arc_row, normalize_boolq_row, normalize_mmlu_row,
                      normalize_openbookqa_row, normalize_winogrande_row)
from .records import (LETTERS, BenchmarkNotFoundError, DataFormatError, Example, HubUnavailableError, SplitNotFoundError,
                      TaskData, UnknownDatasetError, _require, _require_text, letter_prompt, qa_context, validate_example)

__all__ = [
    "Example",
    "TaskData",
    "DatasetSpec",
    "DATASETS",
    "MMLU_SUBJECTS",
    "LETTERS",
    "DataFormatError",
    "SplitNotFoundError",
    "BenchmarkNotFoundError",
    "UnknownDatasetError",
    "HubUnavailableError",
    "validate_example",
    "letter_prompt",
    "qa_context",
    "load_task",
    "get_spec",
    "available_datasets",
    "default_data_dir",
    "normalize_openbookqa_row",
    "normalize_arc_row",
    "normalize_boolq_row",
    "normalize_winogrande_row",
    "normalize_mmlu_row",
    "HUB_NORMALIZERS",
]

#: Seed of the permutation that splits a validation file into ``train``/``test`` halves when a
#: benchmark has no local train file (BoolQ). Fixed on purpose: it does not follow ``load_task(seed=)``,
#: so that ``train`` and ``test`` loaded with different ``seed`` values never overlap.
FALLBACK_SPLIT_SEED = 0

#: Environment variable that points to the data root (the folder holding ``arc_easy/``, ``mmlu/``, ...).
DATA_DIR_ENV = "SCALABL_DATA_DIR"


# ---------------------------------------------------------------------------------------------- registry
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives and how its rows become :class:`Example` items.

    :param name: canonical name (``"arc_easy"``).
    :param family: row schema / adapter: ``"openbookqa"``, ``"arc"``, ``"boolq"``, ``"winogrande"``, ``"mmlu"``.
    :param folder: benchmark folder relative to the data root (``"mmlu/anatomy"``).
    :param label_words: answer words of the letter format.
    :param hub_id: Hugging Face Hub dataset id.
    :param hub_config: Hub config name, if any.
    :param split_files: logical split → local file stem, where they differ (WinoGrande ``train`` → ``train_s``).
    :param hub_splits: logical split → Hub split, where they differ.
    :param split_notes: note attached to a remapped split.
    :param validation_fallback: a missing ``train``/``test`` file is carved from ``validation.jsonl``.

    Example::

        spec = DATASETS["winogrande_s"]
        spec.split_files["train"]     # 'train_s'
    """

    name: str
    family: str
    folder: str
    label_words: tuple[str, ...]
    hub_id: str
    hub_config: str | None = None
    split_files: Mapping[str, str] = field(default_factory=dict, hash=False)
    hub_splits: Mapping[str, str] = field(default_factory=dict, hash=False)
    split_notes: Mapping[str, str] = field(default_factory=dict, hash=False)
    validation_fallback: bool = False


def _wino_spec(size: str) -> DatasetSpec:
    note = (f"WinoGrande's official test split is unlabeled: 'test' is the labeled validation split "
            f"(validation.jsonl, 1267 items); train is train_{size}")
    return DatasetSpec(
        name=f"winogrande_{size}", family="winogrande", folder="winogrande", label_words=("A", "B"),
        hub_id="allenai/winogrande", hub_config=f"winogrande_{size}",
        split_files={"train": f"train_{size}", "test": "validation"},
        hub_splits={"test": "validation"},
        split_notes={"test": note, "train": f"train = train_{size}"},
    )


def _build_registry() -> dict[str, DatasetSpec]:
    reg: dict[str, DatasetSpec] = {}
    abcd = LETTERS[:4]
    reg["openbookqa"] = DatasetSpec("openbookqa", "openbookqa", "openbookqa", abcd, "allenai/openbookqa", "main")
    reg["arc_easy"] = DatasetSpec("arc_easy", "arc", "arc_easy", LETTERS[:5], "allenai/ai2_arc", "ARC-Easy")
    reg["arc_challenge"] = DatasetSpec("arc_challenge", "arc", "arc_challenge", LETTERS[:5], "allenai/ai2_arc",
                                       "ARC-Challenge")
    reg["boolq"] = DatasetSpec(
        "boolq", "boolq", "boolq", ("no", "yes"), "google/boolq", None,
        hub_splits={"test": "validation"},
        split_notes={"test": "BoolQ's official test split is unlabeled: 'test' is the validation split"},
        validation_fallback=True,
    )
    reg["winogrande_s"] = _wino_spec("s")
    reg["winogrande_m"] = _wino_spec("m")
    for subject in MMLU_SUBJECTS:
        reg[f"mmlu_{subject}"] = DatasetSpec(f"mmlu_{subject}", "mmlu", f"mmlu/{subject}", abcd, "cais/mmlu", subject)
    reg["obqa"] = reg["openbookqa"]
    reg["arc_e"] = reg["arc_easy"]
    reg["arc_c"] = reg["arc_challenge"]
    return reg


#: All registered names (aliases ``obqa``, ``arc_e``, ``arc_c`` map to the same spec as the full names).
DATASETS: dict[str, DatasetSpec] = _build_registry()


def available_datasets() -> list[str]:
    """All dataset names :func:`load_task` accepts (canonical names and aliases), sorted.

    Example::

        [n for n in available_datasets() if not n.startswith("mmlu_")]
        # ['arc_c', 'arc_challenge', 'arc_e', 'arc_easy', 'boolq', 'obqa', 'openbookqa', ...]
    """
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (case-insensitive; ``-`` and spaces count as ``_``).

    :raises UnknownDatasetError: (a ``KeyError``) with close matches and a pointer to
        :func:`available_datasets`.

    Example::

        get_spec("ARC-Easy").name   # 'arc_easy'
    """
    if not isinstance(name, str):
        raise UnknownDatasetError(f"dataset name must be a string, got {name!r}; see available_datasets()")
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, list(DATASETS), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if key.startswith("mmlu") and not close:
        hint = " MMLU names are 'mmlu_<subject>', e.g. 'mmlu_anatomy'."
    raise UnknownDatasetError(
        f"unknown dataset {name!r}.{hint} See scalabl_pyro.harness.data.available_datasets() for all "
        f"{len(DATASETS)} names (openbookqa, arc_easy, arc_challenge, boolq, winogrande_s, winogrande_m, "
        f"mmlu_<subject>, aliases obqa/arc_e/arc_c); for your own data pass a .jsonl/.csv path or a folder."
    )


def default_data_dir() -> Path | None:
    """The local data root: ``$SCALABL_DATA_DIR``, else ``<cwd>/../shared/data``, else
    ``<package parent>/../shared/data``; ``None`` if none of them exists.

    A ``$SCALABL_DATA_DIR`` that points nowhere triggers a warning and the next candidate is tried.

    Example::

        root = default_data_dir()    # e.g. PosixPath('/work/shared/data')
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p.resolve()
        warnings.warn(f"${DATA_DIR_ENV}={env!r} is not a directory; ignoring it (set it to the folder "
                      f"holding arc_easy/, boolq/, mmlu/, ...)", stacklevel=2)
    for cand in (Path.cwd() / ".." / "shared" / "data",
                 Path(__file__).resolve().parent.parent / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


# ---------------------------------------------------------------------------------------------- rows
def _check_row(row: Any, family: str, where: str) -> None:
    """Validate one uniform-schema row; raise :class:`DataFormatError` naming ``where``."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}; each line must "
                              f"be one object like {{\"id\": ..., \"question\": ..., \"choices\": [...], \"label\": 0}}")
    rid = _require(row, "id", where)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataFormatError(f"{where}: field 'id' must be a string or integer, got {rid!r}")
    text_fields = {"winogrande": ("sentence",), "boolq": ("question", "passage")}.get(family, ("question",))
    for key in text_fields:
        _require_text(row, key, where)
    if family == "boolq" and "choices" not in row:
        choices: Any = ["no", "yes"]
    else:
        choices = _require(row, "choices", where)
    if not isinstance(choices, list) or not choices:
        raise DataFormatError(f"{where}: field 'choices' must be a non-empty list of strings, got {choices!r}")
    for k, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise DataFormatError(f"{where}: choice {k} is {c!r}; every choice must be non-empty text "
                                  f"(fix or drop the row)")
    label = _require(row, "label", where)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataFormatError(f"{where}: field 'label' must be an integer choice index, got {label!r}")
    if not 0 <= label < len(choices):
        raise DataFormatError(f"{where}: label {label} is out of range; allowed 0..{len(choices) - 1} "
                              f"for {len(choices)} choices (labels are 0-based indices into 'choices')")
    if family == "winogrande":
        if len(choices) != 2:
            raise DataFormatError(f"{where}: a WinoGrande row needs exactly 2 choices, got {len(choices)}")
        if "_" not in row["sentence"]:
            raise DataFormatError(f"{where}: the sentence has no '_' blank; WinoGrande sentences mark the "
                                  f"blank to fill with a single '_'")


def _build_example(family: str, row: Mapping[str, Any]) -> Example:
    """Turn a checked uniform row into an :class:`Example` (both formats)."""
    rid = str(row["id"])
    label = int(row["label"])
    if family in ("openbookqa", "arc", "mmlu"):
        choices = tuple(row["choices"])
        shown = [c.strip() for c in choices]
        question = row["question"].strip()
        prompt = letter_prompt(question, shown)
        # OpenBookQA stems are sentences to complete ("Predators eat ..."): no "Question:" wrapper.
        context = question if family == "openbookqa" else qa_context(question)
        return Example(rid, label, choices, prompt, context, tuple(" " + c for c in shown))
    if family == "boolq":
        choices = tuple(row.get("choices") or ("no", "yes"))
        question = row["question"].strip()
        if not question.endswith("?"):
            question += "?"
        text = f"{row['passage'].strip()}\nQuestion: {question}\nAnswer:"
        return Example(rid, label, choices, text, text, tuple(" " + c.strip() for c in choices))
    if family == "winogrande":
        choices = tuple(row["choices"])
        opts = [c.strip() for c in choices]
        sentence = row["sentence"].strip()
        prompt = (f"{sentence}\nWhat does the blank _ refer to?\n"
                  + "".join(f"{w}) {o}\n" for w, o in zip(LETTERS, opts)) + "Answer:")
        i = sentence.index("_")  # first '_' is the blank
        context, after = sentence[:i].rstrip(), sentence[i + 1:]
        # Blank at the very start: empty context (the model code prepends BOS) and no leading space.
        sep = " " if context else ""
        return Example(rid, label, choices, prompt, context, tuple(sep + o + after for o in opts))
    raise ValueError(f"unknown dataset family {family!r}; expected one of openbookqa, arc, mmlu, boolq, winogrande")


# ---------------------------------------------------------------------------------------------- loading
class _quiet_datasets:
    """Silence the ``datasets`` progress bars for the duration of a read (restored afterwards)."""

    def __enter__(self):
        import datasets

        self._ds = datasets
        self._was_enabled = datasets.is_progress_bar_enabled()
        if self._was_enabled:
            datasets.disable_progress_bars()
        return datasets

    def __exit__(self, *exc):
        if self._was_enabled:
            self._ds.enable_progress_bars()
        return False


def _prevalidate_jsonl(path: Path, family: str) -> list[int]:
    """Check every line of ``path``; return the 1-based line numbers of the rows (blank lines skipped)."""
    lines: list[int] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the "
                                      f"file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be "
                                      f"exactly one JSON object, fix or remove this line") from None
            _check_row(row, family, where)
            lines.append(lineno)
    if not lines:
        raise DataFormatError(f"{path} contains no rows; expected one JSON object per line")
    return lines


def _read_local_rows(path: Path, family: str) -> list[tuple[str, dict[str, Any]]]:
    """Pre-validate ``path`` and read it with ``datasets.load_dataset("json")``; return (where, row) pairs."""
    lines = _prevalidate_jsonl(path, family)
    split_key = path.stem if re.fullmatch(r"\w+", path.stem) else "data"
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset("json", data_files={split_key: str(path)}, split=split_key)
            rows = [dict(r) for r in ds]
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise DataFormatError(
            f"datasets.load_dataset('json') could not read {path} ({type(e).__name__}: {e}). Every line parsed "
            f"as JSON, so check that each field has the same type in every row (e.g. 'id' always a string)"
        ) from None
    if len(rows) != len(lines):
        raise DataFormatError(f"{path}: datasets read {len(rows)} rows but the file has {len(lines)} JSON lines; "
                              f"make sure the file is plain JSON Lines (one object per line)")
    return [(f"{path}, line {ln}", row) for ln, row in zip(lines, rows)]


def _locate_benchmark_dir(spec: DatasetSpec, data_dir: Path) -> Path:
    """The folder holding ``spec``'s ``<split>.jsonl`` files, given the data root or the folder itself."""
    if not data_dir.exists():
        raise FileNotFoundError(
            f"data_dir {str(data_dir)!r} does not exist; pass the folder holding the benchmark folders "
            f"(e.g. '../shared/data') or the benchmark folder itself (e.g. '../shared/data/{spec.folder}')")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is a file, not a folder; pass the folder holding "
                                f"'{spec.folder}/' (or that folder itself)")
    parts = spec.folder.split("/")
    candidates = [data_dir.joinpath(*parts)]
    if len(parts) > 1:  # data_dir may be the family folder, e.g. .../mmlu
        candidates.append(data_dir / parts[-1])
    for cand in candidates:
        if cand.is_dir():
            return cand
    if any(data_dir.glob("*.jsonl")):  # the benchmark folder itself
        if data_dir.name != parts[-1]:
            warnings.warn(f"reading {spec.name!r} from {str(data_dir)!r}, a folder not named {parts[-1]!r}; "
                          f"make sure it holds {spec.name} data", stacklevel=3)
        return data_dir
    present = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    raise BenchmarkNotFoundError(
        f"no '{spec.folder}/' folder under data_dir {str(data_dir)!r} (folders there: {present or 'none'}); pass "
        f"the data root that holds '{spec.folder}/', the benchmark folder itself, or hub=True to download it")


def _available_splits(bench_dir: Path, spec: DatasetSpec) -> list[str]:
    stems = sorted(p.stem for p in bench_dir.glob("*.jsonl"))
    out = [f"{logical} (= {stem}.jsonl)" for logical, stem in spec.split_files.items()
           if logical not in stems and stem in stems]
    if spec.validation_fallback and "validation" in stems:
        out += [f"{s} (half of validation.jsonl)" for s in ("train", "test") if s not in stems]
    return stems + out


def _local_rows(spec: DatasetSpec, bench_dir: Path, split: str) -> tuple[list[tuple[str, dict]], str]:
    stem = spec.split_files.get(split, split)
    path = bench_dir / f"{stem}.jsonl"
    if path.is_file():
        return _read_local_rows(path, spec.family), spec.split_notes.get(split, "")
    val = bench_dir / "validation.jsonl"
    if spec.validation_fallback and split in ("train", "test") and val.is_file():
        rows = _read_local_rows(val, spec.family)
        order = list(range(len(rows)))
        random.Random(FALLBACK_SPLIT_SEED).shuffle(order)
        half = len(rows) // 2
        chosen = sorted(order[:half] if split == "train" else order[half:])
        note = (f"{spec.name} has no local {split} split: validation.jsonl ({len(rows)} rows) is split "
                f"deterministically 50/50 (seeded permutation, seed {FALLBACK_SPLIT_SEED}) into train "
                f"({half}) and test ({len(rows) - half}); do not also evaluate on 'validation', it overlaps both")
        return [rows[i] for i in chosen], note
    raise SplitNotFoundError(
        f"{spec.name}: no split {split!r} in {str(bench_dir)!r} (looked for {path.name}); splits that exist: "
        f"{', '.join(_available_splits(bench_dir, spec)) or 'none'}")


def _hub_rows(spec: DatasetSpec, split: str, *, local_hint: str = "") -> tuple[list[tuple[str, dict]], str]:
    hub_split = spec.hub_splits.get(split, split)
    label = f"{spec.hub_id}" + (f" (config {spec.hub_config!r})" if spec.hub_config else "")
    try:
        with _quiet_datasets() as datasets:
            args = (spec.hub_id, spec.hub_config) if spec.hub_config else (spec.hub_id,)
            ds = datasets.load_dataset(*args, split=hub_split)
            raw_rows = [dict(r) for r in ds]
    except Exception as e:  # noqa: BLE001 - network/hub errors are many and deep
        raise HubUnavailableError(
            f"could not load {label} split {hub_split!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"The hub is unreachable from here (offline?) or has no such split. {local_hint}Use local files "
            f"instead: load_task({spec.name!r}, {split!r}, data_dir='path/to/shared/data') or set "
            f"${DATA_DIR_ENV} to the folder holding '{spec.folder}/'."
        ) from None
    norm = HUB_NORMALIZERS[spec.family]
    rows = []
    for i, raw in enumerate(raw_rows):
        where = f"hub {label} split {hub_split!r}, row {i}"
        row = norm(raw, index=i, split=hub_split)
        _check_row(row, spec.family, where)
        rows.append((where, row))
    note = spec.split_notes.get(split, "") if hub_split != split else ""
    return rows, (f"loaded from the Hugging Face Hub ({label}, split {hub_split!r})" + (f"; {note}" if note else ""))


def load_task(name: str, split: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None,
              seed: int = 0, hub: bool = False, fields: Mapping[str, Any] | None = None) -> TaskData:
    """Load one split of a benchmark as a :class:`TaskData`.

    :param name: dataset name (see :func:`available_datasets`): ``openbookqa``/``obqa``,
        ``arc_easy``/``arc_e``, ``arc_challenge``/``arc_c``, ``boolq``, ``winogrande_s``,
        ``winogrande_m``, ``mmlu_<subject>``.
    :param split: ``"train"``, ``"validation"``, ``"test"`` (MMLU also ``"dev"``). WinoGrande ``"test"``
        is the labeled validation file; BoolQ ``"train"``/``"test"`` are the two halves of its
        validation file (no local train file); ``task.note`` says so.
    :param data_dir: the data root holding the benchmark folders (e.g. ``../shared/data``) or the
        benchmark folder itself. Default: :func:`default_data_dir`; if that is ``None`` the Hub is used.
    :param limit: keep a deterministic random subset of this many examples.
    :param seed: seed of the ``limit`` subset (the BoolQ train/test split always uses seed 0).
    :param hub: load from the Hugging Face Hub (network) instead of local files.
    :param fields: for your own data (``name`` a ``.jsonl``/``.csv`` path or a folder): your column names,
        see :func:`scalabl_pyro.harness.userdata.load_user_task`, which such a path is handed to.
    :raises UnknownDatasetError: unknown name (with close matches).
    :raises SplitNotFoundError: no file for ``split`` (lists the splits that exist).
    :raises DataFormatError: a malformed row (names file and 1-based line).
    :raises HubUnavailableError: the Hub could not be reached.

    Example::

        train = load_task("arc_e", "train", limit=500)
        test = load_task("mmlu_anatomy", "test", data_dir="../shared/data")
        wino = load_task("winogrande_s", "test")   # validation.jsonl; see wino.note
        mine = load_task("my_train.jsonl", "train")  # your own file (README: 'Bring your own data')
    """
    from .userdata import load_if_user_path  # your own data: a .jsonl/.csv path or a folder of them

    if (own := load_if_user_path(name, split, data_dir=data_dir, hub=hub, fields=fields, limit=limit,
                                 seed=seed)) is not None:
        return own
    spec = get_spec(name)
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split={split!r} must be a split name such as 'train', 'validation' or 'test'")
    split = split.strip()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None (all examples)")

    if hub:
        rows, note = _hub_rows(spec, split)
    else:
        explicit = data_dir is not None
        root = Path(data_dir).expanduser() if explicit else default_data_dir()
        if root is None:
            rows, note = _hub_rows(spec, split, local_hint=(
                f"No local data folder was found (${DATA_DIR_ENV} unset, no ../shared/data). "))
        else:
            try:
                bench_dir = _locate_benchmark_dir(spec, root)
            except BenchmarkNotFoundError as e:
                if explicit:
                    raise
                rows, note = _hub_rows(spec, split, local_hint=f"Local fallback failed too: {e}. ")
            else:
                rows, note = _local_rows(spec, bench_dir, split)

    examples = []
    for where, row in rows:
        ex = _build_example(spec.family, row)
        validate_example(ex, len(spec.label_words), where=where)
        examples.append(ex)
    task = TaskData(spec.name, split, tuple(examples), spec.label_words, note=note)
    return task.subset(limit, seed=seed) if limit is not None else task
