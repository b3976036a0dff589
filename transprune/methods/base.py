"""The interface between the runner and a pruning criterion.

The runner owns the bookkeeping (which tokens are alive, gathers, caches); a method only turns
a StageContext (one sample at one pruning layer) into StageScores over the candidate tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import PruneConfig


@dataclass
class StageContext:
    sample: int
    layer: int                          # 1-indexed pruning layer p
    candidates: torch.Tensor            # (c,) alive visual-token indices into the original visual tokens
    candidate_slots: torch.Tensor       # (c,) their positions in the current sequence
    instruction_slots: torch.Tensor     # (q,) instruction-token positions in the current sequence
    last_slot: int                      # position of the last prompt token
    key_valid: torch.Tensor             # (n,) bool, False at padding
    ttv_acc: torch.Tensor | None        # (c,) accumulated TTV of the candidates (TransPrune only)
    next_layer_qk: Callable             # () -> (q (H, n, hd), k (Hkv, n, hd)) of layer p+1 on layer p's output
    this_layer_qk: Callable             # () -> (q, k) of layer p on its own input (FastV)
    next_scaling: float
    this_scaling: float


@dataclass
class StageScores:
    score: torch.Tensor                 # (c,) higher = keep
    ttv: torch.Tensor | None = None
    iga: torch.Tensor | None = None


class Method:
    """Override `score`; override `layers_needing_input` if the method reads a layer's input, and
    set `reads_next_layer` if `score` calls `ctx.next_layer_qk()` (the runner then lets the next
    layer reuse the keys that side pass projected)."""
    name = "base"
    reads_next_layer = False

    def __init__(self, config: PruneConfig):
        self.config = config

    def layers_needing_input(self) -> set[int]:
        return set()

    def score(self, ctx: StageContext) -> StageScores:
        raise NotImplementedError
