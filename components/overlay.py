"""Overlays: which image patches survive each stage, score heatmaps, and click-to-inspect.

Everything is drawn on (a display-sized copy of) the ORIGINAL image using the trace's layout:
`layout.boxes` gives each visual token's rectangle in original-image pixels, so center crops
(LLaVA-1.5) and AnyRes tiles (LLaVA-NeXT: a "base" view of the whole image plus a "high-res"
grid) map back onto the picture the user uploaded. Tokens without a place (NeXT's row-newline
tokens) are counted but not drawn. Areas no token covers (outside a center crop) are hatched:
the model never saw them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw

from transprune import methods

from . import drawing
from .drawing import INK, KEPT, PICK
from .files import STORE
from .metrics import layer0_stage, stage_name, stage_place

DISPLAY_MAX = 768          # longer side of every overlay image, in pixels
PRUNED_HERE_DIM = 0.55     # blend towards ink for tokens dropped at the stage shown
PRUNED_BEFORE_DIM = 0.75   # ... and for tokens dropped at an earlier stage
SCORE_KINDS = (("ttv", "TTV (accumulated)"), ("iga", "IGA"), ("score", "Combined score"))
VIDEO_COLUMNS = 4          # frames per row of a video's contact sheet


@dataclass
class Canvas:
    """The picture the overlays are drawn on and where each visual token sits on it.

    For an image: a display-sized copy of the original and the trace's layout (`scale` maps
    original pixels to display pixels). For a video: a contact sheet of the frames that carry
    tokens, with every token's box moved onto its frame's tile (`scale` 1).
    """
    image: Image.Image
    scale: float               # display pixels per layout unit
    layout: object             # transprune.VisualLayout, in the units `scale` converts
    trace: object              # transprune.PruneTrace
    source: object = None      # the trace's own layout (original pixels, frame numbers), for labels

    @classmethod
    def from_trace(cls, original: Image.Image, trace) -> "Canvas":
        if trace.layout is None:
            raise ValueError("The trace has no layout, so patches cannot be placed on the image.")
        image, scale = drawing.fit(original.convert("RGB"), DISPLAY_MAX)
        return cls(image=image, scale=scale, layout=trace.layout, trace=trace, source=trace.layout)

    @classmethod
    def from_video(cls, frames, trace, columns: int = VIDEO_COLUMNS, gap: int = 6) -> "Canvas":
        """Tile the frames that carry tokens (Qwen2.5-VL: the first of each frame pair) in a grid."""
        from transprune.trace import VisualLayout

        layout = trace.layout
        if layout is None:
            raise ValueError("The trace has no layout, so patches cannot be placed on the frames.")
        boxes = layout.boxes.clone()
        frame_of = layout.frame if layout.frame is not None else torch.zeros(len(boxes), dtype=torch.long)
        placed = torch.isfinite(boxes).all(dim=1)
        shown = sorted(set(frame_of[placed].tolist()))
        cols = min(columns, len(shown))
        rows = math.ceil(len(shown) / cols)
        width, height = frames[0].size
        scale = (DISPLAY_MAX * 1.25 - gap * (cols - 1)) / (cols * width)
        tile_w, tile_h = round(width * scale), round(height * scale)
        sheet = Image.new("RGB", (cols * tile_w + (cols - 1) * gap, rows * tile_h + (rows - 1) * gap), drawing.PAPER)
        for k, f in enumerate(shown):
            x, y = (k % cols) * (tile_w + gap), (k // cols) * (tile_h + gap)
            sheet.paste(frames[f].convert("RGB").resize((tile_w, tile_h), Image.Resampling.LANCZOS), (x, y))
            on_frame = placed & (frame_of == f)
            boxes[on_frame] = boxes[on_frame] * scale + torch.tensor([x, y, x, y], dtype=boxes.dtype)
        moved = VisualLayout(boxes=boxes, segment=layout.segment, segments=list(layout.segments),
                             image_size=sheet.size, frame=layout.frame)
        return cls(image=sheet, scale=1.0, layout=moved, trace=trace, source=layout)

    @property
    def segments(self) -> list[str]:
        return list(self.layout.segments)

    def tokens(self, segment: str) -> np.ndarray:
        """Indices of the visual tokens of `segment` that have a place on the image."""
        seg = self.segments.index(segment)
        boxes = self.layout.boxes.numpy()
        mask = (self.layout.segment.numpy() == seg) & np.isfinite(boxes).all(axis=1)
        return np.nonzero(mask)[0]

    def rect(self, token: int) -> tuple[int, int, int, int]:
        """Display-pixel rectangle (inclusive) of one token; neighbours tile without gaps."""
        x0, y0, x1, y1 = (float(v) * self.scale for v in self.layout.boxes[token])
        return round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)


def canvas_for(comparison, picture: Image.Image | None) -> Canvas:
    """The canvas of a run: the image, or the sampled video frames."""
    trace = comparison.pruned.trace
    if comparison.frames:
        return Canvas.from_video(comparison.frames, trace)
    return Canvas.from_trace(picture, trace)


def _status(trace, stage_index: int) -> np.ndarray:
    """Per visual token at a stage: 0 kept, 1 pruned at this stage, 2 pruned earlier."""
    stage = trace.stages[stage_index]
    status = np.full(trace.visual_tokens, 2, dtype=np.int8)
    status[trace.own(stage.candidates).numpy()] = 1   # own(): tokens a stage inserted have no patch
    status[trace.own(stage.kept).numpy()] = 0
    return status


def _mask(canvas: Canvas, tokens) -> Image.Image:
    mask = Image.new("L", canvas.image.size, 0)
    draw = ImageDraw.Draw(mask)
    for token in tokens:
        draw.rectangle(canvas.rect(int(token)), fill=255)
    return mask


def _hatch_outside(canvas: Canvas, image: Image.Image, segment: str) -> Image.Image:
    """Darken and hatch what no token of `segment` covers (e.g. outside LLaVA's center crop)."""
    covered = _mask(canvas, canvas.tokens(segment))
    if covered.getextrema() == (255, 255):
        return image
    shade = Image.blend(image, Image.new("RGB", image.size, INK), 0.82)
    draw = ImageDraw.Draw(shade)
    step = 14
    for offset in range(-image.height, image.width, step):
        draw.line([(offset, image.height), (offset + image.height, 0)], fill=(71, 85, 105), width=1)
    return Image.composite(image, shade, covered)


def stage_view(canvas: Canvas, stage_index: int, segment: str | None = None) -> Image.Image:
    """The image with tokens pruned by this stage dimmed (earlier ones darker) and kept ones outlined."""
    segment = segment or canvas.segments[0]
    tokens = canvas.tokens(segment)
    status = _status(canvas.trace, stage_index)
    image = canvas.image.copy()
    ink = Image.new("RGB", image.size, INK)
    for value, dim in ((1, PRUNED_HERE_DIM), (2, PRUNED_BEFORE_DIM)):
        chosen = tokens[status[tokens] == value]
        if len(chosen):
            image = Image.composite(Image.blend(canvas.image, ink, dim), image, _mask(canvas, chosen))
    image = _hatch_outside(canvas, image, segment)
    draw = ImageDraw.Draw(image)
    kept = tokens[status[tokens] == 0]
    cell = min((canvas.rect(int(t))[2] - canvas.rect(int(t))[0] for t in kept), default=8)
    width = 2 if cell >= 14 else 1
    for token in kept:
        draw.rectangle(canvas.rect(int(token)), outline=KEPT, width=width)
    return image


def heatmap(canvas: Canvas, stage_index: int, kind: str, segment: str | None = None) -> Image.Image | None:
    """Candidates of a stage coloured by `kind` ("ttv", "iga", "score"; min→max = dark→bright) over a
    greyed image, with the colour scale (the stage's lowest and highest value) in a strip above it;
    tokens already pruned stay grey. None when the method has no such score."""
    segment = segment or canvas.segments[0]
    stage = canvas.trace.stages[stage_index]
    values = getattr(stage, kind)
    if values is None:
        return None
    grey = canvas.image.convert("L").convert("RGB")
    base = Image.blend(grey, Image.new("RGB", grey.size, (226, 232, 240)), 0.35)
    base = _hatch_outside(canvas, base, segment)
    in_segment = set(canvas.tokens(segment).tolist())
    candidates = stage.candidates.numpy()
    scores = values.float().numpy()
    colours = drawing.colormap(drawing.normalise(scores))
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for token, colour in zip(candidates, colours):
        if int(token) in in_segment:
            draw.rectangle(canvas.rect(int(token)), fill=(*colour.tolist(), 200))
    picture = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    # The scale reads the stage's candidates (every segment): one colour means one value across views.
    return drawing.with_scale_bar(picture, float(scores.min()), float(scores.max()))


def _stage_name(trace, stage_index: int) -> str:
    layer = trace.stages[stage_index].layer
    return f"Stage {stage_index + 1} · {stage_name(layer, trace)}"


def stage_gallery(canvas: Canvas) -> list[tuple[Image.Image, str]]:
    """One view per stage (per AnyRes segment), captioned with what survived."""
    items = []
    trace = canvas.trace
    drawn = np.concatenate([canvas.tokens(segment) for segment in canvas.segments])
    for index, stage in enumerate(trace.stages):
        recycled = trace.inserted_in(stage.kept)
        # Kept tokens with no patch to draw (a frame's class token, a row-end newline): counted, so the
        # captions add up to the table's count.
        undrawn = np.setdiff1d(trace.own(stage.kept).numpy(), drawn).size
        for segment in canvas.segments:
            tokens = canvas.tokens(segment)
            kept = np.intersect1d(stage.kept.numpy(), tokens).size
            where = f" ({segment})" if len(canvas.segments) > 1 else ""
            place = stage_place(stage.layer, trace)
            caption = f"{place[0].upper()}{place[1:]}{where}: {kept} of {len(tokens)} kept"
            if undrawn and segment == canvas.segments[-1]:
                caption += f", + {undrawn} not drawn (class, row-end or merged tokens: no patch of their own)"
            if recycled and segment == canvas.segments[-1]:
                caption += f", + {recycled} recycled (not drawn: merged from pruned patches)"
            items.append((stage_view(canvas, index, segment), caption))
    return items


def _score_title(trace, layer: int) -> str:
    if layer == 0:   # a pre-LLM stage, or an in-LLM one on the first layer's input: the place names it
        return getattr(layer0_stage(trace), "score_title", "Score")
    criterion = trace.config.get("criterion", "transprune") if trace.config else "transprune"
    if trace.method != "transprune":
        stage = methods.REGISTRY.get(trace.method)
        return f"Score ({stage.label if stage else trace.method})"
    return {"ttv": "Score (TTV only)", "iga": "Score (IGA only)"}.get(criterion, "Combined score")


def heatmap_gallery(canvas: Canvas, stage_index: int) -> list[tuple[Image.Image, str]]:
    items = []
    for kind, title in SCORE_KINDS:
        layer = canvas.trace.stages[stage_index].layer
        title = _score_title(canvas.trace, layer) if kind == "score" else title
        for segment in canvas.segments:
            image = heatmap(canvas, stage_index, kind, segment)
            if image is None:
                continue
            where = f" ({segment})" if len(canvas.segments) > 1 else ""
            items.append((image, f"{title} {stage_place(layer, canvas.trace)}{where}"))
    return items


def stage_labels(trace) -> list[str]:
    return [_stage_name(trace, i) for i in range(len(trace.stages))]


# ---------------------------------------------------------------------------- inspecting a patch
def find_patch(canvas: Canvas, segment: str, x: float, y: float) -> int | None:
    """The token of `segment` whose box contains display pixel (x, y), or None."""
    ox, oy = x / canvas.scale, y / canvas.scale
    boxes = canvas.layout.boxes.numpy()
    for token in canvas.tokens(segment):
        x0, y0, x1, y1 = boxes[token]
        if x0 <= ox < x1 and y0 <= oy < y1:
            return int(token)
    return None


def patch_table(trace, token: int):
    """One visual token's fate, TTV, IGA, score and rank (1 = highest score) at each stage, as a
    DataFrame with one column per pruning layer (narrow enough for a side panel)."""
    import pandas as pd

    columns = {}
    for stage in trace.stages:
        candidates = stage.candidates.tolist()
        if token not in candidates:
            columns[_column(stage.layer, trace)] = ["already pruned", "", "", "", ""]
            continue
        at = candidates.index(token)
        fate = "kept" if token in set(stage.kept.tolist()) else "pruned here"
        rank = int((stage.score > stage.score[at]).sum()) + 1

        def value(t):
            return "–" if t is None else f"{float(t[at]):.3g}"
        columns[_column(stage.layer, trace)] = [fate, value(stage.ttv), value(stage.iga), value(stage.score),
                                           f"{rank}/{len(candidates)}"]
    return pd.DataFrame({"": PATCH_ROWS, **columns})


PATCH_ROWS = ["Fate", "TTV", "IGA", "Score", "Rank"]


def _column(layer: int, trace=None) -> str:
    name = stage_name(layer, trace)
    return name[0].upper() + name[1:]


def inspect_view(canvas: Canvas, segment: str, token: int | None = None) -> Image.Image:
    """The final-stage view, with the inspected patch (if any) boxed in pink."""
    image = stage_view(canvas, len(canvas.trace.stages) - 1, segment)
    if token is not None:
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = canvas.rect(token)
        pad = 2
        draw.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), outline=PICK, width=3)
    return image


