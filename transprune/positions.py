"""What a decoder layer after a pruning stage receives: position ids (both position modes), rotary
embeddings and its attention mask, in prefill and decode.

Pure tensor functions over a `transprune.sequence.SequenceView`; the mask itself comes from the
layer's builder (`transprune.masks`), chosen per attention backend and layer type. The runner
calls `prefill_layer_kwargs` / `decode_layer_kwargs` for every layer after a stage.
"""

from __future__ import annotations

import torch

from . import compat
from .sequence import SequenceView


def prefill_positions(view: SequenceView, position_ids: torch.Tensor, mode: str) -> torch.Tensor:
    """Position ids (B, n) or M-RoPE (3, B, n) of the slots of `view`.

    "original": the kept tokens keep their ids; "compact": each kept token moves back by the number
    of removed tokens before it (renumbered 0..n'-1 over the valid tokens).
    """
    batch = view.seq_index.shape[0]
    index = view.seq_index
    if position_ids.dim() == 3:  # M-RoPE: (3, B, L)
        ids = position_ids.expand(-1, batch, -1).gather(2, index[None].expand(position_ids.shape[0], -1, -1))
    else:
        ids = position_ids.expand(batch, -1).gather(1, index)
    if mode == "compact":
        pad = view.dummy.sum(dim=1, keepdim=True)
        rank = torch.arange(index.shape[1], device=index.device)[None] - pad
        ids = (ids - (index - rank)).clamp_min(0)
    return ids


def gather_rotary(view: SequenceView, embeddings) -> tuple[torch.Tensor, ...]:
    """The (cos, sin) rows, each (B, n, head_dim), of the slots of `view` (original positions)."""
    batch, index = view.seq_index.shape[0], view.seq_index
    return tuple(t.expand(batch, -1, -1).gather(1, index[:, :, None].expand(-1, -1, t.shape[-1]))
                 for t in embeddings)


def decode_positions(view: SequenceView, position_ids: torch.Tensor) -> torch.Tensor:
    """"compact" decode positions of a layer after a stage: the unpruned ones minus what it removed."""
    return position_ids - view.removed[:, None]


class Memo:
    """Values computed once per source objects: the language model hands every layer the same
    position ids, rotary and mask objects, so each is adjusted once per stage (or decode step).
    Sources are matched by identity and held, so a freed object's id is never mistaken for them."""

    def __init__(self):
        self._entries: list[tuple[str, tuple, object]] = []

    def get(self, kind: str, sources: tuple, compute):
        for entry_kind, entry_sources, value in self._entries:
            if entry_kind == kind and all(a is b for a, b in zip(entry_sources, sources)):
                return value
        value = compute()
        self._entries.append((kind, sources, value))
        return value


def prefill_layer_kwargs(view: SequenceView, kwargs: dict, hidden: torch.Tensor, mode: str, masks, rotary,
                         memo: Memo) -> dict:
    """The survivors' position ids, position embeddings and mask for a layer after a stage, from the
    full-sequence ones the language model passed. `rotary(hidden, position_ids)` -> (cos, sin)
    recomputes the rotary embedding ("compact" positions); `masks` is the backend's mask builder."""
    result = {}
    position_ids = compat.get(kwargs, "position_ids")
    length = view.slot_of_pos.shape[1]
    new_ids = memo.get("ids", (position_ids,), lambda: prefill_positions(
        view, torch.arange(length, device=hidden.device)[None] if position_ids is None else position_ids, mode))
    if position_ids is not None:  # a layer that got no position ids (M-RoPE models) gets none
        result["position_ids"] = new_ids
        if masks.gap_free_position_ids:
            result["position_ids"] = torch.arange(view.width, device=hidden.device)[None].expand(hidden.shape[0], -1)
    embeddings = compat.require(kwargs, "position_embeddings", "A decoder layer")
    if mode == "compact":
        compute = lambda: rotary(hidden, new_ids)  # noqa: E731
    else:
        compute = lambda: gather_rotary(view, embeddings)  # noqa: E731
    result["position_embeddings"] = memo.get("rope", (embeddings[0],), compute)
    mask = compat.get(kwargs, "attention_mask")
    result["attention_mask"] = memo.get("mask", (mask, masks), lambda: masks.prefill(view, mask))
    return result


def decode_layer_kwargs(view: SequenceView, kwargs: dict, hidden: torch.Tensor, mode: str, masks, rotary,
                        decoded: int, memo: Memo) -> dict:
    """What changes for a decode step of a layer that saw `view` in prefill: the mask columns of its
    cache and, for "compact" positions, the shifted position ids and their rotary embedding. Layers
    that saw the same view get the same values, computed once per step (`memo`)."""
    sources = (view, masks, compat.get(kwargs, "attention_mask"),
               compat.require(kwargs, "position_embeddings", "A decoder layer")[0])
    return memo.get("decode", sources, lambda: _decode_changes(view, kwargs, hidden, mode, masks, rotary, decoded))


def _decode_changes(view, kwargs, hidden, mode, masks, rotary, decoded) -> dict:
    result = {}
    mask = compat.get(kwargs, "attention_mask")
    new_mask = masks.decode(view, mask, decoded, hidden.shape[1])
    if new_mask is not mask:
        result["attention_mask"] = new_mask
    if mode == "compact":
        position_ids = compat.require(kwargs, "position_ids", "A decoder layer in decoding")
        result["position_ids"] = decode_positions(view, position_ids)
        result["position_embeddings"] = rotary(hidden, result["position_ids"])
    return result
