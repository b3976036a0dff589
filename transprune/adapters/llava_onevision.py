"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): Qwen2 LM, SigLIP tower.

Images use AnyRes like LLaVA-NeXT ("anyres_max_9" downscales large maps); SigLIP has no CLS, so
the base view is exactly side x side tokens. Videos: per frame a 2x2-pooled grid, then one
newline token after the last frame.
"""

from __future__ import annotations

from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def max_tiles(self, model) -> int | None:
        aspect = getattr(model.config, "vision_aspect_ratio", "anyres_max_9")
        return int(aspect.replace("anyres_max_", "")) if aspect.startswith("anyres_max_") else None

    def base_tokens(self, model, side: int) -> int:
        return side * side
