"""Pruning criteria, registered by the name used in PruneConfig.method."""

from __future__ import annotations

from ..config import PruneConfig
from .base import Method, StageContext, StageScores
from .peers import FastV, PDrop, RandomKeep
from .transprune import TransPrune

METHODS: dict[str, type[Method]] = {m.name: m for m in (TransPrune, FastV, PDrop, RandomKeep)}


def for_config(config: PruneConfig) -> Method:
    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}. Choose one of: {', '.join(METHODS)}.")
    return METHODS[config.method](config)