def token_label(canvas: Canvas, token: int) -> str:
    source = canvas.source or canvas.layout
    x0, y0, x1, y1 = (float(v) for v in source.boxes[token])
    where = canvas.segments[int(source.segment[token])]
    frame = f", sampled frame {int(source.frame[token]) + 1}" if source.frame is not None else ""
    picture = "frame" if source.frame is not None else "original image"
    return (f"Patch #{token} ({where}{frame}) covers x {math.floor(x0)}–{math.ceil(x1)}, y {math.floor(y0)}–"
            f"{math.ceil(y1)} of the {picture}; its scores are in the table *Patch scores per stage* below.")


# ---------------------------------------------------------------------------- the pieces
@dataclass
class Inspector:
    """The clickable final-stage overlay and the per-patch score table (laid out by app.py)."""
    inspect: gr.Image
    segment: gr.Radio
    patch_note: gr.Markdown
    patch_table: gr.Dataframe


@dataclass
class Galleries:
    stages: gr.Gallery
    heat_stage: gr.Radio
    heatmaps: gr.Gallery


def build_view() -> tuple[gr.Image, gr.Radio, gr.Markdown]:
    """(the picture, the AnyRes view choice, the note naming the patch a click picked: right under the picture)."""
    # No floating label: it would cover the top-left patches; the legend below says what this is.
    inspect = gr.Image(label="What it kept", show_label=False, type="pil", interactive=False, format="png",
                       elem_id="inspect-image", buttons=["download", "fullscreen"], height=380)
    patch_note = gr.Markdown(PATCH_NOTE, elem_id="patch-note")
    gr.Markdown(LEGEND, elem_id="overlay-legend")
    segment = gr.Radio(["image"], value="image", label="View", visible=False, elem_id="segment",
                       info="AnyRes: the base view and the high-resolution tiles")
    return inspect, segment, patch_note


