"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, arXiv 2502.11494): keep the visual tokens least duplicated with a few
pivot tokens. No attention weights are read, so the model's attention can stay SDPA or FlashAttention.

What the authors' released LLaVA code (github.com/ZichenWen1/DART, `get_retained_image_token`; the
same algorithm is in ModelTC/llmc `token_reduction/dart.py`) does, once, on the output of decoder
layer K = 2 (1-indexed; the release prunes before the 0-based layer 2), and what this module does:

1. Pivots from the keys of layer K (its own k projection of its input, rotary applied, all key heads
   concatenated): the `pivot_image_token` = 4 visual tokens and the `pivot_text_token` = 4 tokens
   after the image (our instruction tokens) with the largest L1 key norm. (The release repeats the
   key heads for grouped-query attention first; that multiplies every L1 norm by the same factor,
   so the ranking is the same.)                                                  -> `pivots`
2. Duplication is measured on layer K's output after the language model's *final* norm (as
   released: `self.norm(layer_outputs[0])`), by cosine similarity.
3. Budget: `max_num_trunction` M (the released scripts pass 128 for "128 tokens"); each pivot, in
   turn, takes the TOKEN_TOPK = M // (4 + 4) visual tokens least similar to it among those not yet
   taken (image pivots are never candidates). Kept: the image pivots + everything taken; the text
   pivots themselves are text, not kept visual tokens. So the released "128" keeps 4 + 8 * 16 = 132
   visual tokens, "64" keeps 4 + 8 * 8 = 68 and "192" keeps 4 + 8 * 24 = 196; the presets reproduce
   that (`planned_keep`), with M = floor(N_span * keep ratio).                   -> `select`
4. Positions: kept tokens keep their original position ids (the release sets
   `position_ids = keep_indexs`, and decoding continues from the unpruned length): "original".

Choices where the release is silent or accidental:
- the pivots take their turns in a defined order: image pivots by decreasing key norm, then text
  pivots by decreasing key norm (the release iterates a Python `set` of token positions, whose order
  follows the positions' hash buckets);
- several images or videos in one prompt: each span gets its own image pivots and budget, the text
  pivots are shared (the release handles one image);
- a span smaller than the budget, or an instruction shorter than 4 tokens: a pivot takes what is
  left, and there are as many text pivots as instruction tokens (the release would fail in `topk`).

Trace: `Stage.score` is the order of selection (the first pivot highest, tokens not kept 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import scoring
from .base import Method, Needs, StageContext, StageScores

PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4


def key_l1_norms(key: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's keys, all key heads concatenated. key: (Hkv, n, hd) -> (len(slots),)."""
    return key[:, slots].float().abs().sum(dim=(0, 2))


def pivots(norms: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest norms (fewer if there are fewer), largest first."""
    return norms.topk(min(count, len(norms))).indices


def select(visual: torch.Tensor, text_pivot_states: torch.Tensor, image_pivots: torch.Tensor,
           per_pivot: int) -> list[int]:
    """DART's greedy duplication pass over one span (pure function).

    visual: (c, d) the span's tokens after the final norm; text_pivot_states: (t, d) the text pivots'
    states, in their turn order; image_pivots: indices into `visual`, in their turn order. Each pivot
    in turn (image pivots first) takes the `per_pivot` tokens least cosine-similar to it among those
    not taken yet. Returns the kept indices into `visual` in order of selection: image pivots first.
    """
    taken = [int(i) for i in image_pivots]
    available = torch.ones(len(visual), dtype=torch.bool, device=visual.device)
    available[image_pivots] = False
    turns = [visual[i] for i in image_pivots] + list(text_pivot_states)
    for pivot in turns:
        left = available.nonzero().flatten()
        if len(left) == 0:
            break
        similarity = F.cosine_similarity(pivot.float()[None], visual[left].float(), dim=-1)
        picked = left[(-similarity).topk(min(per_pivot, len(left))).indices]
        available[picked] = False
        taken += picked.tolist()
    return taken


def per_pivot_budget(span_tokens: int, ratio: float) -> int:
    """TOKEN_TOPK = M // (pivots), M = floor(N_span * ratio) (the release's max_num_trunction)."""
    return scoring.keep_count(span_tokens, ratio) // (PIVOT_IMAGE_TOKENS + PIVOT_TEXT_TOKENS)


class DART(Method):
    """Duplication-aware pruning after layer 2 (see the module docstring)."""
    name = "dart"
    label = "DART"
    # The released LLaVA settings: once, after layer 2, max_num_trunction M = 128 (default), 64 or 192 of
    # N = 576, 4 image + 4 text pivots; it keeps 4 + 8 * (M // 8) = 132 / 68 / 196 tokens (see the module
    # docstring), original positions as released.
    presets = {
        "dart": dict(prune_layers=(2,), keep_ratios=(128 / 576,), accumulation_layers=(), positions="original"),
        "dart-64": dict(prune_layers=(2,), keep_ratios=(64 / 576,), accumulation_layers=(), positions="original"),
        "dart-192": dict(prune_layers=(2,), keep_ratios=(192 / 576,), accumulation_layers=(), positions="original"),
    }

    @classmethod
    def check_config(cls, config):
        if len(config.prune_layers) != 1:
            return (f"DART prunes once (after layer 2 in the release); give one pruning layer, not "
                    f"{len(config.prune_layers)}.")
        return None

    def needs(self) -> Needs:
        # The pruning layer's own keys (pivots) and its output after the final norm (duplication).
        return Needs(this_layer_qk=True, final_norm_output=True)

    def score(self, ctx: StageContext) -> StageScores:
        _, key = ctx.this_layer_qk()
        ratio = self.config.keep_ratios[self.config.prune_layers.index(ctx.layer)]
        text_turns = pivots(key_l1_norms(key, ctx.instruction_slots), PIVOT_TEXT_TOKENS)
        text_states = ctx.final_norm_output(ctx.instruction_slots[text_turns])
        visual_norms = key_l1_norms(key, ctx.candidate_slots)
        states = ctx.final_norm_output(ctx.candidate_slots)
        order = []
        for span in ctx.candidate_spans.unique():
            members = (ctx.candidate_spans == span).nonzero().flatten()
            image_turns = pivots(visual_norms[members], PIVOT_IMAGE_TOKENS)
            kept = select(states[members], text_states, image_turns, per_pivot_budget(len(members), ratio))
            order += members[kept].tolist()
        score = torch.zeros(len(ctx.candidates), dtype=torch.float32, device=key.device)
        score[order] = torch.arange(len(order), 0, -1, dtype=torch.float32, device=key.device)
        return StageScores(score=score, keep=len(order))

    @classmethod
    def keep_note(cls, ratio: float) -> str | None:
        return f"+ {PIVOT_IMAGE_TOKENS} image pivots"

    @classmethod
    def planned_keep(cls, span_tokens: int, ratio: float) -> int:
        """Image pivots + what every pivot takes (see the module docstring): 132 of 576 at 128/576."""
        pivots_total = PIVOT_IMAGE_TOKENS + PIVOT_TEXT_TOKENS
        return min(span_tokens, PIVOT_IMAGE_TOKENS + pivots_total * per_pivot_budget(span_tokens, ratio))
