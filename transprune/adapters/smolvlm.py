"""SmolVLM: Idefics3-style image splitting, Llama text model; one adapter for two transformers classes.

Which class. A checkpoint's config.json names one of two implementations of this model, and
`transprune.models` loads the one it names: SmolVLM-256M/500M-Instruct say `"model_type": "idefics3"`
(`Idefics3ForConditionalGeneration`, `Idefics3Processor`), SmolVLM2 checkpoints say `"smolvlm"`
(`SmolVLMForConditionalGeneration`, `SmolVLMProcessor`). `VARIANTS` is the table of what differs: the
class names, and that SmolVLMProcessor also takes video (so it wants a video processor and the
`num2words` package). Everything this adapter reads is the same in both (transformers 5.24,
`models/idefics3` and `models/smolvlm`), so nothing below branches on the class; the tests check
that equal weights give bit-identical logits in both.

Where things are: the text decoder is `model.model.text_model` (not `language_model` as in the
other families), a `LlamaModel` with 1-D RoPE, so the base adapter's q/k projections, rotary and
both position modes apply unchanged; the image token is `config.image_token_id`; the processor
carries `image_seq_len` (tokens per tile) and its image processor the tile grid settings.

How an image enters the sequence. The processor resizes the image, cuts it into rows x cols tiles
of the vision encoder's size and adds a downscaled global view; each tile becomes `image_seq_len`
`<image>` tokens (pixel-shuffled SigLIP patches), with text markup between the tiles:

    <fake_token_around_image><row_1_col_1><image>*S <fake_token_around_image><row_1_col_2><image>*S \\n
    ... \\n <fake_token_around_image><global-img><image>*S <fake_token_around_image>

Only `<image>` tokens (config.image_token_id) are visual tokens; the markup (`<fake_token_around_image>`,
`<row_r_col_c>`, `<global-img>`, newlines) is text, is never pruned, and stays where it is. The
visual tokens of one image are therefore not contiguous; the runner keeps visual positions as an
index set, so the gaps need nothing special.

Budget: all tiles and the global view of one image form ONE visual span of N tokens (the design's
"the run of tokens the vision path inserts for one image", as LLaVA-NeXT's base view + AnyRes
tiles are one span). They are scored together and keep floor(N * r_i) tokens between them, so a
tile that matters more can keep more; trace indices 0..N-1 number the image's `<image>` tokens in
sequence order (tiles row-major, then the global view). A prompt with several images has one span
per image (`visual_spans`), each with its own budget. The instruction is the text after the last
`<image>` token (from the closing `<fake_token_around_image>` on).

The bottom of this module builds the offline tiny models, `tiny-smolvlm` and `tiny-idefics3`: random
weights (16 layers; equal weights in both classes at one seed), an offline tokenizer and the class's
processor, image splitting on (a 200x120 image gives 2x2 tiles + global).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import prompt as prompts, tiny
from ..architecture import Shape
from ..spec import ModelSpec
from ..trace import VisualLayout
from .base import Adapter
from .llava import grid_boxes

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


@dataclass(frozen=True)
class Variant:
    """One transformers implementation of SmolVLM: the names, in `transformers`, of its classes."""
    model: str
    config: str
    vision_config: str
    processor: str
    image_processor: str    # the PIL backend (no torchvision)
    video: bool             # its processor also takes video: it wants a video processor and `num2words`


# Keyed by config.json's `model_type`; the first is the family's default class (tiny-smolvlm).
VARIANTS = {
    "smolvlm": Variant("SmolVLMForConditionalGeneration", "SmolVLMConfig", "SmolVLMVisionConfig",
                       "SmolVLMProcessor", "SmolVLMImageProcessorPil", video=True),
    "idefics3": Variant("Idefics3ForConditionalGeneration", "Idefics3Config", "Idefics3VisionConfig",
                        "Idefics3Processor", "Idefics3ImageProcessorPil", video=False),
}


class SmolVLMAdapter(Adapter):
    family = "smolvlm"
    label = "SmolVLM"
    model_classes = tuple(variant.model for variant in VARIANTS.values())
    # Language model: text_config of the checkpoints' config.json. N: one square image (any size: the
    # processor scales its longest side to size.longest_edge = 2048 px, then cuts 512 px tiles,
    # max_image_size.longest_edge) = 4x4 tiles + the global view, 64 `<image>` tokens each
    # (processor_config.json image_seq_len: (512/16)^2 SigLIP patches / scale_factor 4^2): 17 x 64.
    # A 4:3 photo would give 4x3 tiles + global = 832.
    architectures = {
        "smolvlm-256m": Shape(hidden=576, intermediate=1536, layers=30, visual_tokens=1088),
        # layers: not read from the official config.json itself; copies of it leave num_hidden_layers
        # out of text_config, so LlamaConfig's default 32 applies, which is also the depth of its base
        # model SmolLM2-360M.
        "smolvlm-500m": Shape(hidden=960, intermediate=2560, layers=32, visual_tokens=1088),
    }
    timing_arch = "smolvlm-500m"
    models = (
        ModelSpec("tiny-smolvlm", "Tiny SmolVLM (random weights)", size="0.9M", builder=lambda: tiny_smolvlm(),
                  description="SmolVLM architecture (image splitting: 2x2 tiles + global view), random weights."),
        ModelSpec("tiny-idefics3", "Tiny Idefics3 (random weights)", size="0.9M",
                  builder=lambda: tiny_smolvlm(model_type="idefics3"),
                  description="tiny-smolvlm's model and weights in Idefics3ForConditionalGeneration, the class of "
                              "SmolVLM-256M/500M-Instruct."),
        # SmolVLM(1) checkpoints: config.json model_type "idefics3", so Idefics3ForConditionalGeneration and
        # Idefics3Processor (which, unlike SmolVLM2's SmolVLMProcessor, does not need `num2words`).
        ModelSpec("smolvlm-256m", "SmolVLM-256M-Instruct", size="256M",
                  checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct"),
        ModelSpec("smolvlm-500m", "SmolVLM-500M-Instruct", size="500M",
                  checkpoint="HuggingFaceTB/SmolVLM-500M-Instruct"),
    )

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_smolvlm(**kwargs)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.text_model

    def read_prompt(self, model: nn.Module, input_ids: torch.Tensor, is_visual: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> prompts.Prompt:
        """The base prompt, with one span per image across its tiles and global view (`visual_spans`)."""
        prompt = super().read_prompt(model, input_ids, is_visual, attention_mask)
        prompt.visual_spans = [self.visual_spans(model, input_ids[b], positions)
                               for b, positions in enumerate(prompt.visual_positions)]
        return prompt

    def visual_spans(self, model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Span number (= image number) of each visual token of one sample (`positions`: sorted).

        Every image, split or not, ends with its global view `<global-img><image>*S`, so the last
        run of `<image>` tokens in a prompt is always a global view and the token before it is
        `<global-img>` (its id is read there: real checkpoints' configs do not carry it). Runs up
        to and including a global view form one image.
        """
        if len(positions) == 0:
            return positions
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[1:] = positions[1:] != positions[:-1] + 1
        run = starts.cumsum(0) - 1                                   # run number of each visual token
        run_starts = positions[starts]
        if int(run_starts[-1]) == 0:
            return torch.zeros_like(positions)
        global_id = input_ids[run_starts[-1] - 1]
        before = input_ids[(run_starts - 1).clamp_min(0)]
        is_global_run = (before == global_id) & (run_starts > 0)
        # image of a run = global views completed before it
        image_of_run = torch.cumsum(is_global_run.long(), 0) - is_global_run.long()
        return image_of_run[run]

    def visual_layout(self, model, processor, image_size, num_tokens):
        """Tiles row-major over the image, then the global view over the whole image.

        The processor resizes the longest side to `size.longest_edge`, then up to multiples of the
        tile size (it stretches, no crop), so tile (r, c) covers the image's r-th/c-th 1/rows, 1/cols.
        """
        width, height = image_size
        image_processor = getattr(processor, "image_processor", processor)
        per_tile = int(getattr(processor, "image_seq_len", 0))
        side = int(round(per_tile ** 0.5))
        if per_tile == 0 or side * side != per_tile or num_tokens % per_tile:
            return None
        rows, cols = tile_grid(image_processor, width, height)
        if (rows * cols + 1) * per_tile != num_tokens:
            return None
        boxes = []
        for r in range(rows):
            for c in range(cols):
                x0, x1 = width * c / cols, width * (c + 1) / cols
                y0, y1 = height * r / rows, height * (r + 1) / rows
                boxes.append(grid_boxes(side, side, x0, y0, x1, y1))
        boxes.append(grid_boxes(side, side, 0.0, 0.0, float(width), float(height)))
        segment = torch.cat([torch.zeros(rows * cols * per_tile, dtype=torch.long),
                             torch.ones(per_tile, dtype=torch.long)])
        return VisualLayout(boxes=torch.cat(boxes), segment=segment, segments=["tiles", "global"],
                            image_size=(width, height))


