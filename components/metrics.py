"""The metrics table, the sequence-length chart (baseline vs pruned, per decoder layer) and where the
time went (vision encoder, language-model prefill, decode; baseline vs pruned, as stacked bars).

Every number comes from the Comparison: token counts and per-layer lengths from the pruned run's
trace, times from `LoadedModel.generate` timings, FLOPs from `transprune.flops` (the paper's
accounting, visual tokens only, plus the whole-sequence variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr
from PIL import Image, ImageDraw

from transprune.flops import tflops

from . import drawing

HEADERS = ["Metric", "Baseline", "Pruned", "Change"]
SPEEDUP_ROW = "Prefill speedup (measured)"


def layer0_stage(trace):
    """The stage class that pruned at layer 0 in `trace`: a pre-LLM stage (its config's `pre_llm`), or an
    in-LLM one on the first layer's input (DivPrune's twin on a family its rewrite cannot serve); None."""
    from transprune import methods

    config = getattr(trace, "config", None) or {}
    return methods.PRE_LLM.get(config.get("pre_llm")) or methods.REGISTRY.get(config.get("method"))


def stage_name(layer: int, trace=None) -> str:
    """A stage as the page names it: "layer 7", or the layer-0 stage's own label."""
    if layer != 0:
        return f"layer {layer}"
    stage = layer0_stage(trace)
    return stage.label if stage else "pre-LLM stage"


def stage_place(layer: int, trace=None) -> str:
    """Where a stage prunes: "after layer 7", or "before the LLM (DivPrune)" for layer 0."""
    return f"before the LLM ({stage_name(0, trace)})" if layer == 0 else f"after layer {layer}"


def kept_row_name(layer: int, trace=None) -> str:
    return f"Visual tokens {stage_place(layer, trace)}"


def token_count(kept: int, recycled: int) -> str:
    """"28", or "28 (26 + 2 recycled)" when a method inserted tokens (SparseVLM's cluster means of
    pruned ones: tokens the LLM sees that are no patch of the image, so the overlays cannot show them)."""
    return str(kept) if not recycled else f"{kept} ({kept - recycled} + {recycled} recycled)"


@dataclass
class Numbers:
    """The headline figures, computed once for the table, the verdict and the card."""
    visual_tokens: int                   # in the baseline's prompt
    kept: list[tuple[int, int, int]]     # (layer, kept, of them recycled) per stage
    prefill_ms: tuple[float, float]
    speedup: float
    tflops_visual: tuple[float, float]
    tflops_full: tuple[float, float]
    baseline_lengths: list[int]
    pruned_lengths: list[int]
    # The answer pass of each side, split: {"vision": ms, "llm prefill": ms, "decode": ms}.
    time_split: tuple[dict, dict] = ({}, {})

    @property
    def llm_speedup(self) -> float:
        """The language model's own prefill speedup in the answer pass (the part pruning changes)."""
        before, after = self.time_split[0].get("llm prefill"), self.time_split[1].get("llm prefill")
        return before / after if before and after else float("nan")

    @property
    def flops_saved(self) -> float:
        return 1.0 - self.tflops_visual[1] / self.tflops_visual[0] if self.tflops_visual[0] else 0.0

    @property
    def bound(self) -> float:
        """Analytic whole-sequence speedup bound for prefill."""
        return self.tflops_full[0] / self.tflops_full[1] if self.tflops_full[1] else float("nan")


def numbers(comparison) -> Numbers:
    trace = comparison.pruned.trace
    hidden, intermediate, layers = comparison.shape
    prompt = int(comparison.baseline.inputs["input_ids"].shape[1])
    baseline_lengths = [prompt] * layers
    # The baseline's visual tokens: its prompt minus the text tokens the pruned run also had (equal
    # to trace.visual_tokens except after VisionZip, whose trace adds the CLS token).
    n = prompt - (trace.tokens_per_layer[0] - trace.visual_tokens_per_layer[0])
    base_ms, pruned_ms = comparison.prefill_ms("baseline"), comparison.prefill_ms("pruned")
    return Numbers(
        visual_tokens=n, kept=[(s.layer, len(s.kept), trace.inserted_in(s.kept)) for s in trace.stages],
        prefill_ms=(base_ms, pruned_ms), speedup=base_ms / pruned_ms if pruned_ms > 0 else float("nan"),
        tflops_visual=(tflops([n] * layers, hidden, intermediate),
                       tflops(trace.visual_tokens_per_layer, hidden, intermediate)),
        tflops_full=(tflops(baseline_lengths, hidden, intermediate),
                     tflops(trace.tokens_per_layer, hidden, intermediate)),
        baseline_lengths=baseline_lengths, pruned_lengths=list(trace.tokens_per_layer),
        time_split=(time_split(comparison.baseline.timings), time_split(comparison.pruned.timings)))


