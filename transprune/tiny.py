"""Shared pieces of the offline tiny models: a word-level tokenizer, chat templates, config pieces.

Each family's tiny model is built in its adapter module (`Adapter.build_tiny`, e.g.
`transprune.adapters.llava.tiny_llava`) from these pieces. Nothing here downloads anything. The
tiny models use the real transformers classes (so they go through exactly the pruning code a real
checkpoint does) with small widths, 16 decoder layers so the presets' scaled schedules fit, and a
fixed seed (`finish`) so two builds have equal weights.
"""

from __future__ import annotations

import threading

import torch

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


def llama_text_config(tokenizer, layers: int, hidden: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def clip_vision_config(image_size: int, patch_size: int, hidden: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size)


# Random initialisation draws from torch's global generator, which every thread shares: seeding and
# building under one lock (transprune.benchmarking's random models take it too) keeps two builds in
# parallel threads (the app's start-up self-check and its first model load) from interleaving their draws, so a seed always gives the same weights.
BUILD_LOCK = threading.Lock()


def finish(model_class, config, attn_implementation: str, seed: int):
    """`model_class(config)` in eval mode with the seed's weights, set to `attn_implementation`, its
    generation config padding and stopping with the text config's tokens."""
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    with BUILD_LOCK:
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model
