"""The pruned sequence as an explicit state: which original token each slot holds, per stage.

Pure tensors and small dataclasses; no model, no hooks. `transprune.runner` keeps one
`PrunedSequence` per prefill. What a layer receives for that sequence (positions, rotary, mask) is
computed elsewhere: `transprune.positions` (position ids, rotary, layer arguments) and
`transprune.masks` (one mask builder per attention backend and layer type); the prompt itself is
read by `transprune.prompt`.

Shapes: B samples, L tokens in the prompt, n slots in the current (pruned) sequence. Samples of a
padded batch may keep different numbers of tokens; shorter rows are left-filled with masked
"dummy" slots so the batch stays rectangular (a dummy slot repeats the row's first kept token and
attends only to itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import scoring
from .prompt import Prompt


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
