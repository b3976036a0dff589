"""TransPrune: alpha * TTV (accumulated) + (1 - alpha) * IGA (instruction-guided attention)."""

from __future__ import annotations

from .. import scoring
from .base import Method, Needs, StageContext, StageScores


class TransPrune(Method):
    name = "transprune"
    label = "TransPrune"
    accumulates_ttv = True
    # "low" is inferred: the paper prints only its TFLOPs (1.19 on LLaVA-1.5-7B); ratios .5/.25/.0625
    # at layers 7/9/12 reproduce that figure. "off" keeps everything (the hooks run, nothing is pruned).
    presets = {
        "high": dict(prune_layers=(7, 9, 12), keep_ratios=(0.875, 0.625, 0.125),
                     accumulation_layers=tuple(range(7, 13)), alpha=0.5),
        "low": dict(prune_layers=(7, 9, 12), keep_ratios=(0.5, 0.25, 0.0625),
                    accumulation_layers=tuple(range(7, 13)), alpha=0.5),
        "off": dict(prune_layers=(7, 9, 12), keep_ratios=(1.0, 1.0, 1.0),
                    accumulation_layers=tuple(range(7, 13)), alpha=0.5),
    }
    # The app: TransPrune and its two single criteria, on the High / Low presets above.
    app_choices = {"TransPrune": "transprune", "TTV-only": "ttv", "IGA-only": "iga"}
    app_budgets = "transprune_schedule"

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
