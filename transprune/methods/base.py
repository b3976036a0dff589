"""The stage protocol between the runner and a pruning method.

A method is one file in `transprune/methods/` plus one `register(...)` line in
`transprune/methods/__init__.py` plus its test file; the config validates method names against that
registry, and the presets, the app, the eval table, the bench and the shared tests read every fact
below from it (`tests/test_registry.py` fails when a registered stage lacks one). There are two
kinds of stage, with a common base. Every stage declares (class attributes):

- `name` (unique in the registry, the string of `PruneConfig.method`) and `label` (shown in the app);
- `presets`: named PruneConfig field overrides written for a 32-layer model, `method` left out
  (`transprune.config.PRESETS` collects them; the eval table has a row per preset, the bench and
  eval take them by name), e.g. `presets = {"keeplast": dict(prune_layers=(2,), keep_ratios=(0.5,))}`;
- how the app offers it: by default an in-LLM method with a preset of its own name appears under
  its `label` with that preset at High and half its keep ratios at Low, and a pre-LLM stage with
  presets appears with the ones that keep the most / least; `app_choices`, `app_budgets` and
  `control` override that (see `PruningStage`);
- `test_config` (the fields the shared tests run it with, default its first preset) and
  `adaptive_keep` (it decides its own counts per input).

**An in-LLM method** (TransPrune, FastV, PDrop, random) subclasses `Method` and provides:

- `needs(self) -> Needs`: what its scores read, from `self.config` (the PruneConfig resolved for
  the model's depth). The runner computes exactly that and nothing more: TTV recorded at
  `ttv_layers`, q/k of the layer after each stage on the stage's output (`next_layer_qk`), q/k of
  the pruning layer on its own input (`this_layer_qk`), the input embeddings (`input_embeddings`:
  the first decoder layer's input at the visual and instruction tokens), the pruning layer's output
  after the language model's final norm at any slots (`final_norm_output`, DART). How these are computed,
  shared between the samples of a batch and reused by the model's own forward (key reuse) is the
  runner's business;
- `score(self, ctx: StageContext) -> StageScores`: one sample at one pruning layer, a score per
  candidate (higher = keep). The runner keeps the top floor(N_span * r) per span, in order, or
  the top `StageScores.keep` over all candidates when the method sets that count (rank-adaptive);
- optionally `insert(self, ctx, scores, kept) -> Insertion | None`: new visual tokens to add
  after the stage (SparseVLM recycles deleted tokens), each borrowing the position and span of
  one candidate, and `inserted_count(candidates, kept)` (how many, for the analytic FLOPs);
- optionally `planned_keep(span_tokens, ratio)`, when the method's own count (`StageScores.keep`)
  follows from the budget by a rule of its own (DART: pivots on top), for the analytic FLOPs;
- optionally `accumulates_ttv = True` (the config then defaults `accumulation_layers` to the
  first..last pruning layer) and `check_config(config) -> str | None` (a sentence saying what to
  change, for a config this method cannot run; the config raises it as a ConfigError).

**A pre-LLM stage** (VisionZip; DivPrune and CDPruner through `preselect.SubsetStage`, which
needs only `choose`) subclasses `PreLLMStage` and provides `name`, `label`,
`supported_models` (words for an error message), `default_keep` (the share of each image's
patches it keeps when the config gives none), `check_model`, `prepare_inputs` (rewrites the
processor's inputs before the model sees them), `is_prepared` (tells a model call with those
inputs from one with the processor's own), `map_traces` (re-indexes the in-LLM traces into the
original visual tokens, with itself as a stage at layer 0), `tokens_entering_llm` (for the
analytic FLOPs), and `patches` / `layout` (for the overlays). It keeps the share
`config.pre_llm_keep` and runs alone (`PruneConfig(method=name)`) or before any in-LLM method
(`PruneConfig(pre_llm=name, ...)`, see `methods.pre_llm_stage`).

An in-LLM method reads the model only through what the runner hands it (`StageContext`); a
pre-LLM stage gets the model itself. No method module imports the adapters or the runner
(`tests/test_imports.py` checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .. import scoring
from ..errors import PruningInputError

if TYPE_CHECKING:   # no import at run time: the config imports this registry
    from ..config import PruneConfig


@dataclass(frozen=True)
class Needs:
    """What a method's scores read; the runner provides exactly this."""
    ttv_layers: frozenset[int] = frozenset()   # layers whose TTV (attention + MLP) is accumulated, prefill only
    next_layer_qk: bool = False                 # ctx.next_layer_qk(): layer p+1's q/k on layer p's output
    this_layer_qk: bool = False                 # ctx.this_layer_qk(): layer p's q/k on its own input
    input_embeddings: bool = False              # ctx.input_embeddings(): the first decoder layer's input
    final_norm_output: bool = False             # ctx.final_norm_output(slots): the LM's final norm of layer p's output


