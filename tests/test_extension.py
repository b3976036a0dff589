"""The extension points: a new method is one class + one registration, what a method declares
it needs decides the hooks, and the pruner's public timing hook."""

import pytest
import torch

import transprune
from transprune import ConfigError, PruneConfig, methods
from transprune.methods import Method, Needs, StageScores


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
        del methods.REGISTRY[KeepLast.name], methods.METHODS[KeepLast.name]


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
