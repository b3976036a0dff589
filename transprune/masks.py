"""Attention masks of the layers after a pruning stage: one builder per attention backend and layer type.

A layer's mask is described by a `LayerMask` (its transformers layer type, a sliding window, and
whether an image's tokens see each other both ways), which the family adapter declares per decoder
layer (`Adapter.layer_masks`). `MASK_BUILDERS`, keyed by (backend layout, layer type) as
transformers' `masking_utils` keys its functions, gives the builder; `layer_builder` picks it once
per layer.

Layouts:
- "dense" (eager, SDPA, flex): a 4-D (B, 1, q, k) bool or additive float mask, or None for an
  unpadded causal batch. `DenseMask` gathers the rows and columns of the survivors from the
  model's own mask, which is exact for a causal mask (and any pattern laid over it that moves with
  the tokens). `RebuiltMask` builds the mask again over the survivors from the mask functions below
  (`MASK_FUNCTIONS`): used where a gathered mask would be wrong (a sliding window) or where the
  model sizes its decode masks against another layer's cache (Gemma 3).
- "padding" (FlashAttention): a (B, k) 0/1 padding mask; FlashAttention reads gaps in
  `position_ids` as packed sequences, so layers after a stage get gap-free ids (rotary still comes
  from `position_embeddings`). FlashAttention applies a sliding window itself, over the keys it is
  given, which are the survivors: the same convention as `RebuiltMask`.

**The sliding-window convention.** After a stage a sliding-window layer counts its window over the
surviving sequence, as the model itself would over the shorter sequence: a query sees the keys
fewer than `window` slots before it (kept text and visual tokens, and tokens a stage inserted),
not fewer than `window` original positions. This is also what the model's KV cache does in
decoding: a sliding layer (`DynamicSlidingWindowLayer`) keeps the last `window - 1` entries it
was given, so counting in original positions could not hold beyond prefill. The slow reference
(`transprune.reference`, which runs the layers on the gathered survivors) builds its masks the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .sequence import SequenceView


@dataclass(frozen=True)
class LayerMask:
    """What one decoder layer's attention mask says, over the sequence that layer sees."""
    layer_type: str = "full_attention"      # transformers' name: "full_attention" or "sliding_attention"
    window: int | None = None               # sliding window: a query sees keys fewer than `window` slots back
    image_blocks: bool = False              # the tokens of one visual span see each other both ways (Gemma 3)


# ---------------------------------------------------------------------------- mask functions over slots
# Each takes the view, query slots (B, q, 1) and key slots (B, 1, k) and says which pairs may attend,
# as transformers' masking_utils functions do over positions; `RebuiltMask` combines them:
# (causal OR image_block) AND sliding_window AND the key is a real token.
def causal(view: SequenceView, query: torch.Tensor, key: torch.Tensor, spec: LayerMask) -> torch.Tensor:
    return key <= query


def image_block(view: SequenceView, query: torch.Tensor, key: torch.Tensor, spec: LayerMask) -> torch.Tensor:
    """Both in one visual span (its slots are contiguous: the span's survivors stay together)."""
    span = view.span
    query_span = span.gather(1, query[:, :, 0].clamp_max(span.shape[1] - 1))[:, :, None]
    key_span = span.gather(1, key[:, 0, :].clamp_max(span.shape[1] - 1))[:, None, :]
    inside = (query < span.shape[1]) & (key < span.shape[1])   # decoded tokens are text
    return inside & (query_span == key_span) & (query_span >= 0)


def sliding_window(view: SequenceView, query: torch.Tensor, key: torch.Tensor, spec: LayerMask) -> torch.Tensor:
    return key > query - spec.window


MASK_FUNCTIONS = {"causal": causal, "image_block": image_block, "sliding_window": sliding_window}


def _fill_values(mask: torch.Tensor):
    """(allowed, blocked) values of a bool mask or an additive float mask."""
    if mask.dtype == torch.bool:
        return True, False
    return 0.0, torch.finfo(mask.dtype).min