def tile_grid(image_processor, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of tiles the SmolVLM image processor cuts a (width, height) image into ((0, 0)
    without splitting), following its resize -> resize_for_vision_encoder -> split_images."""
    import math

    tile = image_processor.max_image_size["longest_edge"]
    if not image_processor.do_image_splitting:
        return 0, 0
    longest = _longest_edge(image_processor.size)
    # resize: longest side to `longest` (transformers' get_resize_output_image_size, even sizes)
    aspect = width / height
    if width >= height:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    if h > tile or w > tile:
        return (h - tile) // tile + 1, (w - tile) // tile + 1
    return 0, 0


def _longest_edge(size) -> int:
    return int(size["longest_edge"] if isinstance(size, dict) else size.longest_edge)


# ------------------------------------------------------------------------------ offline tiny model
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}{{ ':' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def smolvlm_tokenizer(max_tiles: int = 4):
    """A word-level tokenizer with SmolVLM's special tokens (<row_r_col_c> up to max_tiles x max_tiles)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<end_of_utterance>", FAKE_TOKEN,
                GLOBAL_TOKEN] + [f"<row_{r}_col_{c}>" for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in tiny.BASE_WORDS + ["User", "Assistant"]:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="<end_of_utterance>", unk_token="<unk>",
                                        additional_special_tokens=specials[4:])
    tokenizer.padding_side = "left"
    return tokenizer