LEGEND = ("**What it kept.** **Outlined** = kept after the last stage · **dimmed** = pruned (darker = earlier) · "
          "click a patch for its scores. Pruned inside the language model, a patch's content has already flowed "
          "into the kept tokens, so these are often edges and background next to an object; pruned before it "
          "(VisionZip, DivPrune, CDPruner), a patch never reached it.")


PATCH_NOTE = ("Outlined patches survived the last stage. Click any patch to see its scores at each stage (TTV and "
              "IGA for TransPrune; each method's own score otherwise).")


def build_patch_table() -> gr.Dataframe:
    return gr.Dataframe(headers=["", "Layer"], value=[], label="Patch scores per stage", interactive=False, wrap=True,
                        elem_id="patch-table")


def build_galleries() -> Galleries:
    gr.Markdown("### What each stage kept\nBright, outlined patches survive; dimmed ones were pruned "
                "(darker = pruned at an earlier stage). Hatched areas are outside the model's view.")
    stages = gr.Gallery(label="Surviving patches after each stage", show_label=False, columns=3, format="png", height="auto",
                        object_fit="contain", elem_id="stage-gallery", buttons=["download", "fullscreen"])
    gr.Markdown("### Why: the scores behind the choice\nEach candidate patch coloured from its lowest (dark) to "
                "its highest (bright) score at the chosen stage; grey patches were already pruned.")
    heat_stage = gr.Radio(["Stage 1"], value="Stage 1", label="Heatmaps at", elem_id="heat-stage")
    heatmaps = gr.Gallery(label="TTV, IGA and combined score", show_label=False, columns=3, format="png", height="auto",
                          object_fit="contain", elem_id="heatmap-gallery", buttons=["download", "fullscreen"])
    return Galleries(stages=stages, heat_stage=heat_stage, heatmaps=heatmaps)