def _decode_columns(view: SequenceView, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key columns of a decode step for a layer of `view`: its prefill slots, then the decoded
    tokens (cached and new), as positions into the unpruned mask of `total` columns; and which
    columns are dummies."""
    prefill_length = view.slot_of_pos.shape[1]
    extra = torch.arange(prefill_length, total, device=device)
    columns = torch.cat([view.seq_index, extra.expand(view.seq_index.shape[0], -1)], dim=1)
    pad = torch.zeros(columns.shape[0], len(extra), dtype=torch.bool, device=device)
    return columns, torch.cat([view.dummy, pad], 1)


class DenseMask:
    """4-D masks (B, 1, q, k), bool or additive float: eager, SDPA, flex attention."""
    gap_free_position_ids = False

    @staticmethod
    def prefill(view: SequenceView, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of a layer that sees `view`, from the full prompt's mask (None: causal, unpadded)."""
        index, dummy = view.seq_index, view.dummy
        batch, width = index.shape
        has_dummy = view.has_dummy
        if mask is None and not has_dummy:
            return None   # causal over the slots, which is the order the layer sees them in
        if not view.in_prompt_order:
            return _slot_order_mask(view, mask)
        if mask is None:
            causal = torch.ones(width, width, dtype=torch.bool, device=index.device).tril()
            mask = causal[None, None].expand(batch, 1, width, width).clone()
        else:
            heads = mask.shape[1]
            mask = mask.expand(batch, -1, -1, -1)
            mask = mask.gather(2, index[:, None, :, None].expand(-1, heads, -1, mask.shape[3]))
            mask = mask.gather(3, index[:, None, None, :].expand(-1, heads, width, -1))
        if has_dummy:
            allowed, blocked = _fill_values(mask)
            mask = mask.masked_fill(dummy[:, None, None, :], blocked)
            # A dummy row attends only to itself, so no row is fully masked (NaN in SDPA).
            eye = torch.eye(width, dtype=torch.bool, device=index.device)
            mask = mask.masked_fill((dummy[:, None, :, None] & eye[None, None]), allowed)
        return mask

    @staticmethod
    def decode(view: SequenceView, mask: torch.Tensor | None, decoded: int, query_length: int):
        """The mask of a decode step for a layer that saw `view` in prefill, from the unpruned
        step's mask; `decoded` tokens are cached since prefill, `query_length` are new. Returns
        `mask` itself when it needs no change."""
        if mask is not None:
            return _gather_decode_mask(view, mask)
        if not view.has_dummy:
            return mask
        keep = _decode_keep(view, decoded + query_length)
        return keep[:, None, None, :].expand(-1, 1, query_length, -1)


class PaddingMask:
    """(B, k) 0/1 padding masks: FlashAttention."""
    gap_free_position_ids = True

    @staticmethod
    def prefill(view: SequenceView, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None and not view.has_dummy:
            return None
        return view.token_valid.to(torch.long)

    @staticmethod
    def decode(view: SequenceView, mask: torch.Tensor | None, decoded: int, query_length: int):
        if mask is not None:
            return _gather_decode_mask(view, mask)
        if not view.has_dummy:
            return mask
        return _decode_keep(view, decoded + query_length).to(torch.long)


def _slot_order_mask(view: SequenceView, like: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, n, n) causal mask over the slots for a view with inserted tokens (their borrowed
    positions are not in slot order, so the prompt's mask cannot be gathered): a slot sees the
    valid slots up to itself; padding and dummy rows see only themselves. In `like`'s format
    (bool, or additive float of its dtype; bool when None)."""
    width = view.width
    causal = torch.ones(width, width, dtype=torch.bool, device=view.seq_index.device).tril()
    allowed = causal[None] & view.token_valid[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=causal.device)[None] & ~view.token_valid[:, :, None]
    allowed = allowed[:, None]
    if like is None or like.dtype == torch.bool:
        return allowed
    zero, blocked = _fill_values(like)
    return torch.full(allowed.shape, zero, dtype=like.dtype, device=like.device).masked_fill(~allowed, blocked)


def _decode_keep(view: SequenceView, extra: int) -> torch.Tensor:
    """(B, n + extra) bool: every column but the dummies."""
    ones = torch.ones(view.dummy.shape[0], extra, dtype=torch.bool, device=view.dummy.device)
    return torch.cat([~view.dummy, ones], dim=1)


def _gather_decode_mask(view: SequenceView, mask: torch.Tensor) -> torch.Tensor:
    """The columns of a decode step's mask (2-D padding or 4-D) that a layer of `view` caches."""
    columns, dummy = _decode_columns(view, mask.shape[-1], mask.device)
    if mask.dim() == 2:
        return mask.gather(1, columns).masked_fill(dummy, 0)
    mask = mask.expand(columns.shape[0], -1, -1, -1)
    mask = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    if view.has_dummy:
        _, blocked = _fill_values(mask)
        mask = mask.masked_fill(dummy[:, None, None, :], blocked)
    return mask


class RebuiltMask:
    """4-D masks built again over the slots a layer sees, from `MASK_FUNCTIONS` (dense backends).

    Prefill: (causal OR same image block) AND within the window, over the slots, for real tokens;
    padding and dummy rows see only themselves (their outputs are never read). Decode: the columns
    the layer's own KV cache holds (a sliding layer: its last `window - 1` entries) then the new
    tokens, whatever width the model sized its own mask to. Same format as the model's mask (bool,
    or additive float of its dtype; bool when the model passed None).
    """
    gap_free_position_ids = False

    def __init__(self, spec: LayerMask):
        self.spec = spec

    def _allowed(self, view: SequenceView, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        allowed = MASK_FUNCTIONS["causal"](view, query, key, self.spec)
        if self.spec.image_blocks:
            allowed = allowed | MASK_FUNCTIONS["image_block"](view, query, key, self.spec)
        if self.spec.window is not None:
            allowed = allowed & MASK_FUNCTIONS["sliding_window"](view, query, key, self.spec)
        return allowed

    def prefill(self, view: SequenceView, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None and not view.has_dummy and self.spec == LayerMask():
            return None
        slots = torch.arange(view.width, device=view.seq_index.device)
        allowed = self._allowed(view, slots[None, :, None], slots[None, None, :]) & view.token_valid[:, None, :]
        allowed |= torch.eye(view.width, dtype=torch.bool, device=slots.device)[None] & ~view.token_valid[:, :, None]
        return _in_format(allowed[:, None], mask)

    def decode(self, view: SequenceView, mask: torch.Tensor | None, decoded: int, query_length: int):
        if mask is None and not view.has_dummy and bool(view.token_valid.all()):
            return None   # every cached column is a real token and the model needs no mask
        total = view.width + decoded + query_length
        first = 0 if self.spec.window is None else max(view.width + decoded - (self.spec.window - 1), 0)
        key = torch.arange(first, total, device=view.seq_index.device)
        query = torch.arange(total - query_length, total, device=key.device)
        decoded_valid = view.token_valid.new_ones(view.token_valid.shape[0], decoded + query_length)
        valid = torch.cat([view.token_valid, decoded_valid], 1)[:, key]
        allowed = self._allowed(view, query[None, :, None], key[None, None, :]) & valid[:, None, :]
        return _in_format(allowed[:, None], mask)


def _in_format(allowed: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """A bool mask `allowed` as `like` is: bool, or additive float of its dtype (bool when None)."""
    if like is None or like.dtype == torch.bool:
        return allowed
    zero, blocked = _fill_values(like)
    return torch.full(allowed.shape, zero, dtype=like.dtype, device=like.device).masked_fill(~allowed, blocked)


# Attention implementation (transformers' `_attn_implementation`) -> layout.
LAYOUTS: dict[str, str] = {
    "eager": "dense",
    "sdpa": "dense",
    "flex_attention": "dense",
    "flash_attention_2": "padding",
    "flash_attention_3": "padding",
}

# (layout, layer type) -> builder; a class is the builder itself, a function makes one from the LayerMask.
MASK_BUILDERS: dict[tuple[str, str], object] = {
    ("dense", "full_attention"): lambda spec: RebuiltMask(spec) if spec.image_blocks else DenseMask,
    ("dense", "sliding_attention"): RebuiltMask,
    ("padding", "full_attention"): lambda spec: PaddingMask,
    ("padding", "sliding_attention"): lambda spec: PaddingMask,   # the kernel windows the survivors itself
}


def layout(attn_implementation: str | None) -> str:
    """The mask layout of an attention implementation; names outside the table (hub kernels such as
    "kernels-community/flash-attn") are FlashAttention when they say so, else dense."""
    name = attn_implementation or "eager"
    if name in LAYOUTS:
        return LAYOUTS[name]
    return "padding" if "flash" in name else "dense"


@functools.lru_cache(maxsize=None)
def layer_builder(attn_implementation: str | None, spec: LayerMask = LayerMask()):
    """The mask builder of one decoder layer (one object per kind of layer, so layers alike share
    their adjusted masks, `positions.Memo`)."""
    key = (layout(attn_implementation), spec.layer_type)
    if key not in MASK_BUILDERS:
        raise ValueError(f"No mask builder for layer type {spec.layer_type!r} with {attn_implementation}; "
                         f"known: {', '.join(sorted({t for _, t in MASK_BUILDERS}))}.")
    return MASK_BUILDERS[key](spec)


def mask_builder(attn_implementation: str | None):
    """The builder of a full-attention layer without image blocks (every family but Gemma 3)."""
    return layer_builder(attn_implementation)
