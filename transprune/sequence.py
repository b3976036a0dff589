"""The pruned sequence as an explicit state: which original token each slot holds, and what a
decoder layer needs to see that sequence (positions, rotary, attention mask), in prefill and decode.

Pure tensor functions and small dataclasses; no model, no hooks. `transprune.runner` keeps one
`PrunedSequence` per prefill and asks this module for the kwargs of every layer after a stage
(`prefill_layer_kwargs`, `decode_layer_kwargs`).

Shapes: B samples, L tokens in the prompt, n slots in the current (pruned) sequence. Samples of a
padded batch may keep different numbers of tokens; shorter rows are left-filled with masked
"dummy" slots so the batch stays rectangular (a dummy slot repeats the row's first kept token and
attends only to itself).

Attention masks come in two layouts, one builder per layout, chosen once from `MASK_BUILDERS` by
the model's attention implementation (as transformers' `masking_utils` does):

- `DenseMask` (eager, SDPA, flex): a 4-D (B, 1, q, k) bool or additive float mask, or None for an
  unpadded causal batch;
- `PaddingMask` (FlashAttention): a (B, k) 0/1 padding mask; FlashAttention reads gaps in
  `position_ids` as packed sequences, so layers after a stage get gap-free ids (rotary still comes
  from `position_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import compat, scoring


# ---------------------------------------------------------------------------- the prompt
@dataclass
class Prompt:
    """What a prefill's input says about its tokens (fixed for the prefill)."""
    is_visual: torch.Tensor                  # (B, L) bool, visual and not padding
    token_valid: torch.Tensor                # (B, L) bool, a real (non-padding) token
    visual_positions: list[torch.Tensor]     # per sample, (N_b,) positions of the visual tokens
    visual_spans: list[torch.Tensor]         # per sample, (N_b,) span number of each visual token
    instruction_positions: list[torch.Tensor]  # per sample, positions of the instruction tokens
    last_position: list[int]                 # per sample, position of the last prompt token

    @property
    def length(self) -> int:
        return self.is_visual.shape[1]


