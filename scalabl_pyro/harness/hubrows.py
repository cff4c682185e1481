"""Hugging Face Hub rows of the benchmarks mapped to the uniform schema of ``../shared/data/README.md`` (what
:func:`~scalabl_pyro.harness.data.load_task` reads with ``hub=True``), one normalizer per family.

Example::

    row = normalize_arc_row({"id": "x", "question": "?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                             "answerKey": "B"})
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .records import LETTERS, DataFormatError, _require

__all__ = ["HUB_NORMALIZERS", "normalize_openbookqa_row", "normalize_arc_row", "normalize_boolq_row",
           "normalize_winogrande_row", "normalize_mmlu_row"]


def _hub_mc(row: Mapping[str, Any], qkey: str, where: str) -> dict[str, Any]:
    ch = _require(row, "choices", where)
    if not isinstance(ch, Mapping) or "text" not in ch or "label" not in ch:
        raise DataFormatError(f"{where}: hub field 'choices' must be {{'text': [...], 'label': [...]}}, got {ch!r}")
    texts, keys = list(ch["text"]), [str(k).strip() for k in ch["label"]]
    key = str(_require(row, "answerKey", where)).strip()
    if key not in keys:
        raise DataFormatError(f"{where}: answerKey {key!r} is not one of the choice labels {keys}")
    return {"id": str(_require(row, "id", where)), "question": _require(row, qkey, where), "choices": texts,
            "label": keys.index(key), "choice_labels": keys, "answer_key": key}


def normalize_openbookqa_row(row: Mapping[str, Any], *, index: int = 0, split: str = "train") -> dict[str, Any]:
    """Map an ``allenai/openbookqa`` (config ``main``) row to the uniform local schema.

    Example::

        normalize_openbookqa_row({"id": "7-980", "question_stem": "The sun is responsible for",
            "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"})
        # {'id': '7-980', 'question': 'The sun is responsible for', 'choices': [...], 'label': 3, ...}
    """
    return _hub_mc(row, "question_stem", f"allenai/openbookqa {split} row {index}")


def normalize_arc_row(row: Mapping[str, Any], *, index: int = 0, split: str = "train") -> dict[str, Any]:
    """Map an ``allenai/ai2_arc`` row (answer keys ``A``–``E`` or ``1``–``4``) to the uniform schema.

    Example::

        normalize_arc_row({"id": "x", "question": "q?", "choices": {"text": ["a", "b", "c"],
                           "label": ["1", "2", "3"]}, "answerKey": "2"})["label"]   # 1
    """
    return _hub_mc(row, "question", f"allenai/ai2_arc {split} row {index}")


def normalize_boolq_row(row: Mapping[str, Any], *, index: int = 0, split: str = "train") -> dict[str, Any]:
    """Map a ``google/boolq`` row (``question``, ``answer`` bool, ``passage``) to the uniform schema.

    The Hub rows have no id: it is ``boolq-<split>-<index>``.

    Example::

        normalize_boolq_row({"question": "is it", "answer": True, "passage": "It is."}, index=3)
        # {'id': 'boolq-train-3', 'question': 'is it', 'passage': 'It is.', 'choices': ['no', 'yes'], 'label': 1}
    """
    where = f"google/boolq {split} row {index}"
    ans = _require(row, "answer", where)
    if not isinstance(ans, bool):
        raise DataFormatError(f"{where}: hub field 'answer' must be true/false, got {ans!r}")
    return {"id": f"boolq-{split}-{index}", "idx": index, "question": _require(row, "question", where),
            "passage": _require(row, "passage", where), "choices": ["no", "yes"], "label": int(ans)}


def normalize_winogrande_row(row: Mapping[str, Any], *, index: int = 0, split: str = "train") -> dict[str, Any]:
    """Map an ``allenai/winogrande`` row (``sentence``, ``option1``, ``option2``, ``answer`` "1"/"2").

    The Hub rows have no qID: the id is ``winogrande-<split>-<index>``. Unlabeled rows (``answer == ""``,
    the official test split) are rejected.

    Example::

        normalize_winogrande_row({"sentence": "A beat B because _ was fast.", "option1": "A",
                                  "option2": "B", "answer": "1"})["label"]   # 0
    """
    where = f"allenai/winogrande {split} row {index}"
    o1, o2 = _require(row, "option1", where), _require(row, "option2", where)
    ans = str(_require(row, "answer", where)).strip()
    if ans not in ("1", "2"):
        raise DataFormatError(f"{where}: answer {ans!r} is not '1' or '2' (WinoGrande's test split is "
                              f"unlabeled; evaluate on 'validation' instead)")
    return {"id": str(row.get("qID") or f"winogrande-{split}-{index}"), "sentence": _require(row, "sentence", where),
            "choices": [o1, o2], "label": int(ans) - 1, "option1": o1, "option2": o2, "answer": ans}


def normalize_mmlu_row(row: Mapping[str, Any], *, index: int = 0, split: str = "test") -> dict[str, Any]:
    """Map a ``cais/mmlu`` row (``question``, ``subject``, ``choices``, ``answer`` 0–3 or ``A``–``D``).

    Example::

        normalize_mmlu_row({"question": "1+1?", "subject": "math", "choices": ["1", "2", "3", "4"],
                            "answer": 1}, index=0, split="test")["id"]   # 'math-test-0'
    """
    where = f"cais/mmlu {split} row {index}"
    ans = _require(row, "answer", where)
    if isinstance(ans, str) and ans.strip().upper() in LETTERS[:4]:
        ans = LETTERS.index(ans.strip().upper())
    if isinstance(ans, bool) or not isinstance(ans, int):
        raise DataFormatError(f"{where}: hub field 'answer' must be 0-3 or A-D, got {ans!r}")
    subject = str(row.get("subject") or "mmlu")
    return {"id": f"{subject}-{split}-{index}", "subject": subject, "question": _require(row, "question", where),
            "choices": list(_require(row, "choices", where)), "label": ans, "answer_key": LETTERS[ans] if 0 <= ans < 4 else ""}


#: family → hub row normalizer ``f(row, *, index, split) -> uniform row``.
HUB_NORMALIZERS: dict[str, Callable[..., dict[str, Any]]] = {
    "openbookqa": normalize_openbookqa_row,
    "arc": normalize_arc_row,
    "boolq": normalize_boolq_row,
    "winogrande": normalize_winogrande_row,
    "mmlu": normalize_mmlu_row,
}
