"""A decoder layer run by hand for the slow reimplementations in the tests (test_sparsevlm, test_dart):
its own causal mask and KV cache, no pruning hooks, so the runner is compared with something independent."""

from __future__ import annotations

import torch


def layer_step(language, cache_kwargs: dict, layer, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """`layer` of the Llama-style `language` model on `hidden` (B, n, d) at `position_ids`, caching its keys
    and values through `cache_kwargs` ({cache keyword: cache}); a causal mask over the n new tokens."""
    cos_sin = language.rotary_emb(hidden, position_ids)
    n = hidden.shape[1]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None] if n > 1 else None
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=cos_sin,
                              attention_mask=mask, **cache_kwargs)
    mid = hidden + attn
    return mid + layer.mlp(layer.post_attention_layernorm(mid))
