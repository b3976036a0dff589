"""The generic runner: hook plumbing that prunes visual tokens inside any supported model's text decoder.

Nothing of the model is replaced except, per instance and until `remove()`, the `forward` of the
key projection right after each stage (see `transprune.sidepass.KeyReuse`). `Pruner` attaches
forward hooks and pre-hooks:

- on the outer model: read `input_ids` to find the visual tokens and the instruction of each
  sample (the language model itself only sees `inputs_embeds`), and tell prefill from decode;
- before every decoder layer: hand layers after a pruning stage the position ids, position
  embeddings and attention mask of the surviving tokens;
- on attention and MLP at the layers whose TTV the method needs: record TTV (prefill only);
- after each pruning layer: score the alive visual tokens, keep the top k, add the tokens a method
  inserts (SparseVLM's recycled ones), and return the gathered hidden states: the next layer's input.

The state of one prefill is a `transprune.sequence.PrunedSequence` (which token each slot holds, per
stage); what a layer after a stage receives is in `transprune.positions` (positions, rotary) and
`transprune.masks`. Family facts come from the adapter (`transprune.adapters`), scores from the method
(`transprune.methods`), which declares what it reads (`Method.needs()`); this module decides how that
is computed and reused.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import adapters, compat, masks, methods, positions, resolve, scoring, sequence
from .config import PruneConfig, as_config
from .errors import PruningInputError
from .methods.base import Needs
from .sidepass import KeyReuse, SidePasses
from .trace import PruneTrace, Stage


# Models with a pruner attached, so a second one is refused (two would fight over the same layers).
# Kept here, not on the model: nothing of ours is stored on it.
_ATTACHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _no_timer(name):
    return nullcontext()


@dataclass
class _Prefill:
    """One prefill's pruning state and what the hooks hand each other."""
    sequence: sequence.PrunedSequence
    traces: list[PruneTrace]
    layer_kwargs: dict | None = None         # what the latest layer received (after our changes)
    layer_inputs: dict = field(default_factory=dict)       # layer -> its input (Needs.this_layer_qk)
    input_embeddings: torch.Tensor | None = None           # layer 1's input (Needs.input_embeddings)
    key_projections: dict = field(default_factory=dict)    # layer -> its key projection, to reuse
    memo: positions.Memo = field(default_factory=positions.Memo)        # per stage: gathered layer kwargs
    guard: compat.DecodeGuard | None = None  # set when the pruned prefill returned its KV cache
    decoding: bool = False
    steps: int = 0                           # tokens decoded before the current step
    step_memo: positions.Memo = field(default_factory=positions.Memo)   # per decode step: adjusted layer kwargs


