"""Question files for `python -m transprune.eval --questions`: LLaVA/POPE JSONL, bad lines kept as errors.

One JSON object per line (LLaVA's `llava_*.jsonl` and POPE's `coco_pope_*.json` layout):

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes", "category": "random"}

Accepted spellings: id from "question_id" or "id"; question from "text" or "question"; gold answer
from "label" or "answer"; "image" is a path relative to the image folder (absent = text-only
question); "category" is optional and gives per-category figures.

POPE as LLaVA ships it keeps the gold answers apart (`--annotations`):
- a file of lines {"question_id", "label"|"answer"}: matched by question id;
- a folder of `coco_pope_<category>.json` files (LLaVA's `eval_pope.py` layout): the i-th line of
  `coco_pope_<c>.json` answers the i-th question of category c, in question-file order.

Nothing is dropped: a line that cannot be used (bad JSON, no question, no gold answer, a duplicate
id) becomes a Question with `error` set, so every method's answers file reports it and the summary
counts it. Images are opened per question by `load_image`, which raises ImageError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


class DataError(ValueError):
    """The question or annotation file cannot be read at all; the message says what to fix."""


class ImageError(RuntimeError):
    """One question's image is missing or unreadable; the run records it and goes on."""


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answer: str | None
    image: str | None = None          # relative to the image folder; None = text only
    category: str | None = None
    error: str | None = None          # set for a line that cannot be asked


def _first(record: dict, *keys):
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    return None


def parse_line(line: str, number: int) -> Question:
    """One JSONL line (1-based `number`, for messages) -> Question, with `error` set if unusable."""
    fallback = f"line-{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return Question(fallback, "", None, error=f"line {number}: not valid JSON ({error.msg})")
    if not isinstance(record, dict):
        return Question(fallback, "", None, error=f"line {number}: expected a JSON object, got {type(record).__name__}")
    qid = _first(record, "question_id", "id")
    qid = fallback if qid is None else str(qid)
    text = _first(record, "text", "question")
    answer = _first(record, "label", "answer")
    image = _first(record, "image")
    category = _first(record, "category")
    question = Question(qid, str(text or ""), None if answer is None else str(answer),
                        None if image is None else str(image), None if category is None else str(category))
    if text is None:
        return _with_error(question, f"line {number}: no question (a 'text' or 'question' field)")
    if image is not None and not isinstance(image, str):
        return _with_error(question, f"line {number}: 'image' must be a file name, got {image!r}")
    return question


def _with_error(question: Question, error: str) -> Question:
    return replace(question, error=error)


def read_questions(path: str | Path, annotations: str | Path | None = None) -> list[Question]:
    """All questions of a JSONL file, in file order (blank lines skipped), answers joined from `annotations`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read the question file {path}: {error}. Pass a JSONL file with one question "
                        "per line.") from error
    questions = [parse_line(line, number) for number, line in enumerate(lines, 1) if line.strip()]
    if not questions:
        raise DataError(f"The question file {path} holds no questions; write one JSON object per line.")
    if annotations is not None:
        questions = join_annotations(questions, annotations)
    # Every line keeps a line of its own in the answers file: a repeated id gets a "#k" suffix and an error.
    seen: dict[str, int] = {}
    checked = []
    for question in questions:
        count = seen.get(question.id, 0)
        seen[question.id] = count + 1
        if count:
            question = replace(question, id=f"{question.id}#{count + 1}",
                               error=question.error or f"duplicate question id {question.id!r}")
        elif question.error is None and question.answer is None:
            question = _with_error(question, f"question {question.id!r} has no gold answer "
                                             "('label' or 'answer', or --annotations)")
        checked.append(question)
    return checked


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}); fix the annotation file.") from error
    return records


def join_annotations(questions: list[Question], annotations: str | Path) -> list[Question]:
    """Gold answers from a separate file (by question id) or a coco_pope_<category>.json folder (by order)."""
    annotations = Path(annotations)
    if annotations.is_dir():
        return _join_by_category(questions, annotations)
    if not annotations.is_file():
        raise DataError(f"Annotations {annotations} not found; pass a JSONL file or a folder of "
                        "coco_pope_<category>.json files.")
    labels = {}
    for record in _read_jsonl(annotations):
        qid, label = _first(record, "question_id", "id"), _first(record, "label", "answer")
        if qid is not None and label is not None:
            labels[str(qid)] = str(label)
    return [q if q.error or q.id not in labels else replace(q, answer=labels[q.id]) for q in questions]


def _join_by_category(questions: list[Question], folder: Path) -> list[Question]:
    files = sorted(folder.glob("*_pope_*.json")) + sorted(folder.glob("*_pope_*.jsonl"))
    if not files:
        raise DataError(f"No <dataset>_pope_<category>.json files in {folder}; LLaVA's POPE layout names them "
                        "e.g. coco_pope_random.json.")
    labels: dict[str, list[str]] = {}
    for file in files:
        category = file.stem.split("_pope_", 1)[1]
        labels[category] = [str(_first(r, "label", "answer")) for r in _read_jsonl(file)]
    used: dict[str, int] = {}
    joined = []
    for q in questions:
        if q.error is None and q.category in labels:
            index = used.get(q.category, 0)
            used[q.category] = index + 1
            if index < len(labels[q.category]):
                q = replace(q, answer=labels[q.category][index])
        joined.append(q)
    for category, count in used.items():
        if count != len(labels[category]):
            raise DataError(f"Category {category!r} has {count} questions but {len(labels[category])} annotations; "
                            "the POPE folder layout pairs them line by line, so the files must match.")
    return joined


def load_image(images: str | Path, name: str):
    """The RGB PIL image `images/name`; ImageError if it is missing or cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    path = Path(images) / name
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error
