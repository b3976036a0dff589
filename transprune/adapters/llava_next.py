"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): AnyRes.

One image becomes: the base view (the whole image squashed to one CLIP tile, rows x cols
patches), then the high-resolution tiles stitched into one feature map, unpadded back to the
image's aspect ratio, with an image-newline token closing every row. All of them carry the image
token id, so all of them are visual tokens and candidates for pruning.
"""

from __future__ import annotations

import torch

from .. import tiny
from ..architecture import Shape
from ..spec import ModelSpec
from ..trace import VisualLayout
from .llava import LlavaAdapter, grid_boxes


def anyres_feature_grid(image_size_hw, grid_pinpoints, tile_size: int, patches_per_side: int,
                        max_tiles: int | None = None):
    """(rows, cols) of the unpadded high-res feature map, as transformers computes it.

    `max_tiles` reproduces LLaVA-OneVision's "anyres_max_N": a map larger than N tiles' worth of
    patches is downscaled by bilinear interpolation.
    """
    import math

    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size_hw, grid_pinpoints, tile_size)
    features = torch.zeros(1, tiles_h * patches_per_side, tiles_w * patches_per_side)
    features = unpad_image(features, torch.tensor(image_size_hw))
    rows, cols = features.shape[1], features.shape[2]
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * patches_per_side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    label = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration",)
    # Language model from the public config.json; N: 5 x 576, the base view and four AnyRes tiles.
    architectures = {
        "llava-next-vicuna-7b": Shape(hidden=4096, intermediate=11008, layers=32, visual_tokens=2880),
        "llava-next-mistral-7b": Shape(hidden=4096, intermediate=14336, layers=32, visual_tokens=2880),
    }
    timing_arch = "llava-next-vicuna-7b"
    models = (
        ModelSpec("tiny-llava-next", "Tiny LLaVA-NeXT (random weights)", size="0.9M",
                  builder=lambda: tiny_llava_next(), description="LLaVA-NeXT AnyRes architecture, random weights."),
        ModelSpec("llava-next-vicuna-7b", "LLaVA-NeXT-Vicuna-7B", size="7B",
                  checkpoint="llava-hf/llava-v1.6-vicuna-7b-hf"),
        ModelSpec("llava-next-mistral-7b", "LLaVA-NeXT-Mistral-7B", size="7B",
                  checkpoint="llava-hf/llava-v1.6-mistral-7b-hf"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_llava_next(**kwargs)

    def max_tiles(self, model) -> int | None:
        return None

    def base_tokens(self, model, side: int) -> int:
        strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        return side * side if strategy == "default" else side * side + 1

    def visual_layout(self, model, processor, image_size, num_tokens):
        width, height = image_size
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        base_count = self.base_tokens(model, side)
        rows, cols = anyres_feature_grid((height, width), model.config.image_grid_pinpoints, vision.image_size, side,
                                         self.max_tiles(model))
        if base_count + rows * (cols + 1) != num_tokens:
            return None
        base = grid_boxes(side, side, 0.0, 0.0, float(width), float(height))
        fine = grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height)).view(rows, cols, 4)
        newline = torch.full((rows, 1, 4), float("nan"))
        fine = torch.cat([fine, newline], dim=1).view(-1, 4)
        segment = torch.cat([torch.zeros(base_count, dtype=torch.long), torch.ones(rows * (cols + 1), dtype=torch.long)])
        if base_count != side * side:  # "full" strategy keeps the CLS token: it has no place
            base = torch.cat([torch.full((1, 4), float("nan")), base])
        return VisualLayout(boxes=torch.cat([base, fine]), segment=segment, segments=["base", "high-res"],
                            image_size=(width, height))


# ---------------------------------------------------------------------------- offline model
def llava_next_processor(tokenizer, image_size: int, patch_size: int, grid_pinpoints):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=grid_pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", chat_template=tiny.CHAT_TEMPLATE,
                              num_additional_image_tokens=1)


def tiny_llava_next(layers: int = 16, hidden: int = 64, image_size: int = 112, patch_size: int = 14,
                    attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random LlavaNextForConditionalGeneration with AnyRes up to 2x2 tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = tiny.word_tokenizer()
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    config = LlavaNextConfig(text_config=tiny.llama_text_config(tokenizer, layers, hidden, 4, 2),
                             vision_config=tiny.clip_vision_config(image_size, patch_size),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             projector_hidden_act="gelu", vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                             image_seq_length=(image_size // patch_size) ** 2)
    model = tiny.finish(LlavaNextForConditionalGeneration, config, attn_implementation, seed)
    return model, llava_next_processor(tokenizer, image_size, patch_size, pinpoints)
