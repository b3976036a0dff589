"""SparseVLM (Zhang et al. 2024, "SparseVLM: Visual Token Sparsification for Efficient VLM Inference").

What the authors' released LLaVA code (github.com/Gumpest/SparseVLMs, v1) does, and what this
module reproduces on the runner's per-stage interface:

1. Text raters, once per prompt, from the input embeddings (the first decoder layer's input):
   M = softmax over text tokens of (V @ T^T), V the visual embeddings (N, d), T the embeddings of
   the text after the image (q, d), no scaling; m = mean of M over the visual tokens, (q,); the
   raters are the text tokens with m > mean(m).                                    -> `select_raters`
2. At each pruning layer the layer's own attention (eager weights on its input, as released; we
   recompute it as a side pass with the layer's norm, q/k projections and rotary, so SDPA/FA2 stay
   usable) is averaged over heads; P = its rows at the raters and columns at the alive visual
   tokens, (R, c). Score of a visual token = mean of its column over the raters.   -> `rater_attention`
3. How many to keep. Released budgets (`score.py`, layers 2, 6, 15 counted from 0, i.e. on the
   output of 1-indexed layers 3, 7, 16 of LLaVA-1.5-7B): 192 -> keep 300 / 200 / 110, 128 -> 303 /
   110 / 36, 64 -> 66 / 30 / 17, each capped at c - 1. The presets "sparsevlm" (= 192),
   "sparsevlm-128" and "sparsevlm-64" encode them as keep ratios of N = 576 (scaled to other N and
   depths like every preset). Rank-adaptive mode (the paper's Sec. 3.2, released as
   `attn_postprocess_rank`): r = rank(P) (torch.linalg.matrix_rank in float32); if r == c keep all,
   else keep min(int(r * scale + bias), c - 1).                                     -> `rank_keep`
   Method name "sparsevlm_rank" selects it (scale 13.5, bias 0 by default: the only values we found,
   the defaults of a public MiniGPT-4 port of this code; the `--scale/--bias` of the authors' LLaVA
   eval scripts were not available to us, and their current main branch uses the fixed budgets
   above). The count comes back in StageScores.keep; the trace's keep_ratio then is the config's,
   not the count, and flops.schedule_tokens cannot predict it (trace_tflops can).
4. Token recycling: of the deleted tokens, the int(0.3 * deleted) + 1 with the highest scores are
   clustered (DPC-KNN, k = number of clusters = int(m / 10) + 1) on the pruning layer's output and
   averaged per cluster; the cluster means are inserted after the kept visual tokens.
   -> `recycle` computes exactly these tokens. The runner cannot insert them: its sequence is always
   a subset of the original positions (KV cache lengths, masks, position ids and traces are indexed
   by original position), so SparseVLM here runs deletion only. See the module's `RECYCLING_GAP`.

Cost. Analytic prefill TFLOPs on LLaVA-1.5-7B (`transprune.flops`, visual tokens only, the
paper's accounting): 1.33 / 0.92 / 0.52 for the released 192 / 128 / 64 budgets, deletion only.
TransPrune's paper table prints 1.57 TFLOPs for SparseVLM; no released budget gives that figure,
and the recycled tokens (not inserted here) do not explain the gap: inserted and never deleted
again they add at most 9 + 4 + 3 = 16 tokens per layer on the 192 budget, 1.41 TFLOPs.

Trace: kept indices are into the original visual tokens as for every method; with recycling they
would also need entries for tokens that have no original index (see RECYCLING_GAP).
"""

from __future__ import annotations

import torch

from .. import scoring
from .base import Method, Needs, StageContext, StageScores

RECYCLE_SHARE = 0.3          # share of the deleted tokens considered for recycling
RECYCLE_CLUSTER_DIVISOR = 10  # clusters = int(recycled / 10) + 1