# Handlers: `state` is the session's run (see components.compare.RunState). Images go out as
# write-once files (components/files.py), never as PIL images Gradio would rewrite in its cache.
def on_heat_stage(state, label: str):
    if not state:
        return []
    canvas = state.canvas
    labels = stage_labels(canvas.trace)
    index = labels.index(label) if label in labels else 0
    return STORE.gallery(heatmap_gallery(canvas, index), "heatmap")


def on_segment(state, segment: str):
    if not state:
        return None
    return STORE.image(inspect_view(state.canvas, segment), "kept")


def on_patch_click(state, segment: str, evt: gr.SelectData):
    """Clicking the inspect image: box the patch and list its scores per stage."""
    if not state:
        raise gr.Error("Run a comparison first, then click a patch of the overlay.")
    point = getattr(evt, "index", None)
    if not (isinstance(point, (list, tuple)) and len(point) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)):
        raise gr.Error("A patch click needs the clicked point as two numbers (x, y): click the picture on the page.")
    x, y = point
    canvas = state.canvas
    segment = segment if segment in canvas.segments else canvas.segments[0]
    token = find_patch(canvas, segment, x, y)
    if token is None:
        return (STORE.image(inspect_view(canvas, segment), "kept"),
                "That point is outside the model's view (no patch there).", [])
    return (STORE.image(inspect_view(canvas, segment, token), "kept"), token_label(canvas, token),
            patch_table(canvas.trace, token))
