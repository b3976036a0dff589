"""Small PIL helpers shared by the overlays, the chart and the comparison card: fonts, a colour
map, the palette. No Gradio, no model."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageFont

# One palette for the whole app, readable on a projector.
INK = (15, 23, 42)          # slate-900
MUTED = (100, 116, 139)     # slate-500
PAPER = (255, 255, 255)
PANEL = (241, 245, 249)     # slate-100
BASELINE = (100, 116, 139)  # the unpruned run
PRUNED = (79, 70, 229)      # indigo-600: the pruned run
KEPT = (6, 182, 212)        # cyan-500: outline of surviving patches
PICK = (236, 72, 153)       # pink-500: the patch a presenter clicked
SAVED = (199, 210, 254)     # indigo-200: compute saved
DIFF = (245, 158, 11)       # amber-500: words that differ

# Anchors of a perceptually ordered dark-to-bright map (close to "inferno").
_ANCHORS = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                     (245, 125, 21), (250, 193, 39), (252, 255, 164)], dtype=np.float32)


@functools.lru_cache(maxsize=32)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans when the system has it, else Pillow's built-in scalable font."""
    for name in (("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf") if bold
                 else ("DejaVuSans.ttf", "LiberationSans-Regular.ttf")):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def colormap(values) -> np.ndarray:
    """(n,) values in [0, 1] -> (n, 3) uint8 colours along the dark-to-bright map."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - low)[:, None]
    return (_ANCHORS[low] * (1 - t) + _ANCHORS[low + 1] * t).round().astype(np.uint8)


def normalise(values) -> np.ndarray:
    """Min-max to [0, 1]; a constant vector maps to 0.5."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    span = v.max() - v.min()
    return np.full_like(v, 0.5) if span <= 0 else (v - v.min()) / span


def fit(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """A copy no larger than max_side on its longer side, and the scale factor applied."""
    scale = min(1.0, max_side / max(image.size))
    if scale >= 1.0:
        return image.copy(), 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), scale


def text_width(draw, text: str, face) -> float:
    return draw.textlength(text, font=face)


def wrap(draw, text: str, face, width: float, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends with … when text is cut."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if text_width(draw, candidate, face) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and text_width(draw, lines[-1] + " …", face) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] = lines[-1].rstrip() + " …"
    return lines


def scale_bar_height(width: int) -> int:
    """Height of the colour-scale strip `with_scale_bar` adds above an image `width` pixels wide."""
    return max(18, round(width * 0.06))


def with_scale_bar(image: Image.Image, low: float, high: float) -> Image.Image:
    """`image` with the colour map's scale above it: "low <value>", the dark-to-bright ramp, "high <value>".
    The strip is added on top (a gallery's caption covers an image's bottom edge), so the picture itself (and
    its alignment with the source image) is untouched."""
    from PIL import ImageDraw

    bar = scale_bar_height(image.width)
    out = Image.new("RGB", (image.width, image.height + bar), PAPER)
    out.paste(image, (0, bar))
    draw = ImageDraw.Draw(out)
    face = font(max(9, round(bar * 0.55)))
    left, right = f"low {low:.3g}", f"high {high:.3g}"
    pad = max(3, bar // 6)
    start = pad + text_width(draw, left, face) + pad
    end = image.width - pad - text_width(draw, right, face) - pad
    top = 0
    draw.text((pad, top + bar / 2), left, fill=INK, font=face, anchor="lm")
    draw.text((image.width - pad, top + bar / 2), right, fill=INK, font=face, anchor="rm")
    if end - start >= 4:
        ramp = colormap(np.linspace(0.0, 1.0, int(end - start)))
        strip = Image.fromarray(np.repeat(ramp[None], bar - 2 * pad, axis=0), "RGB")
        out.paste(strip, (int(start), top + pad))
    return out
