"""Scoring for `python -m transprune.eval --questions`: pure functions on strings and records.

Two kinds of data:
- yes/no data (every gold answer is "yes" or "no": POPE, MME): the prediction is mapped to yes/no
  the way LLaVA's POPE script does (`llava/eval/eval_pope.py`: first sentence, commas dropped, a
  "no"/"No"/"not" word means no, anything else yes), and "yes" is the positive class for precision,
  recall and F1;
- anything else (GQA, TextVQA, multiple-choice letters): exact match after `normalize`.

A record is one line of an answers file: {"id", "question", "answer", "prediction", "correct",
"error", "tflops", ...}. Records with an error (missing image, malformed line, ...) count in `n`
and `errors` but are not scored: accuracy, precision, recall and F1 are over the `scored` ones.
"""

from __future__ import annotations

import re
import string

YES_NO = ("yes", "no")
_PUNCTUATION = string.punctuation + " "


def normalize(text: str) -> str:
    """Lower case, inner whitespace collapsed, punctuation stripped at both ends: "  The Cat. " -> "the cat"."""
    return re.sub(r"\s+", " ", str(text).lower()).strip(_PUNCTUATION)


def yes_no(prediction: str) -> str:
    """"yes" or "no", as LLaVA's POPE evaluation reads a free-form answer."""
    text = str(prediction)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def is_yes_no(answers) -> bool:
    """True when every gold answer (there is at least one) is yes or no, ignoring case and punctuation."""
    answers = [normalize(a) for a in answers]
    return bool(answers) and all(a in YES_NO for a in answers)


def is_correct(prediction: str, answer: str, yes_no_data: bool) -> bool:
    if yes_no_data:
        return yes_no(prediction) == normalize(answer)
    return normalize(prediction) == normalize(answer)


def yes_no_metrics(predictions, answers) -> dict:
    """POPE's figures from paired yes/no strings, "yes" = positive. Empty denominators give 0.0.

    accuracy = (TP+TN)/n, precision = TP/(TP+FP), recall = TP/(TP+FN), f1 = 2PR/(P+R),
    yes_ratio = share of predictions that are yes.
    """
    pairs = [(yes_no(p), normalize(a)) for p, a in zip(predictions, answers)]
    tp = sum(p == "yes" and a == "yes" for p, a in pairs)
    fp = sum(p == "yes" and a == "no" for p, a in pairs)
    tn = sum(p == "no" and a == "no" for p, a in pairs)
    fn = sum(p == "no" and a == "yes" for p, a in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / n if n else 0.0, precision=precision, recall=recall, f1=f1,
                yes_ratio=(tp + fp) / n if n else 0.0, tp=tp, fp=fp, tn=tn, fn=fn)


def summarize(records: list[dict], yes_no_data: bool) -> dict:
    """{"n", "scored", "errors", "accuracy", "tflops"} (+ POPE figures for yes/no data) of one method.

    tflops = mean analytic TFLOPs (visual tokens only) over the answered records; None if none was.
    """
    scored = [r for r in records if not r.get("error")]
    flops = [r["tflops"] for r in scored if r.get("tflops") is not None]
    summary = dict(n=len(records), scored=len(scored), errors=len(records) - len(scored),
                   accuracy=(sum(bool(r["correct"]) for r in scored) / len(scored)) if scored else 0.0,
                   tflops=(sum(flops) / len(flops)) if flops else None)
    if yes_no_data:
        figures = yes_no_metrics([r["prediction"] for r in scored], [r["answer"] for r in scored])
        summary.update(precision=figures["precision"], recall=figures["recall"], f1=figures["f1"],
                       yes_ratio=figures["yes_ratio"])
    return summary


def summarize_by_category(records: list[dict], yes_no_data: bool) -> dict:
    """summarize() per record "category" (POPE's random/popular/adversarial, MME's subtasks); {} if none."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if record.get("category") is not None:
            groups.setdefault(str(record["category"]), []).append(record)
    return {name: summarize(group, yes_no_data) for name, group in sorted(groups.items())}
