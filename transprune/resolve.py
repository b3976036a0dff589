"""The one place a PruneConfig is resolved for a model: the library, the app and the tools call `for_model`.

    resolved = transprune.resolve.for_model(model, "high", spec=lm.spec)

In order:
1. the position mode, where the config leaves it unset: the checkpoint's recommended mode
   (`ModelSpec.positions`, e.g. shapes-llava's "original"), else the family's default
   (`Adapter.default_positions`: "compact" for 1-D RoPE, "original" for M-RoPE);
2. the schedule: layers written for `reference_depth` (the presets: 32) scaled to the model's
   depth (`PruneConfig.resolve`) and checked against it;
3. the family's checks: the position mode is one the family can run (`Adapter.allowed_positions`),
   and a pre-LLM stage supports the model (`PreLLMStage.check_model`). Where it does not, a stage
   that runs alone and declares a `first_layer_twin` (DivPrune, CDPruner) becomes that in-LLM
   stage at layer 0, which makes the same choice on the first decoder layer's input
   (`transprune.methods.first_layer`); stacked, it stays refused.

ConfigError (a schedule or mode that cannot run here) and UnsupportedModelError (a stage for
another family) say what to change; the app turns them into its own sentences.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import adapters, methods
from .config import ConfigError, PruneConfig, as_config
from .errors import UnsupportedModelError
from .spec import ModelSpec


def recommended(config: PruneConfig | str | None, spec: ModelSpec | None = None) -> PruneConfig | None:
    """`config` (a PruneConfig or preset name) with the checkpoint's recommended position mode filled in
    where it leaves `positions` unset; None stays None (no pruning); any other type is a TypeError."""
    config = as_config(config, allow_none=True)
    if config is not None and config.positions is None and spec is not None and spec.positions is not None:
        config = dataclasses.replace(config, positions=spec.positions)
    return config


def for_model(model: nn.Module, config: PruneConfig | str, spec: ModelSpec | None = None) -> PruneConfig:
    """`config` resolved for `model` (see the module docstring); `spec`: the registry entry it was loaded
    from, for its recommended position mode (None: the family's default)."""
    adapter = adapters.for_model(model)
    config = first_layer_twin(model, recommended(as_config(config), spec))
    resolved = config.resolve(len(adapter.decoder_layers(model)), adapter.default_positions)
    if resolved.positions not in adapter.allowed_positions:
        raise ConfigError(f"positions={resolved.positions!r} is not valid for {adapter.family} models; "
                          f"use one of {', '.join(adapter.allowed_positions)}.")
    return resolved


def first_layer_twin(model: nn.Module, config: PruneConfig) -> PruneConfig:
    """`config`, or where its pre-LLM stage cannot rewrite this model's inputs and runs alone, the
    config of its twin at layer 0. Raises UnsupportedModelError for a stage with no way to run here."""
    stage = methods.pre_llm_stage(config)
    if stage is None:
        return config
    try:
        stage.check_model(model)
        return config
    except UnsupportedModelError:
        twin = methods.METHODS.get(stage.first_layer_twin) if stage.first_layer_twin else None
        if twin is None:
            raise
        if config.method != config.pre_llm:
            raise UnsupportedModelError(
                f"{stage.label} runs before the language model, stacked with {config.method}, only on "
                f"{stage.supported_models}; got {type(model).__name__}. Run it alone ({config.pre_llm}-64, -128 "
                "or -192): on this model it then prunes the first decoder layer's input, the same choice.") from None
    return twin.from_pre_llm(config)
