"""What a pruning stage reads (its side passes and the StageContext a method gets) and the key reuse they allow.

A score that reads attention (IGA, PDrop, FastV) needs queries and keys of a decoder layer without
running its attention kernel (so the model can stay on SDPA or FlashAttention): `SidePasses`
projects them once per stage for the whole batch, lazily, through the family adapter. The keys of
the layer after a stage are projected on all tokens there anyway, so that layer takes the
survivors' rows instead of projecting them again (`KeyReuse`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .methods.base import StageContext


class SidePasses:
    """Lazy q/k projections for the scores of one pruning stage at layer `number` (1-indexed).

    `hidden`: layer `number`'s output (B, n, d); `layer_input`: its input (only for
    `this_layer_qk`); `lent_keys`: its own key projection of that input, if it lent it.
    `position_embeddings`: layer `number`'s (cos, sin); `next_position_embeddings`: those layer
    number+1 uses on the same sequence (they differ where layer types have their own rotary, Gemma 3).
    """

    def __init__(self, adapter, layers, number: int, hidden: torch.Tensor, position_embeddings,
                 next_position_embeddings, query_slots: torch.Tensor, layer_input: torch.Tensor | None = None,
                 lent_keys: torch.Tensor | None = None, final_norm: nn.Module | None = None):
        self.adapter, self.layers, self.number, self.hidden = adapter, layers, number, hidden
        self.final_norm = final_norm   # the language model's last norm (Needs.final_norm_output), else None
        self.position_embeddings, self.query_slots = position_embeddings, query_slots
        self.next_position_embeddings = next_position_embeddings
        self.layer_input, self.lent_keys = layer_input, lent_keys
        self.next_scaling = adapter.attention_scaling(layers[number])
        self.this_scaling = adapter.attention_scaling(layers[number - 1])
        self._next = self._this = None
        self.next_key_proj = None      # layer number+1's key projection of `hidden`, once projected

    @torch.no_grad()
    def next_layer_qk(self, sample: int):
        """(q (H, n, hd), k (Hkv, n, hd)) of layer number+1 on layer number's output."""
        if self._next is None:
            *self._next, self.next_key_proj = self.adapter.side_projection(
                self.layers[self.number], self.hidden, self.next_position_embeddings, self.query_slots)
        return self._next[0][sample], self._next[1][sample]

    @torch.no_grad()
    def this_layer_qk(self, sample: int):
        """(q, k) of layer number on its own input."""
        if self._this is None:
            *self._this, _ = self.adapter.side_projection(
                self.layers[self.number - 1], self.layer_input, self.position_embeddings, self.query_slots,
                key_proj=self.lent_keys)
        return self._this[0][sample], self._this[1][sample]


    def context(self, seq, sample: int, input_embeddings: torch.Tensor | None) -> StageContext:
        """What a method reads for `sample` of `seq` (a PrunedSequence) at this stage; the first
        decoder layer's input, if given, for `StageContext.input_embeddings`."""
        prompt, view, slots = seq.prompt, seq.view, seq.candidate_slots(sample)
        return StageContext(
            sample=sample, layer=self.number, candidates=seq.alive[sample], candidate_slots=slots,
            instruction_slots=seq.slots(sample, prompt.instruction_positions[sample]),
            last_slot=int(view.slot_of_pos[sample, prompt.last_position[sample]]),
            key_valid=view.token_valid[sample], ttv_acc=seq.ttv_acc[sample][seq.alive[sample]],
            next_layer_qk=functools.partial(self.next_layer_qk, sample),
            this_layer_qk=functools.partial(self.this_layer_qk, sample),
            next_scaling=self.next_scaling, this_scaling=self.this_scaling,
            input_embeddings=(None if input_embeddings is None
                              else functools.partial(seq.prompt_rows, input_embeddings, sample)),
            candidate_spans=seq.candidate_spans(sample), output=lambda: self.hidden[sample, slots],
            final_norm_output=(None if self.final_norm is None
                               else lambda at: self.final_norm(self.hidden[sample, at])))


class KeyReuse:
    """Lets a key projection return keys computed earlier instead of projecting again.

    `take(hidden, project)` returns those keys or None (then the module projects). Sets an
    instance-level `forward` on the module (a forward hook runs only after the projection it would
    replace); `remove()` puts back exactly what was there before, including another library's own
    instance-level forward (e.g. accelerate's offloading hooks).
    """

    def __init__(self, module: nn.Module, take):
        self.module = module
        self._had_own = "forward" in module.__dict__
        self._previous = module.__dict__.get("forward")
        project = module.forward

        def forward(hidden, *args, **kwargs):
            keys = take(hidden, project)
            return project(hidden, *args, **kwargs) if keys is None else keys

        module.forward = forward

    def remove(self):
        if self.module is None:
            return
        if self._had_own:
            self.module.forward = self._previous
        else:
            del self.module.forward
        self.module = None
