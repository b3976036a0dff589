"""The two answers side by side, with the words that differ highlighted, and a one-line verdict."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import gradio as gr

DIFF_LABEL = "differs"
DIFF_COLOUR = "#f59e0b"


def _words(text: str) -> list[str]:
    return text.split()


def diff_segments(baseline: str, pruned: str) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """HighlightedText values for both answers: runs of words, labelled DIFF_LABEL where they differ.

    Word-level diff (difflib): a word missing from, added to or replaced in the other answer is
    marked on the side where it appears. Joining the segments' text gives each answer back.
    """
    a, b = _words(baseline), _words(pruned)
    left, right = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        label = None if tag == "equal" else DIFF_LABEL
        if i2 > i1:
            left.append((" ".join(a[i1:i2]), label))
        if j2 > j1:
            right.append((" ".join(b[j1:j2]), label))
    # Spaces between runs, so the runs read as one sentence.
    spaced = []
    for segments in (left, right):
        out = []
        for k, (text, label) in enumerate(segments):
            out.append((text + (" " if k < len(segments) - 1 else ""), label))
        spaced.append(out or [("(empty answer)", None)])
    return spaced[0], spaced[1]


def word_agreement(baseline: str, pruned: str) -> float:
    """Share of words the two answers have in common, in order (1.0 = identical)."""
    a, b = _words(baseline), _words(pruned)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def escape_markdown(text: str) -> str:
    """`text` shown literally in a Markdown component (a question is the visitor's own text)."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


QUESTION_SHOWN = 120     # characters of the question the verdict's first line shows


def verdict(baseline: str, pruned: str, visual_kept: int, visual_total: int, flops_saved: float,
            speed: str, heldout: str | None = None, question: str | None = None, recycled: int = 0,
            schedule: str = "", model: str = "") -> str:
    """The headline over the answers: same answer or not, what it cost, and how fast.

    `recycled`: how many of the `visual_kept` tokens a method inserted (SparseVLM). `schedule` and
    `model` name the run on the question's line, so a verdict read after the settings changed says
    which run it describes.
    `speed` is the speed figure that means something for this run (the run's own measured speedup
    on a real checkpoint; the real-size measurement, or where to get it, for the built-in tiny
    models); `heldout` a line on the setting's accuracy over the model's held-out questions.
    """
    same = " ".join(_words(baseline)) == " ".join(_words(pruned))
    answer = ("✓ **Same answer**" if same else
              f"⚠ **Answers differ** ({word_agreement(baseline, pruned):.0%} of words agree)")
    of_them = f" ({recycled} recycled)" if recycled else ""
    text = (f"{answer} &nbsp;·&nbsp; **{visual_total} → {visual_kept}** visual tokens{of_them} &nbsp;·&nbsp; "
            f"**{flops_saved:.0%}** fewer analytic FLOPs &nbsp;·&nbsp; {speed}")
    ran = " · ".join(escape_markdown(part) for part in (model, schedule) if part)
    if question or ran:
        # A long question is cut on this line (the answers must stay in the first screen); the whole
        # question is in the input box and the trace.
        shown = question if len(question or "") <= QUESTION_SHOWN else question[:QUESTION_SHOWN - 1].rstrip() + "…"
        asked = f"Q: {escape_markdown(shown)}" if question else ""
        text = f"<small>{asked}{' — ' if asked and ran else ''}{ran}</small>  \n" + text
    if heldout:
        text += f"  \n<small>{heldout}</small>"
    return text


def heldout_line(record: dict | None, baseline: dict | None, n_label: str = "held-out scene questions") -> str | None:
    """"On 500 held-out scene questions this setting answers 98.0 % right (unpruned: 100.0 %)"."""
    if record is None or baseline is None:
        return None
    return (f"On {record['n']} {n_label} this setting answers **{record['accuracy']:.1%}** right "
            f"(unpruned: {baseline['accuracy']:.1%}): one example is never the whole story.")


@dataclass
class Answers:
    verdict: gr.Markdown
    baseline: gr.HighlightedText
    pruned: gr.HighlightedText


def build() -> Answers:
    verdict_box = gr.Markdown("Run a comparison to see both answers here.", elem_id="verdict",
                              elem_classes=["verdict"])
    with gr.Row(equal_height=True, elem_id="answers-row"):
        baseline = gr.HighlightedText(label="Baseline · all tokens", color_map={DIFF_LABEL: DIFF_COLOUR},
                                      show_legend=False, show_inline_category=False, elem_id="answer-baseline",
                                      elem_classes=["answer"])
        pruned = gr.HighlightedText(label="Pruned · survivors only",
                                    color_map={DIFF_LABEL: DIFF_COLOUR}, show_legend=False,
                                    show_inline_category=False, elem_id="answer-pruned", elem_classes=["answer"])
    return Answers(verdict=verdict_box, baseline=baseline, pruned=pruned)