def visual_spans(positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Span number of each visual token: a new span starts after a gap or a change of token id.

    One image or video is one span; each span keeps its own floor(N_span * r) tokens.
    """
    if len(positions) == 0:
        return positions
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = (positions[1:] != positions[:-1] + 1) | (token_ids[1:] != token_ids[:-1])
    return starts.cumsum(0) - 1


def read_prompt(input_ids: torch.Tensor, is_visual: torch.Tensor, attention_mask: torch.Tensor | None) -> Prompt:
    """The Prompt of a batch: visual tokens, their spans, and the instruction (every non-visual
    token after the last visual one; a prompt that ends with its image has none, and its last
    token stands in)."""
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is not None and attention_mask.dim() == 2:
        token_valid = attention_mask.bool().to(device)
    else:
        token_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    positions, spans, instructions, last = [], [], [], []
    for b in range(batch):
        visual = (is_visual[b] & token_valid[b]).nonzero().flatten()
        real = token_valid[b].nonzero().flatten()
        positions.append(visual)
        spans.append(visual_spans(visual, input_ids[b, visual]))
        last.append(int(real[-1]))
        after = real[(real > visual[-1]) & ~is_visual[b, real]] if len(visual) else real[-1:]
        instructions.append(after if len(after) else real[-1:])
    return Prompt(is_visual=is_visual & token_valid, token_valid=token_valid, visual_positions=positions,
                  visual_spans=spans, instruction_positions=instructions, last_position=last)


# ---------------------------------------------------------------------------- one layout of the sequence
@dataclass
class SequenceView:
    """The layout of the current (possibly pruned) sequence, shape (B, n) unless noted.

    A slot holds a prompt token or a token a stage inserted (SparseVLM's recycled tokens). An
    inserted token has no position of its own: it borrows one (`seq_index`) for its position id,
    rotary and padding column, and sits right after the visual tokens of its span.
    """
    seq_index: torch.Tensor      # original position of each slot (dummies: the row's first kept one; inserted: borrowed)
    dummy: torch.Tensor          # bool, slot is batch filler
    token_valid: torch.Tensor    # bool, a real non-padding token
    removed: torch.Tensor        # (B,) visual tokens removed so far, net of inserted ones
    slot_of_pos: torch.Tensor    # (B, L) slot of each original position, -1 if removed
    visual_index: torch.Tensor   # index into the sample's visual tokens (PrunedSequence.visual), -1 for text and dummies
    inserted: torch.Tensor       # bool, a token a stage inserted

    @property
    def width(self) -> int:
        return self.seq_index.shape[1]

    @property
    def has_dummy(self) -> bool:
        return bool(self.dummy.any())

    @property
    def in_prompt_order(self) -> bool:
        """True when slots follow the prompt's order (no inserted tokens), so masks can be gathered."""
        return not bool(self.inserted.any())

    def visual_slots(self, sample: int, visual: torch.Tensor) -> torch.Tensor:
        """Slots of the sample's visual tokens `visual` (indices into PrunedSequence.visual)."""
        index = self.visual_index[sample]
        slots = torch.full((int(index.max()) + 1,), -1, dtype=torch.long, device=index.device)
        present = (index >= 0).nonzero().flatten()
        slots[index[present]] = present
        return slots[visual]

    @classmethod
    def full(cls, prompt: Prompt) -> "SequenceView":
        """The unpruned sequence: slot i holds position i."""
        batch, length = prompt.is_visual.shape
        device = prompt.is_visual.device
        arange = torch.arange(length, device=device).expand(batch, length)
        visual_index = torch.full((batch, length), -1, dtype=torch.long, device=device)
        for b, positions in enumerate(prompt.visual_positions):
            visual_index[b, positions] = torch.arange(len(positions), device=device)
        return cls(seq_index=arange.clone(), dummy=torch.zeros_like(prompt.token_valid),
                   token_valid=prompt.token_valid, removed=torch.zeros(batch, dtype=torch.long, device=device),
                   slot_of_pos=arange.clone(), visual_index=visual_index,
                   inserted=torch.zeros_like(prompt.token_valid))


@dataclass
class VisualTokens:
    """One sample's visual tokens: the prompt's N (indices 0..N-1), then any a stage inserted."""
    positions: torch.Tensor      # (N',) original position (inserted: the one they borrow)
    spans: torch.Tensor          # (N',) span number (inserted: the span they were made from)
    prompt_count: int            # N

    def add(self, anchors: torch.Tensor) -> torch.Tensor:
        """Append tokens that borrow position and span from the visual tokens `anchors`; their indices."""
        new = torch.arange(len(self.positions), len(self.positions) + len(anchors), device=self.positions.device)
        self.positions = torch.cat([self.positions, self.positions[anchors]])
        self.spans = torch.cat([self.spans, self.spans[anchors]])
        return new


def next_view(prompt: Prompt, old: SequenceView, alive: list[torch.Tensor], visual: list[VisualTokens],
              new: list[torch.Tensor]) -> tuple[SequenceView, torch.Tensor]:
    """The view that keeps every text token and the `alive` visual tokens (indices into each
    sample's `visual`), with the `new` ones (a subset of `alive`) inserted right after the visual
    tokens of their span, in order; and (B, n') per new slot the old slot to gather it from
    (inserted slots: 0, their hidden states come from the stage)."""
    batch, length = prompt.is_visual.shape
    device = prompt.is_visual.device
    rows = []   # per sample: (old slot or -1, visual index or -1) of each new slot, in order
    for b in range(batch):
        index = old.visual_index[b]
        is_alive = torch.zeros(len(visual[b].positions) + 1, dtype=torch.bool, device=device)   # + 1: never empty
        is_alive[alive[b]] = True
        keep = ~old.dummy[b] & ((index < 0) | is_alive[index.clamp_min(0)])
        slots = keep.nonzero().flatten()
        order = slots.double()
        # An inserted token goes after the last slot its span had: keys strictly between that slot and the next.
        new_order = torch.empty(len(new[b]), dtype=torch.float64, device=device)
        new_spans = visual[b].spans[new[b]]
        for span in new_spans.unique():
            members = (new_spans == span).nonzero().flatten()
            last = ((index >= 0) & (visual[b].spans[index.clamp_min(0)] == span)).nonzero().flatten().max()
            steps = torch.arange(1, len(members) + 1, dtype=torch.float64, device=device)
            new_order[members] = last + steps / (len(members) + 1)
        sort = torch.cat([order, new_order]).argsort(stable=True)
        source = torch.cat([slots, torch.full_like(new[b], -1)])[sort]
        rows.append((source, torch.cat([index[slots], new[b]])[sort]))
    width = max(len(source) for source, _ in rows)
    seq_index = torch.empty(batch, width, dtype=torch.long, device=device)
    visual_index = torch.full((batch, width), -1, dtype=torch.long, device=device)
    gather = torch.zeros(batch, width, dtype=torch.long, device=device)
    dummy = torch.zeros(batch, width, dtype=torch.bool, device=device)
    inserted = torch.zeros(batch, width, dtype=torch.bool, device=device)
    slot_of_pos = torch.full((batch, length), -1, dtype=torch.long, device=device)
    for b, (source, index) in enumerate(rows):
        pad, is_new = width - len(source), source < 0
        is_inserted = is_new | old.inserted[b, source.clamp_min(0)]    # now or at an earlier stage
        positions = old.seq_index[b, source.clamp_min(0)]
        positions[is_new] = visual[b].positions[index[is_new]]
        dummy[b, :pad] = True
        seq_index[b, :pad], seq_index[b, pad:] = positions[0], positions
        visual_index[b, pad:], inserted[b, pad:] = index, is_inserted
        gather[b, :pad], gather[b, pad:] = source.clamp_min(0)[0], source.clamp_min(0)
        slot_of_pos[b, positions[~is_inserted]] = torch.arange(pad, width, device=device)[~is_inserted]
    token_valid = prompt.token_valid.gather(1, seq_index) & ~dummy
    removed = torch.tensor([v.prompt_count - len(a) for v, a in zip(visual, alive)], device=device)
    return SequenceView(seq_index, dummy, token_valid, removed, slot_of_pos, visual_index, inserted), gather


def gather_slots(values: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """(B, n', d) rows of `values` (B, n, d) at the slots `gather` (B, n')."""
    return values.gather(1, gather[:, :, None].expand(-1, -1, values.shape[-1]))


# ---------------------------------------------------------------------------- positions
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


# ---------------------------------------------------------------------------- masks, one builder per layout
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


# Attention implementation (transformers' `_attn_implementation`) -> mask builder.
MASK_BUILDERS: dict[str, type] = {
    "eager": DenseMask,
    "sdpa": DenseMask,
    "flex_attention": DenseMask,
    "flash_attention_2": PaddingMask,
    "flash_attention_3": PaddingMask,
}


def mask_builder(attn_implementation: str | None):
    """The builder for an attention implementation; names outside the table (hub kernels such as
    "kernels-community/flash-attn") are FlashAttention when they say so, else dense."""
    name = attn_implementation or "eager"
    if name in MASK_BUILDERS:
        return MASK_BUILDERS[name]
    return PaddingMask if "flash" in name else DenseMask


# ---------------------------------------------------------------------------- what a decoder layer receives
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
    result["attention_mask"] = memo.get("mask", (mask,), lambda: masks.prefill(view, mask))
    return result


def decode_layer_kwargs(view: SequenceView, kwargs: dict, hidden: torch.Tensor, mode: str, masks, rotary,
                        decoded: int, memo: Memo) -> dict:
    """What changes for a decode step of a layer that saw `view` in prefill: the mask columns of its
    cache and, for "compact" positions, the shifted position ids and their rotary embedding. Layers
    that saw the same view get the same values, computed once per step (`memo`)."""
    sources = (view, compat.get(kwargs, "attention_mask"),
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


# ---------------------------------------------------------------------------- the state of a prefill
@dataclass
class PrunedSequence:
    """One prefill's pruning state: the prompt, the alive visual tokens per sample, their
    accumulated TTV, and the view after each stage (what the layers after it saw and cache)."""
    prompt: Prompt
    view: SequenceView
    visual: list[VisualTokens]               # per sample, its visual tokens (the prompt's, then inserted ones)
    alive: list[torch.Tensor]                # per sample, alive indices into `visual`, ascending
    ttv_acc: list[torch.Tensor]              # per sample, (N_b,) float32 over all of `visual`
    stages: list[tuple[int, SequenceView]] = field(default_factory=list)   # (layer, view after it)

    @classmethod
    def start(cls, prompt: Prompt) -> "PrunedSequence":
        device = prompt.is_visual.device
        return cls(prompt=prompt, view=SequenceView.full(prompt),
                   visual=[VisualTokens(positions, spans, len(positions))
                           for positions, spans in zip(prompt.visual_positions, prompt.visual_spans)],
                   alive=[torch.arange(len(v), device=device) for v in prompt.visual_positions],
                   ttv_acc=[torch.zeros(len(v), dtype=torch.float32, device=device)
                            for v in prompt.visual_positions])

    @property
    def pruned(self) -> bool:
        return bool(self.stages)

    def view_for_layer(self, number: int) -> SequenceView | None:
        """The view layer `number` (1-indexed) sees, None for layers before the first stage."""
        view = None
        for layer, stage_view in self.stages:
            if layer < number:
                view = stage_view
        return view

    def counts(self) -> tuple[list[int], list[int]]:
        """Per sample, (tokens, visual tokens) in the current sequence (valid slots only)."""
        return self.view.token_valid.sum(dim=1).tolist(), [len(alive) for alive in self.alive]

    def cache_lengths(self, num_layers: int) -> list[int]:
        """Per layer, the tokens its KV cache holds after prefill."""
        lengths = []
        for number in range(1, num_layers + 1):
            view = self.view_for_layer(number)
            lengths.append(self.prompt.length if view is None else view.width)
        return lengths

    # -- per sample, in the current view
    def slots(self, sample: int, positions: torch.Tensor) -> torch.Tensor:
        return self.view.slot_of_pos[sample, positions]

    def prompt_rows(self, values: torch.Tensor, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual (N, d), instruction (q, d)): the sample's rows of `values` (B, L, d), a tensor over
        the unpruned prompt (such as the first decoder layer's input)."""
        row = values[sample]
        return row[self.prompt.visual_positions[sample]], row[self.prompt.instruction_positions[sample]]

    def candidate_slots(self, sample: int) -> torch.Tensor:
        """Slots of the sample's alive visual tokens."""
        return self.view.visual_slots(sample, self.alive[sample])

    def candidate_spans(self, sample: int) -> torch.Tensor:
        """Span number of each of the sample's alive visual tokens."""
        return self.visual[sample].spans[self.alive[sample]]

    def query_slots(self) -> torch.Tensor:
        """(B, m): every slot a score reads a query from (instruction tokens and the last token);
        short rows repeat their last slot."""
        rows = []
        for b, instruction in enumerate(self.prompt.instruction_positions):
            positions = torch.cat([instruction, instruction.new_tensor([self.prompt.last_position[b]])])
            rows.append(self.slots(b, positions).unique())
        width = max(len(row) for row in rows)
        return torch.stack([torch.cat([row, row[-1:].expand(width - len(row))]) for row in rows])

    def add_ttv(self, values: torch.Tensor):
        """Accumulate per-slot TTV (B, n) onto the alive visual tokens."""
        for b, alive in enumerate(self.alive):
            self.ttv_acc[b][alive] += values[b, self.candidate_slots(b)]

    def select(self, sample: int, score: torch.Tensor, ratio: float, keep: int | None = None) -> torch.Tensor:
        """Indices into the sample's candidates to keep: per span the top floor(N_span * ratio)
        by `score`, in their original order; with `keep` (a method's own count), the top `keep`
        over all candidates."""
        if keep is not None:
            return scoring.topk_keep(score, keep)
        spans = self.prompt.visual_spans[sample]   # the budget is a share of the span's prompt tokens
        candidate_spans = self.candidate_spans(sample)
        keep = []
        for span in candidate_spans.unique():
            members = (candidate_spans == span).nonzero().flatten()
            span_size = int((spans == span).sum())
            keep.append(members[scoring.topk_keep(score[members], scoring.keep_count(span_size, ratio))])
        return torch.cat(keep).sort().values if keep else score.new_zeros(0, dtype=torch.long)

    def prune(self, layer: int, alive: list[torch.Tensor], anchors: list[torch.Tensor | None] | None = None):
        """Keep `alive` after `layer`; returns (B, n') the old slot of each new slot (see `next_view`).

        `anchors`, per sample: insert one new visual token per entry, borrowing that visual
        token's position and span (None = insert nothing). The new tokens get the next indices
        into `visual`, in order, and are alive.
        """
        new = []
        for b, anchor in enumerate(anchors or [None] * len(alive)):
            added = self.visual[b].add(anchor) if anchor is not None else alive[b].new_zeros(0)
            self.ttv_acc[b] = torch.cat([self.ttv_acc[b], self.ttv_acc[b].new_zeros(len(added))])
            new.append(added)
        self.alive = [torch.cat([a, added]) for a, added in zip(alive, new)]
        self.view, gather = next_view(self.prompt, self.view, self.alive, self.visual, new)
        self.stages.append((layer, self.view))
        return gather

    def insert_rows(self, pruned: torch.Tensor, tokens: list[torch.Tensor | None]) -> torch.Tensor:
        """`pruned` (B, n', d), the gathered stage output, with the inserted slots set to `tokens`
        (per sample (k, d), in the order of the last `prune`'s anchors)."""
        view = self.view
        for b, rows in enumerate(tokens):
            if rows is None or len(rows) == 0:
                continue
            first_new = len(self.visual[b].positions) - len(rows)
            slots = (view.visual_index[b] >= first_new).nonzero().flatten()
            pruned[b, slots] = rows[view.visual_index[b, slots] - first_new].to(pruned.dtype)
        return pruned
