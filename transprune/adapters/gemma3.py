"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP vision tower, average-pooled to a fixed grid
of soft tokens per image, and a Gemma 3 text decoder whose layers differ by type.

Every fact of the family lives in this module: the adapter, its real checkpoint's shape,
its registry entries (`models`), the slow reference's layer steps (`ReferenceSteps`) and the
offline tiny model (`tiny_gemma3`).

How an image enters the sequence. The processor replaces `<start_of_image>` in the prompt with
`\\n\\n<start_of_image><image_soft_token>*S<end_of_image>\\n\\n` (S = config.mm_tokens_per_image,
256 for google/gemma-3-4b-it: 896 px / 14 px patches = 64x64, pooled 4x4 to 16x16). The `S`
soft tokens (config.image_token_id) are the visual span; the markers are text.

What differs from a Llama-style decoder, and where it is handled:

- Layer types (`text_config.layer_types`): five sliding-window layers ("sliding_attention",
  window `text_config.sliding_window`, 1024 for 4b) then one full-attention layer, repeated.
  `layer_masks` declares each layer's `transprune.masks.LayerMask`; a sliding layer after a stage
  counts its window over the surviving sequence (the convention in `transprune.masks`).
- Bidirectional attention within an image: given `token_type_ids` (the processor returns them and
  `generate` passes them in prefill), the soft tokens of one image see each other both ways, in
  both layer types. Gathering the model's own mask keeps this for the survivors of an image.
- Its own rotary per layer type (local base 10k; global base 1M with linear scaling 8 on 4b): the
  language model hands each layer the (cos, sin) of its type, so a recomputed rotary
  ("compact" positions) and the side pass of layer p+1 use the type of the layer they serve
  (`layer_rotary`, `side_position_embeddings`).
- Sandwich norms: the attention and the MLP outputs pass through their own RMSNorm before the
  residual add. TTV reads each sub-module's own output (`o_proj`'s, `down_proj`'s), before that
  norm; the reference does the same.
- Queries and keys are RMS-normalised per head (`q_norm`, `k_norm`, handled by the base side
  projection) and scaled by `query_pre_attn_scalar ** -0.5` (`attn.scaling`).
- FlashAttention is refused by transformers itself (it would drop the image blocks); the model
  runs with eager or SDPA.
- The processor has no video half: Gemma 3 is images only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import compat
from ..architecture import Shape
from ..masks import LayerMask
from ..spec import ModelSpec
from ..trace import VisualLayout
from .base import Adapter
from .llava import grid_boxes

BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN = "<start_of_image>", "<image_soft_token>", "<end_of_image>"

