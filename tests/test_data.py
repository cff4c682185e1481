"""Tests of scalabl_pyro.harness.data: real-file adapters (skipped without ../shared/data), malformed files, registry,
hub normalizers (hand-made hub-shaped rows, no network)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import scalabl_pyro.harness.data as data_mod
from scalabl_pyro.harness.data import (
    DATASETS,
    MMLU_SUBJECTS,
    BenchmarkNotFoundError,
    DataFormatError,
    Example,
    HubUnavailableError,
    SplitNotFoundError,
    TaskData,
    UnknownDatasetError,
    available_datasets,
    default_data_dir,
    get_spec,
    letter_prompt,
    load_task,
    normalize_arc_row,
    normalize_boolq_row,
    normalize_mmlu_row,
    normalize_openbookqa_row,
    normalize_winogrande_row,
    qa_context,
    validate_example,
)

REPO = Path(__file__).resolve().parents[1]


def _real_root() -> Path | None:
    env = os.environ.get("SCALABL_DATA_DIR")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="module")
def root() -> Path:
    r = _real_root()
    if r is None:
        pytest.skip("real benchmark data not found: set SCALABL_DATA_DIR or place it at <repo>/../shared/data")
    return r


def _norm(s: str) -> str:
    return " ".join(s.split())


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _arc_row(i: int, label: int = 0, n: int = 4) -> dict:
    return {"id": f"q{i}", "question": f"Question number {i}?", "choices": [f"choice {k}" for k in range(n)],
            "label": label, "choice_labels": list("ABCDE"[:n]), "answer_key": "ABCDE"[label]}


# --------------------------------------------------------------------------------------------- real files
REAL_CASES = [
    ("openbookqa", "train", 4), ("obqa", "test", 4), ("arc_easy", "test", 5), ("arc_c", "validation", 5),
    ("boolq", "validation", 2), ("winogrande_s", "train", 2), ("winogrande_m", "test", 2),
    ("mmlu_anatomy", "test", 4), ("mmlu_high_school_physics", "dev", 4),
]


@pytest.mark.parametrize("name,split,num_classes", REAL_CASES)
def test_real_adapters(root, name, split, num_classes):
    task = load_task(name, split, data_dir=root, limit=15, seed=0)
    assert isinstance(task, TaskData) and len(task) == (5 if split == "dev" else 15)
    assert task.name == get_spec(name).name and task.split == split
    assert task.num_classes == num_classes == len(task.label_words)
    for ex in task:
        assert isinstance(ex, Example) and ex.id
        assert 0 <= ex.label < len(ex.choices) <= num_classes
        assert len(ex.continuations) == len(ex.choices)
        assert ex.prompt.endswith("Answer:")
        assert all(c.strip() for c in ex.choices)
        if get_spec(name).family != "winogrande":
            assert ex.context.strip()
        if get_spec(name).family in ("arc", "mmlu", "openbookqa"):
            assert ex.prompt.startswith("Question: ") and "\nChoices:\nA) " in ex.prompt
            assert ex.continuations == tuple(" " + c.strip() for c in ex.choices)
        if get_spec(name).family in ("arc", "mmlu"):
            assert ex.context.startswith("Question: ") and ex.context.endswith("\nAnswer:")


def test_real_limit_is_deterministic(root):
    a = load_task("arc_easy", "train", data_dir=root, limit=30, seed=1)
    b = load_task("arc_easy", "train", data_dir=root, limit=30, seed=1)
    c = load_task("arc_easy", "train", data_dir=root, limit=30, seed=2)
    assert a == b and [e.id for e in a] != [e.id for e in c]
    assert "subset" in a.note


def test_real_arc_three_and_five_choices(root):
    task = load_task("arc_easy", "train", data_dir=root)
    assert task.num_classes == 5 and len(task) == 2251
    sizes = {len(ex.choices) for ex in task}
    assert {3, 4, 5} <= sizes
    five = next(ex for ex in task if len(ex.choices) == 5)
    three = next(ex for ex in task if len(ex.choices) == 3)
    assert "\nE) " in five.prompt and "\nD) " not in three.prompt


def test_real_openbookqa_context_is_stem(root):
    ex = load_task("openbookqa", "test", data_dir=root, limit=3)[0]
    assert not ex.context.startswith("Question:")
    assert ex.prompt.startswith("Question: " + ex.context)


def test_real_boolq_split_from_validation(root):
    tr = load_task("boolq", "train", data_dir=root)
    te = load_task("boolq", "test", data_dir=root)
    va = load_task("boolq", "validation", data_dir=root)
    assert len(tr) + len(te) == len(va) == 3270 and abs(len(tr) - len(te)) <= 1
    ids_tr, ids_te = {e.id for e in tr}, {e.id for e in te}
    assert not ids_tr & ids_te and ids_tr | ids_te == {e.id for e in va}
    assert "validation" in tr.note and "seed 0" in tr.note and "validation" in te.note
    assert load_task("boolq", "train", data_dir=root) == tr  # deterministic
    # limit seeds do not move the train/test boundary
    assert {e.id for e in load_task("boolq", "test", data_dir=root, limit=50, seed=7)} <= ids_te
    ex = tr[0]
    assert tr.label_words == ("no", "yes") and ex.choices == ("no", "yes")
    assert ex.prompt == ex.context and ex.prompt.endswith("?\nAnswer:") and "\nQuestion: " in ex.prompt
    assert ex.continuations == (" no", " yes")


def test_real_winogrande_reconstructs_sentences(root):
    raw = {}
    with open(root / "winogrande" / "validation.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            raw[r["id"]] = r
    task = load_task("winogrande_s", "test", data_dir=root)
    assert len(task) == len(raw) == 1267
    assert "validation" in task.note
    for ex in task:
        r = raw[ex.id]
        assert ex.choices == (r["option1"], r["option2"]) and ex.label == int(r["answer"]) - 1
        for opt, cont in zip(ex.choices, ex.continuations):
            assert _norm(ex.context + cont) == _norm(r["sentence"].replace("_", opt, 1))
        assert ex.prompt.endswith("\nA) %s\nB) %s\nAnswer:" % ex.choices)
    assert len(load_task("winogrande_s", "train", data_dir=root)) == 640
    assert len(load_task("winogrande_m", "train", data_dir=root)) == 2558


def test_real_mmlu_registry_and_data_dir_forms(root):
    folders = {p.name for p in (root / "mmlu").iterdir() if p.is_dir()}
    assert folders == set(MMLU_SUBJECTS) and len(MMLU_SUBJECTS) == 57
    assert all(f"mmlu_{s}" in DATASETS for s in folders)
    a = load_task("mmlu_anatomy", "validation", data_dir=root)
    b = load_task("mmlu_anatomy", "validation", data_dir=root / "mmlu")
    c = load_task("mmlu_anatomy", "validation", data_dir=root / "mmlu" / "anatomy")
    assert a == b == c and len(a) == 14
    with pytest.raises(SplitNotFoundError) as ei:
        load_task("mmlu_anatomy", "train", data_dir=root)
    assert "dev" in str(ei.value) and "test" in str(ei.value) and "validation" in str(ei.value)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALABL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("SCALABL_DATA_DIR", str(tmp_path / "nope"))
    with pytest.warns(UserWarning, match="SCALABL_DATA_DIR"):
        d = default_data_dir()
    assert d is None or d.is_dir()


# --------------------------------------------------------------------------------------------- synthetic files
def test_bad_json_names_file_and_line(tmp_path):
    rows = [_arc_row(0), _arc_row(1), '{"id": "q2", "question": "oops", ', _arc_row(3)]
    _write_jsonl(tmp_path / "arc_easy" / "test.jsonl", rows)
    with pytest.raises(DataFormatError) as ei:
        load_task("arc_easy", "test", data_dir=tmp_path)
    msg = str(ei.value)
    assert "test.jsonl" in msg and "line 3" in msg and "JSON" in msg


def test_label_out_of_range(tmp_path):
    _write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [_arc_row(0), {**_arc_row(1), "label": 7}])
    with pytest.raises(ValueError) as ei:
        load_task("arc_easy", "test", data_dir=tmp_path)
    msg = str(ei.value)
    assert "line 2" in msg and "label 7" in msg and "0..3" in msg


def test_missing_field(tmp_path):
    row = _arc_row(1)
    del row["choices"]
    _write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [_arc_row(0), _arc_row(2), row])
    with pytest.raises(DataFormatError, match=r"line 3: missing field 'choices'"):
        load_task("arc_easy", "test", data_dir=tmp_path)


def test_empty_choice_and_bad_types(tmp_path):
    p = tmp_path / "arc_easy"
    _write_jsonl(p / "test.jsonl", [{**_arc_row(0), "choices": ["a", "  ", "c", "d"]}])
    with pytest.raises(DataFormatError, match="line 1: choice 1"):
        load_task("arc_easy", "test", data_dir=tmp_path)
    _write_jsonl(p / "test.jsonl", [{**_arc_row(0), "label": "B"}])
    with pytest.raises(DataFormatError, match="integer"):
        load_task("arc_easy", "test", data_dir=tmp_path)
    _write_jsonl(p / "test.jsonl", ["[1, 2]"])
    with pytest.raises(DataFormatError, match="JSON object"):
        load_task("arc_easy", "test", data_dir=tmp_path)


def test_too_many_choices_for_task(tmp_path):
    _write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [_arc_row(0, n=6)])
    with pytest.raises(ValueError, match="6 choices but the task has only 5 classes"):
        load_task("arc_easy", "test", data_dir=tmp_path)


def test_missing_split_lists_existing(tmp_path):
    _write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [_arc_row(0)])
    _write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", [_arc_row(0)])
    with pytest.raises(SplitNotFoundError) as ei:
        load_task("arc_easy", "train", data_dir=tmp_path)
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert "'train'" in msg and "test" in msg and "validation" in msg


def test_data_dir_forms_and_errors(tmp_path):
    _write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [_arc_row(0), _arc_row(1, label=2)])
    a = load_task("arc_easy", "test", data_dir=tmp_path)
    b = load_task("arc_easy", "test", data_dir=tmp_path / "arc_easy")
    assert a == b and len(a) == 2 and a[1].label == 2
    assert a[0].prompt == letter_prompt("Question number 0?", ["choice 0", "choice 1", "choice 2", "choice 3"])
    assert a[0].context == qa_context("Question number 0?")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("arc_easy", "test", data_dir=tmp_path / "missing")
    with pytest.raises(BenchmarkNotFoundError, match="arc_easy"):
        load_task("boolq", "test", data_dir=tmp_path)


def test_boolq_fallback_synthetic(tmp_path):
    rows = [{"id": f"boolq-{i}", "idx": i, "question": f"is it {i}", "passage": "Some passage.",
             "choices": ["no", "yes"], "label": i % 2} for i in range(11)]
    _write_jsonl(tmp_path / "boolq" / "validation.jsonl", rows)
    tr = load_task("boolq", "train", data_dir=tmp_path)
    te = load_task("boolq", "test", data_dir=tmp_path)
    assert len(tr) == 5 and len(te) == 6
    assert not {e.id for e in tr} & {e.id for e in te}
    assert "50/50" in tr.note and tr == load_task("boolq", "train", data_dir=tmp_path)
    assert tr[0].prompt == f"Some passage.\nQuestion: {rows[int(tr[0].id.split('-')[1])]['question']}?\nAnswer:"
    # a split with neither a file nor a fallback: error listing what exists (incl. the derived halves)
    with pytest.raises(SplitNotFoundError, match="train \\(half of validation.jsonl\\)"):
        load_task("boolq", "dev", data_dir=tmp_path)


def test_winogrande_blank_at_start_and_mid(tmp_path):
    rows = [
        {"id": "w1", "sentence": "_ was late because Ian's car broke.", "choices": ["Ian", "Bob"], "label": 0},
        {"id": "w2", "sentence": "Ian beat Bob because _'s legs are long.", "choices": ["Ian", "Bob"], "label": 0},
    ]
    _write_jsonl(tmp_path / "winogrande" / "validation.jsonl", rows)
    task = load_task("winogrande_m", "test", data_dir=tmp_path)
    a, b = task
    assert a.context == "" and a.continuations == ("Ian was late because Ian's car broke.",
                                                   "Bob was late because Ian's car broke.")
    assert b.context == "Ian beat Bob because" and b.continuations == (" Ian's legs are long.", " Bob's legs are long.")
    assert b.prompt == ("Ian beat Bob because _'s legs are long.\nWhat does the blank _ refer to?\n"
                        "A) Ian\nB) Bob\nAnswer:")
    _write_jsonl(tmp_path / "winogrande" / "validation.jsonl", [{**rows[0], "sentence": "No blank here."}])
    with pytest.raises(DataFormatError, match="line 1.*blank"):
        load_task("winogrande_m", "validation", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------- registry
def test_unknown_dataset_suggests():
    with pytest.raises(UnknownDatasetError) as ei:
        load_task("arc_esay", "test")
    msg = str(ei.value)
    assert isinstance(ei.value, KeyError)
    assert "'arc_easy'" in msg and "available_datasets()" in msg and not msg.startswith('"')
    with pytest.raises(KeyError, match="mmlu_anatomy"):
        get_spec("mmlu_anatomyy")


def test_registry_names_and_aliases():
    names = available_datasets()
    for n in ("openbookqa", "arc_easy", "arc_challenge", "boolq", "winogrande_s", "winogrande_m",
              "obqa", "arc_e", "arc_c", "mmlu_anatomy", "mmlu_world_religions"):
        assert n in names
    assert sum(n.startswith("mmlu_") for n in names) == 57
    assert get_spec("ARC-Easy") is get_spec("arc_e") is DATASETS["arc_easy"]
    assert get_spec("obqa").name == "openbookqa"
    assert DATASETS["winogrande_s"].split_files["train"] == "train_s"
    assert DATASETS["arc_challenge"].label_words == tuple("ABCDE")


# --------------------------------------------------------------------------------------------- records
def _ex(**kw) -> Example:
    base = dict(id="x", label=1, choices=("a", "b"), prompt="P\nAnswer:", context="C", continuations=(" a", " b"))
    base.update(kw)
    return Example(**base)


def test_validate_example_errors():
    validate_example(_ex(), 2)
    with pytest.raises(ValueError, match=r"label 2 is out of range; allowed 0\.\.1"):
        validate_example(_ex(label=2), 4, where="f.jsonl, line 9")
    with pytest.raises(ValueError, match="no choices"):
        validate_example(_ex(choices=(), continuations=()), 2)
    with pytest.raises(ValueError, match="choice 1"):
        validate_example(_ex(choices=("a", " ")), 2)
    with pytest.raises(ValueError, match="3 choices but the task has only 2"):
        validate_example(_ex(choices=("a", "b", "c"), continuations=(" a", " b", " c")), 2)
    with pytest.raises(ValueError, match="1 continuations for 2 choices"):
        validate_example(_ex(continuations=(" a",)), 2)
    with pytest.raises(ValueError, match="^f.jsonl, line 9: "):
        validate_example(_ex(label=-1), 2, where="f.jsonl, line 9")


def test_taskdata_basics():
    exs = tuple(_ex(id=f"e{i}", label=i % 2) for i in range(10))
    t = TaskData("toy", "train", exs, ("A", "B"))
    assert len(t) == 10 and t.num_classes == 2 and list(t)[3] is exs[3] and t[2] is exs[2]
    assert isinstance(t[2:5], TaskData) and len(t[2:5]) == 3
    s = t.subset(4, seed=3)
    assert s == t.subset(4, seed=3) and len(s) == 4 and t.subset(100) is t
    assert [e.id for e in s] == sorted((e.id for e in s), key=lambda x: int(x[1:]))  # original order kept
    assert "n=10" in repr(t)
    with pytest.raises(ValueError, match="positive integer"):
        t.subset(0)
    with pytest.raises(ValueError, match="out of range"):
        TaskData("toy", "train", (_ex(label=5),), ("A", "B"))
    with pytest.raises(ValueError, match="duplicates"):
        TaskData("toy", "train", exs, ("A", "A"))


# --------------------------------------------------------------------------------------------- hub
def test_hub_normalizers():
    r = normalize_openbookqa_row({"id": "7-980", "question_stem": "The sun is responsible for",
                                  "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
                                  "answerKey": "D"})
    assert r["question"] == "The sun is responsible for" and r["label"] == 3 and r["choices"] == ["a", "b", "c", "d"]
    r = normalize_arc_row({"id": "Mercury_1", "question": "Which?", "choices": {"text": ["x", "y", "z"],
                           "label": ["1", "2", "3"]}, "answerKey": "2"})
    assert r["label"] == 1 and r["id"] == "Mercury_1" and r["choice_labels"] == ["1", "2", "3"]
    with pytest.raises(DataFormatError, match="answerKey 'E'"):
        normalize_arc_row({"id": "a", "question": "q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "E"})
    r = normalize_boolq_row({"question": "is the sky blue", "answer": True, "passage": "Sky -- It is blue."},
                            index=4, split="validation")
    assert r == {"id": "boolq-validation-4", "idx": 4, "question": "is the sky blue",
                 "passage": "Sky -- It is blue.", "choices": ["no", "yes"], "label": 1}
    r = normalize_winogrande_row({"sentence": "A beat B because _ was fast.", "option1": "A", "option2": "B",
                                  "answer": "2"}, index=0, split="train")
    assert r["choices"] == ["A", "B"] and r["label"] == 1 and r["id"] == "winogrande-train-0"
    with pytest.raises(DataFormatError, match="unlabeled"):
        normalize_winogrande_row({"sentence": "_ x", "option1": "A", "option2": "B", "answer": ""})
    r = normalize_mmlu_row({"question": "1+1?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 1},
                           index=5, split="dev")
    assert r["id"] == "math-dev-5" and r["label"] == 1 and r["answer_key"] == "B"
    assert normalize_mmlu_row({"question": "q", "subject": "s", "choices": list("abcd"), "answer": "C"})["label"] == 2


def test_hub_path_with_fake_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    hub_rows = [{"sentence": "Ann helped Bea because _ was kind.", "option1": "Ann", "option2": "Bea", "answer": "1"},
                {"sentence": "Ann thanked Bea because _ was kind.", "option1": "Ann", "option2": "Bea", "answer": "2"}]

    def fake_load_dataset(*args, split=None, **kw):
        calls.append((args, split))
        return hub_rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("winogrande_s", "test", hub=True)
    assert calls == [(("allenai/winogrande", "winogrande_s"), "validation")]
    assert [e.label for e in task] == [0, 1] and "Hugging Face Hub" in task.note
    assert task[0].context == "Ann helped Bea because" and task[0].continuations[0] == " Ann was kind."

    # no local data folder at all -> hub
    calls.clear()
    monkeypatch.setattr(data_mod, "default_data_dir", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: calls.append((a, split)) or [
        {"question": "q?", "subject": "anatomy", "choices": list("abcd"), "answer": 0}])
    t = load_task("mmlu_anatomy", "test")
    assert calls == [(("cais/mmlu", "anatomy"), "test")] and t[0].id == "anatomy-test-0"


def test_hub_failure_is_clear(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(HubUnavailableError) as ei:
        load_task("arc_c", "test", hub=True)
    msg = str(ei.value)
    assert "unreachable" in msg and "data_dir=" in msg and "SCALABL_DATA_DIR" in msg and "ARC-Challenge" in msg
    assert ei.value.__cause__ is None
