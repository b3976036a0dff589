"""PruneConfig: presets, depth scaling, and a clear error for every bad schedule."""

import json
import re

import pytest

from transprune import ConfigError, PruneConfig
from transprune.config import scale_layers
from transprune.shapes.model import ASSET_DIR


def test_high_and_low_presets_match_the_paper():
    high = PruneConfig.preset("high")
    assert high.prune_layers == (7, 9, 12) and high.keep_ratios == (0.875, 0.625, 0.125)
    assert high.effective_accumulation_layers == tuple(range(7, 13)) and high.alpha == 0.5
    low = PruneConfig.preset("low")
    assert low.keep_ratios == (0.5, 0.25, 0.0625)
    assert PruneConfig.preset("off").keep_ratios == (1.0, 1.0, 1.0)
    assert high.resolve(32).prune_layers == (7, 9, 12)


@pytest.mark.parametrize("depth, expected", [(32, (7, 9, 12)), (16, (4, 5, 6)), (12, (3, 4, 5)),
                                             (40, (9, 11, 15)), (24, (5, 7, 9))])
def test_depth_scaling_rule(depth, expected):
    assert scale_layers((7, 9, 12), depth) == expected
    resolved = PruneConfig.preset("high").resolve(depth)
    assert resolved.prune_layers == expected
    assert resolved.accumulation_layers == tuple(range(expected[0], expected[-1] + 1))


def test_explicit_layers_are_not_scaled():
    config = PruneConfig(prune_layers=(2, 3), keep_ratios=(0.5, 0.25)).resolve(16)
    assert config.prune_layers == (2, 3) and config.accumulation_layers is None
    assert config.effective_accumulation_layers == (2, 3)


def test_criterion_switch_sets_alpha():
    assert PruneConfig.preset("high", criterion="ttv").effective_alpha == 1.0
    assert PruneConfig.preset("high", criterion="iga").effective_alpha == 0.0
    assert PruneConfig.preset("high", alpha=0.3).effective_alpha == 0.3


def test_round_trip_through_dict():
    config = PruneConfig.preset("low", positions="original")
    assert PruneConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune_layers=(9, 7), keep_ratios=(0.5, 0.25)), "strictly increasing"),
    (dict(prune_layers=(0, 7), keep_ratios=(0.5, 0.25)), ">= 1"),
    (dict(prune_layers=(7, 9), keep_ratios=(0.25, 0.5)), "must not increase"),
    (dict(prune_layers=(7,), keep_ratios=(1.5,)), "(0, 1]"),
    (dict(prune_layers=(7,), keep_ratios=(0.0,)), "(0, 1]"),
    (dict(prune_layers=(7, 9), keep_ratios=(0.5,)), "one keep ratio per pruning layer"),
    (dict(prune_layers=(), keep_ratios=()), "empty"),
    (dict(prune_layers=(7,), keep_ratios=(0.5,), accumulation_layers=(7, 8)), "past the last pruning layer"),
    (dict(method="tome"), "Unknown method"),
    (dict(criterion="both"), "Unknown criterion"),
    (dict(direction="angle"), "Unknown direction"),
    (dict(positions="relative"), "Unknown positions"),
    (dict(alpha=1.5), "alpha"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        PruneConfig(**kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="high, low, off"):
        PruneConfig.preset("medium")


def test_schedule_deeper_than_the_model_is_refused():
    with pytest.raises(ConfigError, match="does not fit a model with 12 decoder layers"):
        PruneConfig(prune_layers=(7, 12), keep_ratios=(0.5, 0.25)).resolve(12)


def test_the_pre_llm_stage_is_named_by_the_config():
    stacked = PruneConfig(pre_llm="visionzip", pre_llm_keep=0.25)
    assert stacked.method == "transprune" and stacked.prune_layers == (7, 9, 12)
    assert PruneConfig(pre_llm="visionzip").pre_llm_keep == 64 / 576          # the stage's default share
    alone = PruneConfig(method="visionzip")                                   # the stage alone
    assert (alone.pre_llm, alone.pre_llm_keep, alone.prune_layers) == ("visionzip", 64 / 576, ())
    assert PruneConfig(method="visionzip", pre_llm="visionzip", pre_llm_keep=0.5).pre_llm_keep == 0.5
    assert PruneConfig.from_dict(stacked.to_dict()) == stacked


@pytest.mark.parametrize("kwargs, message", [
    (dict(pre_llm="tome"), "Unknown pre-LLM stage 'tome'. Choose one of: visionzip, divprune, cdpruner."),
    (dict(pre_llm="fastv"), "'fastv' prunes inside the language model: give it as method"),
    (dict(pre_llm_keep=0.25), "pre_llm_keep 0.25 is set but pre_llm is not: name the stage that keeps it"),
    (dict(pre_llm="visionzip", pre_llm_keep=0.0),
     "pre_llm_keep 0.0 must lie in (0, 1]: it is the share of each image's patches VisionZip keeps"),
    (dict(method="visionzip", pre_llm="tome"), "method='visionzip' is itself a pre-LLM stage"),
])
def test_bad_pre_llm_fields_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PruneConfig(**kwargs)


def test_a_stack_is_a_pre_llm_preset_then_an_in_llm_preset():
    assert PruneConfig.preset("visionzip-128+high") == PruneConfig.preset("high", pre_llm="visionzip",
                                                                           pre_llm_keep=128 / 576)
    # A pre-LLM stage's own name is that stage at its default share, alone or stacked.
    assert PruneConfig.preset("visionzip") == PruneConfig.preset("visionzip-64")
    assert PruneConfig.preset("visionzip+low") == PruneConfig.preset("visionzip-64+low")
    with pytest.raises(ConfigError, match=re.escape("write a pre-LLM preset (visionzip-192, visionzip-128, "
                                                    "visionzip-64, divprune-192, divprune-128, divprune-64, "
                                                    "cdpruner-192, cdpruner-128, cdpruner-64), '+', then an "
                                                    "in-LLM preset")):
        PruneConfig.preset("fastv+high")
    with pytest.raises(ConfigError, match="stacks two pre-LLM stages"):
        PruneConfig.preset("visionzip-192+visionzip")


def test_a_config_saved_with_visionzip_keep_still_loads():
    """Results saved before pre_llm / pre_llm_keep existed (the shipped eval.json, docs/*.json) hold
    `visionzip_keep`; from_dict reads them, the constructor takes today's names only."""
    saved = json.loads((ASSET_DIR / "eval.json").read_text())
    assert "visionzip_keep" in saved["visionzip-192"]["config"]
    assert PruneConfig.from_dict(saved["visionzip-192"]["config"]) == PruneConfig(
        method="visionzip", pre_llm_keep=1 / 3, positions="compact")
    high = PruneConfig.from_dict(saved["high"]["config"])                  # visionzip_keep None: no pre-LLM stage
    assert high.pre_llm is None and high.keep_ratios == (0.875, 0.625, 0.125)
    with pytest.raises(TypeError, match="visionzip_keep"):
        PruneConfig(visionzip_keep=0.25)