class Gemma3Adapter(Adapter):
    family = "gemma3"
    label = "Gemma 3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    # google/gemma-3-4b-it config.json, text_config: hidden_size 2560, intermediate_size 10240,
    # num_hidden_layers 34; mm_tokens_per_image 256 per image (any image size: it is resized to 896 px).
    architectures = {
        "gemma-3-4b": Shape(hidden=2560, intermediate=10240, layers=34, visual_tokens=256),
    }
    timing_arch = "gemma-3-4b"
    models = (
        ModelSpec("tiny-gemma3", "Tiny Gemma 3 (random weights)", size="0.64M", builder=lambda: tiny_gemma3(),
                  description=("Gemma 3 architecture (sliding-window and full layers, bidirectional image blocks), "
                               "random weights.")),
        ModelSpec("gemma-3-4b", "Gemma-3-4B-it", size="4B", checkpoint="google/gemma-3-4b-it"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_gemma3(**kwargs)

    @staticmethod
    def reference_steps(language_model: nn.Module):
        """How `transprune.reference` runs this family's decoder layers."""
        return ReferenceSteps(language_model)

    def visual_layout(self, model, processor, image_size, num_tokens):
        """One image's soft tokens: a side x side grid, row-major, over the whole image (the processor
        stretches it to a square); None for pan-and-scan crops (more than one image's worth of tokens)."""
        side = math.isqrt(num_tokens)
        if num_tokens != model.config.mm_tokens_per_image or side * side != num_tokens:
            return None
        width, height = image_size
        return VisualLayout(boxes=grid_boxes(side, side, 0.0, 0.0, float(width), float(height)),
                            segment=torch.zeros(num_tokens, dtype=torch.long), segments=["image"],
                            image_size=(width, height))

    def layer_type(self, model: nn.Module, number: int) -> str:
        return self.text_config(model).layer_types[number - 1]

    def layer_masks(self, model: nn.Module) -> list[LayerMask]:
        config = self.text_config(model)
        return [LayerMask(kind, config.sliding_window if kind == "sliding_attention" else None)
                for kind in config.layer_types[: len(self.decoder_layers(model))]]

    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The full-attention layers' (cos, sin)."""
        return self.language_model(model).rotary_emb(hidden, position_ids, "full_attention")

    def layer_rotary(self, model: nn.Module, number: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model(model).rotary_emb(hidden, position_ids, self.layer_type(model, number))

    def side_position_embeddings(self, model: nn.Module, number: int, layer_kwargs: dict, hidden: torch.Tensor):
        """Layer `number`'s own type of rotary at the positions the latest layer saw (the same rows the
        language model would hand it: rotary is computed per position)."""
        position_ids = compat.require(layer_kwargs, "position_ids", "A Gemma 3 decoder layer")
        return self.layer_rotary(model, number, hidden, position_ids)


# ------------------------------------------------------------------------------ the slow reference's steps
class ReferenceSteps:
    """How `transprune.reference` runs a Gemma 3 decoder layer on the sequence it keeps (`kept`,
    the original positions still there), written from the modeling file, independently of the runner.

    Masks: causal, or within one image (a run of adjacent visual tokens in the prompt); sliding
    layers also need the key fewer than `sliding_window` places back in the kept sequence.
    """

    def __init__(self, language_model: nn.Module):
        self.lm, self.config = language_model, language_model.config

    def rotary(self, hidden, positions, number: int):
        return self.lm.rotary_emb(hidden, positions, self.config.layer_types[number - 1])

    def mask(self, kept: torch.Tensor, is_visual: torch.Tensor, number: int, dtype) -> torch.Tensor:
        """(1, 1, n, n) additive mask of layer `number` over the kept positions `kept` (n,) of a prompt
        whose visual tokens are `is_visual` (L,)."""
        image = torch.cumsum(is_visual & ~torch.cat([is_visual.new_zeros(1), is_visual[:-1]]), 0) - 1
        image = torch.where(is_visual, image, -1)[kept]
        n = len(kept)
        query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (key <= query) | ((image[:, None] == image[None, :]) & (image[:, None] >= 0))
        if self.config.layer_types[number - 1] == "sliding_attention":
            allowed &= key > query - self.config.sliding_window
        return torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def layer(self, layer, hidden, cos_sin, mask, cache_kwargs):
        """(output, (attention input, attention output), (MLP input, MLP output))."""
        normed = layer.input_layernorm(hidden)
        attn_out, _ = layer.self_attn(hidden_states=normed, position_embeddings=cos_sin, attention_mask=mask,
                                      **cache_kwargs)
        mid = hidden + layer.post_attention_layernorm(attn_out)
        normed2 = layer.pre_feedforward_layernorm(mid)
        mlp_out = layer.mlp(normed2)
        return mid + layer.post_feedforward_layernorm(mlp_out), (normed, attn_out), (normed2, mlp_out)


# ------------------------------------------------------------------------------ offline tiny model
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '" + BOI_TOKEN + "' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma3_tokenizer():
    """A word-level tokenizer with Gemma 3's special tokens and the attributes its processor reads
    (`boi_token`, `image_token`, `eoi_token` and their ids)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from ..tiny import BASE_WORDS

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN, "<start_of_turn>",
                "<end_of_turn>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in BASE_WORDS + ["user", "model"]:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": BOI_TOKEN, "image_token": IMAGE_TOKEN, "eoi_token": EOI_TOKEN})
    # Named tokens above are special by their role; the turn markers must not be split into words either.
    tokenizer.add_tokens(specials[4:], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_gemma3(layers: int = 16, hidden: int = 64, image_size: int = 64, patch_size: int = 8,
                tokens_per_image: int = 16, sliding_window: int = 12, attn_implementation: str = "sdpa",
                seed: int = 0):
    """(model, processor): a random Gemma3ForConditionalGeneration, 16 soft tokens per 64 px image
    (8x8 SigLIP patches pooled 2x2), layers 6 and 12 full attention and the rest sliding with a
    12-token window, so that prompts (about 30 tokens) are longer than the window before and after
    pruning."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..tiny import BUILD_LOCK, finish

    tokenizer = gemma3_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
        sliding_window=sliding_window, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size, patch_size=patch_size)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                          boi_token_index=ids(BOI_TOKEN), eoi_token_index=ids(EOI_TOKEN),
                          image_token_index=ids(IMAGE_TOKEN))
    model = finish(Gemma3ForConditionalGeneration, config, attn_implementation, seed)
    with BUILD_LOCK:
        # transformers initialises the image projection to zeros (every soft token would be the same
        # vector and every score a tie); random, seeded, so two builds stay equal.
        generator = torch.Generator().manual_seed(seed)
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.data.copy_(torch.randn(projection.shape, generator=generator) * 0.2)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens_per_image)
    return model, processor
