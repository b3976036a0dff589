"""What the runner needs to know about a model family, with Llama-style defaults.

A family adapter overrides only what differs: how visual tokens are found, how positions are
embedded, how token indices map onto the image (for overlays).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class Adapter:
    family = "base"
    model_classes: tuple[str, ...] = ()
    default_positions = "compact"
    allowed_positions = ("compact", "original")

    # ----------------------------------------------------------------- structure
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def attn_implementation(self, model: nn.Module) -> str:
        text_config = getattr(model.config, "text_config", model.config)
        return str(getattr(text_config, "_attn_implementation", None) or "eager")

    # ----------------------------------------------------------------- tokens
    def visual_token_ids(self, model: nn.Module) -> list[int]:
        ids = []
        for name in ("image_token_id", "video_token_id"):
            value = getattr(model.config, name, None)
            if value is not None:
                ids.append(int(value))
        return ids

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True at every token the vision path fills in."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.visual_token_ids(model):
            mask |= input_ids == token_id
        return mask

    # ----------------------------------------------------------------- positions
    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for the given position ids, as the language model computes them."""
        return self.language_model(model).rotary_emb(hidden, position_ids=position_ids)

    def apply_rotary(self, attn: nn.Module, query, key, cos, sin):
        module = sys.modules[type(attn).__module__]
        return module.apply_rotary_pos_emb(query, key, cos, sin)

    def project_qk(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings,
                   query_slots: torch.Tensor | None = None):
        """Queries (B, H, n, hd) and keys (B, Hkv, n, hd) that `layer` would compute from `hidden`.

        Runs the layer's input norm, q/k projections (with their biases), q/k norms where the
        model has them, and its rotary embedding; the model's attention kernel is not involved.
        With `query_slots` (B, m) only those queries are computed (the scores read no others);
        the other query rows are left at zero. That halves the projection work of a side pass.
        """
        query, key, _ = self.side_projection(layer, hidden, position_embeddings, query_slots)
        return query, key

    def side_projection(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings,
                        query_slots: torch.Tensor | None = None, key_proj: torch.Tensor | None = None):
        """`project_qk`, plus the raw `k_proj` output (B, n, Hkv*hd) it used. Pass `key_proj` when
        that output is already known (the layer computed it in its own forward) to skip the
        projection; the runner also hands it to the next layer so survivors are not projected twice."""
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        cos, sin = position_embeddings
        if key_proj is None:
            key_proj = attn.k_proj(normed)
        key = key_proj.view(*normed.shape[:-1], -1, attn.head_dim)
        if query_slots is None:
            query = attn.q_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim)
        else:
            picked = normed.gather(1, query_slots[:, :, None].expand(-1, -1, normed.shape[-1]))
            query = attn.q_proj(picked).view(*picked.shape[:-1], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if query_slots is None:
            return (*self.apply_rotary(attn, query, key, cos, sin), key_proj)
        _, key = self.apply_rotary(attn, key[:, :0], key, cos, sin)
        index = query_slots[:, :, None].expand(-1, -1, cos.shape[-1])
        picked_cos = cos.expand(hidden.shape[0], -1, -1).gather(1, index)
        picked_sin = sin.expand(hidden.shape[0], -1, -1).gather(1, index)
        query, _ = self.apply_rotary(attn, query, query, picked_cos, picked_sin)
        full = query.new_zeros(query.shape[0], query.shape[1], hidden.shape[1], query.shape[-1])
        full.scatter_(2, query_slots[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]), query)
        return full, key, key_proj

    def attention_scaling(self, layer: nn.Module) -> float:
        return float(layer.self_attn.scaling)

    # ----------------------------------------------------------------- overlays
    def visual_layout(self, model: nn.Module, processor, image_size: tuple[int, int], num_tokens: int):
        """VisualLayout for one image of size (W, H) giving `num_tokens` tokens, or None if unknown."""
        return None

    def video_layout(self, model: nn.Module, processor, frame_size: tuple[int, int], num_frames: int,
                     num_tokens: int):
        """VisualLayout for one video of `num_frames` frames of size (W, H) giving `num_tokens` tokens.

        One entry per visual token: its frame index and its box in original frame pixels (NaN for
        tokens without a place). None if the family takes no video or the count does not match.
        """
        return None
