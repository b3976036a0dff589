"""InternVL (`InternVLForConditionalGeneration`, transformers' native port, e.g. OpenGVLab/InternVL3-1B-hf).

Where things are: the text decoder is `model.model.language_model` (a Qwen2 model for InternVL3-1B/2B),
1-D RoPE, so the base adapter's side pass, rotary and both position modes apply unchanged; the
image token is `config.image_token_id` (`<IMG_CONTEXT>`).

How an image enters the sequence. The image processor (GotOcr2's) cuts the image into up to
`max_patches` tiles of the vision encoder's size in a grid that fits its aspect ratio, plus a
thumbnail of the whole image when there is more than one tile; each tile's patches are
pixel-shuffled (`downsample_ratio` 0.5: 2x2 patches into one token) to `image_seq_length` tokens.
The processor writes one image as

    <img><IMG_CONTEXT> * (image_seq_length x tiles)</img>

so all tiles of an image (thumbnail last) are one contiguous run of image tokens: one visual span
with one budget, floor(N * r_i) over all of its tiles, by the base adapter's runs (as SmolVLM's tiles,
which text markup splits, are one span by its own rule). Several images are several runs
(`<img>`/`</img>` separate them), each its own span. Trace indices 0..N-1 number the image's tokens
tile by tile (row-major), each tile's tokens row-major over its shuffled grid, then the thumbnail.

Video: the native processor writes each frame as its own `Frame i: <img>...</img>` with the same
image token, and its video processor needs torchvision; this adapter declares no video
(`video_frames` None), so the app and `transprune.video` offer none for InternVL.

The bottom of the module builds the offline tiny model, `tiny-internvl`, and lists the registry
entries (`models`) and the real checkpoint's shape (`architectures`).
"""

from __future__ import annotations

import torch

from ..architecture import Shape
from ..spec import ModelSpec
from ..trace import VisualLayout
from .base import Adapter
from .llava import grid_boxes


class InternVLAdapter(Adapter):
    family = "internvl"
    label = "InternVL"
    model_classes = ("InternVLForConditionalGeneration",)
    # Language model: InternVL3-1B's is Qwen2.5-0.5B (hidden_size 896, intermediate_size 4864,
    # num_hidden_layers 24; the same text_config values InternVL2-1B's config.json prints in
    # modelscope/ms-swift issue 1649). N: a 448x448 image is one 448 px tile (no thumbnail),
    # (448/14)^2 patches pixel-shuffled 2x2 = image_seq_length 256.
    architectures = {
        "internvl3-1b": Shape(hidden=896, intermediate=4864, layers=24, visual_tokens=256),
    }
    timing_arch = "internvl3-1b"
    # transprune.models registry entries (ModelSpec fields; the registry fills in the family and the video flag).
    models = (
        ModelSpec("tiny-internvl", "Tiny InternVL (random weights)", size="0.9M", builder=lambda: tiny_internvl(),
                  description="InternVL architecture (tiles + thumbnail, pixel shuffle, Qwen2 LM), random weights."),
        ModelSpec("internvl3-1b", "InternVL3-1B", size="1B", checkpoint="OpenGVLab/InternVL3-1B-hf"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_internvl(**kwargs)

    def visual_layout(self, model, processor, image_size, num_tokens):
        """Tiles row-major over the image (the processor resizes to the tile grid, no crop), then the
        thumbnail over the whole image; each tile a side x side grid of tokens."""
        width, height = image_size
        image_processor = getattr(processor, "image_processor", processor)
        per_tile = int(getattr(processor, "image_seq_length", 0) or model.config.image_seq_length)
        side = int(round(per_tile ** 0.5))
        if side * side != per_tile or num_tokens % per_tile:
            return None
        tiles = num_tokens // per_tile
        rows, cols = tile_grid(image_processor, width, height)
        boxes, segment = [], []
        if rows * cols > 1:
            if rows * cols + 1 != tiles:
                return None
            for r in range(rows):
                for c in range(cols):
                    boxes.append(grid_boxes(side, side, width * c / cols, height * r / rows,
                                            width * (c + 1) / cols, height * (r + 1) / rows))
            segment.append(torch.zeros(rows * cols * per_tile, dtype=torch.long))
        elif tiles != 1:
            return None
        boxes.append(grid_boxes(side, side, 0.0, 0.0, float(width), float(height)))
        segment.append(torch.full((per_tile,), len(segment), dtype=torch.long))
        return VisualLayout(boxes=torch.cat(boxes), segment=torch.cat(segment),
                            segments=["tiles", "thumbnail"] if rows * cols > 1 else ["image"],
                            image_size=(width, height))


def tile_grid(image_processor, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of tiles the GotOcr2 image processor cuts a (width, height) image into, by its own
    rule (the grid within min/max_patches whose aspect ratio is closest to the image's)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    if not image_processor.crop_to_patches:
        return 1, 1
    size = image_processor.size
    tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    cols, rows = get_optimal_tiled_canvas((height, width), tile, image_processor.min_patches,
                                          image_processor.max_patches)
    return rows, cols


# ------------------------------------------------------------------------------ offline tiny model
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}


def tiny_internvl(layers: int = 16, hidden: int = 64, tile_size: int = 64, patch_size: int = 8,
                  attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random InternVLForConditionalGeneration (Qwen2 LM): 64 px tiles of 8x8
    patches pixel-shuffled to 16 tokens, up to 4 tiles + a thumbnail (a 200x120 image gives 2x1 tiles
    + thumbnail = 48 tokens). The processor has no video processor (transformers' needs torchvision)."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
                              PreTrainedTokenizerFast, Qwen2Config)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from ..processors import without_video_processor
    from ..tiny import chat_template, finish, word_tokenizer

    words = word_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", extra_special_tokens=IMAGE_TOKENS)
    tokenizer.padding_side = "left"
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=tile_size, patch_size=patch_size)
    per_tile = (tile_size // patch_size) ** 2 // 4          # downsample_ratio 0.5: 2x2 patches per token
    config = InternVLConfig(text_config=text, vision_config=vision, downsample_ratio=0.5, image_seq_length=per_tile,
                            image_token_id=tokenizer.context_image_token_id)
    model = finish(InternVLForConditionalGeneration, config, attn_implementation, seed)
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile_size, "width": tile_size}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = without_video_processor(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_length=per_tile,
        chat_template=chat_template(image="<IMG_CONTEXT> ", video="<video> "))
    return model, processor
