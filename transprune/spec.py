"""ModelSpec: one registered model (a Hub checkpoint or an offline build), as its family's adapter declares it.

A family lists its models in its adapter (`Adapter.models`); `transprune.adapters.register` fills
in `family` and `video` from the adapter, and `transprune.models.REGISTRY` collects them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class ModelSpec:
    name: str                              # the registry name: `transprune.models.load(name)`
    label: str                             # shown to people
    family: str = ""                       # filled in from the adapter that declares it ("" = a bare Hub id)
    size: str = "?"                        # parameter count as people write it: "7B", "0.9M"
    checkpoint: str | None = None          # Hugging Face model id; None for built-in offline models
    builder: Callable | None = None        # () -> (model, processor) for offline models
    video: bool = False                    # filled in from the adapter: the family takes video
    description: str = ""
    # Position mode used whenever a config leaves `positions` unset (None: the family's default, which
    # for 1-D RoPE is "compact", as the released code does). Say why in `positions_reason`.
    positions: str | None = None
    positions_reason: str = ""
    # Held-out accuracy per setting, measured by `python -m transprune.eval` (a JSON in the package).
    heldout: str | None = None

    @property
    def offline(self) -> bool:
        return self.checkpoint is None

    @property
    def heldout_path(self) -> Path | None:
        return Path(__file__).resolve().parent / self.heldout if self.heldout else None

    @property
    def display_name(self) -> str:
        """"LLaVA-1.5-7B · 7B · from the Hub"; a built-in model says nothing more than its size (a
        phone's dropdown holds ~40 characters: "Tiny Video-LLaVA (random weights) · 0.9M")."""
        return f"{self.label} · {self.size}" + ("" if self.offline else " · from the Hub")
