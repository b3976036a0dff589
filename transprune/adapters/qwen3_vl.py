"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's layout plus DeepStack and timestamped video.

What it shares with Qwen2.5-VL (so the adapter subclasses `Qwen2_5_VLAdapter`): the text decoder
at `model.model.language_model` with q/k norms (which the base side pass applies), 3-D M-RoPE
positions the model computes from the image grids (so only "original" positions are valid, and
decoding continues from the model's rope deltas), 2x2-merged patch cells (here 32 px: patch 16),
and the same count of tokens per image and per video. Its rotary module interleaves the t/h/w
frequencies ("interleaved M-RoPE") instead of cutting them into blocks, but still returns (cos, sin)
of shape (B, L, head_dim), so the runner gathers them like any other rotary.

What differs, and what this module does about it:

- **DeepStack.** The vision tower also returns features from a few of its layers
  (`vision_config.deepstack_visual_indexes`); the language model adds feature i to the hidden
  states of the visual tokens right after decoder layer i+1 (1-based), through
  `visual_pos_masks`, a mask over the full prompt. Once a stage has removed tokens that mask no
  longer fits the sequence. So while a pruner is attached, `DeepStack` takes the features out of
  the language model's arguments and adds them itself, after each of those decoder layers, to the
  visual tokens still alive, at their current slots. It runs before the runner's own hooks on the
  same layer: a stage at such a layer scores (and keeps) the states the next layer would have read,
  DeepStack included. Tokens a method inserts (SparseVLM's recycled ones) get no feature: they are
  not any one patch's. Without a pruned prefill in progress the model does it itself.
- **Video.** The processor writes each temporal patch of a video as its own
  `<t seconds><|vision_start|><|video_pad|>*S<|vision_end|>` group, so one video is several runs of
  video tokens with text between them. Its visual span (one budget per video) is all of its
  groups: the adapter reads each video's size from the call (`video_token_counts`).

The bottom of the module builds the offline tiny model, `tiny-qwen3-vl`, and lists the registry
entries (`models`) and the real checkpoint's shape (`architectures`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from .. import prompt as prompts
from ..architecture import Shape
from ..spec import ModelSpec
from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    label = "Qwen3-VL"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    # Language model from the checkpoint's config.json (text_config: hidden_size 2048, intermediate_size
    # 6144, num_hidden_layers 28, as printed in xorbitsai/inference issue 4592 for the 2B shape;
    # the text model is Qwen3-1.7B's size). N: a 448x448 image, 14x14 merged 32 px cells.
    architectures = {
        "qwen3-vl-2b": Shape(hidden=2048, intermediate=6144, layers=28, visual_tokens=196),
    }
    timing_arch = "qwen3-vl-2b"
    # transprune.models registry entries (ModelSpec fields; the registry fills in the family and the video flag).
    models = (
        ModelSpec("tiny-qwen3-vl", "Tiny Qwen3-VL (random weights)", size="0.9M", builder=lambda: tiny_qwen3_vl(),
                  description="Qwen3-VL architecture (interleaved M-RoPE, DeepStack), random weights."),
        ModelSpec("qwen3-vl-2b", "Qwen3-VL-2B-Instruct", size="2B", checkpoint="Qwen/Qwen3-VL-2B-Instruct"),
    )
    # Even: two consecutive frames form one temporal patch (4 groups). Frames are preprocessed as
    # Qwen2.5-VL's (the inherited video_pixel_values), at this model's patch size of 16.
    video_frames = 8

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_qwen3_vl(**kwargs)

    def attach(self, model: nn.Module, prefill_sequence) -> list:
        """DeepStack after pruning, and each video's size for its span (see the module docstring)."""
        self._video_tokens = None
        deepstack = DeepStack(self.language_model(model), self.decoder_layers(model),
                              len(model.config.vision_config.deepstack_visual_indexes), prefill_sequence)

        def read_video_sizes(module, args, kwargs):
            self._video_tokens = video_token_counts(model, kwargs)

        return [model.register_forward_pre_hook(read_video_sizes, with_kwargs=True), *deepstack.attach()]

    def read_prompt(self, model: nn.Module, input_ids: torch.Tensor, is_visual: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> prompts.Prompt:
        """The base prompt, with one span per video across its timestamped frame groups."""
        prompt = super().read_prompt(model, input_ids, is_visual, attention_mask)
        counts = getattr(self, "_video_tokens", None)
        if not counts:
            return prompt   # no video (or called outside a pruner): spans are the runs of tokens
        video_ends = torch.cumsum(torch.tensor(counts, device=input_ids.device), 0)
        seen = 0   # video tokens of earlier samples: the videos are numbered across the batch
        for b, positions in enumerate(prompt.visual_positions):
            is_video = input_ids[b, positions] == model.config.video_token_id
            video = torch.searchsorted(video_ends, seen + torch.cumsum(is_video, 0) - 1, right=True)
            # A run of image tokens keeps its own key; every token of video v gets the key -1 - v.
            key = torch.where(is_video, -1 - video, prompt.visual_spans[b])
            starts = torch.ones_like(key, dtype=torch.bool)
            starts[1:] = key[1:] != key[:-1]
            prompt.visual_spans[b] = starts.cumsum(0) - 1
            seen += int(is_video.sum())
        return prompt


def video_token_counts(model: nn.Module, kwargs) -> list[int] | None:
    """Tokens of each video of a call, in batch order: from `video_grid_thw`, or, where `generate` ran
    the vision tower beforehand and passes its features instead, from those (one tensor per video)."""
    grid = compat.get(kwargs, "video_grid_thw")
    if grid is not None:
        return (grid.prod(-1) // model.config.vision_config.spatial_merge_size**2).tolist()
    encoded = (compat.get(kwargs, "mm_encoder_outputs") or {}).get("video")
    return None if encoded is None else [len(features) for features in encoded.pooler_output]


class DeepStack:
    """Adds Qwen3-VL's DeepStack features to the alive visual tokens during a pruned prefill.

    `prefill_sequence()` is the runner's `transprune.sequence.PrunedSequence` of the prefill in
    progress (None outside one). The features, one (total visual tokens of the batch, d) tensor per
    DeepStack layer, list the visual tokens in the order of the batch's `visual_pos_masks`: sample by
    sample, in sequence order, which is the order of `PrunedSequence.visual` (indices 0..N_b-1).
    """

    def __init__(self, language_model: nn.Module, layers: nn.ModuleList, depth: int, prefill_sequence):
        self.language_model, self.layers, self.depth = language_model, layers, depth
        self.prefill_sequence = prefill_sequence
        self.features: list[torch.Tensor] | None = None

    def attach(self) -> list:
        handles = [self.language_model.register_forward_pre_hook(self._take_features, with_kwargs=True)]
        for index in range(min(self.depth, len(self.layers))):
            handles.append(self.layers[index].register_forward_hook(
                lambda module, args, output, index=index: self._add(index, output)))
        return handles

    def _take_features(self, module, args, kwargs):
        self.features = None
        features = compat.get(kwargs, "deepstack_visual_embeds")
        if features is None or self.prefill_sequence() is None:
            return None   # no visual tokens, or nothing pruned: the model adds them as it always does
        self.features = features
        return args, compat.replace(kwargs, deepstack_visual_embeds=None)

    @torch.no_grad()
    def _add(self, index: int, output):
        seq = self.prefill_sequence()
        if seq is None or self.features is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        feature = self.features[index].to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        first_row = 0   # the feature row of the sample's visual token 0
        for b, visual in enumerate(seq.visual):
            alive = seq.alive[b]
            alive = alive[alive < visual.prompt_count]          # inserted tokens have no feature row
            slots = seq.view.visual_slots(b, alive) if len(alive) else alive
            hidden[b, slots] = hidden[b, slots] + feature[first_row + alive]
            first_row += visual.prompt_count
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# ------------------------------------------------------------------------------ offline tiny model
TIMESTAMP_WORDS = [str(digit) for digit in range(10)] + ["seconds", "<", ">"]


def tiny_qwen3_vl(layers: int = 16, hidden: int = 64, attn_implementation: str = "sdpa", seed: int = 0,
                  min_pixels: int = 128 * 128, max_pixels: int = 256 * 256):
    """(model, processor): a random Qwen3VLForConditionalGeneration: interleaved M-RoPE, 2x2 merged
    32 px cells, three DeepStack layers (as the real checkpoints: after decoder layers 1, 2, 3); a
    200x120 image gives 4x6 = 24 visual tokens. The processor has no video processor (transformers'
    needs torchvision): `transprune.video` prepares video frames itself."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..processors import without_video_processor
    from ..tiny import BASE_WORDS, QWEN_CHAT_TEMPLATE, finish, word_tokenizer

    tokenizer = word_tokenizer(BASE_WORDS + TIMESTAMP_WORDS)
    ids = tokenizer.convert_tokens_to_ids
    heads, head_dim = 4, hidden // 4
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         # t/h/w frequency counts summing to head_dim / 2, interleaved by the rotary module
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1, 2]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    model = finish(Qwen3VLForConditionalGeneration, config, attn_implementation, seed)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16,
                                               merge_size=2, temporal_patch_size=2)
    processor = without_video_processor(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                          video_processor=None, chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor
