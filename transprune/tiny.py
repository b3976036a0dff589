"""Offline building blocks: word-level tokenizers, processors and tiny random models.

Nothing here downloads anything. The tiny models use the real transformers classes (so they go
through exactly the pruning code a real checkpoint does) with small widths, 16 decoder layers so
the presets' scaled schedules fit, and a fixed seed so two builds have equal weights.
"""

from __future__ import annotations

import threading

import torch

from .processors import without_video_processor

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]
# Qwen2.5-VL's placeholders: one image is <|vision_start|><|image_pad|>...<|vision_end|>.
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The words a user of the tiny demo models is likely to type, plus the chat markers.
BASE_WORDS = """USER ASSISTANT : ? . , ! ' what which where who how many is are there a an the this that of in on at
to and or it its color colour shape red green blue yellow white black orange purple circle square triangle star
left right top bottom middle center one two three four five yes no describe image picture photo video show
shown see do you can tell me about object objects thing things big small large""".split()

def chat_template(image: str = "<image> ", video: str = "<video> ") -> str:
    """A "USER: ... ASSISTANT:" chat template; `image`/`video` are what an image/video item becomes."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: "
        "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image + "{% elif item['type'] == 'video' %}" + video +
        "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
        "{% endfor %}{% endif %}"
        "{% else %}ASSISTANT: "
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "{% endif %}</s> {% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = chat_template()
QWEN_CHAT_TEMPLATE = chat_template("<|vision_start|><|image_pad|><|vision_end|> ",
                                   "<|vision_start|><|video_pad|><|vision_end|> ")


def word_tokenizer(words=BASE_WORDS):
    """A lower-cased word-level PreTrainedTokenizerFast over `words` (+ specials); unknown -> <unk>."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + QWEN_TOKENS)}
    for word in words:
        for piece in (word, word.lower()):
            vocab.setdefault(piece, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=["<image>", "<video>", *QWEN_TOKENS])
    tokenizer.padding_side = "left"
    return tokenizer


def clip_image_processor(image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def llava_processor(tokenizer, image_size: int, patch_size: int):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=clip_image_processor(image_size), tokenizer=tokenizer,
                          patch_size=patch_size, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)


def llava_next_processor(tokenizer, image_size: int, patch_size: int, grid_pinpoints):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=grid_pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                              num_additional_image_tokens=1)


def _text_config(tokenizer, layers: int, hidden: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _vision_config(image_size: int, patch_size: int, hidden: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size)


# Random initialisation draws from torch's global generator, which every thread shares: seeding and
# building under one lock (transprune.bench's random models take it too) keeps two builds in parallel threads (the app's start-up self-check and its
# first model load) from interleaving their draws, so a seed always gives the same weights.
BUILD_LOCK = threading.Lock()


def _finish(model_class, config, attn_implementation: str, seed: int):
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    with BUILD_LOCK:
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def tiny_llava(layers: int = 16, hidden: int = 64, image_size: int = 168, patch_size: int = 14,
               attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random LlavaForConditionalGeneration with (image_size/patch)^2 visual tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = word_tokenizer()
    config = LlavaConfig(text_config=_text_config(tokenizer, layers, hidden, 4, 2),
                         vision_config=_vision_config(image_size, patch_size),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=(image_size // patch_size) ** 2)
    model = _finish(LlavaForConditionalGeneration, config, attn_implementation, seed)
    return model, llava_processor(tokenizer, image_size, patch_size)


def tiny_llava_next(layers: int = 16, hidden: int = 64, image_size: int = 112, patch_size: int = 14,
                    attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random LlavaNextForConditionalGeneration with AnyRes up to 2x2 tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = word_tokenizer()
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    config = LlavaNextConfig(text_config=_text_config(tokenizer, layers, hidden, 4, 2),
                             vision_config=_vision_config(image_size, patch_size),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             projector_hidden_act="gelu", vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                             image_seq_length=(image_size // patch_size) ** 2)
    model = _finish(LlavaNextForConditionalGeneration, config, attn_implementation, seed)
    return model, llava_next_processor(tokenizer, image_size, patch_size, pinpoints)


def tiny_video_llava(layers: int = 16, hidden: int = 64, image_size: int = 112, patch_size: int = 14,
                     attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random VideoLlavaForConditionalGeneration (images; videos via transprune.video)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaProcessor
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    tokenizer = word_tokenizer()
    side = image_size // patch_size
    config = VideoLlavaConfig(text_config=_text_config(tokenizer, layers, hidden, 4, 2),
                              vision_config=_vision_config(image_size, patch_size),
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                              projector_hidden_act="gelu", vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=side * side,
                              video_seq_length=8 * (side * side + 1))
    model = _finish(VideoLlavaForConditionalGeneration, config, attn_implementation, seed)
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": image_size},
                                               crop_size={"height": image_size, "width": image_size})
    processor = without_video_processor(VideoLlavaProcessor)(video_processor=None, image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                    vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                    num_additional_image_tokens=1)
    return model, processor


def tiny_llava_onevision(layers: int = 16, hidden: int = 64, image_size: int = 56, patch_size: int = 14,
                         attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a random LlavaOnevisionForConditionalGeneration (Qwen2 LM, SigLIP tower, AnyRes)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tokenizer = word_tokenizer()
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
    model = _finish(LlavaOnevisionForConditionalGeneration, config, attn_implementation, seed)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    processor = without_video_processor(LlavaOnevisionProcessor)(video_processor=None, image_processor=image_processor, tokenizer=tokenizer,
                                        num_image_tokens=(s // patch_size) ** 2,
                                        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)
    return model, processor


def tiny_qwen2_5_vl(layers: int = 16, hidden: int = 64, attn_implementation: str = "sdpa", seed: int = 0,
                    min_pixels: int = 224 * 224, max_pixels: int = 448 * 448):
    """(model, processor): a random Qwen2_5_VLForConditionalGeneration (M-RoPE, 2x2 merged 28 px cells)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = word_tokenizer()
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
    model = _finish(Qwen2_5_VLForConditionalGeneration, config, attn_implementation, seed)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    processor = without_video_processor(Qwen2_5_VLProcessor)(video_processor=None, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor
