"""Pruning stages, registered by the name used in `PruneConfig.method`.

A new method = one module in this package (see `base.py` for what it provides) + one
`register(...)` line below. `PruneConfig` validates method names against this registry.
"""

from __future__ import annotations

from .base import Insertion, Method, Needs, PreLLMStage, PruningStage, StageContext, StageScores
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .peers import FastV, PDrop, RandomKeep
from .sparsevlm import SparseVLM, SparseVLMRank
from .transprune import TransPrune
from .visionzip import VisionZip

REGISTRY: dict[str, type[PruningStage]] = {}
METHODS: dict[str, type[Method]] = {}          # in-LLM methods
PRE_LLM: dict[str, type[PreLLMStage]] = {}     # stages before the language model (VisionZip, DivPrune, CDPruner)


def register(stage_class: type[PruningStage]) -> type[PruningStage]:
    if stage_class.name in REGISTRY:
        raise ValueError(f"A pruning method named {stage_class.name!r} is already registered.")
    REGISTRY[stage_class.name] = stage_class
    (PRE_LLM if stage_class.pre_llm else METHODS)[stage_class.name] = stage_class
    return stage_class


register(TransPrune)
register(FastV)
register(PDrop)
register(RandomKeep)
register(VisionZip)
register(SparseVLM)
register(SparseVLMRank)
register(DART)
register(DivPrune)
register(CDPruner)


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
           "METHODS", "PRE_LLM", "register", "names", "stage_class", "for_config", "pre_llm_stage"]
