"""TransPrune: alpha * TTV (accumulated) + (1 - alpha) * IGA (instruction-guided attention)."""

from __future__ import annotations

from .. import scoring
from .base import Method, Needs, StageContext, StageScores


class TransPrune(Method):
    name = "transprune"
    label = "TransPrune"
    accumulates_ttv = True

    @classmethod
    def check_config(cls, config):
        if config.effective_alpha > 0 and not config.effective_accumulation_layers:
            return "TransPrune with alpha > 0 needs accumulation_layers at or before the pruning layers."
        return None

    def needs(self) -> Needs:
        return Needs(ttv_layers=frozenset(self.config.effective_accumulation_layers), next_layer_qk=True)

    def score(self, ctx: StageContext) -> StageScores:
        query, key = ctx.next_layer_qk()
        iga = scoring.iga(query, key, ctx.instruction_slots, ctx.key_valid, ctx.candidate_slots, ctx.next_scaling)
        ttv = scoring.normalize(ctx.ttv_acc.float())
        return StageScores(score=scoring.combine(ctx.ttv_acc, iga, self.config.effective_alpha), ttv=ttv, iga=iga)
