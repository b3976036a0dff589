"""Attention masks of the layers after a pruning stage: one builder per attention backend and layer type.

Each decoder layer has a `LayerMask` (its transformers layer type and sliding window), declared by
the family adapter (`Adapter.layer_masks`); `MASK_BUILDERS`, keyed by (backend layout, layer
type) as transformers' `masking_utils` keys its mask functions, gives the layer's builder
(`layer_builder`, chosen once per layer).

Layouts and layer types:
- "dense" (eager, SDPA, flex), a 4-D (B, 1, q, k) bool or additive float mask, or None for an
  unpadded causal batch:
  - "full_attention" (`DenseMask`): the survivors' rows and columns of the model's own mask. Exact
    for a causal mask and for any pattern over it that moves with the tokens: **bidirectional
    attention within an image block** (Gemma 3: the tokens of one image see each other both ways)
    stays right, because the survivors of an image keep their order and stay together.
  - "sliding_attention" (`SlidingWindowMask`): the same, then the window is counted again over
    the survivors (below).
- "padding" (FlashAttention), a (B, k) 0/1 padding mask (`PaddingMask`), both layer types:
  FlashAttention reads gaps in `position_ids` as packed sequences, so layers after a stage get
  gap-free ids (rotary still comes from `position_embeddings`); the kernel applies a sliding
  window itself, over the keys it is given (the survivors): the convention below.

**The sliding-window convention.** After a stage a sliding-window layer counts its window over the
surviving sequence, as the model itself would over the shorter sequence (transformers 5.24,
`sliding_window_overlay`: a query at index q sees keys at index k > q - window, causal or in its own
image block): a query sees the kept tokens fewer than `window` slots before it, not fewer than
`window` original positions. This is also what the model's KV cache does in decoding: a sliding
layer (`DynamicSlidingWindowLayer`) keeps the last `window - 1` entries it was given, so a window
in original positions could not hold beyond prefill. The slow reference (`transprune.reference`,
which runs the layers on the gathered survivors) builds its masks the same way.

**Decode masks.** transformers sizes a decode step's mask for one layer of each type (the first
full-attention and the first sliding one). A layer after a stage caches fewer tokens: its mask is
gathered from the model's when that one is in prompt coordinates, else built from the columns its
own cache holds (the view's slots, then the decoded tokens; a sliding layer: the last
`window - 1` of them, then the new tokens).
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
        in_prompt_columns = view.slot_of_pos.shape[1] + decoded + query_length
        if mask is not None and mask.dim() == 4 and mask.shape[-1] != in_prompt_columns:
            return _own_cache_mask(view, mask, decoded, query_length)   # sized against another layer's cache
        if mask is not None:
            return _gather_decode_mask(view, mask)
        if not view.has_dummy:
            return mask
        keep = _decode_keep(view, decoded + query_length)
        return keep[:, None, None, :].expand(-1, 1, query_length, -1)


class SlidingWindowMask:
    """A sliding-window layer's 4-D masks: `DenseMask`'s, with the window counted over the slots."""
    gap_free_position_ids = False

    def __init__(self, window: int):
        self.window = window

    def prefill(self, view: SequenceView, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Keys at or before the query: the real tokens fewer than `window` slots back (the model's
        own mask says nothing here: its window counted original positions). Keys after the query:
        the model's own mask, gathered (its image blocks; a window never reaches forward)."""
        slots = torch.arange(view.width, device=view.seq_index.device)
        too_far = slots[None, :] <= slots[:, None] - self.window      # (query, key): key `window` or more back
        if mask is None and not view.has_dummy and not bool(too_far.any()):
            return None
        past = _slot_order_mask(view, None) & ~too_far[None, None]
        gathered = DenseMask.prefill(view, mask)
        if gathered is None:   # the model passed None: causal, nothing after the query
            return _in_format(past, mask)
        if gathered.dtype != torch.bool:
            gathered = gathered > torch.finfo(gathered.dtype).min / 2
        future = slots[None, :] > slots[:, None]
        return _in_format(torch.where(future[None, None], gathered, past), mask)

    def decode(self, view: SequenceView, mask: torch.Tensor | None, decoded: int, query_length: int):
        if mask is None and not view.has_dummy and bool(view.token_valid.all()):
            return None   # every column the layer holds is a real token, and the model passed no mask
        return _own_cache_mask(view, mask, decoded, query_length, self.window)


def _own_cache_mask(view: SequenceView, like: torch.Tensor | None, decoded: int, query_length: int,
                    window: int | None = None) -> torch.Tensor:
    """(B, 1, q, k) mask of a decode step over the columns a layer of `view` caches: its slots, then
    the `decoded` tokens, then the `query_length` new ones (a sliding layer keeps the last
    `window - 1` before the new ones); causal and within the window over those slots; real tokens only.
    In `like`'s format."""
    total = view.width + decoded + query_length
    first = 0 if window is None else max(view.width + decoded - (window - 1), 0)
    key = torch.arange(first, total, device=view.seq_index.device)
    query = torch.arange(total - query_length, total, device=key.device)
    decoded_valid = view.token_valid.new_ones(view.token_valid.shape[0], decoded + query_length)
    valid = torch.cat([view.token_valid, decoded_valid], 1)[:, key]
    allowed = key[None, :] <= query[:, None]
    if window is not None:
        allowed &= key[None, :] > query[:, None] - window
    return _in_format((allowed[None] & valid[:, None, :])[:, None], like)


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

# (layout, layer type) -> a function of the layer's LayerMask that gives its builder.
MASK_BUILDERS: dict[tuple[str, str], object] = {
    ("dense", "full_attention"): lambda spec: DenseMask,
    ("dense", "sliding_attention"): lambda spec: SlidingWindowMask(spec.window),
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
    """The builder of a full-attention layer (every layer of a family without layer types)."""
    return layer_builder(attn_implementation)