@dataclass
class StageContext:
    """One sample at one pruning layer p, in the current (possibly already pruned) sequence."""
    sample: int
    layer: int                          # 1-indexed pruning layer p (0: before the first layer, on its input)
    candidates: torch.Tensor            # (c,) alive visual-token indices into the original visual tokens
    candidate_slots: torch.Tensor       # (c,) their positions in the current sequence
    instruction_slots: torch.Tensor     # (q,) instruction-token positions in the current sequence
    last_slot: int                      # position of the last prompt token
    key_valid: torch.Tensor             # (n,) bool, False at padding
    ttv_acc: torch.Tensor | None        # (c,) accumulated TTV of the candidates (when Needs.ttv_layers)
    next_layer_qk: Callable             # () -> (q (H, n, hd), k (Hkv, n, hd)) of layer p+1 on layer p's output
    this_layer_qk: Callable             # () -> (q, k) of layer p on its own input (FastV)
    next_scaling: float
    this_scaling: float
    # () -> (visual (N, d), instruction (q, d)): the first decoder layer's input (the input
    # embeddings) at all the sample's visual tokens and at its instruction tokens; None unless
    # Needs.input_embeddings (SparseVLM picks its text raters there).
    input_embeddings: Callable | None = None
    candidate_spans: torch.Tensor | None = None   # (c,) span (image or video) of each candidate
    output: Callable | None = None      # () -> (c, d) the pruning layer's output at the candidates
    # (slots (m,)) -> (m, d): the language model's final norm applied to the pruning layer's output at
    # any slots of the sample; None unless Needs.final_norm_output (DART compares tokens there).
    final_norm_output: Callable | None = None


@dataclass
class StageScores:
    score: torch.Tensor                 # (c,) higher = keep
    ttv: torch.Tensor | None = None
    iga: torch.Tensor | None = None
    # How many candidates to keep when the method decides it (SparseVLM's rank-adaptive count): the
    # top `keep` over all the sample's candidates; None = the schedule's floor(N_span * r) per span.
    keep: int | None = None
    # The candidates to keep when the method chooses a set rather than a ranking (DivPrune's and CDPruner's
    # greedy picks, `transprune.methods.first_layer`): indices into the candidates; None = by `score`.
    kept: torch.Tensor | None = None


@dataclass
class Insertion:
    """New visual tokens a stage adds to one sample, placed right after the visual tokens of their
    span. Each borrows the position id (and rotary) of one candidate, its anchor."""
    tokens: torch.Tensor                # (k, d) their hidden states: the next layer's input
    anchors: torch.Tensor               # (k,) indices into the stage's candidates
    sources: list[torch.Tensor]         # per token, the candidate indices it was made from (for the trace)


class PruningStage:
    """What every registered stage has: a name, a label for people, its presets, the config, a config check,
    and how the app offers it."""
    name = "base"
    label = "base"
    pre_llm = False
    accumulates_ttv = False
    # Named presets: PruneConfig field overrides written for a 32-layer model (`method` is filled in).
    presets: dict[str, dict] = {}
    # The config fields the shared tests (tests/test_peers.py) run it with; None = its first preset.
    test_config: dict | None = None
    # True when the method decides how many tokens each stage keeps (StageScores.keep) per input, so
    # the budget is an upper bound, not the count.
    adaptive_keep = False
    # The app: its method choices, UI label -> criterion (None: {label: "transprune"} when it is
    # offered); how its High / Low budgets are built (None: "own_preset" for an in-LLM method with a
    # preset of its own name, "pre_llm" for a pre-LLM stage with presets, else not offered);
    # `control`: listed after the others (the random control).
    app_choices: dict[str, str] | None = None
    app_budgets: str | None = None
    control = False

    def __init__(self, config: "PruneConfig"):
        self.config = config

    @classmethod
    def check_config(cls, config: "PruneConfig") -> str | None:
        """None if this stage can run `config`, else a sentence saying what to change."""
        return None

    @classmethod
    def app_kind(cls) -> str | None:
        """How the app builds this stage's budgets: "transprune_schedule" (TransPrune's High / Low
        presets), "own_preset" (its preset of its own name at High, half its keep ratios at Low),
        "pre_llm" (its presets that keep the most / the least), or None (the app does not offer it)."""
        if cls.app_budgets is not None:
            return cls.app_budgets
        if cls.pre_llm:
            return "pre_llm" if cls.presets else None
        return "own_preset" if cls.name in cls.presets else None

    @classmethod
    def ui_choices(cls) -> dict[str, str]:
        """The app's method choices for this stage, UI label -> criterion; {} when it is not offered."""
        if cls.app_kind() is None:
            return {}
        return dict(cls.app_choices) if cls.app_choices is not None else {cls.label: "transprune"}

    @classmethod
    def test_values(cls) -> dict:
        """PruneConfig fields the shared tests run this stage with (`test_config`, or its first preset)."""
        if cls.test_config is not None:
            return dict(cls.test_config, method=cls.name)
        if not cls.presets:
            raise ValueError(f"{cls.__name__} declares neither presets nor a test_config: give it one.")
        return dict(next(iter(cls.presets.values())), method=cls.name)


