"""Pruning criteria, registered by the name used in PruneConfig.method."""

from __future__ import annotations

from ..config import PruneConfig
from .base import Method, StageContext, StageScores
from .peers import FastV, PDrop, RandomKeep
from .transprune import TransPrune

METHODS: dict[str, type[Method]] = {m.name: m for m in (TransPrune, FastV, PDrop, RandomKeep)}

# VisionZip compresses the image tokens *before* the language model (it rewrites the inputs), so
# it is not a per-stage Method above. PruneConfig(method="visionzip") / `visionzip_keep` run it
# through the pruner (`pruner.prepare_inputs`); by hand with exact counts:
# `new_inputs, kept = PRE_LLM["visionzip"](model, inputs, dominant=54, contextual=10)`.
from . import visionzip  # noqa: E402
PRE_LLM = {"visionzip": visionzip.compress_inputs}


def for_config(config: PruneConfig) -> Method:
    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}. Choose one of: {', '.join(METHODS)}.")
    return METHODS[config.method](config)
