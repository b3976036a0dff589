"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): LLaVA-1.5-style images, 8-frame videos.

Image and video placeholders carry different token ids; both are visual tokens. A video's tokens
are frame after frame, each frame the CLS token followed by its patch grid.
"""

from __future__ import annotations

from .llava import LlavaAdapter


class VideoLlavaAdapter(LlavaAdapter):
    family = "video_llava"
    model_classes = ("VideoLlavaForConditionalGeneration",)
