"""transprune.resolve: the one place a config is resolved for a model (library, app and tools call it)."""

from __future__ import annotations

import pytest

import transprune
from transprune import ConfigError, PruneConfig, UnsupportedModelError, models, resolve


def test_positions_come_from_the_checkpoint_then_the_family(tiny_model):
    llava, _ = tiny_model("llava")
    qwen, _ = tiny_model("qwen2_5_vl")
    shapes = models.REGISTRY["shapes-llava"]          # recommends original positions
    assert resolve.for_model(llava, "high", spec=shapes).positions == "original"
    assert resolve.for_model(llava, "high").positions == "compact"           # LLaVA's default
    assert resolve.for_model(qwen, "high").positions == "original"           # M-RoPE's only mode
    assert resolve.for_model(llava, PruneConfig.preset("high", positions="compact"), spec=shapes).positions == \
        "compact"                                                             # a config's own choice wins
    assert resolve.recommended(None, shapes) is None


def test_depth_scaling_and_the_family_checks(tiny_model):
    llava, _ = tiny_model("llava")
    qwen, _ = tiny_model("qwen2_5_vl")
    assert resolve.for_model(llava, "high").prune_layers == (4, 5, 6)       # (7, 9, 12) on 16 layers
    with pytest.raises(ConfigError, match="positions='compact' is not valid for qwen2_5_vl"):
        resolve.for_model(qwen, PruneConfig.preset("high", positions="compact"))
    with pytest.raises(UnsupportedModelError, match="VisionZip supports"):
        resolve.for_model(qwen, "visionzip-64")
    with pytest.raises(ConfigError, match="does not fit a model with 16 decoder layers"):
        resolve.for_model(llava, PruneConfig(prune_layers=(16,), keep_ratios=(0.5,)))


def test_the_pruner_and_the_loaded_model_resolve_alike():
    lm = models.load("shapes-llava")
    with transprune.apply(lm.model, lm.config_for("high")) as pruner:
        assert pruner.config == lm.resolve("high") == resolve.for_model(lm.model, "high", lm.spec)
