"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): LLaVA-1.5-style images, 8-frame videos.

Image and video placeholders carry different token ids; both are visual tokens. A video's tokens
are frame after frame, each frame the CLS token followed by its patch grid.
"""

from __future__ import annotations

import torch

from .. import tiny
from ..architecture import Shape
from ..processors import without_video_processor
from ..spec import ModelSpec
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
    models = (
        ModelSpec("tiny-video-llava", "Tiny Video-LLaVA (random weights)", size="0.9M",
                  builder=lambda: tiny_video_llava(), description="Video-LLaVA architecture, random weights."),
        ModelSpec("video-llava-7b", "Video-LLaVA-7B", size="7B", checkpoint="LanguageBind/Video-LLaVA-7B-hf"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_video_llava(**kwargs)

    video_frames = 8              # trained on exactly 8 frames, and its checkpoints take no other count
    required_frames = 8

    # -- video (transprune.video) --------------------------------------------------------------
    def video_pixel_values(self, image_processor, clips) -> dict:
        """Each frame through the image processor, as VideoLlavaVideoProcessor does (CLS kept)."""
        kwargs = dict(return_tensors="pt")
        if "return_legacy_image_output" in getattr(getattr(image_processor, "valid_kwargs", None),
                                                   "__annotations__", {}):
            kwargs["return_legacy_image_output"] = False  # silences a deprecation warning
        frames = []
        for clip in clips:
            out = image_processor(images=clip, **kwargs)
            frames.append(out.get("pixel_values_images", out.get("pixel_values")))
        return dict(pixel_values_videos=torch.stack(frames))

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


# ---------------------------------------------------------------------------- offline model
def tiny_video_llava(layers: int = 16, hidden: int = 64, image_size: int = 112, patch_size: int = 14,
                     attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random VideoLlavaForConditionalGeneration (images; videos via transprune.video)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaProcessor
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    tokenizer = tiny.word_tokenizer()
    side = image_size // patch_size
    config = VideoLlavaConfig(text_config=tiny.llama_text_config(tokenizer, layers, hidden, 4, 2),
                              vision_config=tiny.clip_vision_config(image_size, patch_size),
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                              projector_hidden_act="gelu", vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=side * side,
                              video_seq_length=8 * (side * side + 1))
    model = tiny.finish(VideoLlavaForConditionalGeneration, config, attn_implementation, seed)
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": image_size},
                                               crop_size={"height": image_size, "width": image_size})
    processor_class = without_video_processor(VideoLlavaProcessor)   # image-only: no torchvision needed
    processor = processor_class(video_processor=None, image_processor=image_processor, tokenizer=tokenizer,
                                patch_size=patch_size, vision_feature_select_strategy="default",
                                chat_template=tiny.CHAT_TEMPLATE, num_additional_image_tokens=1)
    return model, processor
