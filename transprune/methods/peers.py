"""Peer methods scored through the same interface: FastV, PDrop and a random control."""

from __future__ import annotations

import torch

from .. import scoring
from .base import Method, Needs, StageContext, StageScores


def _last_token_attention(query, key, ctx: StageContext, scaling: float) -> torch.Tensor:
    """Attention of the last prompt token to the candidates, mean over heads."""
    last = torch.tensor([ctx.last_slot], device=query.device)
    return scoring.attention_to_columns(query, key, last, ctx.key_valid, ctx.candidate_slots, scaling)[0]


class FastV(Method):
    """FastV (Chen et al. 2024): after layer K, keep the visual tokens the last prompt token
    attends to most in layer K itself (recomputed as a side pass, so SDPA/FA2 still work)."""
    name = "fastv"
    label = "FastV"
    presets = {"fastv": dict(prune_layers=(2,), keep_ratios=(0.5,), accumulation_layers=(), positions="original")}

    def needs(self) -> Needs:
        return Needs(this_layer_qk=True)

    def score(self, ctx: StageContext) -> StageScores:
        query, key = ctx.this_layer_qk()
        return StageScores(score=_last_token_attention(query, key, ctx, ctx.this_scaling))


class PDrop(Method):
    """PyramidDrop (Xing et al. 2024): at each stage, rank by the last instruction token's
    attention, computed like IGA with the next layer's projections."""
    name = "pdrop"
    label = "PDrop"
    presets = {"pdrop": dict(prune_layers=(8, 16, 24), keep_ratios=(0.5, 0.25, 0.125), accumulation_layers=(),
                             positions="compact")}

    def needs(self) -> Needs:
        return Needs(next_layer_qk=True)

    def score(self, ctx: StageContext) -> StageScores:
        query, key = ctx.next_layer_qk()
        return StageScores(score=_last_token_attention(query, key, ctx, ctx.next_scaling))


class RandomKeep(Method):
    """Uniform random keep at the same schedule: the control every method must beat."""
    name = "random"
    label = "Random"
    presets = {"random": dict(prune_layers=(7, 9, 12), keep_ratios=(0.875, 0.625, 0.125), accumulation_layers=())}
    app_budgets = "transprune_schedule"   # the control runs on TransPrune's High / Low schedules
    control = True                        # listed last in the app

    def score(self, ctx: StageContext) -> StageScores:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + ctx.layer * 1009 + ctx.sample)
        return StageScores(score=torch.rand(len(ctx.candidates), generator=generator))