RECYCLING_GAP = (
    "Recycled tokens are new tokens (cluster means of deleted tokens' hidden states), inserted "
    "after the kept visual tokens at the pruning layer. The runner would need: a view slot kind "
    "for tokens without an original position (transprune.sequence.SequenceView.seq_index maps "
    "every slot to an original position); their position ids (compact: next after the kept visual "
    "tokens; original: none exists); their mask rows/columns and KV-cache entries in every later "
    "layer, including decode steps; a hook point that can return a hidden state longer than a "
    "gather (today the pruning layer's output is sequence.gather_slots of its own rows); and trace "
    "entries for candidates that are recycled tokens at later stages (the release scores them "
    "with the others).")


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices (into `text`) of SparseVLM's text raters.

    visual: (N, d), text: (q, d) input embeddings. m_j = mean_i softmax_j(visual @ text^T)_ij;
    raters = {j : m_j > mean(m)}. Computed in float32. Returns a sorted LongTensor (never empty:
    if no token is above the mean, i.e. all are equal, every text token rates).
    """
    relevance = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)
    raters = (relevance > relevance.mean()).nonzero().flatten()
    return raters if len(raters) else torch.arange(len(text), device=text.device)


def rater_attention(query, key, rater_slots, key_valid, candidate_slots, scaling) -> torch.Tensor:
    """P: (R, c) head-averaged attention of the raters (query rows) to the candidates (columns).

    query (H, n, hd), key (Hkv, n, hd) of one sample after rotary; softmax over all visible keys.
    """
    probs = scoring.attention_probs(query, key, rater_slots, key_valid, scaling).mean(dim=0)
    return probs[:, candidate_slots]


def rank_keep(relation: torch.Tensor, scale: float, bias: float) -> int:
    """Released rank-adaptive count: c if rank(P) == c, else min(int(rank * scale + bias), c - 1)."""
    candidates = relation.shape[1]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if candidates - rank == 0:
        return candidates
    return min(int(rank * scale + bias), candidates - 1)


def recycle(hidden: torch.Tensor, scores: torch.Tensor, deleted: torch.Tensor, generator=None):
    """The recycled tokens of one stage: (clusters (k, d), members: the deleted-token indices used).

    hidden: (c, d) the pruning layer's output at the candidates; scores: (c,); deleted: indices
    into the candidates. The top int(0.3 * len(deleted)) + 1 deleted tokens by score are clustered
    into k = int(m / 10) + 1 groups by `cluster_and_merge`.
    """
    if len(deleted) == 0:
        return hidden.new_zeros(0, hidden.shape[-1]), deleted
    count = min(int(len(deleted) * RECYCLE_SHARE) + 1, len(deleted))
    members = deleted[scores[deleted].topk(count).indices]
    clusters = int(count / RECYCLE_CLUSTER_DIVISOR) + 1
    return cluster_and_merge(hidden[members][None], clusters, generator)[0], members


def cluster_and_merge(x: torch.Tensor, clusters: int, generator=None) -> torch.Tensor:
    """DPC-KNN clustering and per-cluster mean, as released: x (B, N, C) -> (B, clusters, C).

    Distances are Euclidean / sqrt(C); density = exp(-mean of squared distances to the `clusters`
    nearest tokens (itself included)) + uniform noise * 1e-6 (released; pass a generator for
    determinism); delta = distance to the nearest denser token (the largest distance for the
    densest); centres = top `clusters` of delta * density; every token joins its nearest centre
    (a centre joins itself); a cluster's token is the mean of its members.
    """
    batch, n, channels = x.shape
    dist = torch.cdist(x.float(), x.float()) / channels ** 0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=generator, device=x.device) * 1e-6
    denser = (density[:, None, :] > density[:, :, None]).float()
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values
    centres = (delta * density).topk(clusters, dim=-1).indices                   # (B, k)
    assign = dist.gather(1, centres[:, :, None].expand(-1, -1, n)).argmin(dim=1)  # (B, N)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(batch, -1))
    merged = x.new_zeros(batch, clusters, channels, dtype=torch.float32)
    merged.scatter_add_(1, assign[:, :, None].expand(-1, -1, channels), x.float())
    counts = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assign, torch.ones(batch, n,
                                                                                              device=x.device))
    return (merged / (counts[:, :, None] + 1e-6)).to(x.dtype)


class SparseVLM(Method):
    """Text-rater attention of the pruning layer itself; released per-stage budgets (see module doc)."""
    name = "sparsevlm"
    label = "SparseVLM"

    def needs(self) -> Needs:
        # The input embeddings (raters) and each pruning layer's q/k on its own input (its attention).
        return Needs(this_layer_qk=True, input_embeddings=True)

    def raters(self, ctx: StageContext) -> torch.Tensor:
        visual, text = ctx.input_embeddings()
        return select_raters(visual, text)

    def relation(self, ctx: StageContext) -> torch.Tensor:
        query, key = ctx.this_layer_qk()
        rater_slots = ctx.instruction_slots[self.raters(ctx)]
        return rater_attention(query, key, rater_slots, ctx.key_valid, ctx.candidate_slots, ctx.this_scaling)

    def score(self, ctx: StageContext) -> StageScores:
        return StageScores(score=self.relation(ctx).mean(dim=0))


class SparseVLMRank(SparseVLM):
    """SparseVLM with the rank-adaptive deletion count: keep min(int(rank(P) * scale + bias), c - 1)."""
    name = "sparsevlm_rank"
    label = "SparseVLM (rank-adaptive)"
    scale = 13.5
    bias = 0.0

    def score(self, ctx: StageContext) -> StageScores:
        relation = self.relation(ctx)
        return StageScores(score=relation.mean(dim=0), keep=rank_keep(relation, self.scale, self.bias))
