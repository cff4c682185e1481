"""Bring your own data (scalabl_pyro.harness.userdata): JSONL/CSV round trips, field mappings, every error with its file and
line, the tasks working with the model code, and train + evaluate on a user file from the command line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import scalabl_pyro
from scalabl_pyro.harness.data import DataFormatError, Example, SplitNotFoundError, TaskData, letter_prompt, load_task
from scalabl_pyro.harness.userdata import completion_prompt, is_user_path, load_user_task, task_from_records

MC = {"id": "fr", "question": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo"], "label": 0}
MC_EXAMPLE = Example(
    id="fr", label=0, choices=("Paris", "Rome", "Oslo"),
    prompt="Question: What is the capital of France?\nChoices:\nA) Paris\nB) Rome\nC) Oslo\nAnswer:",
    context="Question: What is the capital of France?\nAnswer:", continuations=(" Paris", " Rome", " Oslo"))


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _at(path: Path, line: int | None = None) -> str:
    """The start of an error message: the file and (if given) the line, escaped for ``match=``."""
    return "^" + re.escape(f"{path} line {line}: " if line is not None else f"{path}")


# --------------------------------------------------------------------------------------------- round trips
def test_jsonl_round_trip_both_row_kinds(tmp_path):
    f = _jsonl(tmp_path / "quiz.jsonl", [
        MC,
        "",  # blank lines are skipped (line numbers still count them)
        {"question": "2 + 2 = ?", "choices": ["3", "4"], "label": "B", "context": "Arithmetic.", "extra": 1},
        {"context": "The capital of Italy is", "continuations": [" Rome", " Paris"], "label": 0},
    ])
    task = load_task(str(f), "train")
    assert isinstance(task, TaskData) and (task.name, task.split, len(task)) == ("quiz", "train", 3)
    assert task.label_words == ("A", "B", "C") and task.labels == (0, 1, 0)
    assert task[0] == MC_EXAMPLE
    assert task[1] == Example(
        id="quiz-line3", label=1, choices=("3", "4"),
        prompt="Arithmetic.\nQuestion: 2 + 2 = ?\nChoices:\nA) 3\nB) 4\nAnswer:",
        context="Arithmetic.\nQuestion: 2 + 2 = ?\nAnswer:", continuations=(" 3", " 4"))
    assert task[2] == Example(
        id="quiz-line4", label=0, choices=("Rome", "Paris"),
        prompt="The capital of Italy is\nWhich continuation fits best?\nA) Rome\nB) Paris\nAnswer:",
        context="The capital of Italy is", continuations=(" Rome", " Paris"))
    assert task[2].prompt == completion_prompt("The capital of Italy is", [" Rome", " Paris"])
    assert load_user_task(f, "test").split == "test" and load_task(f, "train") == task  # a Path works too
    assert "quiz.jsonl" in task.note


def test_multiple_choice_rows_match_the_builtin_format(tmp_path):
    # an ARC-shaped row gives exactly what the ARC adapter gives (same prompt and context builders)
    f = _jsonl(tmp_path / "arc_like.jsonl", [{**MC, "choice_labels": ["A", "B", "C"]}])
    ex = load_task(str(f), "test")[0]
    assert ex.prompt == letter_prompt(MC["question"], MC["choices"])
    assert ex.context == "Question: What is the capital of France?\nAnswer:"


def test_csv_round_trip_numbered_and_json_list_columns(tmp_path):
    f = tmp_path / "quiz.csv"
    f.write_text('id,question,choice0,choice1,choice2,label\n'
                 'fr,What is the capital of France?,Paris,Rome,Oslo,0\n'
                 '\n'
                 ',"Two, plus two?",3,4,,B\n', encoding="utf-8")
    task = load_task(str(f), "train")
    assert task[0] == MC_EXAMPLE
    assert task[1].id == "quiz-line4" and task[1].choices == ("3", "4") and task[1].label == 1  # trailing cell empty
    assert task[1].prompt == "Question: Two, plus two?\nChoices:\nA) 3\nB) 4\nAnswer:"
    g = tmp_path / "lists.csv"
    g.write_text('\ufeffquestion,choices,label\nWhat is the capital of France?,"[""Paris"", ""Rome"", ""Oslo""]",0\n',
                 encoding="utf-8")  # a byte-order mark, as Excel writes
    assert load_task(str(g), "train")[0].choices == MC_EXAMPLE.choices
    h = tmp_path / "completions.csv"
    h.write_text('context,continuation0,continuation1,label\nThe capital of Italy is, Rome, Paris,0\n',
                 encoding="utf-8")
    assert load_task(str(h), "train")[0].continuations == (" Rome", " Paris")  # verbatim, leading space kept


def test_field_mapping_and_letter_labels(tmp_path):
    f = _jsonl(tmp_path / "renamed.jsonl", [
        {"query": "Capital of France?", "options": ["Paris", "Rome"], "answer": "a"},
        {"query": "Capital of Italy?", "options": ["Paris", "Rome"], "answer": 1}])
    fields = {"question": "query", "choices": "options", "label": "answer"}
    task = load_task(str(f), "train", fields=fields)
    assert task.labels == (0, 1) and task[0].context == "Question: Capital of France?\nAnswer:"
    with pytest.raises(DataFormatError, match=_at(f, 1) + r"missing field 'question'"):
        load_task(str(f), "train")  # without the mapping the names do not match, and the error says how to map
    no_answer = _jsonl(tmp_path / "no_answer.jsonl", [{"query": "Capital of France?", "options": ["Paris", "Rome"]}])
    with pytest.raises(DataFormatError,
                       match=_at(no_answer, 1) + r"missing field 'answer' \(your name for 'label', from fields=\)"):
        load_task(str(no_answer), "train", fields=fields)
    # several columns as the choices (CSV), and a CSV label given as a letter
    g = tmp_path / "wide.csv"
    g.write_text("prompt,A,B,C,D,answer\nCapital of France?,Paris,Rome,Oslo,Bern,A\nBig?,x,y,,,B\n", encoding="utf-8")
    wide = load_task(str(g), "train", fields={"question": "prompt", "choices": ["A", "B", "C", "D"], "label": "answer"})
    assert wide.label_words == ("A", "B", "C", "D") and wide[1].choices == ("x", "y") and wide.labels == (0, 1)
    with pytest.raises(DataFormatError, match=_at(g, 1) + "the header has no column 'E'"):
        load_task(str(g), "train", fields={"question": "prompt", "choices": ["A", "B", "E"], "label": "answer"})
    with pytest.raises(ValueError, match="'answers' is not a schema field"):
        load_task(str(f), "train", fields={"answers": "answer"})


def test_records_and_hugging_face_shaped_rows():
    hf_rows = [  # allenai/openbookqa rows: nested choices, letter answer keys
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies", "plants sprouting"], "label": ["A", "B"]}, "answerKey": "B"},
    ]
    task = task_from_records(hf_rows, name="obqa", split="test",
                             fields={"question": "question_stem", "choices": "choices.text", "label": "answerKey"})
    assert (task.name, task.split, task[0].id, task[0].label) == ("obqa", "test", "7-980", 1)
    assert task[0].continuations == (" puppies", " plants sprouting")
    with pytest.raises(DataFormatError, match=r"^toy train row 1: field 'label' is the string '1'"):
        task_from_records([MC, {**MC, "id": "x", "label": "1"}], name="toy")
    with pytest.raises(DataFormatError, match=r"^toy train row 0: a list is not a row"):
        task_from_records([["a", "b"]], name="toy")
    with pytest.raises(DataFormatError, match="no rows"):
        task_from_records([], name="toy")


def test_folder_of_split_files_limit_and_dispatch(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{**MC, "id": f"q{i}"} for i in range(10)])
    (d / "test.csv").write_text("question,choice0,choice1,label\nQ?,a,b,1\n", encoding="utf-8")
    train, test = load_task(str(d), "train"), load_task(str(d), "test")
    assert (train.name, len(train), test.name, test[0].label) == ("mine", 10, "mine", 1)
    sub = load_task(str(d), "train", limit=4, seed=1)
    assert len(sub) == 4 and sub == load_task(str(d), "train", limit=4, seed=1) and "subset" in sub.note
    with pytest.raises(SplitNotFoundError, match=r"no validation.jsonl or validation.csv .*test.csv, train.jsonl"):
        load_task(str(d), "validation")
    _jsonl(d / "test.jsonl", [MC])
    with pytest.raises(DataFormatError, match="both test.jsonl and test.csv"):
        load_task(str(d), "test")
    assert is_user_path("x.jsonl") and is_user_path("data/mine") and is_user_path(d) and not is_user_path("arc_easy")
    with pytest.raises(ValueError, match="drop data_dir"):
        load_task(str(d), "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'arc_easy' is a built-in benchmark"):
        load_task("arc_easy", "test", fields={"label": "answer"})
    with pytest.raises(KeyError, match="for your own data pass a .jsonl/.csv path"):
        load_task("mine", "train")  # a bare folder name reads as a benchmark name: the error points to paths


def test_exported_from_the_package():
    assert scalabl_pyro.load_user_task is load_user_task and scalabl_pyro.task_from_records is task_from_records
    assert {"load_user_task", "task_from_records"} <= set(scalabl_pyro.__all__)


# --------------------------------------------------------------------------------------------- errors
GOOD = {"question": "Fine?", "choices": ["yes", "no"], "label": 0}


@pytest.mark.parametrize("bad, message", [
    ('{"question": "oops", ', r"invalid JSON \(Expecting"),                                        # malformed JSON
    ("[1, 2]", r"a JSON list is not a row; each line must be one JSON object"),
    ({"question": "Q?", "choices": ["a", "b"]}, r"missing field 'label' \(fields present: 'question', 'choices'\)"),
    ({"choices": ["a", "b"], "label": 0}, r"missing field 'question' \(or 'continuations' for a completion row\)"),
    ({"continuations": [" a", " b"], "label": 0}, r"missing field 'context' \(a completion row needs"),
    ({"question": 7, "choices": ["a", "b"], "label": 0}, r"field 'question' must be text, got int 7"),  # wrong types
    ({"question": "Q?", "choices": "a, b", "label": 0}, r"field 'choices' must be a list of strings, got str"),
    ({"question": "Q?", "choices": ["a", 2], "label": 0}, r"field 'choices' item 1 must be text, got int 2"),
    ({"question": "Q?", "choices": ["a", "b"], "label": 1.0}, r"field 'label' must be a 0-based choice index"),
    ({"question": "Q?", "choices": ["a", "b"], "label": True}, r"field 'label' must be a 0-based choice index"),
    ({"question": "Q?", "choices": ["a", "b"], "label": "1"}, r"field 'label' is the string '1'; write the 0-based"),
    ({"question": "Q?", "choices": ["a", "b"], "label": "yes"}, r"field 'label' is 'yes'; use a 0-based choice index"),
    ({"id": [1], "question": "Q?", "choices": ["a", "b"], "label": 0}, r"field 'id' must be a string or an integer"),
    ({"question": "Q?", "choices": ["a", "b", "c"], "label": 5},                                    # label range
     r"field 'label' is 5 but the row has 3 choices \(allowed 0\.\.2, or 'A'\.\.'C'\)"),
    ({"question": "Q?", "choices": ["a", "b"], "label": -1}, r"field 'label' is -1 but the row has 2 choices"),
    ({"question": "Q?", "choices": ["a", "b"], "label": "D"}, r"field 'label' is 'D' \(= 3\) but the row has 2"),
    ({"question": "Q?", "choices": ["a"], "label": 0}, r"field 'choices' has 1 choice; a row needs at least 2"),
    ({"question": "Q?", "choices": [], "label": 0}, r"field 'choices' has 0 choices; a row needs at least 2"),
    ({"question": "Q?", "choices": ["a", "  "], "label": 0}, r"field 'choices' item 1 is empty \('  '\)"),  # empty
    ({"question": "  ", "choices": ["a", "b"], "label": 0}, r"field 'question' is empty"),
    ({"context": "C", "continuations": [" a", " "], "label": 0}, r"field 'continuations' item 1 is empty"),
    ({"question": "Q?", "continuations": [" a", " b"], "label": 0}, r"the row has both 'question'"),
    ({**GOOD, "id": "dup"}, r"field 'id' is 'dup', already used at .*line 1"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad, message):
    f = _jsonl(tmp_path / "my.jsonl", [{**GOOD, "id": "dup"}, "", bad])
    with pytest.raises(DataFormatError, match=_at(f, 3) + message):
        load_task(str(f), "train")


@pytest.mark.parametrize("text, line, message", [
    ("question,choice0,choice1,label\nQ?,a,b,0\nQ?,a,b,7\n", 3, r"field 'label' is 7 but the row has 2 choices"),
    ("question,choice0,choice1,label\nQ?,a,b,0\nQ?,a,,1\n", 3, r"field 'choices' has 1 choice \(columns choice0\)"),
    ("question,choice0,choice1,choice2,label\nQ?,a,,c,0\n", 2, r"field 'choice1' is empty"),
    ("question,choice0,choice1,label\nQ?,a,b,zero\n", 2, r"field 'label' is 'zero'"),
    ("question,choices,label\nQ?,a;b,0\n", 2, r"field 'choices' is 'a;b', not a JSON list"),
    ('question,choices,label\nQ?,"{""a"": 1}",0\n', 2, r"field 'choices' must be a list of strings, got dict"),
    ("question,choice0,choice1,label\nQ?,a,b,0,extra\n", 2, r"5 cells but the header \(line 1\) has 4 columns"),
    ("question,choice0,choice1\nQ?,a,b\n", 2, r"missing field 'label' \(fields present: 'question', 'choice0'"),
    ("question,question,label\nQ?,a,0\n", 1, r"the header row has repeated column names \['question'\]"),
    ('question,choice0,choice1,label\n"Q?,a,b,0\n', 2, r"1 cells but the header \(line 1\) has 4 columns; .* close"),
])
def test_csv_errors_name_file_line_and_field(tmp_path, text, line, message):
    f = tmp_path / "my.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=_at(f, line) + message):
        load_task(str(f), "train")


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=_at(empty) + " is empty: no rows; expected one JSON object per line"):
        load_task(str(empty), "train")
    header_only = tmp_path / "header.csv"
    header_only.write_text("question,choice0,choice1,label\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=_at(header_only) + " is empty: no rows; expected a header row"):
        load_task(str(header_only), "train")
    (tmp_path / "blank.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataFormatError, match="is empty"):
        load_task(str(tmp_path / "blank.csv"), "train")
    txt = tmp_path / "my.txt"
    txt.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=_at(txt) + ": unknown file extension '.txt'; use .jsonl .* or .csv"):
        load_task(str(txt), "train")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=_at(missing) + ": no such file or folder"):
        load_task(str(missing), "train")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9?"}\n')
    with pytest.raises(DataFormatError, match=_at(latin, 2) + "not valid UTF-8"):
        load_task(str(latin), "train")
    with pytest.raises(ValueError, match="limit=0"):
        load_task(str(txt.with_suffix(".jsonl")), "train", limit=0)  # checked before the file is read


# --------------------------------------------------------------------------------------------- with the model
@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_user_task_runs_through_the_model_in_both_formats(tmp_path, scoring):
    import torch

    from scalabl_pyro.backbones import tiny_llama
    from scalabl_pyro.config import ScalaBLConfig
    from scalabl_pyro.scoring import AdaptedLM

    f = _jsonl(tmp_path / "mix.jsonl", [MC, {"context": "Two plus two is", "continuations": [" four", " five"],
                                             "label": 0}])
    task = load_task(str(f), "train")
    lm, tok = tiny_llama()
    net = AdaptedLM(lm, tok, label_words=task.label_words, config=ScalaBLConfig(r=2, scoring=scoring),
                    subspace=False)
    with torch.no_grad():
        logits = net.logits(net.collate(list(task.examples)))
    assert logits.shape[-2:] == (2, 3) and torch.isfinite(logits[..., :2]).all()


# --------------------------------------------------------------------------------------------- command line
def test_cli_trains_and_evaluates_on_user_files(tmp_path, capsys):
    from scalabl_pyro.harness.cli import main

    qs = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Norway", "Oslo"), ("Peru", "Lima")]
    rows = [{"question": f"What is the capital of {c}?", "choices": [a, "Bern", "Kyiv"] if i % 2 == 0 else
             ["Kyiv", "Bern", a], "label": 0 if i % 2 == 0 else 2} for i, (c, a) in enumerate(qs)]
    train = _jsonl(tmp_path / "my_train.jsonl", rows * 2)
    test = _jsonl(tmp_path / "my_test.jsonl", [*rows[:3], {"context": "The capital of Peru is",
                                                           "continuations": [" Lima", " Oslo"], "label": "A"}])
    run = tmp_path / "run"
    tiny = ["--backbone", "tiny", "--steps", "2", "--batch-size", "4", "--r", "2", "--quiet"]
    assert main(["train", "--dataset", str(train), "--out", str(run), *tiny]) == 0
    assert "trained scalabl on" in capsys.readouterr().out
    info = json.loads((run / "run.json").read_text())
    assert info["meta"]["dataset"] == str(train) and info["label_words"] == ["A", "B", "C"]
    assert main(["evaluate", str(run), "--dataset", str(test), "--num-samples", "2", "--quiet"]) == 0
    metrics = json.loads((run / "eval_my_test_test" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["num_samples"] == 2 and metrics["dataset"] == str(test)
    assert (run / "eval_my_test_test" / "reliability.png").is_file()
    capsys.readouterr()
    # what would be ignored or is missing is refused with the fix, in one line
    assert main(["evaluate", str(run), "--quiet"]) == 2
    assert "pass --dataset with the file to evaluate on" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--dataset", str(test), "--split", "validation"]) == 2
    assert "drop --split" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--dataset", str(test), "--data-dir", str(tmp_path)]) == 2
    assert "drop --data-dir" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "label": 5}])
    assert main(["train", "--dataset", str(bad), "--out", str(tmp_path / "r2"), *tiny]) == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2: field 'label' is 5 but the row has 3 choices" in err and "Traceback" not in err
    wide = _jsonl(tmp_path / "wide.jsonl", [{"question": "Q?", "choices": list("abcde"), "label": 0}])
    assert main(["evaluate", str(run), "--dataset", str(wide), "--quiet"]) == 2
    assert "has questions with 5 choices but the run was trained with 3 classes" in capsys.readouterr().err


def test_cli_folder_dataset_defaults_to_its_test_split(tmp_path):
    from scalabl_pyro.harness.cli import main

    d = tmp_path / "mine"
    d.mkdir()
    _jsonl(d / "train.jsonl", [MC, {**MC, "id": "b", "label": 1}])
    (d / "test.csv").write_text("question,choice0,choice1,label\nCapital of France?,Paris,Rome,A\n", encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(d), "--method", "mle", "--out", str(run), "--backbone", "tiny",
                 "--steps", "1", "--r", "2", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert json.loads((run / "eval_mine_test" / "metrics.json").read_text())["n"] == 1


def test_readme_example_files_load(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Bring your own data")[1].split("\n## ")[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    jsonl = next(body for lang, body in blocks if lang == "json")
    csv_text = next(body for lang, body in blocks if lang == "" and body.startswith("question,"))
    train = load_task(str(_jsonl(tmp_path / "my_train.jsonl", jsonl.strip().splitlines())), "train")
    (tmp_path / "my_test.csv").write_text(csv_text, encoding="utf-8")
    test = load_task(str(tmp_path / "my_test.csv"), "test")
    assert train.labels == (0, 1, 0) and train[1].context.startswith("Plants make sugar from light.\nQuestion:")
    assert test.labels == (0, 1) and test[1].choices == ("3", "4") and train.label_words == test.label_words
