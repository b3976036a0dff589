"""DivPrune and CDPruner where their input rewrite cannot go: the same choice as a stage at layer 0.

`preselect.SubsetStage` works before the language model by handing it fewer image tokens, which
only LLaVA-1.5's single CLIP tile allows (`preselect` says why Qwen2.5-VL, LLaVA-NeXT, SmolVLM...
cannot). But the tokens both methods choose among, the projected visual tokens, are exactly the
first decoder layer's input at the visual positions, and CDPruner's instruction is that input at
the instruction tokens. So on every other family the same choice is an in-LLM stage at layer 0: the
runner prunes the input embeddings before layer 1, with the family's own position handling
(Qwen2.5-VL keeps each kept token's M-RoPE position, "original"; 1-D RoPE families renumber,
"compact", as both releases do on LLaVA).

`resolve.for_model` swaps a pre-LLM stage for its twin (`PreLLMStage.first_layer_twin`) when the
model is not one the rewrite supports and the stage runs alone; the twins have no presets of their
own. Per span (an image, or a video) the twin keeps round(pre_llm_keep * N_span) tokens, the count
the pre-LLM stage keeps of an image.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import Method, Needs, StageContext, StageScores
from .cdpruner import CDPruner
from .divprune import DivPrune
from .preselect import SubsetStage, keep_count


class FirstLayerSubset(Method):
    """A `SubsetStage`'s `choose` applied per span to the first decoder layer's input (see the module docstring)."""
    stage: type[SubsetStage] = SubsetStage
    presets = {}   # reached through the pre-LLM stage's presets (resolve.for_model)
    test_config = dict(prune_layers=(0,), keep_ratios=(64 / 576,))

    @classmethod
    def check_config(cls, config) -> str | None:
        if tuple(config.prune_layers) != (0,):
            return (f"{cls.label} chooses once, before the first decoder layer: use prune_layers=(0,) with one "
                    f"keep ratio, or the preset {cls.stage.name}-64 / -128 / -192.")
        return None

    @classmethod
    def from_pre_llm(cls, config):
        """The twin of a config that runs `cls.stage` alone before the language model."""
        return replace(config, method=cls.name, pre_llm=None, pre_llm_keep=None, prune_layers=(0,),
                       keep_ratios=(config.pre_llm_keep or cls.stage.default_keep,), accumulation_layers=())

    @classmethod
    def planned_keep(cls, span_tokens: int, ratio: float) -> int:
        return keep_count(ratio, span_tokens)

    def needs(self) -> Needs:
        return Needs(input_embeddings=self.stage.uses_instruction)

    def score(self, ctx: StageContext) -> StageScores:
        features = ctx.output()     # at layer 0: the input embeddings at the candidates
        instruction = ctx.input_embeddings()[1] if self.stage.uses_instruction else None
        chooser = self.stage(self.config)
        ratio = self.config.keep_ratios[0]
        score = torch.zeros(len(features), dtype=torch.float32, device=features.device)
        kept = []
        for span in ctx.candidate_spans.unique():
            members = (ctx.candidate_spans == span).nonzero().flatten()
            chosen, span_score = chooser.choose(features[members], instruction, keep_count(ratio, len(members)))
            kept.append(members[chosen])
            score[members] = span_score.float()
        return StageScores(score=score, kept=torch.cat(kept))


class DivPruneFirstLayer(FirstLayerSubset):
    name = "divprune_first_layer"
    label = "DivPrune (layer 0)"
    stage = DivPrune
    presets = {}


class CDPrunerFirstLayer(FirstLayerSubset):
    name = "cdpruner_first_layer"
    label = "CDPruner (layer 0)"
    stage = CDPruner
    presets = {}
