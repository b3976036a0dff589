"""An offline Hugging Face hub cache of real checkpoints, for rehearsing the user's `from_pretrained` path.

../shared/fixtures/hf-hub/<org>--<name>/ (the sibling `shared` folder of the checkout, or the folder
$TRANSPRUNE_HUB_FIXTURES names) holds a real
checkpoint's files other than its weights. `build_hub_cache(root)` copies each folder as it is into
the hub cache layout under `root/hub` and writes random weights next to it, built from the real
config at a reduced width: every value the processor or the prompt depends on stays as it is
(vocabulary, special-token ids, image size, patch size, merge/scale factors, the image token count)
and so does the decoder depth, so the presets resolve to the same layers as on the real model.
Only config.json (reduced widths) and the weights are written; the generation config, tokenizer,
chat template and processor files are the checkpoint's own.

With `HF_HUB_CACHE=root/hub` (or `HF_HOME=root`) and `HF_HUB_OFFLINE=1`,
`from_pretrained("llava-hf/llava-1.5-7b-hf")` resolves exactly as for a user who downloaded it.

Tests take this through conftest's `rehearsal_hub` fixture, which builds the cache once a session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# TRANSPRUNE_HUB_FIXTURES points elsewhere, e.g. from a temporary clone (the fresh-install check) whose
# parent folder has no `shared`.
FIXTURES = Path(os.environ.get("TRANSPRUNE_HUB_FIXTURES")
                or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hf-hub")
# Any 40-hex commit: refs/main points at it, as after a real download.
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"

# Reduced widths: small enough that a 900-token prefill of a 30-layer decoder takes milliseconds on a CPU.
TEXT_HIDDEN, TEXT_HEADS, TEXT_KV_HEADS = 64, 4, 2
VISION_HIDDEN, VISION_HEADS, VISION_LAYERS = 32, 2, 2


@dataclass(frozen=True)
class Rehearsed:
    """One rehearsed checkpoint: its registry name, Hub id, and what its real processor gives a 640x480 photo."""
    name: str
    repo_id: str
    visual_tokens_640x480: int

    @property
    def folder(self) -> Path:
        return FIXTURES / self.repo_id.replace("/", "--")


# The visual-token counts are the real processors' (fixtures/hf-hub/README.md): LLaVA-1.5's CLIP at 336 px
# gives 24 x 24; SmolVLM-256M splits a 640x480 photo into 4x3 tiles of 512 px + the global view, 64 tokens
# each; Qwen2.5-VL-7B resizes it to 644x476 px, 46 x 34 patches of 14 px merged 2x2.
REHEARSED = (
    Rehearsed("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 576),
    Rehearsed("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", 13 * 64),
    Rehearsed("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 23 * 17),
)


def fixtures_present() -> bool:
    return all(item.folder.is_dir() for item in REHEARSED)


def snapshot_dir(hub: Path, repo_id: str) -> Path:
    return hub / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SNAPSHOT


def _reduce_text(text, vocab_size: int | None = None):
    """A text config at the reduced width; depth, vocabulary, special ids and RoPE theta stay."""
    text.hidden_size, text.intermediate_size = TEXT_HIDDEN, 2 * TEXT_HIDDEN
    text.num_attention_heads, text.num_key_value_heads = TEXT_HEADS, TEXT_KV_HEADS
    text.head_dim = TEXT_HIDDEN // TEXT_HEADS
    if vocab_size is not None:
        text.vocab_size = vocab_size
    return text


def _reduce_vision(vision):
    vision.hidden_size, vision.intermediate_size = VISION_HIDDEN, 2 * VISION_HIDDEN
    vision.num_attention_heads, vision.num_hidden_layers = VISION_HEADS, VISION_LAYERS
    return vision


def reduced_config(repo_id: str, folder: Path):
    """The checkpoint's config with reduced widths (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "llava":
        _reduce_text(config.text_config)
        _reduce_vision(config.vision_config)          # image_size 336, patch 14: 576 tokens stay
        config.vision_config.projection_dim = VISION_HIDDEN
    elif config.model_type == "idefics3":
        _reduce_text(config.text_config)
        _reduce_vision(config.vision_config)          # image_size 512, patch 16, scale_factor 4: 64 a tile
    elif config.model_type == "qwen2_5_vl":
        _reduce_text(config.text_config)
        head_dim = TEXT_HIDDEN // TEXT_HEADS
        # M-RoPE splits head_dim / 2 frequencies over (t, h, w) as the real 16/24/24 of 64 does.
        section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
        config.text_config.rope_parameters = dict(config.text_config.rope_parameters, mrope_section=section)
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size, vision.num_heads = VISION_HIDDEN, 2 * VISION_HIDDEN, VISION_HEADS
        vision.depth, vision.fullatt_block_indexes = VISION_LAYERS, [VISION_LAYERS - 1]
        vision.out_hidden_size = TEXT_HIDDEN          # patch 14, merge 2, temporal 2, window 112 stay
    else:
        raise ValueError(f"No reduction rule for {repo_id} (model_type {config.model_type!r}).")
    return config


def _write_checkpoint(repo_id: str, folder: Path, snapshot: Path, seed: int) -> None:
    import transformers

    for source in folder.iterdir():
        if source.name != "SOURCE.md":
            shutil.copy2(source, snapshot / source.name)
    config = reduced_config(repo_id, folder)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        # The weights and the reduced config; every other file stays the checkpoint's own.
        for name in ["config.json", *(p.name for p in Path(saved).glob("*.safetensors*"))]:
            shutil.copy2(Path(saved) / name, snapshot / name)


def build_hub_cache(root: Path, seed: int = 0) -> Path:
    """A hub cache of every REHEARSED checkpoint under `root/hub`; returns that folder (HF_HUB_CACHE)."""
    hub = Path(root) / "hub"
    for item in REHEARSED:
        snapshot = snapshot_dir(hub, item.repo_id)
        snapshot.mkdir(parents=True, exist_ok=True)
        refs = snapshot.parents[1] / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text(SNAPSHOT)
        _write_checkpoint(item.repo_id, item.folder, snapshot, seed)
    return hub
