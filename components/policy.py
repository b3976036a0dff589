"""App policy: which models this app offers, how they are labelled, and what a CPU-only Space changes.

`ModelPolicy` is one part of `components.engine.Engine` (the others: `components.loading`, and the
comparison in `components.engine`); it reads `self.settings`, `self.device` and `self.unavailable`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from transprune.models import REGISTRY

from .hub import HUB_ID

# The offline models tried, in order, when no model is named (the first that loads wins).
OFFLINE_DEFAULTS = ("shapes-llava", "tiny-llava")
# The default of a CPU-only Space that reaches the Hub, chosen by measurement (scripts/cpu_candidates.py;
# table and sources in docs/cpu_space.md; full-size architectures, random weights, a 640x480 photo, one
# thread of a shared Xeon, process CPU seconds). SmolVLM-256M with one 512-px view (CPU_PROCESSOR_KWARGS):
# a click (Engine.compare, 32 new tokens, 1 timing repeat) took 12.5-12.8 s (7.5-7.6 s wall with 2
# threads in a quiet spell), and High still shows on the language model's prefill (64 -> 8 visual
# tokens, 251 -> 177 ms). The others miss the free tier's 20 s:
# with the checkpoint's 13 tiles the vision tower alone takes 26 s per prefill (~114 s a click);
# SmolVLM-500M with one view decodes at half the speed (18.3 s a click, 29 s with 3 repeats);
# LLaVA-OneVision-0.5B's 400M-parameter SigLIP-so400m tower over AnyRes crops makes a prefill 50 s
# (19 s with a single crop), ~177 s a click (76 s). Peak RSS 1.5 GB (float32) of the Space's 16 GB.
CPU_SPACE_DEFAULT = "smolvlm-256m"
# Processor settings of registry models on a CPU (passed to AutoProcessor.from_pretrained). SmolVLM's
# vision tower, run once per 512-px tile, is most of a CPU prefill: a 640x480 photo makes 13 tiles
# (832 visual tokens) with the checkpoint's splitting, one without it (64 tokens).
CPU_PROCESSOR_KWARGS = {
    "smolvlm-256m": {"do_image_splitting": False},
    "smolvlm-500m": {"do_image_splitting": False},
}
# "Timing repeats" preset on a CPU-only Space (3 elsewhere): each repeat adds a baseline + pruned prefill
# pair (~4.3 s on one core for the default above: 21 s a click with 3 repeats, 12.5 s with 1).
CPU_SPACE_REPEATS = 1
DEFAULT_REPEATS = 3


@dataclass
class Settings:
    """App policy. allowed_models None = every registered model plus any Hub id of a supported
    family; a tuple = only those registered names (Space mode uses the whole registry)."""
    allowed_models: tuple[str, ...] | None = None
    device: str | None = None
    cache_size: int = 2


class ModelPolicy:
    """Which models may load, their dropdown labels, the video input, and the CPU-Space presets."""
    settings: Settings
    device: str
    unavailable: dict[str, str]

    def allowed(self, name: str) -> bool:
        if self.settings.allowed_models is not None:
            return name in self.settings.allowed_models
        return name in REGISTRY or bool(HUB_ID.match(name))

    def model_names(self) -> list[str]:
        return list(self.settings.allowed_models or REGISTRY)

    def label(self, name: str) -> str:
        spec = REGISTRY.get(name)
        text = spec.display_name if spec else f"{name} (Hugging Face id, downloads from the Hub)"
        return text + (" — not available here" if name in self.unavailable else "")

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for the model dropdown."""
        return [(self.label(n), n) for n in self.model_names()]

    def video_enabled(self) -> bool:
        """Whether to show the video input: a video-capable model is offered and the library can
        prepare video inputs."""
        return any(REGISTRY[n].video for n in self.model_names() if n in REGISTRY)

    def video_example_model(self) -> str | None:
        """The model the video example switches to: the first offered video model that needs no
        download (a built-in one), else the first offered video model; None when none is offered."""
        video = [name for name in self.model_names() if REGISTRY.get(name) and REGISTRY[name].video]
        return next((name for name in video if REGISTRY[name].offline), video[0] if video else None)

    @property
    def on_cpu_space(self) -> bool:
        """A CPU-only Hugging Face Space (SPACE_ID set, no CUDA device): the free tier's 2 vCPUs."""
        return bool(os.environ.get("SPACE_ID")) and not self.device.startswith("cuda")

    def default_repeats(self) -> int:
        """The "Timing repeats" preset: fewer on a CPU-only Space, where each repeat is a full prefill pair."""
        return CPU_SPACE_REPEATS if self.on_cpu_space else DEFAULT_REPEATS

    def processor_kwargs(self, name: str) -> dict:
        """Processor settings this engine loads `name` with: CPU_PROCESSOR_KWARGS on a CPU, else none."""
        return {} if self.device.startswith("cuda") else CPU_PROCESSOR_KWARGS.get(name, {})