class Pruner:
    """Prunes visual tokens of `model` according to `config` until `remove()` is called.

    Use through `transprune.apply(model, config)`. `trace` is the PruneTrace of sample 0 of the
    last prefill (None if that prompt had no visual tokens); `traces` has one per sample (with a
    pre-LLM stage such as VisionZip, in the original patches).

    Timing hooks (public, for `transprune.bench`): every part of the pruner's own work runs in a
    `torch.profiler.record_function` range "transprune.<name>" ("ttv", "score", and the pre-LLM
    stage's "score"); set `timer` to a callable name -> context manager to time them without a
    profiler, and `reuse_listener` to a callable (project, hidden) called whenever key reuse saved
    the layer after a stage a key projection (`project(hidden)` redoes it).
    """

    def __init__(self, model: nn.Module, config: PruneConfig | str):
        config = as_config(config)
        if model in _ATTACHED:
            raise PruningInputError("A pruner is already attached to this model; call its .remove() (or leave "
                                    "its `with` block) before applying another.")
        self.model = model
        self.adapter = adapters.for_model(model)
        self.layers = self.adapter.decoder_layers(model)
        self.config = resolve.for_model(model, config)
        self.pre_stage = methods.pre_llm_stage(self.config)
        self.method = methods.for_config(self.config)
        self.needs = self.method.needs() if self.method is not None else Needs()
        self.prune_layers = self.config.prune_layers
        self.input_layers = set(self.prune_layers) if self.needs.this_layer_qk else set()
        self.masks = [masks.layer_builder(self.adapter.attn_implementation(model), spec)
                      for spec in self.adapter.layer_masks(model)]   # per layer
        self.traces: list[PruneTrace] = []
        self.timer: Callable | None = None
        self.reuse_listener: Callable | None = None
        self._state: _Prefill | None = None
        self._handles: list = []
        self._registered = False
        try:
            self._attach()
        except Exception:
            self.remove()
            raise
        _ATTACHED.add(model)
        self._registered = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def trace(self) -> PruneTrace | None:
        return self.traces[0] if self.traces else None

    def prepare_inputs(self, inputs: dict) -> dict:
        """The processor's inputs, rewritten for this config's pre-LLM stage (VisionZip): call the
        model with what this returns. Without a pre-LLM stage, `inputs` unchanged."""
        if self.pre_stage is None:
            return inputs
        return self.pre_stage.prepare_inputs(self.model, inputs, span=self.span)

    @contextmanager
    def span(self, name: str):
        """Context manager around a named part of the pruner's work (see the class docstring)."""
        with torch.profiler.record_function(f"transprune.{name}"), (self.timer or _no_timer)(name):
            yield

    def _attach(self):
        hook, adapter = self._handles.append, self.adapter
        self._handles.extend(adapter.attach(self.model, self._prefill_sequence))   # first: they run before ours
        hook(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        hook(self.model.register_forward_hook(self._after_model_call, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            number = index + 1
            hook(layer.register_forward_pre_hook(functools.partial(self._before_layer, number), with_kwargs=True))
            if number in self.needs.ttv_layers:
                hook(adapter.attention(layer).register_forward_hook(self._after_attention, with_kwargs=True))
                hook(adapter.mlp(layer).register_forward_hook(self._after_mlp))
            if number in self.prune_layers:
                hook(layer.register_forward_hook(functools.partial(self._after_prune_layer, number)))
            # Side passes project keys that a layer computes anyway: the layer after a stage takes
            # the survivors' keys from the side pass instead of projecting them again, and a layer
            # whose input a method reads (FastV) lends its own keys to the side pass.
            if number - 1 in self.prune_layers and self.needs.next_layer_qk:
                hook(KeyReuse(adapter.key_projection(layer), functools.partial(self._take_keys, number)))
            if number in self.input_layers:
                hook(adapter.key_projection(layer).register_forward_hook(functools.partial(self._lend_keys, number)))
        if self.pre_stage is not None:
            hook(self.layers[-1].register_forward_hook(self._after_last_layer))

    def _prefill_sequence(self) -> sequence.PrunedSequence | None:   # for an adapter's own hooks
        return None if self._state is None or self._state.decoding else self._state.sequence

    def remove(self):
        """Detach every hook and drop all state; safe to call twice."""
        while self._handles:
            self._handles.pop().remove()
        if self._registered:
            _ATTACHED.discard(self.model)
            self._registered = False
        self._state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ------------------------------------------------------------------ outer model
    def _on_model_call(self, module, args, kwargs):
        input_ids = compat.get(kwargs, "input_ids", args[0] if args else None)
        cache = compat.find_cache(args, kwargs)
        compat.DecodeGuard.check_dynamic(cache)
        if cache is not None and compat.cache_length(cache, 0) > 0:
            self._begin_decode_step(cache)
            return None
        if self._continues_unseen_cache(kwargs, input_ids):
            return None
        if self.pre_stage is not None:
            self.pre_stage.check_prepared(input_ids, compat.get(kwargs, "pixel_values"))
        self._state = None
        self.traces = []
        if input_ids is None:
            if compat.get(kwargs, "inputs_embeds") is not None:
                raise PruningInputError("TransPrune locates visual tokens from input_ids; call the model with "
                                        "input_ids (and pixel_values), not inputs_embeds.")
            return None
        is_visual = self.adapter.visual_mask(self.model, input_ids)
        if not bool(is_visual.any()):
            return None
        prompt = self.adapter.read_prompt(self.model, input_ids, is_visual, compat.get(kwargs, "attention_mask"))
        traces = [PruneTrace(visual_tokens=len(v), method=self.config.method, config=self.config.to_dict())
                  for v in prompt.visual_positions]
        self._state = _Prefill(sequence=sequence.PrunedSequence.start(prompt), traces=traces)
        if not self.prune_layers:
            self.traces = traces   # no stage to wait for
        return None

    def _continues_unseen_cache(self, kwargs, input_ids) -> bool:
        """True for a call that continues a KV cache the pruner could not find (it is then run as is)."""
        if not compat.continues_cache(kwargs, input_ids):
            return False
        compat.DecodeGuard.check_unseen_continuation(
            after_pruned_prefill=self._state is not None and self._state.guard is not None,
            adds_visual=input_ids is not None and bool(self.adapter.visual_mask(self.model, input_ids).any()))
        self._state = None
        return True

    def _begin_decode_step(self, cache):
        state = self._state
        if state is None or state.guard is None:
            # No pruned prefill of ours to continue: the model must run exactly as without a pruner,
            # which is right only for a cache no pruned prefill wrote (equal lengths in every layer).
            self._state = None
            compat.DecodeGuard.check_unpruned(cache, len(self.layers), PruningInputError(
                "This KV cache comes from a pruned prefill that this pruner did not run or no longer holds. "
                "Generate from the prompt with the pruner attached, in one call."))
            return
        steps = state.guard.check(cache, "before a decode step")
        state.decoding, state.steps, state.step_memo = True, steps, positions.Memo()

    def _after_model_call(self, module, args, kwargs, output):
        cache, state = compat.output_cache(output), self._state
        if cache is None:
            return None
        if state is None:
            compat.DecodeGuard.check_unpruned(cache, len(self.layers), compat.IncompatibleTransformersError(
                "a call continued a pruned KV cache without being recognised as a decode step."))
            return None
        if state.guard is None:
            state.guard = compat.DecodeGuard(state.sequence.cache_lengths(len(self.layers)))
        state.guard.check(cache, "after a decode step" if state.decoding else "after the pruned prefill")
        return None

    # ------------------------------------------------------------------ decoder layers
    def _before_layer(self, number, module, args, kwargs):
        state = self._state
        if state is None:
            return None
        hidden = compat.hidden_states(args, kwargs)
        if state.decoding:
            view = state.sequence.view_for_layer(number)
            if view is None:
                return None
            return args, compat.replace(kwargs, **positions.decode_layer_kwargs(
                view, kwargs, hidden, self.config.positions, self.masks[number - 1],
                functools.partial(self._rotary, number), state.steps, state.step_memo))
        if number == 1 and self.needs.input_embeddings:
            state.input_embeddings = hidden
        if number == 1 and self.prune_layers and self.prune_layers[0] == 0:
            # A stage at layer 0 prunes the first layer's input: the input embeddings.
            state.layer_kwargs = kwargs
            hidden = self._run_stage(0, hidden)
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, compat.replace(kwargs, hidden_states=hidden))
        if state.sequence.pruned:
            kwargs = compat.replace(kwargs, **positions.prefill_layer_kwargs(
                state.sequence.view, kwargs, hidden, self.config.positions, self.masks[number - 1],
                functools.partial(self._rotary, number), state.memo))
        state.layer_kwargs = kwargs
        if number in self.input_layers:
            state.layer_inputs[number] = hidden
        for trace, tokens, visual in zip(state.traces, *state.sequence.counts()):
            trace.tokens_per_layer.append(tokens)
            trace.visual_tokens_per_layer.append(visual)
        return args, kwargs

    def _rotary(self, number, hidden, position_ids):
        return self.adapter.layer_rotary(self.model, number, hidden, position_ids)

    def _after_attention(self, module, args, kwargs, output):
        self._record_ttv(compat.hidden_states(args, kwargs), output[0] if isinstance(output, tuple) else output)

    def _after_mlp(self, module, args, output):
        self._record_ttv(args[0], output)

    @torch.no_grad()
    def _record_ttv(self, hidden_in, hidden_out):
        state = self._state
        if state is None or state.decoding:
            return
        with self.span("ttv"):
            seq = state.sequence
            seq.add_ttv(scoring.ttv(hidden_in, hidden_out, seq.view.token_valid, self.config.direction))

    def _after_prune_layer(self, number, module, args, output):
        state = self._state
        if state is None or state.decoding:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        pruned = self._run_stage(number, hidden)
        return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

    @torch.no_grad()
    def _run_stage(self, number, hidden):
        """The stage after layer `number` (0: before the first layer) on `hidden`, that layer's output
        (B, n, d); returns the pruned hidden states the next layer takes."""
        state = self._state
        ratio = self.config.keep_ratios[self.prune_layers.index(number)]
        seq = state.sequence
        scorer = SidePasses(self.adapter, self.layers, number, hidden,
                            compat.get(state.layer_kwargs, "position_embeddings"),
                            self.adapter.side_position_embeddings(self.model, number + 1, state.layer_kwargs, hidden),
                            seq.query_slots(),
                            state.layer_inputs.get(number), state.key_projections.get(number),
                            self.adapter.final_norm(self.model) if self.needs.final_norm_output else None)
        alive, anchors, tokens = list(seq.alive), [None] * len(seq.alive), [None] * len(seq.alive)
        for b, candidates in enumerate(seq.alive):
            if len(seq.prompt.visual_positions[b]) == 0:
                continue
            context = scorer.context(seq, b, state.input_embeddings if self.needs.input_embeddings else None)
            with self.span("score"):
                scores = self.method.score(context)
                kept = (scores.kept.sort().values if scores.kept is not None
                        else seq.select(b, scores.score, ratio, scores.keep))
                insertion = self.method.insert(context, scores, kept)
            alive[b] = candidates[kept]
            if insertion is not None:
                anchors[b], tokens[b] = candidates[insertion.anchors], insertion.tokens
            state.traces[b].stages.append(Stage.of_scores(number, ratio, candidates, scores, alive[b],
                                                          insertion, first_new=len(seq.visual[b].positions)))
        state.layer_inputs.pop(number, None)
        state.key_projections.pop(number, None)
        gather = seq.prune(number, alive, anchors)
        state.memo = positions.Memo()
        if scorer.next_key_proj is not None and not any(t is not None for t in tokens):
            # Key reuse only when every slot is gathered: an inserted token has no key projection yet.
            state.key_projections[number + 1] = sequence.gather_slots(scorer.next_key_proj, gather)
        if number == self.prune_layers[-1]:
            self.traces = state.traces
        return seq.insert_rows(sequence.gather_slots(hidden, gather), tokens)

    def _take_keys(self, number, hidden, project) -> torch.Tensor | None:
        """The key projection of layer `number` on `hidden` if a side pass already computed it."""
        state = self._state
        keys = None if state is None or state.decoding else state.key_projections.pop(number, None)
        if keys is None or keys.shape[:-1] != hidden.shape[:-1]:
            return None
        if self.reuse_listener is not None:
            self.reuse_listener(project, hidden)
        return keys

    def _lend_keys(self, number, module, args, output):
        state = self._state
        if state is not None and not state.decoding:
            state.key_projections[number] = output
        return None

    def _after_last_layer(self, module, args, output):
        """End of a prefill with a pre-LLM stage: map the traces back into its original tokens."""
        state = self._state
        if state is not None and not state.decoding:
            self.traces = self.pre_stage.map_traces(state.traces)
        return None


def apply(model: nn.Module, config: PruneConfig | str = "high") -> Pruner:
    """Prune `model`'s visual tokens with `config` (a PruneConfig or a preset name; anything else is a
    TypeError). Returns a Pruner; use it as a context manager or call `.remove()` to restore the model."""
    return Pruner(model, as_config(config))
