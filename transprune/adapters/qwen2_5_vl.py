"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): M-RoPE and 2x2-merged 28 px cells.

Positions are 3-D (temporal, height, width), computed by the model from the image grids, so only
"original" positions are valid: the kept tokens keep their M-RoPE ids and decoding continues from
the model's own rope deltas. The rotary module already interleaves the M-RoPE sections, so the
per-layer (cos, sin) have the usual (B, L, head_dim) shape and can be gathered like 1-D RoPE.
"""

from __future__ import annotations

import math

import torch

from .. import tiny
from ..architecture import Shape
from ..frames import normalise_frames
from ..processors import without_video_processor
from ..spec import ModelSpec
from ..trace import VisualLayout
from .base import Adapter
from .llava import grid_boxes

# Qwen2VLVideoProcessor's per-frame pixel cap (size["longest_edge"]).
VIDEO_MAX_PIXELS = 768 * 28 * 28


def _get(obj, name, default=None):
    value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return default if value is None else value


def qwen_frame_size(processor, height: int, width: int) -> tuple[int, int]:
    """(height, width) Qwen2.5-VL video frames are resized to: multiples of 28 px (patch x merge).

    `processor` is the full processor or an image processor. A real video processor's own pixel
    bounds win; otherwise (no video processor, or transprune.video's torchvision-free stand-in)
    the image processor's, with max_pixels capped at 768*28*28.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None and not getattr(video_processor, "stand_in", False):
        source, cap = video_processor, None
    else:
        source, cap = getattr(processor, "image_processor", processor), VIDEO_MAX_PIXELS
    patch, merge = int(_get(source, "patch_size", 14)), int(_get(source, "merge_size", 2))
    size = _get(source, "size", {})
    min_pixels = int(_get(size, "shortest_edge") or _get(source, "min_pixels", 56 * 56))
    max_pixels = int(_get(size, "longest_edge") or _get(source, "max_pixels", VIDEO_MAX_PIXELS))
    if cap is not None:
        max_pixels = min(max_pixels, cap)
    return smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_video_patches(image_processor, frames) -> tuple[torch.Tensor, list[int]]:
    """(patches (T/2 * h/14 * w/14, 3*2*14*14), [T/2, h/14, w/14]) of one clip, as Qwen2VLVideoProcessor
    makes them: frames resized with `qwen_frame_size`, normalised, an odd count padded with the last frame."""
    from PIL import Image

    patch = int(_get(image_processor, "patch_size", 14))
    merge = int(_get(image_processor, "merge_size", 2))
    temporal = int(_get(image_processor, "temporal_patch_size", 2))
    height, width = qwen_frame_size(image_processor, frames[0].height, frames[0].width)
    video = normalise_frames([f.resize((width, height), Image.BICUBIC) for f in frames], image_processor)
    if pad := -len(frames) % temporal:  # as Qwen2VLVideoProcessor.patchify: repeat the last frame
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    grid_t, grid_h, grid_w = video.shape[0] // temporal, height // patch, width // patch
    channels = video.shape[1]
    patches = video.view(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch), [grid_t, grid_h, grid_w]


class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    # Language model from the public config.json; N: a 448x448 image, 16x16 merged 28 px cells.
    architectures = {
        "qwen2.5-vl-3b": Shape(hidden=2048, intermediate=11008, layers=36, visual_tokens=256),
        "qwen2.5-vl-7b": Shape(hidden=3584, intermediate=18944, layers=28, visual_tokens=256),
    }
    timing_arch = "qwen2.5-vl-7b"
    models = (
        ModelSpec("tiny-qwen2.5-vl", "Tiny Qwen2.5-VL (random weights)", size="0.9M",
                  builder=lambda: tiny_qwen2_5_vl(), description="Qwen2.5-VL architecture (M-RoPE), random weights."),
        ModelSpec("qwen2.5-vl-3b", "Qwen2.5-VL-3B-Instruct", size="3B", checkpoint="Qwen/Qwen2.5-VL-3B-Instruct"),
        ModelSpec("qwen2.5-vl-7b", "Qwen2.5-VL-7B-Instruct", size="7B", checkpoint="Qwen/Qwen2.5-VL-7B-Instruct"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_qwen2_5_vl(**kwargs)

    video_frames = 8              # even: two consecutive frames form one temporal patch (4 steps)
    video_metadata = True         # its processor reads the sampled frame rate
    default_positions = "original"
    allowed_positions = ("original",)

    def video_pixel_values(self, image_processor, clips) -> dict:
        """Patches and grids as Qwen2VLVideoProcessor makes them (`qwen_video_patches`)."""
        patches, grids = zip(*(qwen_video_patches(image_processor, clip) for clip in clips))
        return dict(pixel_values_videos=torch.cat(patches), video_grid_thw=torch.tensor(grids))

    def visual_layout(self, model, processor, image_size, num_tokens):
        """The processor resizes (no crop) to multiples of 28 px; each token is one 28 px cell."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = image_size
        image_processor = getattr(processor, "image_processor", processor)
        patch = image_processor.patch_size
        merge = image_processor.merge_size
        size = image_processor.size
        min_pixels = getattr(size, "shortest_edge", None) or getattr(image_processor, "min_pixels", None)
        max_pixels = getattr(size, "longest_edge", None) or getattr(image_processor, "max_pixels", None)
        resized_h, resized_w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels,
                                            max_pixels=max_pixels)
        rows, cols = resized_h // (patch * merge), resized_w // (patch * merge)
        if rows * cols != num_tokens:
            return None
        return VisualLayout(boxes=grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height)),
                            segment=torch.zeros(num_tokens, dtype=torch.long), segments=["image"],
                            image_size=(width, height))

    # -- video (transprune.video) --------------------------------------------------------------
    def video_token_count(self, model_config, processor, num_frames, frame_size):
        vision = model_config.vision_config
        height, width = qwen_frame_size(processor, frame_size[1], frame_size[0])
        cell = vision.patch_size * vision.spatial_merge_size
        return math.ceil(num_frames / vision.temporal_patch_size) * (height // cell) * (width // cell)

    def video_layout(self, model, processor, frame_size, num_frames, num_tokens):
        """Per temporal patch (two consecutive frames) the 28 px merged-cell grid of the resized frame.

        A token covers both frames of its pair; `frame` names the first (0, 2, 4, ...).
        """
        width, height = frame_size
        vision = model.config.vision_config
        cell = vision.patch_size * vision.spatial_merge_size
        temporal = vision.temporal_patch_size
        resized_h, resized_w = qwen_frame_size(processor, height, width)
        rows, cols = resized_h // cell, resized_w // cell
        steps = math.ceil(num_frames / temporal)
        if steps * rows * cols != num_tokens:
            return None
        grid = grid_boxes(rows, cols, 0.0, 0.0, float(width), float(height))
        return VisualLayout(boxes=grid.repeat(steps, 1), segment=torch.zeros(num_tokens, dtype=torch.long),
                            segments=["video"], image_size=(width, height),
                            frame=(torch.arange(steps) * temporal).repeat_interleave(rows * cols))


# ---------------------------------------------------------------------------- offline model
def tiny_qwen2_5_vl(layers: int = 16, hidden: int = 64, attn_implementation: str = "sdpa", seed: int = 0,
                    min_pixels: int = 224 * 224, max_pixels: int = 448 * 448):
    """(model, processor): a random Qwen2_5_VLForConditionalGeneration (M-RoPE, 2x2 merged 28 px cells)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny.word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // 4
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    model = tiny.finish(Qwen2_5_VLForConditionalGeneration, config, attn_implementation, seed)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    processor_class = without_video_processor(Qwen2_5_VLProcessor)   # image-only: no torchvision needed
    processor = processor_class(video_processor=None, image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=tiny.QWEN_CHAT_TEMPLATE)
    return model, processor