def time_split(timings: dict) -> dict:
    """A run's time in its parts: the vision encoder, the language model's prefill (the rest of the
    prefill: projector and pre-LLM stages included) and decoding the answer."""
    vision = timings.get("vision_ms", 0.0)
    prefill, total = timings["prefill_ms"], timings["total_ms"]
    return {"vision": vision, "llm prefill": max(prefill - vision, 0.0), "decode": max(total - prefill, 0.0)}


def fmt_tflops(x: float) -> str:
    return f"{x:.2f}" if x >= 0.01 else f"{x:.3g}"


def _megabytes(value: float) -> str:
    """"12.3 MB", or "96 KB" below one MB (a tiny model's cache)."""
    return f"{value:.1f} MB" if value >= 1 else f"{value * 1024:.0f} KB"


def _change(before: float, after: float) -> str:
    return f"{after / before - 1.0:+.0%}".replace("-", "−") if before else ""


def table(comparison, method_label: str):
    """The metrics as a DataFrame: one row per metric, columns Baseline / <method> / Change, all cells
    strings formatted for reading."""
    import pandas as pd
    nums = numbers(comparison)
    base, pruned = comparison.baseline.timings, comparison.pruned.timings
    n = nums.visual_tokens
    rows = [["Visual tokens in", str(n), str(n), ""]]
    for layer, kept, recycled in nums.kept:
        rows.append([kept_row_name(layer, comparison.pruned.trace), str(n), token_count(kept, recycled),
                     f"−{1 - kept / n:.0%}" if n else ""])
    repeats = len(comparison.prefill_samples["pruned"])
    rows.append([f"Prefill ms (median of {repeats})", f"{nums.prefill_ms[0]:.1f}", f"{nums.prefill_ms[1]:.1f}",
                 _change(*nums.prefill_ms)])

    def rate(t):
        return "n/a" if t.get("decode_tokens_per_s") is None else f"{t['decode_tokens_per_s']:.1f}"
    split_base, split_pruned = nums.time_split
    for part, name in (("vision", "Vision encoder ms (answer pass)"), ("llm prefill", "LLM prefill ms (answer pass)"),
                       ("decode", "Decode ms (answer pass)")):
        # An in-LLM method leaves the vision encoder's work as it is: a change there is the clock's noise.
        untouched = part == "vision" and comparison.resolved.pre_llm is None
        rows.append([name, f"{split_base[part]:.1f}", f"{split_pruned[part]:.1f}",
                     "same work" if untouched else _change(split_base[part], split_pruned[part])])
    rows.append(["Decode tokens/s", rate(base), rate(pruned), ""])
    rows.append(["End-to-end ms (answer pass)", f"{base['total_ms']:.1f}", f"{pruned['total_ms']:.1f}",
                 _change(base["total_ms"], pruned["total_ms"])])
    rows.append(["New tokens", str(base["new_tokens"]), str(pruned["new_tokens"]), ""])
    # The run's own memory. Its KV cache, read from the cache's tensors: exact, and what pruning shrinks
    # for good. On a GPU also the allocator's peak above the loaded model (activations too); a CPU's
    # peak RSS is not shown: the C allocator keeps freed blocks, so after a first run it reads 0.
    kv_base, kv_pruned = base.get("kv_cache_mb"), pruned.get("kv_cache_mb")
    if kv_base is not None and kv_pruned is not None:
        rows.append(["KV cache at the end", _megabytes(kv_base), _megabytes(kv_pruned), _change(kv_base, kv_pruned)])
    if comparison.device.startswith("cuda"):
        rows.append(["Run memory MB (GPU, above the model)", f"{base.get('run_memory_mb', 0.0):.0f}",
                     f"{pruned.get('run_memory_mb', 0.0):.0f}", ""])
    rows.append(["Analytic TFLOPs (visual tokens)", fmt_tflops(nums.tflops_visual[0]),
                 fmt_tflops(nums.tflops_visual[1]), _change(*nums.tflops_visual)])
    rows.append(["Analytic TFLOPs (whole sequence)", fmt_tflops(nums.tflops_full[0]),
                 fmt_tflops(nums.tflops_full[1]), _change(*nums.tflops_full)])
    # On a built-in toy model the figure is a toy's (too small for pruning to pay off): said in the cell,
    # never the claim (the verdict quotes the real-size figure instead).
    toy = " · a toy: the verdict quotes the real-size figure" if comparison.spec.offline else ""
    rows.append([SPEEDUP_ROW, "1.00×", f"{nums.speedup:.2f}×", f"this model's analytic bound {nums.bound:.2f}×{toy}"])
    rows.append(["Device · dtype", f"{comparison.device} · {comparison.dtype}",
                 f"{comparison.device} · {comparison.dtype}", ""])
    return pd.DataFrame(rows, columns=["Metric", "Baseline", method_label, "Change"])


