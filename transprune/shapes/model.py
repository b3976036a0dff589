"""The shapes-llava architecture, and loading the trained weights shipped in the package.

A real `LlavaForConditionalGeneration` (so pruning runs exactly the code a real checkpoint does):
CLIP-style tower (168 px, patch 14 -> 12x12 = 144 visual tokens, width 128, 4 layers), the
LLaVA two-layer GELU projector, and a Llama-style language model (width 128, 12 layers, 4 heads),
with the project's word-level tokenizer and chat template ("USER: <image> {question} ASSISTANT:").
The model answers with one lower-case word followed by </s>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..tiny import BASE_WORDS, llava_processor, word_tokenizer
from . import scenes

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes-llava"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "shapes.json"            # vocabulary word list, image/patch size, training record

IMAGE_SIZE = scenes.IMAGE_SIZE
PATCH_SIZE = 14
ARCH = dict(vision_hidden=128, vision_layers=4, vision_heads=4, text_hidden=128, text_layers=12, text_heads=4,
            text_intermediate=256)


def words() -> list[str]:
    """The tokenizer's word list: the project's base words, then the scene words they lack."""
    base = list(BASE_WORDS)
    lower = {w.lower() for w in base}
    return base + [w for w in scenes.vocabulary() if w not in lower]


def build_tokenizer(word_list=None):
    return word_tokenizer(word_list or words())


def load_tokenizer(directory):
    """The word-level tokenizer saved next to the weights (ids must match the embedding rows).

    The saved file, not a fresh `word_tokenizer()`, so that a later change to the project's base
    vocabulary or special tokens cannot silently renumber the words the model was trained on.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def build_processor(tokenizer):
    return llava_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE)


def build_config(tokenizer, arch: dict | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    a = dict(ARCH, **(arch or {}))
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=a["text_hidden"],
                       intermediate_size=a["text_intermediate"], num_hidden_layers=a["text_layers"],
                       num_attention_heads=a["text_heads"], num_key_value_heads=a["text_heads"],
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=a["vision_hidden"], intermediate_size=a["vision_hidden"] * 4,
                              num_hidden_layers=a["vision_layers"], num_attention_heads=a["vision_heads"],
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    # vision_feature_layer=-1: the tower's last layer feeds the projector (with -2 it would be wasted).
    return LlavaConfig(text_config=text, vision_config=vision,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       projector_hidden_act="gelu", vision_feature_layer=-1,
                       vision_feature_select_strategy="default",
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, tie_word_embeddings=False)


def finish(model, config, attn_implementation: str = "sdpa"):
    """Attention backend and the generation ids, so generate() stops at </s>."""
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model


def build_model(tokenizer, seed: int = 0, arch: dict | None = None):
    """A freshly initialised shapes-llava (float32, train mode)."""
    from transformers import LlavaForConditionalGeneration

    config = build_config(tokenizer, arch)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return finish(LlavaForConditionalGeneration(config), config)


def save(model, tokenizer, directory: Path, meta: dict, dtype=torch.float16):
    """Write config.json, model.safetensors (in `dtype`), tokenizer files and shapes.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / (WEIGHTS + ".tmp")), metadata={"format": "pt"})
    (directory / (WEIGHTS + ".tmp")).replace(directory / WEIGHTS)
    (directory / CONFIG).write_text(model.config.to_json_string())
    tokenizer.save_pretrained(str(directory))
    meta = dict(meta, words=words(), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    (directory / META).write_text(json.dumps(meta, indent=1) + "\n")


def load_shapes_llava(directory: Path | str | None = None, attn_implementation: str = "sdpa"):
    """(model, processor) from the shipped files; float32, eval mode, offline (no Hub access).

    `directory` defaults to $TRANSPRUNE_SHAPES_DIR if set, else the package's assets folder.
    """
    directory = Path(directory or os.environ.get("TRANSPRUNE_SHAPES_DIR") or ASSET_DIR)
    missing = [name for name in (WEIGHTS, CONFIG, "tokenizer.json") if not (directory / name).is_file()]
    if missing:
        raise ModelLoadError(f"The shapes-llava files {missing} are missing from {directory}. Train and export "
                             "them with `python -m transprune.shapes.train`, or pick tiny-llava.")
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    try:
        tokenizer = load_tokenizer(directory)
        config = LlavaConfig.from_dict(json.loads((directory / CONFIG).read_text()))
        if (tokenizer.convert_tokens_to_ids("<image>") != config.image_token_index
                or tokenizer.eos_token_id != config.text_config.eos_token_id
                or len(tokenizer) != config.text_config.vocab_size):
            raise ValueError("the saved tokenizer does not match config.json (image/eos ids or vocabulary size)")
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        model = LlavaForConditionalGeneration(config)
        state = {k: v.float() for k, v in load_file(str(directory / WEIGHTS)).items()}
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"Could not load shapes-llava from {directory}: {error}") from error
    model = finish(model.float().eval(), config, attn_implementation)
    return model, build_processor(tokenizer)
