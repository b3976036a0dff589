"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): LLaVA-1.5-style images, 8-frame videos.

Image and video placeholders carry different token ids; both are visual tokens. A video's tokens
are frame after frame, each frame the CLS token followed by its patch grid.
"""

from __future__ import annotations

import torch

from .. import tiny
from ..architecture import Shape
from ..trace import VisualLayout
from .llava import LlavaAdapter


class VideoLlavaAdapter(LlavaAdapter):
    family = "video_llava"
    label = "Video-LLaVA"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    # Language model from the public config.json; N: a video of 8 frames x 257 (CLS + 16x16 patches).
    architectures = {
        "video-llava-7b": Shape(hidden=4096, intermediate=11008, layers=32, visual_tokens=2056),
    }
    timing_arch = "video-llava-7b"
    build_tiny = staticmethod(tiny.tiny_video_llava)
    video_frames = 8              # trained on exactly 8 frames, and its checkpoints take no other count
    required_frames = 8
    video_frames_style = "clip_frames"

    # -- video (transprune.video) --------------------------------------------------------------
    def video_token_count(self, model_config, processor, num_frames, frame_size):
        """Per frame the CLS token and the patch grid."""
        vision = model_config.vision_config
        side = vision.image_size // vision.patch_size
        return num_frames * (side * side + 1)

    def video_layout(self, model, processor, frame_size, num_frames, num_tokens):
        """Per frame: the CLS token (no place, NaN box), then the patch grid through resize + crop."""
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        if num_frames * (side * side + 1) != num_tokens:
            return None
        grid = self.visual_layout(model, processor, frame_size, side * side).boxes
        per_frame = torch.cat([torch.full((1, 4), float("nan")), grid])
        return VisualLayout(boxes=per_frame.repeat(num_frames, 1),
                            segment=torch.zeros(num_tokens, dtype=torch.long), segments=["video"],
                            image_size=tuple(frame_size),
                            frame=torch.arange(num_frames).repeat_interleave(side * side + 1))
