"""The TransPrune math as pure tensor functions (no hooks, no state).

Shapes: B batch, n tokens of the current sequence, d hidden size, H query heads, Hkv key heads.
All scores are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def ttv(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None = None,
        direction: str = "one_minus_cos") -> torch.Tensor:
    """Token Transition Variation of one sub-module (attention or MLP), per token.

    x_in: (B, n, d) what the sub-module received (output of the norm before it);
    x_out: (B, n, d) its output before the residual add; valid: (B, n) bool, False for padding.
    TTV_t = (|x_out_t| / |x_in_t|) * softmax_t(g), g_t = 1 - cos(x_in_t, x_out_t)
    (or 1 - |cos| with direction="one_minus_abs_cos"); the softmax runs over each sample's valid
    tokens. Returns (B, n) float32, 0 at invalid tokens.
    """
    x_in, x_out = x_in.float(), x_out.float()
    # Two norms and one dot product (what cosine_similarity would recompute): this runs on the
    # whole sequence at every accumulation layer, twice, so it is a visible share of scoring.
    norm_in = torch.linalg.vector_norm(x_in, dim=-1).clamp_min(EPS)
    norm_out = torch.linalg.vector_norm(x_out, dim=-1)
    magnitude = norm_out / norm_in
    cosine = torch.linalg.vecdot(x_in, x_out) / (norm_in * norm_out.clamp_min(EPS))
    if direction == "one_minus_cos":
        change = 1.0 - cosine
    elif direction == "one_minus_abs_cos":
        change = 1.0 - cosine.abs()
    else:
        raise ValueError(f"Unknown direction {direction!r}; use 'one_minus_cos' or 'one_minus_abs_cos'.")
    if valid is not None:
        change = change.masked_fill(~valid, float("-inf"))
    result = magnitude * torch.softmax(change, dim=-1)
    if valid is not None:
        result = result.masked_fill(~valid, 0.0)
    return result


def attention_probs(query: torch.Tensor, key: torch.Tensor, query_slots: torch.Tensor,
                    key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention of selected queries over all keys of one sample.

    query: (H, n, hd) and key: (Hkv, n, hd) after rotary embedding; query_slots: (q,) long, the
    query tokens' slots; key_valid: (n,) bool. Key heads are repeated for grouped-query attention.
    Returns (H, q, n) float32 probabilities; key j is visible to query i iff j <= i and valid.
    That is H x q x n floats: the scores use `attention_to_columns`, which never holds all of it.
    """
    return _probs(query, _repeat_heads(key, query.shape[0]), query_slots, key_valid, scaling)


def _repeat_heads(key: torch.Tensor, heads: int) -> torch.Tensor:
    """(H, n, hd) float32 keys: each of the Hkv key heads repeated for its query heads (GQA)."""
    return key.repeat_interleave(heads // key.shape[0], dim=0).float()


def _probs(query, key, query_slots, key_valid, scaling) -> torch.Tensor:
    n = key.shape[1]
    logits = query[:, query_slots].float() @ key.transpose(-1, -2)
    # In place: the same values as out-of-place ops, without two more (H, q, n) tensors.
    logits.mul_(scaling)
    visible = (torch.arange(n, device=key.device)[None, :] <= query_slots[:, None]) & key_valid[None, :]
    logits.masked_fill_(~visible[None], float("-inf"))
    return torch.softmax(logits, dim=-1)


# A long question is thousands of query rows over thousands of keys: all at once, their attention
# is quadratic in the prompt (2 GB at 8k tokens on a 4-head model), far more than the model itself
# needs. `attention_to_columns` takes the rows in blocks of head_dim rows, so a block holds H x
# head_dim x n = n x d logits, as many as one hidden state (the size the model allocates at every
# layer; fewer rows make slow, thin matrix products), or CHUNK_ELEMENTS (4 MiB) if that is more.
CHUNK_ELEMENTS = 2 ** 20


def attention_to_columns(query: torch.Tensor, key: torch.Tensor, query_slots: torch.Tensor,
                         key_valid: torch.Tensor, column_slots: torch.Tensor, scaling: float) -> torch.Tensor:
    """(q, c) float32: `attention_probs` averaged over heads, at the key columns `column_slots` only.

    The softmax still runs over every visible key; queries are taken a block of rows at a time
    (see CHUNK_ELEMENTS), so memory grows with q x c and n x d, never with q x n. Each row is
    computed exactly as `attention_probs` computes it.
    """
    heads, n = query.shape[0], key.shape[1]
    key = _repeat_heads(key, heads)
    rows = max(query.shape[-1], CHUNK_ELEMENTS // (heads * max(n, 1)))
    blocks = [_probs(query, key, query_slots[start:start + rows], key_valid, scaling)[:, :, column_slots].mean(dim=0)
              for start in range(0, len(query_slots), rows)]
    if not blocks:
        return torch.zeros(0, len(column_slots), dtype=torch.float32, device=query.device)
    return torch.cat(blocks)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / (sum(x) + 1e-8): scores summing to one over the candidates."""
    return x / (x.sum() + EPS)


def iga(query: torch.Tensor, key: torch.Tensor, instruction_slots: torch.Tensor, key_valid: torch.Tensor,
        candidate_slots: torch.Tensor, scaling: float) -> torch.Tensor:
    """Instruction-Guided Attention to each candidate visual token of one sample.

    Attention of the instruction queries (mean over heads, then over queries) to the candidate
    keys, normalised to sum to one. Returns (len(candidate_slots),) float32.
    """
    probs = attention_to_columns(query, key, instruction_slots, key_valid, candidate_slots, scaling)
    return normalize(probs.mean(dim=0))


def combine(ttv_acc: torch.Tensor, iga_scores: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """score = alpha * normalize(TTV_acc) + (1 - alpha) * IGA (IGA already normalised)."""
    score = alpha * normalize(ttv_acc.float())
    if alpha < 1.0:
        score = score + (1.0 - alpha) * iga_scores.float()
    return score


def keep_count(num_visual: int, ratio: float) -> int:
    """k_i = floor(N * r_i), computed so that e.g. 576 * 0.875 is exactly 504."""
    return int(num_visual * ratio + 1e-9)


def topk_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending (the kept tokens keep their order)."""
    k = max(0, min(k, score.numel()))
    return torch.topk(score, k, sorted=False).indices.sort().values
