"""The extension points: a new method is one class + one registration, what a method declares
it needs decides the hooks, and the pruner's public timing hook."""

import pytest
import torch

import transprune
from components import schedule
from transprune import ConfigError, PruneConfig, methods
from transprune import eval as eval_tool
from transprune.config import PRESETS
from transprune.methods import Method, PreLLMStage, StageScores


class KeepLast(Method):
    """A toy criterion: keep the latest visual tokens (score = position among the candidates)."""
    name = "keep_last_for_test"
    label = "Keep last"

    def score(self, ctx):
        return StageScores(score=ctx.candidates.float())


@pytest.fixture
def registered():
    methods.register(KeepLast)
    try:
        yield KeepLast
    finally:
        methods.unregister(KeepLast.name)


@pytest.fixture
def llava(tiny_model, make_inputs, sample_image):
    model, processor = tiny_model("llava")
    return model, make_inputs(processor, [sample_image()], ["What color is the circle ?"])


def test_a_new_method_is_one_class_and_one_registration(registered, llava):
    model, inputs = llava
    config = PruneConfig(method=registered.name, prune_layers=(4, 6), keep_ratios=(0.5, 0.25))
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        model(**inputs)
    n = pruner.trace.visual_tokens
    assert [stage.kept.tolist() for stage in pruner.trace.stages] == [list(range(n - n // 2, n)),
                                                                      list(range(n - n // 4, n))]
    with pytest.raises(ValueError, match="already registered"):
        methods.register(KeepLast)


class KeepLastWithPresets(KeepLast):
    """KeepLast declaring its presets in its own class, as a method module does."""
    name = "keep_last_presets_for_test"
    presets = {"keep-last-test": dict(prune_layers=(7, 9), keep_ratios=(0.5, 0.25), accumulation_layers=())}


def test_a_new_method_with_a_preset_gets_an_eval_row():
    methods.register(KeepLastWithPresets)
    try:
        assert PRESETS["keep-last-test"]["method"] == KeepLastWithPresets.name     # the registry fills it in
        label, budget, factory = eval_tool.method_table()["keep-last-test"]
        assert (label, budget) == ("Keep last", "keep-last-test")
        assert factory(0) == PruneConfig.preset("keep-last-test", positions="compact")
    finally:
        methods.unregister(KeepLastWithPresets.name)
    assert "keep-last-test" not in PRESETS


class HalfZip(PreLLMStage):
    """A toy pre-LLM stage: only registered, never run."""
    name = "halfzip_for_test"
    label = "Half zip"
    supported_models = "no models"
    default_keep = 0.5
    presets = {"halfzip-most": dict(pre_llm_keep=0.75), "halfzip-least": dict(pre_llm_keep=0.25), "halfzip-mid": {}}


@pytest.fixture
def pre_llm_registered():
    methods.register(HalfZip)
    try:
        yield HalfZip
    finally:
        methods.unregister(HalfZip.name)


def test_a_new_pre_llm_stage_with_presets_is_configured_and_offered(pre_llm_registered, monkeypatch):
    name = pre_llm_registered.name
    stacked = PruneConfig.preset("halfzip-least+high")
    assert (stacked.pre_llm, stacked.pre_llm_keep, stacked.method) == (name, 0.25, "transprune")
    assert isinstance(methods.pre_llm_stage(stacked), HalfZip)
    assert eval_tool.method_table()["halfzip-mid"][:2] == ("Half zip", "halfzip-mid")
    # The app: High / Low are the stage's presets that keep the most / the least.
    assert schedule.pre_llm_budgets(name) == {"High": "halfzip-most", "Low": "halfzip-least"}
    monkeypatch.setattr(schedule, "METHODS", schedule.method_choices())
    assert schedule.method_kind("Half zip") == "pre_llm"
    assert schedule.build_config("Half zip", "High") == PruneConfig(method=name, pre_llm_keep=0.75)
    assert schedule.build_config("Half zip", "Custom", keep_ratio=0.3).pre_llm_keep == 0.3
    assert schedule.describe(schedule.build_config("Half zip", "Low"), 16) == (
        "Half zip keeps 25% of the patches before the LLM")
    with pytest.raises(ConfigError, match="Half zip prunes before the language model"):
        schedule.build_config("Half zip", "High", layers_text="3, 4")


def test_the_config_validates_names_against_the_registry():
    with pytest.raises(ConfigError, match="Unknown method 'keep_last_for_test'.*transprune.*visionzip"):
        PruneConfig(method="keep_last_for_test")


def _forward_hooks(module) -> int:
    return len(module._forward_hooks)


@pytest.mark.parametrize("preset, ttv, key_reuse", [("high", True, True), ("pdrop", False, True),
                                                     ("random", False, False), ("fastv", False, False)])
def test_what_a_method_needs_decides_the_hooks(llava, preset, ttv, key_reuse):
    model, _ = llava
    layers = model.model.language_model.layers
    with transprune.apply(model, preset) as pruner:
        first = pruner.prune_layers[0]
        assert (_forward_hooks(layers[first - 1].self_attn) > 0) == (ttv and first in pruner.needs.ttv_layers)
        assert ("forward" in layers[first].self_attn.k_proj.__dict__) == key_reuse
        assert (_forward_hooks(layers[first - 1].self_attn.k_proj) > 0) == (preset == "fastv")
    assert all("forward" not in layer.self_attn.k_proj.__dict__ for layer in layers)


def test_timing_hook_and_profiler_ranges(llava):
    model, inputs = llava
    seen = []

    class Timer:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            seen.append(self.name)

        def __exit__(self, *exc):
            return False

    reused = []
    with torch.no_grad(), transprune.apply(model, "high") as pruner:
        pruner.timer = Timer
        pruner.reuse_listener = lambda project, hidden: reused.append(project(hidden).shape)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            model(**inputs)
    assert {"ttv", "score"} <= set(seen)
    assert len(reused) == len(pruner.prune_layers)        # the layer after each stage reused its keys
    names = {event.name for event in profile.events()}
    assert {"transprune.ttv", "transprune.score"} <= names
