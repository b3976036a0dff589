"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): Qwen2 LM, SigLIP tower.

Images use AnyRes like LLaVA-NeXT ("anyres_max_9" downscales large maps); SigLIP has no CLS, so
the base view is exactly side x side tokens. Videos: per frame a 2x2-pooled grid, then one
newline token after the last frame.
"""

from __future__ import annotations

import math

import torch

from .. import tiny
from ..architecture import Shape
from ..trace import VisualLayout
from .llava import grid_boxes
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    label = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    # Language model from the public config.json; N: a video of 8 frames x 196 pooled tokens + 1 newline.
    architectures = {
        "llava-onevision-0.5b": Shape(hidden=896, intermediate=4864, layers=24, visual_tokens=1569),
        "llava-onevision-7b": Shape(hidden=3584, intermediate=18944, layers=28, visual_tokens=1569),
    }
    timing_arch = "llava-onevision-7b"
    build_tiny = staticmethod(tiny.tiny_llava_onevision)
    # 8 frames: the Hugging Face examples' count (the paper evaluates with 32: pass num_frames=32).
    video_frames = 8
    video_frames_style = "squashed_tile"

    def max_tiles(self, model) -> int | None:
        aspect = getattr(model.config, "vision_aspect_ratio", "anyres_max_9")
        return int(aspect.replace("anyres_max_", "")) if aspect.startswith("anyres_max_") else None

    def base_tokens(self, model, side: int) -> int:
        return side * side

    # -- video (transprune.video) --------------------------------------------------------------
    def video_token_count(self, model_config, processor, num_frames, frame_size):
        """Per frame a ceil(side/2)^2 pooled grid, then one newline token."""
        vision = model_config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        return num_frames * side * side + 1

    def video_layout(self, model, processor, frame_size, num_frames, num_tokens):
        """Per frame a ceil(side/2)^2 pooled grid over the whole (squashed) frame; then one newline.

        The newline token closes the video and has no place (NaN box); it is given the last frame.
        """
        vision = model.config.vision_config
        pooled = math.ceil(vision.image_size // vision.patch_size / 2)
        if num_frames * pooled * pooled + 1 != num_tokens:
            return None
        width, height = frame_size
        grid = grid_boxes(pooled, pooled, 0.0, 0.0, float(width), float(height))
        boxes = torch.cat([grid.repeat(num_frames, 1), torch.full((1, 4), float("nan"))])
        frame = torch.cat([torch.arange(num_frames).repeat_interleave(pooled * pooled),
                           torch.tensor([num_frames - 1])])
        return VisualLayout(boxes=boxes, segment=torch.zeros(num_tokens, dtype=torch.long), segments=["video"],
                            image_size=(width, height), frame=frame)
