"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one 24x24 grid of CLIP patches per image."""

from __future__ import annotations

import math

import torch

from .. import tiny
from ..architecture import Shape
from ..spec import ModelSpec
from ..trace import VisualLayout
from .base import Adapter


def _size_value(size, *keys):
    """Read a processor size field that may be a dict, an object with attributes, or an int."""
    if isinstance(size, int):
        return size
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def grid_boxes(rows: int, cols: int, x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
    """(rows*cols, 4) boxes of a row-major grid spanning the rectangle (x0, y0)-(x1, y1)."""
    ys = torch.linspace(y0, y1, rows + 1)
    xs = torch.linspace(x0, x1, cols + 1)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()
    return torch.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], dim=1)


class LlavaAdapter(Adapter):
    family = "llava"
    label = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration",)
    # Language model from the public config.json; N: one 24x24 grid of CLIP patches.
    architectures = {
        "llava-1.5-7b": Shape(hidden=4096, intermediate=11008, layers=32, visual_tokens=576),
        "llava-1.5-13b": Shape(hidden=5120, intermediate=13824, layers=40, visual_tokens=576),
    }
    timing_arch = "llava-1.5-7b"
    models = (
        ModelSpec("shapes-llava", "Shapes LLaVA (trained)", size="2.9M", builder=lambda: load_shapes_llava(),
                  description="A small LLaVA trained on synthetic shape scenes; answers colour/shape/count/where "
                              "questions.",
                  positions="original",
                  positions_reason=("trained only on unpruned sequences, this small model reads where a shape is "
                                    "from its 1-D positions: on 500 held-out questions High keeps 98.0 % of the "
                                    "answers with original positions and 86.4 % with the released code's compact "
                                    "renumbering (where 73 %, count 63 %)"),
                  heldout="assets/shapes-llava/eval.json"),
        ModelSpec("tiny-llava", "Tiny LLaVA (random weights)", size="0.65M", builder=lambda: tiny_llava(),
                  description="LLaVA-1.5 architecture, 16 layers, random weights: exercises pruning, answers are "
                              "noise."),
        ModelSpec("llava-1.5-7b", "LLaVA-1.5-7B", size="7B", checkpoint="llava-hf/llava-1.5-7b-hf"),
        ModelSpec("llava-1.5-13b", "LLaVA-1.5-13B", size="13B", checkpoint="llava-hf/llava-1.5-13b-hf"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_llava(**kwargs)

    def visual_layout(self, model, processor, image_size, num_tokens):
        """Map the patch grid back through the processor's resize + center crop."""
        width, height = image_size
        side = int(math.isqrt(num_tokens))
        if side * side != num_tokens:
            return None
        image_processor = getattr(processor, "image_processor", processor)
        crop = getattr(image_processor, "crop_size", None)
        do_crop = bool(getattr(image_processor, "do_center_crop", False)) and crop is not None
        size = getattr(image_processor, "size", None)
        shortest = _size_value(size, "shortest_edge") if size is not None else None
        if do_crop and shortest:
            # Resize the short side to `shortest`, then cut a centred crop_h x crop_w window.
            crop_h = _size_value(crop, "height") or shortest
            crop_w = _size_value(crop, "width") or shortest
            scale = shortest / min(width, height)
            left = (width * scale - crop_w) / 2 / scale
            top = (height * scale - crop_h) / 2 / scale
            box = (left, top, left + crop_w / scale, top + crop_h / scale)
        else:
            box = (0.0, 0.0, float(width), float(height))  # squashed to a square: the grid spans it all
        boxes = grid_boxes(side, side, *box)
        return VisualLayout(boxes=boxes, segment=torch.zeros(num_tokens, dtype=torch.long), segments=["image"],
                            image_size=(width, height))


# ---------------------------------------------------------------------------- offline models
def load_shapes_llava():
    """The trained Shapes LLaVA shipped in the package (transprune/assets/shapes-llava)."""
    from ..shapes import load_shapes_llava as load

    return load()


def tiny_llava(layers: int = 16, hidden: int = 64, image_size: int = 168, patch_size: int = 14,
               attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random LlavaForConditionalGeneration with (image_size/patch)^2 visual tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny.word_tokenizer()
    config = LlavaConfig(text_config=tiny.llama_text_config(tokenizer, layers, hidden, 4, 2),
                         vision_config=tiny.clip_vision_config(image_size, patch_size),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=(image_size // patch_size) ** 2)
    model = tiny.finish(LlavaForConditionalGeneration, config, attn_implementation, seed)
    return model, tiny.llava_processor(tokenizer, image_size, patch_size)
