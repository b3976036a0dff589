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
from ..frames import normalise_frames, setting
from ..processors import without_video_processor
from ..spec import ModelSpec
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
    models = (
        ModelSpec("tiny-llava-onevision", "Tiny LLaVA-OneVision (random weights)", size="0.9M",
                  builder=lambda: tiny_llava_onevision(), description="LLaVA-OneVision architecture, random weights."),
        ModelSpec("llava-onevision-0.5b", "LLaVA-OneVision-0.5B", size="0.9B",
                  checkpoint="llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        ModelSpec("llava-onevision-7b", "LLaVA-OneVision-7B", size="8B",
                  checkpoint="llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_llava_onevision(**kwargs)

    # 8 frames: the Hugging Face examples' count (the paper evaluates with 32: pass num_frames=32).
    video_frames = 8

    def video_pixel_values(self, image_processor, clips) -> dict:
        """Each frame squashed to the base tile (no crop, no AnyRes) and normalised."""
        from PIL import Image

        size = setting(image_processor, "size", {})
        height, width = int(setting(size, "height")), int(setting(size, "width"))
        return dict(pixel_values_videos=torch.stack([
            normalise_frames([f.resize((width, height), Image.BICUBIC) for f in clip], image_processor)
            for clip in clips]))

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


# ---------------------------------------------------------------------------- offline model
def tiny_llava_onevision(layers: int = 16, hidden: int = 64, image_size: int = 56, patch_size: int = 14,
                         attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random LlavaOnevisionForConditionalGeneration (Qwen2 LM, SigLIP tower, AnyRes)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tokenizer = tiny.word_tokenizer()
    s = image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s]]
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size, patch_size=patch_size)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=pinpoints)
    model = tiny.finish(LlavaOnevisionForConditionalGeneration, config, attn_implementation, seed)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    processor_class = without_video_processor(LlavaOnevisionProcessor)   # image-only: no torchvision needed
    processor = processor_class(video_processor=None, image_processor=image_processor, tokenizer=tokenizer,
                                num_image_tokens=(s // patch_size) ** 2, vision_feature_select_strategy="full",
                                chat_template=tiny.CHAT_TEMPLATE)
    return model, processor
