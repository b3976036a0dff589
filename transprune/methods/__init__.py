"""Pruning stages, registered by the name used in `PruneConfig.method`.

A new method = one module in this package (see `base.py` for what it provides) + one
`register(...)` line below + its test file. `PruneConfig` validates method names against this
registry; `PRESETS` collects every stage's presets (`transprune.config.PRESETS` is this dict).
"""

from __future__ import annotations

from .base import Insertion, Method, Needs, PreLLMStage, PruningStage, StageContext, StageScores
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .first_layer import CDPrunerFirstLayer, DivPruneFirstLayer
from .peers import FastV, PDrop, RandomKeep
from .sparsevlm import SparseVLM, SparseVLMRank
from .transprune import TransPrune
from .visionzip import VisionZip

REGISTRY: dict[str, type[PruningStage]] = {}
METHODS: dict[str, type[Method]] = {}          # in-LLM methods
PRE_LLM: dict[str, type[PreLLMStage]] = {}     # stages before the language model (VisionZip, DivPrune, CDPruner)
PRESETS: dict[str, dict] = {}                  # preset name -> PruneConfig fields, from every stage's `presets`


def register(stage_class: type[PruningStage]) -> type[PruningStage]:
    if stage_class.name in REGISTRY:
        raise ValueError(f"A pruning method named {stage_class.name!r} is already registered.")
    taken = [name for name in stage_class.presets if name in PRESETS]
    if taken:
        raise ValueError(f"{stage_class.__name__} declares presets already registered ({', '.join(taken)}); "
                         "a stage subclass declares its own `presets` (or `presets = {}`).")
    if any("method" in values for values in stage_class.presets.values()):
        raise ValueError(f"{stage_class.__name__}'s presets name a method; leave it out, the registry fills it in.")
    REGISTRY[stage_class.name] = stage_class
    (PRE_LLM if stage_class.pre_llm else METHODS)[stage_class.name] = stage_class
    PRESETS.update((name, dict(values, method=stage_class.name)) for name, values in stage_class.presets.items())
    return stage_class


def unregister(name: str) -> None:
    """Remove a registered stage and its presets (tests that register a toy stage clean up with it)."""
    stage_class = REGISTRY.pop(name)
    (PRE_LLM if stage_class.pre_llm else METHODS).pop(name)
    for preset in stage_class.presets:
        PRESETS.pop(preset, None)


# The order is the presets' order (the eval table's rows) and, in-LLM methods first, the app's.
register(TransPrune)
register(FastV)
register(PDrop)
register(RandomKeep)
register(SparseVLM)
register(SparseVLMRank)
register(VisionZip)
register(DART)
register(DivPrune)
register(CDPruner)
register(DivPruneFirstLayer)   # their twins at layer 0, for models the input rewrite cannot serve
register(CDPrunerFirstLayer)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def stage_class(name: str) -> type[PruningStage]:
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}. Choose one of: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def for_config(config) -> Method | None:
    """The in-LLM method of a (resolved) config; None when it has no in-LLM stage."""
    if not config.prune_layers:
        return None
    if config.method not in METHODS:
        raise ValueError(f"Unknown in-LLM method {config.method!r}. Choose one of: {', '.join(METHODS)}.")
    return METHODS[config.method](config)


def pre_llm_stage(config) -> PreLLMStage | None:
    """The stage before the language model that a config names (`config.pre_llm`), None without one."""
    if config.pre_llm is None:
        return None
    return PRE_LLM[config.pre_llm](config)


__all__ = ["Insertion", "Method", "Needs", "PreLLMStage", "PruningStage", "StageContext", "StageScores", "REGISTRY",
           "METHODS", "PRE_LLM", "PRESETS", "register", "unregister", "names", "stage_class", "for_config",
           "pre_llm_stage"]
