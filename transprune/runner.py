"""The generic runner: prunes visual tokens inside any supported model's text decoder with hooks.

Nothing of the model is replaced except, per instance and until `remove()`, the `forward` of the
`k_proj` right after each stage (see `_KeyReuse`). `Pruner` attaches forward hooks and pre-hooks:

- on the outer model: read `input_ids` to find the visual tokens and the instruction of each
  sample (the language model itself only sees `inputs_embeds`), and tell prefill from decode;
- before every decoder layer: hand layers after a pruning stage the position embeddings,
  position ids and attention mask of the surviving tokens (the language model computes them once
  for the full sequence and passes the same objects to every layer);
- on self-attention and MLP at the accumulation layers: record TTV (prefill only);
- after each pruning layer: score the alive visual tokens, keep the top k, and return the
  gathered hidden states, which become the next layer's input.

Each layer's KV cache keeps what that layer saw in prefill, so decode steps need only the mask
columns and (for "compact" positions) the position shift of the layer's stage. Samples of a padded
batch may keep different numbers of tokens; shorter ones are left-filled with masked "dummy"
slots so the batch stays rectangular.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import adapters, compat, methods, scoring
from .config import ConfigError, PruneConfig
from .methods import visionzip
from .methods.base import StageContext
from .trace import PruneTrace, Stage


class PruningInputError(ValueError):
    """The inputs cannot be pruned as given; the message says what to pass instead."""


# Models with a pruner attached, so a second one is refused (two would fight over the same layers).
# Kept here, not on the model: nothing of ours is stored on it.
_ATTACHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class _View:
    """The layout of the current (possibly pruned) sequence, shape (B, n) unless noted."""
    seq_index: torch.Tensor      # original sequence position of each slot (dummies: any valid one)
    dummy: torch.Tensor          # bool, slot is batch filler
    token_valid: torch.Tensor    # bool, a real non-padding token
    removed: torch.Tensor        # (B,) visual tokens removed so far
    slot_of_pos: torch.Tensor    # (B, L) slot of each original position, -1 if removed
    prefill_kwargs: dict = field(default_factory=dict)   # cache of gathered layer kwargs


@dataclass
class _PrefillState:
    is_visual: torch.Tensor                  # (B, L) bool
    token_valid: torch.Tensor                # (B, L) bool
    visual_positions: list[torch.Tensor]     # per sample, (N_b,) original positions of visual tokens
    visual_spans: list[torch.Tensor]         # per sample, (N_b,) span number of each visual token
    instruction_positions: list[torch.Tensor]
    last_position: list[int]
    alive: list[torch.Tensor]                # per sample, alive indices into the visual tokens
    ttv_acc: list[torch.Tensor]              # per sample, (N_b,) float32 over all visual tokens
    view: _View
    stage_views: list[tuple[int, _View]] = field(default_factory=list)
    layer_kwargs: dict | None = None         # what the latest layer received (after our changes)
    layer_inputs: dict = field(default_factory=dict)
    key_projections: dict = field(default_factory=dict)   # layer number -> its k_proj output, to reuse
    traces: list[PruneTrace] = field(default_factory=list)
    prefill_length: int = 0
    cache_lengths: list[int] | None = None   # per layer, what its KV cache held after prefill
    decoding: bool = False
    steps: int = 0                            # tokens decoded before the current step
    decode_cache: dict = field(default_factory=dict)


def _mask_fill_values(mask: torch.Tensor):
    """(allowed, blocked) values of a bool mask or an additive float mask."""
    if mask.dtype == torch.bool:
        return True, False
    return 0.0, torch.finfo(mask.dtype).min


class Pruner:
    """Prunes visual tokens of `model` according to `config` until `remove()` is called.

    Use through `transprune.apply(model, config)`. `trace` is the PruneTrace of sample 0 of the
    last prefill (None if that prompt had no visual tokens); `traces` has one per sample.
    """

    def __init__(self, model: nn.Module, config: PruneConfig):
        if not isinstance(config, PruneConfig):
            raise TypeError(f"config must be a transprune.PruneConfig, got {type(config).__name__}.")
        if model in _ATTACHED:
            raise PruningInputError("A pruner is already attached to this model; call its .remove() (or leave "
                                    "its `with` block) before applying another.")
        self.model = model
        self.adapter = adapters.for_model(model)
        self.layers = self.adapter.decoder_layers(model)
        self.config = config.resolve(len(self.layers), self.adapter.default_positions)
        if self.config.positions not in self.adapter.allowed_positions:
            raise ConfigError(
                f"positions={self.config.positions!r} is not valid for {self.adapter.family} models; "
                f"use one of {self.adapter.allowed_positions}.")
        if self.config.visionzip_keep is not None:
            visionzip.check_model(model)
        # VisionZip alone has no in-LLM stage and so no per-stage method.
        self.method = methods.for_config(self.config) if self.config.prune_layers else None
        self.prune_layers = self.config.prune_layers
        self.accumulation_layers = set(self.config.effective_accumulation_layers)
        self.input_layers = self.method.layers_needing_input() if self.method else set()
        # One PruneTrace per sample of the last prefill; with VisionZip, in patch space (see
        # transprune.methods.visionzip.to_patch_space).
        self.traces: list[PruneTrace] = []
        self._zip = None     # (VisionZipSelection, images of each row, input_ids) that prepare_inputs made
        self._state: _PrefillState | None = None
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
        if self.config.visionzip_keep is None:
            return inputs
        dominant, contextual = visionzip.counts(self.config.visionzip_keep, visionzip.num_patches(self.model))
        new_inputs, selection, row_images = visionzip.compress(self.model, inputs, dominant, contextual)
        self._zip = (selection, row_images, new_inputs["input_ids"])
        return new_inputs

    def _attach(self):
        hook = self._handles.append
        hook(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        hook(self.model.register_forward_hook(self._after_model_call, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            number = index + 1
            hook(layer.register_forward_pre_hook(functools.partial(self._before_layer, number), with_kwargs=True))
            if number in self.accumulation_layers:
                hook(layer.self_attn.register_forward_hook(
                    functools.partial(self._after_attention, number), with_kwargs=True))
                hook(layer.mlp.register_forward_hook(functools.partial(self._after_mlp, number)))
            if number in self.prune_layers:
                hook(layer.register_forward_hook(functools.partial(self._after_prune_layer, number)))
            # Side passes project keys that a layer computes anyway: the layer after a stage takes
            # the survivors' keys from the side pass instead of projecting them again, and a layer
            # whose input a method reads (FastV, PDrop) lends its own keys to the side pass.
            if number - 1 in self.prune_layers and self.method.reads_next_layer:
                hook(_KeyReuse(layer.self_attn.k_proj, functools.partial(self._take_keys, number)))
            if number in self.input_layers:
                hook(layer.self_attn.k_proj.register_forward_hook(functools.partial(self._lend_keys, number)))
        if self.config.visionzip_keep is not None:
            hook(self.layers[-1].register_forward_hook(self._after_last_layer))

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
        if cache is not None and "Static" in type(cache).__name__:
            raise PruningInputError(
                "TransPrune needs a dynamic KV cache (pruned layers cache fewer tokens); "
                "do not use cache_implementation='static' or a StaticCache.")
        if cache is not None and compat.cache_length(cache, 0) > 0:
            self._begin_decode_step(cache)
            return None
        if self._continues_unseen_cache(kwargs, input_ids):
            return None
        if self.config.visionzip_keep is not None and (
                compat.get(kwargs, "pixel_values") is not None
                or (input_ids is not None and (self._zip is None or not torch.equal(input_ids, self._zip[2])))):
            raise PruningInputError(
                "This config runs VisionZip before the language model, which changes the inputs: call the "
                "model with `pruner.prepare_inputs(inputs)` (made from these inputs) instead of the processor's "
                "output.")
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
        self._state = self._new_state(input_ids, is_visual, compat.get(kwargs, "attention_mask"))
        return None

    # ------------------------------------------------------------------ decode-step invariants
    # A decode step must be recognised as one, and every layer's KV cache must hold what that layer
    # kept in prefill plus the tokens decoded since. Both are checked before and after each step
    # (a few integer reads); a violation raises instead of decoding with the wrong positions/mask.
    def _cache_lengths(self, cache) -> list[int]:
        return [compat.cache_length(cache, i) for i in range(len(self.layers))]

    def _begin_decode_step(self, cache):
        state = self._state
        if state is None or state.cache_lengths is None:
            # No pruned prefill of ours to continue: the model must run exactly as without a pruner,
            # which is right only for a cache no pruned prefill wrote (equal lengths in every layer).
            self._state = None
            lengths = self._cache_lengths(cache)
            if len(set(lengths)) > 1:
                raise PruningInputError(
                    "This KV cache comes from a pruned prefill that this pruner did not run or no longer "
                    f"holds (its layers cache {min(lengths)} to {max(lengths)} tokens). Generate from the "
                    "prompt with the pruner attached, in one call.")
            return
        steps = compat.cache_length(cache, 0) - state.prefill_length
        self._check_cache(cache, steps, "before a decode step")
        state.decoding, state.steps, state.decode_cache = True, steps, {}

    def _check_cache(self, cache, steps: int, when: str):
        expected = [length + steps for length in self._state.cache_lengths]
        actual = self._cache_lengths(cache)
        if actual != expected:
            raise compat.IncompatibleTransformersError(
                f"{when}, the KV cache holds {actual} tokens per decoder layer where the pruned prefill "
                f"and {steps} decoded tokens leave {expected} (a cache from another run, passed by hand, does "
                "this too: continue with the cache the pruned prefill returned).")

    def _continues_unseen_cache(self, kwargs, input_ids) -> bool:
        """True for a call that continues a KV cache the pruner could not find (it is then run as is).

        A new prompt starts at position 0 and its attention mask is as long as its input; a call whose
        position ids start later, or whose 2-D mask also covers cached tokens, continues a cache even
        when that cache travels under a name or type we do not know.
        """
        mask = compat.get(kwargs, "attention_mask")
        position_ids = compat.get(kwargs, "position_ids")
        embeds = compat.get(kwargs, "inputs_embeds")
        length = input_ids.shape[1] if input_ids is not None else embeds.shape[1] if embeds is not None else None
        longer_mask = mask is not None and mask.dim() == 2 and length is not None and mask.shape[1] > length
        later_positions = isinstance(position_ids, torch.Tensor) and position_ids.numel() > 0 and \
            int(position_ids.min()) > 0
        if not (longer_mask or later_positions):
            return False
        if self._state is not None and self._state.cache_lengths is not None:
            raise compat.IncompatibleTransformersError(
                "a decode step passed the KV cache in a way the pruner does not recognise, so it would "
                "run with the unpruned positions and mask over the pruned cache.")
        if input_ids is not None and bool(self.adapter.visual_mask(self.model, input_ids).any()):
            raise PruningInputError("Continuing a KV cache with a new image or video is not supported: "
                                    "start a new generation from the whole prompt.")
        self._state = None
        return True

    def _after_model_call(self, module, args, kwargs, output):
        cache = compat.output_cache(output)
        if cache is None:
            return None
        state = self._state
        if state is None:
            lengths = self._cache_lengths(cache)
            if len(set(lengths)) > 1:
                raise compat.IncompatibleTransformersError(
                    "a call continued a pruned KV cache without being recognised as a decode step.")
        elif not state.decoding:
            state.cache_lengths = self._prefill_cache_lengths()
            self._check_cache(cache, 0, "after the pruned prefill")
        else:
            self._check_cache(cache, compat.cache_length(cache, 0) - state.prefill_length, "after a decode step")
        return None

    def _prefill_cache_lengths(self) -> list[int]:
        """What each layer's KV cache holds after prefill: the width of the sequence that layer saw."""
        state = self._state
        lengths = []
        for number in range(1, len(self.layers) + 1):
            view = self._view_for_layer(number)
            lengths.append(state.prefill_length if view is None else view.seq_index.shape[1])
        return lengths

    def _new_state(self, input_ids, is_visual, attention_mask) -> _PrefillState:
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is not None and attention_mask.dim() == 2:
            token_valid = attention_mask.bool().to(device)
        else:
            token_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        visual_positions, visual_spans, instruction_positions, last_position = [], [], [], []
        for b in range(batch):
            visual = (is_visual[b] & token_valid[b]).nonzero().flatten()
            real = token_valid[b].nonzero().flatten()
            visual_positions.append(visual)
            visual_spans.append(self._spans(visual, input_ids[b, visual]))
            last_position.append(int(real[-1]))
            if len(visual):
                after = real[(real > visual[-1]) & ~is_visual[b, real]]
            else:
                after = real[-1:]
            # A prompt that ends with its image has no instruction: its last token stands in.
            instruction_positions.append(after if len(after) else real[-1:])
        arange = torch.arange(length, device=device).expand(batch, length)
        view = _View(seq_index=arange.clone(), dummy=torch.zeros_like(token_valid), token_valid=token_valid,
                     removed=torch.zeros(batch, dtype=torch.long, device=device), slot_of_pos=arange.clone())
        state = _PrefillState(
            is_visual=is_visual & token_valid, token_valid=token_valid, visual_positions=visual_positions,
            visual_spans=visual_spans,
            instruction_positions=instruction_positions, last_position=last_position,
            alive=[torch.arange(len(v), device=device) for v in visual_positions],
            ttv_acc=[torch.zeros(len(v), dtype=torch.float32, device=device) for v in visual_positions],
            view=view, prefill_length=length)
        state.traces = [PruneTrace(visual_tokens=len(v), method=self.config.method, config=self.config.to_dict())
                        for v in visual_positions]
        if not self.prune_layers:
            self.traces = state.traces   # no stage to wait for
        return state

    @staticmethod
    def _spans(positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Span number of each visual token: a new span starts after a gap or a change of token id.

        One image or video is one span; each span keeps its own floor(N_span * r) tokens.
        """
        if len(positions) == 0:
            return positions
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[1:] = (positions[1:] != positions[:-1] + 1) | (token_ids[1:] != token_ids[:-1])
        return starts.cumsum(0) - 1

    # ------------------------------------------------------------------ decoder layers
    def _before_layer(self, number, module, args, kwargs):
        state = self._state
        if state is None:
            return None
        if state.decoding:
            view = self._view_for_layer(number)
            if view is None:
                return None
            hidden = compat.hidden_states(args, kwargs)
            embeddings = compat.require(kwargs, "position_embeddings", "A decoder layer")
            # Layers of one stage get the same mask and rotary objects in a step: adjust them once.
            key = (id(view), id(compat.get(kwargs, "attention_mask")), id(embeddings[0]))
            if key not in state.decode_cache:
                state.decode_cache[key] = self._decode_kwargs(view, kwargs, hidden)
            return args, compat.replace(kwargs, **state.decode_cache[key])
        hidden = compat.hidden_states(args, kwargs)
        if state.stage_views:
            kwargs = compat.replace(kwargs, **self._prefill_kwargs(state.view, kwargs, hidden))
        state.layer_kwargs = kwargs
        if number in self.input_layers:
            state.layer_inputs[number] = hidden
        counts = state.view.token_valid.sum(dim=1).tolist()
        for b, trace in enumerate(state.traces):
            trace.tokens_per_layer.append(int(counts[b]))
            trace.visual_tokens_per_layer.append(len(state.alive[b]))
        return args, kwargs

    def _after_last_layer(self, module, args, output):
        """End of a VisionZip prefill: re-index the traces from VisionZip tokens into patches."""
        state = self._state
        if state is None or state.decoding or self._zip is None:
            return None
        selection, row_images, _ = self._zip
        self.traces = [visionzip.to_patch_space(trace, selection, images, self.config.visionzip_keep)
                        for trace, images in zip(state.traces, row_images)]
        return None

    def _take_keys(self, number, hidden) -> torch.Tensor | None:
        """The k_proj output of layer `number` on `hidden` if a side pass already computed it."""
        state = self._state
        if state is None or state.decoding:
            return None
        keys = state.key_projections.pop(number, None)
        if keys is None or keys.shape[:-1] != hidden.shape[:-1]:
            return None
        return keys

    def _lend_keys(self, number, module, args, output):
        state = self._state
        if state is not None and not state.decoding:
            state.key_projections[number] = output
        return None

    def _view_for_layer(self, number) -> _View | None:
        view = None
        for layer, stage_view in self._state.stage_views:
            if layer < number:
                view = stage_view
        return view

    def _after_attention(self, number, module, args, kwargs, output):
        self._record_ttv(compat.hidden_states(args, kwargs), output[0] if isinstance(output, tuple) else output)

    def _after_mlp(self, number, module, args, output):
        self._record_ttv(args[0], output)

    @torch.no_grad()
    def _record_ttv(self, hidden_in, hidden_out):
        state = self._state
        if state is None or state.decoding:
            return
        values = scoring.ttv(hidden_in, hidden_out, state.view.token_valid, self.config.direction)
        for b, alive in enumerate(state.alive):
            slots = state.view.slot_of_pos[b, state.visual_positions[b][alive]]
            state.ttv_acc[b][alive] += values[b, slots]

    @torch.no_grad()
    def _after_prune_layer(self, number, module, args, output):
        state = self._state
        if state is None or state.decoding:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        stage_index = self.prune_layers.index(number)
        ratio = self.config.keep_ratios[stage_index]
        scorer = _SidePasses(self, number, hidden)
        view = state.view
        for b in range(hidden.shape[0]):
            candidates = state.alive[b]
            num_visual = len(state.visual_positions[b])
            if num_visual == 0:
                continue
            slots_of = lambda positions: view.slot_of_pos[b, positions]  # noqa: E731
            context = StageContext(
                sample=b, layer=number, candidates=candidates,
                candidate_slots=slots_of(state.visual_positions[b][candidates]),
                instruction_slots=slots_of(state.instruction_positions[b]),
                last_slot=int(view.slot_of_pos[b, state.last_position[b]]),
                key_valid=view.token_valid[b], ttv_acc=state.ttv_acc[b][candidates],
                next_layer_qk=functools.partial(scorer.next_layer_qk, b),
                this_layer_qk=functools.partial(scorer.this_layer_qk, b),
                next_scaling=scorer.next_scaling, this_scaling=scorer.this_scaling)
            scores = self.method.score(context)
            keep = self._select(scores.score, state.visual_spans[b][candidates], state.visual_spans[b], ratio)
            state.alive[b] = candidates[keep]
            state.traces[b].stages.append(Stage(
                layer=number, keep_ratio=ratio, candidates=candidates.cpu(), kept=candidates[keep].cpu(),
                score=scores.score.detach().cpu(),
                ttv=None if scores.ttv is None else scores.ttv.detach().cpu(),
                iga=None if scores.iga is None else scores.iga.detach().cpu()))
        state.layer_inputs.pop(number, None)
        state.key_projections.pop(number, None)
        new_view, gather = self._next_view()
        state.view = new_view
        state.stage_views.append((number, new_view))
        if scorer.next_key_proj is not None:
            keys = scorer.next_key_proj
            state.key_projections[number + 1] = keys.gather(1, gather[:, :, None].expand(-1, -1, keys.shape[-1]))
        if number == self.prune_layers[-1]:
            self.traces = state.traces
        pruned = hidden.gather(1, gather[:, :, None].expand(-1, -1, hidden.shape[-1]))
        if isinstance(output, tuple):
            return (pruned, *output[1:])
        return pruned

    @staticmethod
    def _select(score, candidate_spans, all_spans, ratio) -> torch.Tensor:
        """Indices into the candidates to keep: the top floor(N_span * r) of each span, in order."""
        keep = []
        for span in candidate_spans.unique():
            members = (candidate_spans == span).nonzero().flatten()
            span_size = int((all_spans == span).sum())
            keep.append(members[scoring.topk_keep(score[members], scoring.keep_count(span_size, ratio))])
        return torch.cat(keep).sort().values if keep else score.new_zeros(0, dtype=torch.long)

    # ------------------------------------------------------------------ gathers
    def _next_view(self):
        """The view after the current stage and, per new slot, the old slot to gather from."""
        state, old = self._state, self._state.view
        batch, length = state.is_visual.shape
        device = state.is_visual.device
        kept_positions = []
        for b in range(batch):
            keep = ~state.is_visual[b]
            keep[state.visual_positions[b][state.alive[b]]] = True
            kept_positions.append(keep.nonzero().flatten())
        width = max(len(p) for p in kept_positions)
        seq_index = torch.empty(batch, width, dtype=torch.long, device=device)
        dummy = torch.zeros(batch, width, dtype=torch.bool, device=device)
        slot_of_pos = torch.full((batch, length), -1, dtype=torch.long, device=device)
        for b, positions in enumerate(kept_positions):
            pad = width - len(positions)
            dummy[b, :pad] = True
            seq_index[b, :pad] = positions[0]
            seq_index[b, pad:] = positions
            slot_of_pos[b, positions] = torch.arange(pad, width, device=device)
        token_valid = state.token_valid.gather(1, seq_index) & ~dummy
        removed = torch.tensor([len(v) - len(a) for v, a in zip(state.visual_positions, state.alive)],
                               device=device)
        gather = old.slot_of_pos.gather(1, seq_index)
        return _View(seq_index, dummy, token_valid, removed, slot_of_pos), gather

    def _positions(self, view: _View, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids of the surviving slots in the configured mode."""
        batch = view.seq_index.shape[0]
        index = view.seq_index
        if position_ids.dim() == 3:  # M-RoPE: (3, B, L)
            ids = position_ids.expand(-1, batch, -1).gather(2, index[None].expand(position_ids.shape[0], -1, -1))
        else:
            ids = position_ids.expand(batch, -1).gather(1, index)
        if self.config.positions == "compact":
            # Renumber: each kept token moves back by the number of removed tokens before it.
            pad = view.dummy.sum(dim=1, keepdim=True)
            rank = torch.arange(index.shape[1], device=index.device)[None] - pad
            ids = (ids - (index - rank)).clamp_min(0)
        return ids

    def _prefill_kwargs(self, view: _View, kwargs: dict, hidden: torch.Tensor) -> dict:
        """The survivors' position ids, position embeddings and mask for a layer after a stage.

        Layers usually all receive the same full-length objects; results are cached per object so
        each is gathered once per stage (models with per-layer mask types get one gather per type).
        """
        cache = view.prefill_kwargs
        result = {}
        position_ids = compat.get(kwargs, "position_ids")
        key = ("ids", id(position_ids))
        if key not in cache:
            source = position_ids
            if source is None:
                source = torch.arange(self._state.prefill_length, device=hidden.device)[None]
            cache[key] = self._positions(view, source)
        new_ids = cache[key]
        if position_ids is not None:  # a layer that got no position ids (M-RoPE models) gets none
            result["position_ids"] = new_ids
            if "flash" in self.adapter.attn_implementation(self.model):
                # FlashAttention reads gaps in position_ids as packed sequences; rotary already comes
                # from position_embeddings, so the layer gets gap-free ids.
                width = view.seq_index.shape[1]
                result["position_ids"] = torch.arange(width, device=hidden.device)[None].expand(hidden.shape[0], -1)
        embeddings = compat.require(kwargs, "position_embeddings", "A decoder layer")
        key = ("rope", id(embeddings[0]))
        if key not in cache:
            batch = hidden.shape[0]
            if self.config.positions == "compact":
                cache[key] = self.adapter.rotary(self.model, hidden, new_ids)
            else:
                index = view.seq_index
                cache[key] = tuple(t.expand(batch, -1, -1).gather(1, index[:, :, None].expand(-1, -1, t.shape[-1]))
                                   for t in embeddings)
        result["position_embeddings"] = cache[key]
        mask = compat.get(kwargs, "attention_mask")
        key = ("mask", id(mask))
        if key not in cache:
            cache[key] = self._prefill_mask(view, mask)
        result["attention_mask"] = cache[key]
        return result

    def _prefill_mask(self, view: _View, mask):
        index, dummy = view.seq_index, view.dummy
        batch, width = index.shape
        has_dummy = bool(dummy.any())
        flash = "flash" in self.adapter.attn_implementation(self.model)
        if mask is None and not has_dummy:
            return None
        if flash:
            # FlashAttention-2 takes a (B, L) padding mask.
            valid = view.token_valid.to(torch.long)
            return valid if (mask is not None or has_dummy) else None
        if mask is None:
            causal = torch.ones(width, width, dtype=torch.bool, device=index.device).tril()
            mask = causal[None, None].expand(batch, 1, width, width).clone()
        else:
            heads = mask.shape[1]
            mask = mask.expand(batch, -1, -1, -1)
            mask = mask.gather(2, index[:, None, :, None].expand(-1, heads, -1, mask.shape[3]))
            mask = mask.gather(3, index[:, None, None, :].expand(-1, heads, width, -1))
        if has_dummy:
            allowed, blocked = _mask_fill_values(mask)
            mask = mask.masked_fill(dummy[:, None, None, :], blocked)
            # A dummy row attends only to itself, so no row is fully masked (NaN in SDPA).
            eye = torch.eye(width, dtype=torch.bool, device=index.device)
            mask = mask.masked_fill((dummy[:, None, :, None] & eye[None, None]), allowed)
        return mask

    def _decode_kwargs(self, view: _View, kwargs, hidden: torch.Tensor) -> dict:
        result = {}
        mask = compat.get(kwargs, "attention_mask")
        prefill_length = self._state.prefill_length
        has_dummy = bool(view.dummy.any())
        if mask is not None:
            total = mask.shape[-1]
            extra = torch.arange(prefill_length, total, device=mask.device)
            columns = torch.cat([view.seq_index, extra.expand(view.seq_index.shape[0], -1)], dim=1)
            if mask.dim() == 2:
                pad = torch.zeros(columns.shape[0], len(extra), dtype=torch.bool, device=mask.device)
                mask = mask.gather(1, columns).masked_fill(torch.cat([view.dummy, pad], 1), 0)
            else:
                mask = mask.expand(columns.shape[0], -1, -1, -1)
                mask = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
                if has_dummy:
                    _, blocked = _mask_fill_values(mask)
                    pad = torch.zeros(columns.shape[0], len(extra), dtype=torch.bool, device=mask.device)
                    mask = mask.masked_fill(torch.cat([view.dummy, pad], 1)[:, None, None, :], blocked)
            result["attention_mask"] = mask
        elif has_dummy:
            query_length = hidden.shape[1]
            extra = self._state.steps + query_length   # cached decode tokens + this step's
            keep = torch.cat([~view.dummy, torch.ones(view.dummy.shape[0], extra, dtype=torch.bool,
                                                      device=view.dummy.device)], dim=1)
            if "flash" in self.adapter.attn_implementation(self.model):
                result["attention_mask"] = keep.to(torch.long)
            else:
                result["attention_mask"] = keep[:, None, None, :].expand(-1, 1, query_length, -1)
        if self.config.positions == "compact":
            position_ids = compat.require(kwargs, "position_ids", "A decoder layer in decoding") - view.removed[:, None]
            result["position_ids"] = position_ids
            result["position_embeddings"] = self.adapter.rotary(self.model, hidden, position_ids)
        return result


class _KeyReuse:
    """Lets a k_proj return keys computed earlier instead of projecting again (None: project).

    Sets an instance-level `forward` on the module (a forward hook runs only after the projection
    it would replace); `remove()` puts back exactly what was there before, including another
    library's own instance-level forward (e.g. accelerate's offloading hooks).
    """

    def __init__(self, module: nn.Module, take):
        self.module = module
        self._had_own = "forward" in module.__dict__
        self._previous = module.__dict__.get("forward")
        self.take, self.project = take, module.forward   # attributes, so a benchmark can time them

        def forward(hidden, *args, **kwargs):
            keys = self.take(hidden)
            return self.project(hidden, *args, **kwargs) if keys is None else keys

        module.forward = forward

    def remove(self):
        if self.module is None:
            return
        if self._had_own:
            self.module.forward = self._previous
        else:
            del self.module.forward
        self.module = None


class _SidePasses:
    """Lazy q/k projections for the scores of one pruning stage, shared by the batch's samples."""

    def __init__(self, pruner: Pruner, number: int, hidden: torch.Tensor):
        self.pruner, self.number, self.hidden = pruner, number, hidden
        layers = pruner.layers
        self.next_scaling = pruner.adapter.attention_scaling(layers[number])
        self.this_scaling = pruner.adapter.attention_scaling(layers[number - 1])
        self._next = self._this = None
        self.next_key_proj = None      # layer number+1's k_proj output on `hidden`, once projected

    def _query_slots(self) -> torch.Tensor:
        """(B, m): every slot a score reads a query from (instruction tokens and the last token)."""
        state = self.pruner._state
        view = state.view
        rows = []
        for b, instruction in enumerate(state.instruction_positions):
            positions = torch.cat([instruction, instruction.new_tensor([state.last_position[b]])])
            rows.append(view.slot_of_pos[b, positions].unique())
        width = max(len(row) for row in rows)
        return torch.stack([torch.cat([row, row[-1:].expand(width - len(row))]) for row in rows])

    @torch.no_grad()
    def next_layer_qk(self, sample: int):
        if self._next is None:
            state = self.pruner._state
            position_embeddings = compat.get(state.layer_kwargs, "position_embeddings")
            *self._next, self.next_key_proj = self.pruner.adapter.side_projection(
                self.pruner.layers[self.number], self.hidden, position_embeddings, self._query_slots())
        return self._next[0][sample], self._next[1][sample]

    @torch.no_grad()
    def this_layer_qk(self, sample: int):
        if self._this is None:
            state = self.pruner._state
            layer_input = state.layer_inputs[self.number]
            *self._this, _ = self.pruner.adapter.side_projection(
                self.pruner.layers[self.number - 1], layer_input, compat.get(state.layer_kwargs, "position_embeddings"),
                self._query_slots(), key_proj=state.key_projections.get(self.number))
        return self._this[0][sample], self._this[1][sample]


def apply(model: nn.Module, config: PruneConfig | str = "high") -> Pruner:
    """Prune `model`'s visual tokens with `config` (a PruneConfig or a preset name).

    Returns a Pruner; use it as a context manager or call `.remove()` to restore the model.
    """
    if isinstance(config, str):
        config = PruneConfig.preset(config)
    return Pruner(model, config)
