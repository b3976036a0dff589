"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025): before the language model, keep the most diverse subset of each image's
projected visual tokens, a max-min diversity problem solved greedily.

What the released code does (the authors' LLaVA patch; the same algorithm is in ModelTC/llmc
`token_reduction/divprune.py`), on the tokens the projector gives the language model
(`inputs_embeds` at the image), and what this module reproduces:

- distance: d(i, j) = 1 - cos(x_i, x_j) over the projected tokens x (float32 here; the release
  uses the model's dtype);
- first token: the one farthest from its nearest other token (the second-smallest entry of its
  column of d, the smallest being its own 0);
- then, T - 1 times: the token whose distance to the nearest already-chosen token is largest;
- T = round(rate * N) (`threshold_terms`); the kept tokens go to the LLM in their original order,
  so positions are renumbered ("compact"), as in the release.

One deviation: a chosen token is excluded from later picks. The release leaves it in, where its
own distance ~0 loses every comparison unless all remaining tokens duplicate a chosen one (then the
release would choose it again and keep fewer than T tokens).

Trace: `Stage.score` is the order of choice, (T - rank) / T for kept tokens, 0 for the others.
Presets "divprune-64|128|192" (T of LLaVA-1.5's 576; the share carries over to other grids) and
stacks such as "divprune-128+high". Families: see `transprune.methods.preselect`.
"""

from __future__ import annotations

import torch

from .preselect import SubsetStage


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """(N, N) 1 - cos(x_i, x_j) in float32."""
    unit = features.float() / features.float().norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.T


def max_min_order(distance: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's greedy max-min selection: (keep,) token indices in order of choice."""
    count = distance.shape[0]
    chosen = torch.zeros(count, dtype=torch.bool, device=distance.device)
    order = []
    # First: the token farthest from its nearest neighbour (second-smallest of its column).
    gain = distance.topk(2, dim=0, largest=False).values[1] if count > 1 else distance[0]
    for step in range(keep):
        pick = int(gain.masked_fill(chosen, float("-inf")).argmax())
        order.append(pick)
        chosen[pick] = True
        # Distance of every token to the nearest chosen one, updated with the new pick (min is exact).
        gain = distance[pick] if step == 0 else torch.minimum(gain, distance[pick])
    return torch.tensor(order, dtype=torch.long, device=distance.device)


class DivPrune(SubsetStage):
    """Max-min diversity over each image's projected tokens (see the module docstring)."""
    name = "divprune"
    label = "DivPrune"
    first_layer_twin = "divprune_first_layer"   # other families: the same choice at layer 0 (methods.first_layer)
    # Before the language model at 64 / 128 / 192 of LLaVA-1.5's 576 tokens (the share carries over to other
    # patch grids); stack like VisionZip, e.g. "divprune-128+high".
    presets = {"divprune-192": dict(pre_llm_keep=192 / 576), "divprune-128": dict(pre_llm_keep=128 / 576),
               "divprune-64": dict(pre_llm_keep=64 / 576)}

    def choose(self, features, instruction, keep):
        order = max_min_order(cosine_distances(features), keep)
        score = torch.zeros(len(features), dtype=torch.float32, device=features.device)
        score[order] = (keep - torch.arange(keep, device=features.device)).float() / keep
        return order.sort().values, score
