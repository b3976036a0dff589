"""The two answers side by side, with the words that differ highlighted, and a one-line verdict."""

from __future__ import annotations

import difflib
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


def verdict(baseline: str, pruned: str, speedup: float, visual_kept: int, visual_total: int,
            flops_saved: float) -> str:
    """The headline over the answers: same answer or not, and what it cost."""
    same = " ".join(_words(baseline)) == " ".join(_words(pruned))
    answer = ("✓ **Same answer**" if same else
              f"⚠ **Answers differ** ({word_agreement(baseline, pruned):.0%} of words agree)")
    text = (f"{answer} &nbsp;·&nbsp; **{visual_kept} of {visual_total}** visual tokens left after the last stage "
            f"&nbsp;·&nbsp; **{flops_saved:.0%}** fewer analytic FLOPs &nbsp;·&nbsp; prefill **{speedup:.2f}×** "
            "measured")
    if speedup < 1.0:
        text += ("  \n<small>Measured slower: on a model this small the fixed per-layer costs of pruning (hooks, "
                 "scoring) outweigh the FLOPs it saves. See “How this is measured”.</small>")
    return text


@dataclass
class Answers:
    verdict: gr.Markdown
    baseline: gr.HighlightedText
    pruned: gr.HighlightedText


def build() -> Answers:
    verdict_box = gr.Markdown("Run a comparison to see both answers here.", elem_id="verdict",
                              elem_classes=["verdict"])
    with gr.Row(equal_height=True):
        baseline = gr.HighlightedText(label="Baseline · all visual tokens", color_map={DIFF_LABEL: DIFF_COLOUR},
                                      show_legend=False, show_inline_category=False, elem_id="answer-baseline",
                                      elem_classes=["answer"])
        pruned = gr.HighlightedText(label="Pruned · only the surviving visual tokens",
                                    color_map={DIFF_LABEL: DIFF_COLOUR}, show_legend=False,
                                    show_inline_category=False, elem_id="answer-pruned", elem_classes=["answer"])
    return Answers(verdict=verdict_box, baseline=baseline, pruned=pruned)
