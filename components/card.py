"""The comparison card: one slide-ready 16:9 PNG with both answers, the key metrics, the
final-stage overlay and the sequence-length chart, model and device named."""

from __future__ import annotations

from PIL import Image, ImageDraw

from . import drawing
from .answers import DIFF_LABEL, diff_segments
from .metrics import fmt_tflops, numbers, sequence_chart, stage_place
from .overlay import Canvas, stage_view

WIDTH, HEIGHT = 1920, 1080
MARGIN = 64


def _answer_words(segments) -> list[tuple[str, bool]]:
    words = []
    for text, label in segments:
        words += [(word, label == DIFF_LABEL) for word in text.split()]
    return words


def _draw_answer(draw, box, title: str, colour, words, face, title_face, max_lines: int = 4):
    """A rounded panel with a coloured title and the answer, differing words on an amber marker."""
    x0, y0, x1, y1 = box
    draw.rounded_rectangle(box, radius=18, fill=drawing.PANEL)
    draw.rounded_rectangle((x0, y0, x0 + 10, y1), radius=4, fill=colour)
    draw.text((x0 + 32, y0 + 18), title, fill=colour, font=title_face)
    line_height = face.size + 14
    space = draw.textlength(" ", font=face)
    width = x1 - x0 - 60
    lines, line, used = [], [], 0.0
    for word, differs in words:  # greedy wrap, keeping each word's highlight
        w = draw.textlength(word, font=face)
        if line and used + w > width:
            lines.append(line)
            line, used = [], 0.0
        line.append((word, differs, w))
        used += w + space
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + [("…", False, draw.textlength("…", font=face))]
    y = y0 + 64
    for line in lines:
        x = x0 + 32
        for word, differs, w in line:
            if differs:
                draw.rounded_rectangle((x - 5, y - 3, x + w + 5, y + face.size + 7), radius=6, fill=drawing.DIFF)
            draw.text((x, y), word, fill=drawing.INK, font=face)
            x += w + space
        y += line_height


