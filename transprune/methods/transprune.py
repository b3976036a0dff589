"""TransPrune: alpha * TTV (accumulated) + (1 - alpha) * IGA (instruction-guided attention)."""

from __future__ import annotations

from .. import scoring
from .base import Method, StageContext, StageScores


class TransPrune(Method):
    name = "transprune"
    reads_next_layer = True

    def score(self, ctx: StageContext) -> StageScores:
        query, key = ctx.next_layer_qk()
        iga = scoring.iga(query, key, ctx.instruction_slots, ctx.key_valid, ctx.candidate_slots, ctx.next_scaling)
        ttv = scoring.normalize(ctx.ttv_acc.float())
        return StageScores(score=scoring.combine(ctx.ttv_acc, iga, self.config.effective_alpha), ttv=ttv, iga=iga)
