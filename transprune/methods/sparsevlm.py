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
   averaged per cluster; the cluster means are inserted right after the kept visual tokens and
   are candidates of the later stages like the others.                -> `recycle`, `SparseVLM.insert`
   Deviations, all outside the release's single-image batch-1 compact-position setting: clusters
   are formed per span (one image or video; the release has one), a recycled token's position in
   "original" mode is its cluster centre's (the release renumbers, "compact", where it is simply
   the next one), and the density noise of DPC-KNN comes from a generator seeded with the
   config's `seed` instead of the global RNG, so runs repeat.

Cost. Analytic prefill TFLOPs on LLaVA-1.5-7B (`transprune.flops`, visual tokens only, the
paper's accounting, recycled tokens included): see `tests/test_sparsevlm.py` and the README's
table; TransPrune's paper table prints 1.57 TFLOPs for SparseVLM, which no released budget gives.

Trace: a recycled token gets the next visual index after the prompt's N (N, N+1, ... in order of
creation); `Stage.inserted` lists them and `Stage.sources` what each was made from.
"""

from __future__ import annotations

import torch

from .. import scoring
from .base import Insertion, Method, Needs, StageContext, StageScores

RECYCLE_SHARE = 0.3          # share of the deleted tokens considered for recycling
RECYCLE_CLUSTER_DIVISOR = 10  # clusters = int(recycled / 10) + 1

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
    return scoring.attention_to_columns(query, key, rater_slots, key_valid, candidate_slots, scaling)


def rank_keep(relation: torch.Tensor, scale: float, bias: float) -> int:
    """Released rank-adaptive count: c if rank(P) == c, else min(int(rank * scale + bias), c - 1)."""
    candidates = relation.shape[1]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if candidates - rank == 0:
        return candidates
    return min(int(rank * scale + bias), candidates - 1)


def recycle(hidden: torch.Tensor, scores: torch.Tensor, deleted: torch.Tensor, generator=None) -> Insertion:
    """The recycled tokens of one span at one stage.

    hidden: (c, d) the pruning layer's output at the candidates; scores: (c,); deleted: indices
    into the candidates (non-empty). The top int(0.3 * len(deleted)) + 1 deleted tokens by score
    are clustered into k = int(m / 10) + 1 groups (`dpc_knn`); each recycled token is its group's
    mean and borrows its centre's position.
    """
    count = min(int(len(deleted) * RECYCLE_SHARE) + 1, len(deleted))
    members = deleted[scores[deleted].topk(count).indices]
    clusters = int(count / RECYCLE_CLUSTER_DIVISOR) + 1
    points = hidden[members][None]
    centres, assign = dpc_knn(points, clusters, generator)
    return Insertion(tokens=merge(points, assign, clusters)[0], anchors=members[centres[0]],
                     sources=[members[assign[0] == j] for j in range(clusters)])


def dpc_knn(x: torch.Tensor, clusters: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering as released: x (B, N, C) -> (centres (B, k) token indices, assign (B, N) cluster of each).

    Distances are Euclidean / sqrt(C); density = exp(-mean of squared distances to the `clusters`
    nearest tokens (itself included)) + uniform noise * 1e-6 (released; pass a generator for
    determinism); delta = distance to the nearest denser token (the largest distance for the
    densest); centres = top `clusters` of delta * density; every token joins its nearest centre
    (a centre joins itself).
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
    return centres, assign


def merge(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """(B, clusters, C): the mean of each cluster's tokens, as released (sum / (count + 1e-6))."""
    batch, n, channels = x.shape
    merged = x.new_zeros(batch, clusters, channels, dtype=torch.float32)
    merged.scatter_add_(1, assign[:, :, None].expand(-1, -1, channels), x.float())
    counts = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assign, torch.ones(batch, n,
                                                                                              device=x.device))
    return (merged / (counts[:, :, None] + 1e-6)).to(x.dtype)


def cluster_and_merge(x: torch.Tensor, clusters: int, generator=None) -> torch.Tensor:
    """The released `cluster_and_merge`: x (B, N, C) -> (B, clusters, C) cluster means."""
    _, assign = dpc_knn(x, clusters, generator)
    return merge(x, assign, clusters)


def recycled_count(deleted: int) -> int:
    """How many tokens `recycle` makes from `deleted` deleted tokens (0 for none)."""
    if deleted <= 0:
        return 0
    return int(min(int(deleted * RECYCLE_SHARE) + 1, deleted) / RECYCLE_CLUSTER_DIVISOR) + 1


class SparseVLM(Method):
    """Text-rater attention of the pruning layer itself; released per-stage budgets (see module doc)."""
    name = "sparsevlm"
    label = "SparseVLM"
    # The released LLaVA budgets: after 1-indexed layers 3, 7, 16 keep 300/200/110 ("192"),
    # 303/110/36 ("128") or 66/30/17 ("64") of N = 576 (see the module docstring).
    presets = {
        "sparsevlm": dict(prune_layers=(3, 7, 16), keep_ratios=(300 / 576, 200 / 576, 110 / 576),
                          accumulation_layers=(), positions="compact"),
        "sparsevlm-128": dict(prune_layers=(3, 7, 16), keep_ratios=(303 / 576, 110 / 576, 36 / 576),
                              accumulation_layers=(), positions="compact"),
        "sparsevlm-64": dict(prune_layers=(3, 7, 16), keep_ratios=(66 / 576, 30 / 576, 17 / 576),
                             accumulation_layers=(), positions="compact"),
    }

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

    def insert(self, ctx: StageContext, scores: StageScores, kept: torch.Tensor) -> Insertion | None:
        """Recycle the deleted tokens of each span (see `recycle`)."""
        is_deleted = torch.ones(len(ctx.candidates), dtype=torch.bool, device=ctx.candidates.device)
        is_deleted[kept] = False
        deleted = is_deleted.nonzero().flatten()
        if len(deleted) == 0:
            return None
        hidden = ctx.output()
        generator = torch.Generator(device=hidden.device).manual_seed(self.config.seed)
        spans = ctx.candidate_spans[deleted]
        parts = [recycle(hidden, scores.score, deleted[spans == span], generator) for span in spans.unique()]
        return Insertion(tokens=torch.cat([p.tokens for p in parts]), anchors=torch.cat([p.anchors for p in parts]),
                         sources=[s for p in parts for s in p.sources])

    @classmethod
    def inserted_count(cls, candidates: int, kept: int) -> int:
        return recycled_count(candidates - kept)


class SparseVLMRank(SparseVLM):
    """SparseVLM with the rank-adaptive deletion count: keep min(int(rank(P) * scale + bias), c - 1)."""
    name = "sparsevlm_rank"
    label = "SparseVLM (rank-adaptive)"
    presets = {}                          # none: the app and the eval table do not offer it
    # The shared tests run it at SparseVLM's released "192" schedule; it decides its own counts.
    test_config = dict(prune_layers=(3, 7, 16), keep_ratios=(300 / 576, 200 / 576, 110 / 576),
                       accumulation_layers=(), positions="compact")
    adaptive_keep = True
    scale = 13.5
    bias = 0.0

    def score(self, ctx: StageContext) -> StageScores:
        relation = self.relation(ctx)
        return StageScores(score=relation.mean(dim=0), keep=rank_keep(relation, self.scale, self.bias))