def render(comparison, canvas: Canvas, method_label: str, budget_label: str, real_size=None) -> Image.Image:
    """The card for one run, WIDTH x HEIGHT; `canvas` places the tokens on the picture (overlay.canvas_for).

    The speed figure is the one that means something (see compare.speed_text): the run's own on a
    real checkpoint; for the built-in tiny models the real-size measurement (`real_size`), else none.
    """
    nums = numbers(comparison)
    trace = comparison.pruned.trace
    card = Image.new("RGB", (WIDTH, HEIGHT), drawing.PAPER)
    draw = ImageDraw.Draw(card)
    sub_face = drawing.font(26)
    label_face, body_face, small = drawing.font(26, bold=True), drawing.font(30), drawing.font(20)

    base_text, pruned_text = comparison.baseline.text, comparison.pruned.text
    same = base_text.split() == pruned_text.split()
    headline = (("Same answer" if same else "Different answers") +
                f" with {len(trace.kept)} of {nums.visual_tokens} visual tokens, {nums.flops_saved:.0%} fewer FLOPs")
    size = 52
    while size > 30 and draw.textlength(headline, font=drawing.font(size, bold=True)) > WIDTH - 2 * MARGIN:
        size -= 2
    draw.rectangle((0, 0, WIDTH, 10), fill=drawing.PRUNED)
    draw.text((MARGIN, 44 + (52 - size) // 2), headline, fill=drawing.INK, font=drawing.font(size, bold=True))
    sub = (f"{method_label} ({budget_label}) vs unpruned · {comparison.spec.label} ({comparison.spec.size}) · "
           f"{comparison.device} · {comparison.dtype}")
    draw.text((MARGIN, 116), sub, fill=drawing.MUTED, font=sub_face)

    # Left: the final-stage overlay, fitted into its box, and what it shows.
    top, bottom = 176, HEIGHT - 96      # content band between the title and the footer
    box_w, box_h = 860, bottom - top - 70
    segment = canvas.segments[-1]  # AnyRes: the high-resolution view carries most tokens
    view = stage_view(canvas, len(trace.stages) - 1, segment)
    scale = min(box_w / view.width, box_h / view.height)
    view = view.resize((round(view.width * scale), round(view.height * scale)), Image.Resampling.LANCZOS)
    card.paste(view, (MARGIN + (box_w - view.width) // 2, top + (box_h - view.height) // 2))
    last = trace.stages[-1]
    recycled = nums.kept[-1][2]       # of the last stage's tokens, those a method inserted
    caption = (f"Kept {stage_place(last.layer, comparison.pruned.trace)}: {len(last.kept) - recycled} of {nums.visual_tokens} visual tokens "
               f"(outlined); dimmed patches were pruned.")
    if recycled:
        caption += f" Plus {recycled} recycled tokens (means of pruned ones), not drawn."
    for i, line in enumerate(drawing.wrap(draw, caption, small, box_w, max_lines=2)):
        draw.text((MARGIN, top + box_h + 16 + i * 28), line, fill=drawing.MUTED, font=small)

    # Right: question, both answers, the numbers, the chart.
    x0, x1 = MARGIN + box_w + 56, WIDTH - MARGIN
    q_lines = drawing.wrap(draw, f"Q: {comparison.question}", body_face, x1 - x0, max_lines=2)
    y = top
    for line in q_lines:
        draw.text((x0, y), line, fill=drawing.INK, font=body_face)
        y += 40
    y += 10
    left_segments, right_segments = diff_segments(base_text, pruned_text)
    panel_h = 166
    _draw_answer(draw, (x0, y, x1, y + panel_h), "Baseline · all visual tokens", drawing.BASELINE,
                 _answer_words(left_segments), body_face, label_face, max_lines=2)
    y += panel_h + 16
    _draw_answer(draw, (x0, y, x1, y + panel_h), f"{method_label} · {len(last.kept)} visual tokens",
                 drawing.PRUNED, _answer_words(right_segments), body_face, label_face, max_lines=2)
    y += panel_h + 24

    stats = [(f"{nums.visual_tokens} → {len(last.kept)}", "visual tokens"),
             (f"{nums.flops_saved:.0%}", "fewer analytic FLOPs")]
    if not comparison.spec.offline:
        stats.append((f"{nums.speedup:.2f}×", f"prefill, measured (bound {nums.bound:.2f}×)"))
    elif real_size is not None:
        stats.append((f"{real_size.speedup:.2f}×", f"prefill at real size (bound {real_size.bound:.2f}×)"))
    col_w = (x1 - x0) / len(stats)
    for i, (value, name) in enumerate(stats):
        size = 34
        while size > 18 and draw.textlength(value, font=drawing.font(size, bold=True)) > col_w - 20:
            size -= 2
        draw.text((x0 + i * col_w, y + 34 - size), value, fill=drawing.PRUNED, font=drawing.font(size, bold=True))
        draw.text((x0 + i * col_w, y + 46), name, fill=drawing.MUTED, font=small)
    y += 92

    chart_h = bottom - y
    if chart_h > 120:
        zoom = 1.5  # larger type than the app's chart, for the back row
        chart = sequence_chart(nums.baseline_lengths, nums.pruned_lengths, width=(x1 - x0) / zoom,
                               height=chart_h / zoom, scale=zoom, title="Tokens per decoder layer")
        card.paste(chart, (x0, y))

    if not comparison.spec.offline:
        timing = (f"Timings: warmed, alternating order, median prefill of "
                  f"{len(comparison.prefill_samples['pruned'])} runs.")
    elif real_size is not None:
        standing_in = (f" ({real_size.note})" if real_size.note
                       else f" (timed with one image's {real_size.visual_tokens} visual tokens; a video carries more)"
                       if comparison.frames is not None else "")
        timing = (f"Speed: {real_size.where}{standing_in}, random weights (timing only), median of "
                  f"{real_size.repeats} runs, {real_size.provenance}.")
    else:
        timing = "Speed not shown: this built-in model is too small for pruning to pay off in time."
    # The paper behind the chosen method; the tool is credited once, not as if it were every method's paper.
    run = comparison.resolved      # TransPrune and its TTV-only / IGA-only ablations are method "transprune"
    credit = ("TransPrune (arXiv 2507.20630)" if run.method == "transprune" and run.pre_llm is None
              else f"{method_label}, run with the TransPrune toolkit")
    footer = (f"{credit}. Analytic FLOPs {fmt_tflops(nums.tflops_visual[0])} → "
              f"{fmt_tflops(nums.tflops_visual[1])} TFLOPs (visual tokens, the paper's accounting). {timing}")
    for i, line in enumerate(drawing.wrap(draw, footer, small, WIDTH - 2 * MARGIN, max_lines=2)):
        draw.text((MARGIN, HEIGHT - 76 + i * 28), line, fill=drawing.MUTED, font=small)
    return card