def smolvlm_processor(tokenizer, tile_size: int, image_seq_len: int, longest_edge: int, model_type: str = "smolvlm"):
    """The processor of `model_type`'s class (`VARIANTS`), images only, built from explicit parameters."""
    import transformers

    variant = VARIANTS[model_type]
    image_processor = getattr(transformers, variant.image_processor)(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile_size}, do_image_splitting=True)
    processor_class = (_image_only_smolvlm_processor() if variant.video
                       else getattr(transformers, variant.processor))
    return processor_class(image_processor, tokenizer, image_seq_len=image_seq_len,
                           chat_template=SMOLVLM_CHAT_TEMPLATE)


def _image_only_smolvlm_processor():
    """SmolVLMProcessor without its video half.

    transformers' SmolVLMProcessor needs `num2words` (for video prompts) in its constructor and a
    video processor in `apply_chat_template`; this subclass takes neither (Idefics3Processor has no
    video half, so it is used as it is).
    """
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_len, chat_template=None):
            self.fake_image_token, self.image_token = FAKE_TOKEN, "<image>"
            self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
            self.end_of_utterance_token, self.global_image_token = "<end_of_utterance>", GLOBAL_TOKEN
            self.image_seq_len, self.video_token = image_seq_len, "<video>"
            ProcessorMixin.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnlySmolVLMProcessor.__name__ = ImageOnlySmolVLMProcessor.__qualname__ = "SmolVLMProcessor"
    return ImageOnlySmolVLMProcessor


def tiny_smolvlm(layers: int = 16, hidden: int = 64, tile_size: int = 64, patch_size: int = 8,
                 attn_implementation: str = "sdpa", seed: int = 0, model_type: str = "smolvlm"):
    """(model, processor): a random model of `model_type`'s class (`VARIANTS`: "smolvlm" or "idefics3");
    16 `<image>` tokens per tile, up to 2x2 tiles + the global view (images up to 2 tiles on their
    longest side). Both classes get equal weights at one seed (same modules, built in the same order)."""
    import transformers
    from transformers import LlamaConfig

    variant = VARIANTS[model_type]
    tokenizer = smolvlm_tokenizer()
    scale_factor = 2
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = getattr(transformers, variant.vision_config)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=tile_size,
                                                          patch_size=patch_size)
    config = getattr(transformers, variant.config)(text_config=text, vision_config=vision, scale_factor=scale_factor,
                                                   image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                                   pad_token_id=tokenizer.pad_token_id)
    model = tiny.finish(getattr(transformers, variant.model), config, attn_implementation, seed)
    image_seq_len = (tile_size // patch_size) ** 2 // scale_factor**2
    return model, smolvlm_processor(tokenizer, tile_size, image_seq_len, longest_edge=2 * tile_size,
                                    model_type=model_type)