class Method(PruningStage):
    """An in-LLM pruning criterion: override `score`, and `needs` if it reads more than nothing."""

    def needs(self) -> Needs:
        return Needs()

    def score(self, ctx: StageContext) -> StageScores:
        raise NotImplementedError

    def insert(self, ctx: StageContext, scores: StageScores, kept: torch.Tensor) -> Insertion | None:
        """New tokens to add after this stage (`kept`: indices into the candidates); None = none."""
        return None

    @classmethod
    def inserted_count(cls, candidates: int, kept: int) -> int:
        """How many tokens `insert` adds to one span when `kept` of `candidates` survive (analytic FLOPs)."""
        return 0

    @classmethod
    def keep_note(cls, ratio: float) -> str | None:
        """Words for what a stage keeps beyond floor(N * ratio), for a schedule's one-line description
        (DART: "+ 4 image pivots"); None when it keeps just that."""
        return None

    @classmethod
    def planned_keep(cls, span_tokens: int, ratio: float) -> int:
        """How many of a span's `span_tokens` one stage keeps at keep ratio `ratio` (analytic FLOPs):
        floor(N_span * r), unless the method decides its own count (DART's pivots come on top)."""
        return scoring.keep_count(span_tokens, ratio)


class PreLLMStage(PruningStage):
    """A stage before the language model that rewrites the inputs (see the module docstring)."""
    # What its per-token score is, as the app titles its heatmap ("CLS attention" for VisionZip).
    score_title = "Score"
    pre_llm = True
    supported_models = "some models"
    default_keep: float | None = None   # share of each image's patches kept when the config gives none
    # The registered in-LLM method that makes the same choice at layer 0, for models this stage cannot
    # rewrite the inputs of (`resolve.for_model` swaps it in for a config that runs this stage alone).
    first_layer_twin: str | None = None

    def check_model(self, model) -> None:
        """Raise UnsupportedModelError for a model this stage cannot run on."""

    def prepare_inputs(self, model, inputs: dict, span=None) -> dict:
        """The processor's inputs rewritten for this stage. `span(name)`, if given, returns a
        context manager timing a named part (the runner's public timing hook)."""
        raise NotImplementedError

    def is_prepared(self, input_ids, pixel_values) -> bool:
        """True for a model call made with what `prepare_inputs` returned (the runner refuses others)."""
        raise NotImplementedError

    def check_prepared(self, input_ids, pixel_values) -> None:
        """Raise PruningInputError for a model call made with the processor's own inputs."""
        if not self.is_prepared(input_ids, pixel_values):
            raise PruningInputError(
                f"This config runs {self.label} before the language model, which changes the inputs: call the "
                "model with `pruner.prepare_inputs(inputs)` (made from these inputs) instead of the processor's "
                "output.")

    def map_traces(self, traces: list) -> list:
        """The in-LLM traces of the last prepared inputs, in the original visual tokens."""
        return traces

    def tokens_entering_llm(self, visual_tokens: int) -> int:
        """How many of `visual_tokens` reach the language model."""
        return visual_tokens

    @classmethod
    def kept_split(cls, keep: float, visual_tokens: int) -> list[int] | None:
        """The stage's own split of what it keeps of `visual_tokens` at share `keep`, for the bench's JSON
        (VisionZip: [dominant, contextual]); None for a stage that keeps one kind of token."""
        return None

    def patches(self, model) -> int:
        """Tokens one image has before this stage (what its traces index)."""
        raise NotImplementedError

    def layout(self, image_layout, trace):
        """The family's VisualLayout of one image's `patches(model)` tokens, in `trace`'s token space."""
        return image_layout