# ---------------------------------------------------------------------------- the chart
def nice_step(top: float, ticks: int = 4) -> float:
    """A 1-2-5 step so that about `ticks` steps cover [0, top]."""
    raw = max(top, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def sequence_chart(baseline: list[int], pruned: list[int], width: int = 760, height: int = 300,
                   scale: float = 2, title: str = "Sequence length per layer") -> Image.Image:
    """Step chart of tokens per decoder layer; the shaded area between the lines is the compute saved.

    `width` x `height` are layout units; the image is `scale` times larger (crisp on big screens).
    """
    W, H = round(width * scale), round(height * scale)
    image = Image.new("RGB", (W, H), drawing.PAPER)
    draw = ImageDraw.Draw(image)

    def u(x):  # layout units -> pixels
        return x * scale
    # Sized to stay readable projected: >= 14 px on the card, about that in the app's side panel.
    small, label = drawing.font(round(u(13))), drawing.font(round(u(14)))
    heading = drawing.font(round(u(16)), bold=True)
    left, right, top, bottom = u(56), u(16), u(66), u(42)
    layers = len(baseline)
    step = nice_step(max(max(baseline), max(pruned), 1) * 1.05)
    top_value = step * math.ceil(max(max(baseline), max(pruned), 1) * 1.05 / step)

    def px(layer_edge: float) -> float:
        return left + (W - left - right) * layer_edge / layers

    def py(value: float) -> float:
        return H - bottom - (H - top - bottom) * value / top_value

    draw.text((left, u(10)), title, fill=drawing.INK, font=heading)
    value = 0.0
    while value <= top_value + 1e-9:  # grid and y labels
        draw.line([(left, py(value)), (W - right, py(value))], fill=(226, 232, 240), width=max(1, round(u(1))))
        text = f"{value:g}"
        draw.text((left - u(8) - draw.textlength(text, font=small), py(value) - u(7)), text, fill=drawing.MUTED,
                  font=small)
        value += step
    for i in range(layers):  # saved area: between the baseline and the pruned steps, layer by layer
        if pruned[i] < baseline[i]:
            draw.rectangle([px(i), py(baseline[i]), px(i + 1), py(pruned[i])], fill=drawing.SAVED)
    saved = 1 - sum(pruned) / sum(baseline) if sum(baseline) else 0.0
    if saved > 0:
        text = f"−{saved:.0%} token·layers"
        first = next(i for i in range(layers) if pruned[i] < baseline[i])
        cx = (px(first) + px(layers)) / 2 - draw.textlength(text, font=label) / 2
        cy = (py(baseline[-1]) + py(pruned[-1])) / 2 - u(8)
        draw.text((max(cx, px(first) + u(6)), cy), text, fill=drawing.PRUNED, font=label)

    def steps(values):
        points = []
        for i, v in enumerate(values):
            points += [(px(i), py(v)), (px(i + 1), py(v))]
        return points
    draw.line(steps(pruned), fill=drawing.PRUNED, width=round(u(4)), joint="curve")
    draw.line(steps(baseline), fill=drawing.BASELINE, width=round(u(2)), joint="curve")
    every = 1 if layers <= 20 else 2 if layers <= 40 else 4  # x labels
    for i in range(0, layers, every):
        text = str(i + 1)
        x = (px(i) + px(i + 1)) / 2 - draw.textlength(text, font=small) / 2
        draw.text((x, H - bottom + u(6)), text, fill=drawing.MUTED, font=small)
    caption = "decoder layer"
    draw.text(((px(0) + px(layers)) / 2 - draw.textlength(caption, font=small) / 2, H - u(18)), caption,
              fill=drawing.MUTED, font=small)
    x = left  # legend, under the title
    for name, colour, box in (("baseline", drawing.BASELINE, False), ("pruned", drawing.PRUNED, False),
                              ("compute saved", drawing.SAVED, True)):
        y = u(36)
        if box:
            draw.rectangle([x, y, x + u(18), y + u(12)], fill=colour)
        else:
            draw.line([(x, y + u(6)), (x + u(18), y + u(6))], fill=colour, width=round(u(3)))
        draw.text((x + u(24), y - u(2)), name, fill=drawing.INK, font=label)
        x += u(24) + draw.textlength(name, font=label) + u(18)
    return image


TIME_PARTS = (("vision", "vision encoder", (148, 163, 184)), ("llm prefill", "LLM prefill", None),
              ("decode", "decode", (203, 213, 225)))


def time_chart(split_baseline: dict, split_pruned: dict, width: int = 480, height: int = 170, scale: float = 2,
               toy: bool = False) -> Image.Image:
    """Two horizontal stacked bars, baseline and pruned: vision encoder, LLM prefill and decode ms of the
    answer pass, on one scale. The LLM prefill is drawn in each side's colour: it is what pruning changes."""
    W, H = round(width * scale), round(height * scale)
    image = Image.new("RGB", (W, H), drawing.PAPER)
    draw = ImageDraw.Draw(image)

    def u(x):
        return x * scale
    small, label = drawing.font(round(u(13))), drawing.font(round(u(14)))
    heading = drawing.font(round(u(16)), bold=True)
    title = "Where the time went" + (" (a toy model's timing)" if toy else " (answer pass)")
    draw.text((u(12), u(8)), title, fill=drawing.INK, font=heading)
    left, right = u(78), u(16)
    total = max(sum(split_baseline.values()), sum(split_pruned.values()), 1e-9)
    for row, (name, split, colour) in enumerate((("baseline", split_baseline, drawing.BASELINE),
                                                 ("pruned", split_pruned, drawing.PRUNED))):
        y = u(40) + row * u(44)
        draw.text((u(12), y + u(6)), name, fill=drawing.INK, font=label)
        x = left
        for part, _, fill in TIME_PARTS:
            width_px = (W - left - right) * split[part] / total
            if width_px > 0:
                draw.rectangle([x, y, x + width_px, y + u(30)], fill=fill or colour)
            text = f"{split[part]:.0f}"
            if width_px > draw.textlength(text, font=small) + u(8):
                ink = drawing.PAPER if fill is None else drawing.INK
                draw.text((x + u(4), y + u(8)), text, fill=ink, font=small)
            x += width_px
    x, y = u(12), H - u(34)
    for _, name, fill in TIME_PARTS:
        draw.rectangle([x, y, x + u(16), y + u(12)], fill=fill or drawing.PRUNED)
        draw.text((x + u(22), y - u(3)), name, fill=drawing.INK, font=small)
        x += u(22) + draw.textlength(name, font=small) + u(16)
    draw.text((x, y - u(3)), "(ms)", fill=drawing.MUTED, font=small)
    return image


def stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """Two charts of one width, one above the other."""
    image = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), drawing.PAPER)
    image.paste(top, (0, 0))
    image.paste(bottom, (0, top.height))
    return image


def build_table() -> gr.Dataframe:
    return gr.Dataframe(headers=HEADERS, value=[], label="Metrics", interactive=False, wrap=True,
                        elem_id="metrics-table", max_height=2000, column_widths=["33%", "22%", "25%", "20%"])


def build_chart() -> gr.Image:
    return gr.Image(label="Sequence length per layer", show_label=False, type="pil", format="png",
                    interactive=False, elem_id="sequence-chart", buttons=["download", "fullscreen"])
