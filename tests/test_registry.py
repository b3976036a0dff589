"""Every registered family and method declares the facts the rest of the project reads from it.

A new family or method is its own file + one register line + its test file; these tests fail,
naming the missing fact, when a registered one leaves a fact out. They are cheap (no model runs).
"""

from __future__ import annotations

import pytest

from transprune import adapters, methods, models
from transprune.adapters.base import Adapter
from transprune.config import PRESETS, PruneConfig
from transprune.methods.base import PruningStage

FAMILIES = list(adapters.FAMILIES)
STAGES = list(methods.REGISTRY)


# ---------------------------------------------------------------------------- families
@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_its_identity_and_structure(family):
    adapter = adapters.FAMILIES[family]
    assert adapter.label != Adapter.label, f"{adapter.__name__} declares no label"
    assert adapter.model_classes, f"{adapter.__name__} declares no model_classes"
    assert adapter.default_positions in adapter.allowed_positions
    assert adapter.architectures, f"{adapter.__name__} declares no architectures (its checkpoints' shapes)"
    assert adapter.timing_arch in adapter.architectures, f"{adapter.__name__}.timing_arch is not one of its shapes"
    assert "build_tiny" in vars(adapter), f"{adapter.__name__} declares no build_tiny of its own"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_its_models(family):
    """An offline tiny model and Hub checkpoints, each Hub checkpoint with its shape for the analytic FLOPs."""
    adapter = adapters.FAMILIES[family]
    assert "models" in vars(adapter), f"{adapter.__name__} declares no models of its own"
    specs = [models.REGISTRY[spec.name] for spec in adapter.models]
    assert all(spec.family == family for spec in specs)
    assert any(spec.offline for spec in specs), f"{adapter.__name__} declares no offline model"
    hub = [spec for spec in specs if not spec.offline]
    assert hub, f"{adapter.__name__} declares no Hub checkpoint"
    for spec in hub:
        assert spec.name in adapter.architectures, f"{spec.name}: no shape in {adapter.__name__}.architectures"
        assert spec.size != "?", f"{spec.name} declares no size"
    for spec in specs:
        assert spec.video == (adapter.video_frames is not None)
        assert spec.positions in (None, *adapter.allowed_positions)


@pytest.mark.parametrize("family", adapters.video_families())
def test_video_family_declares_its_video_preprocessing(family):
    adapter = adapters.FAMILIES[family]
    for fact in ("video_pixel_values", "video_token_count", "video_layout"):
        assert getattr(adapter, fact) is not getattr(Adapter, fact), f"{adapter.__name__} declares no {fact}"


def test_registry_lists_offline_models_first():
    offline = [spec.offline for spec in models.REGISTRY.values()]
    assert offline == sorted(offline, reverse=True)
    assert set(models.REGISTRY) == set(adapters.MODELS)


def test_an_adapter_subclass_that_inherits_its_models_is_refused():
    from transprune.adapters.llava import LlavaAdapter

    class Copy(LlavaAdapter):
        family = "copy_for_test"
        architectures = {}
        timing_arch = None
        model_classes = ()

    with pytest.raises(ValueError, match="declares its own `models`"):
        adapters.register(Copy)
    assert "copy_for_test" not in adapters.FAMILIES


# ---------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", STAGES)
def test_method_declares_its_label_presets_and_test_config(name):
    stage = methods.REGISTRY[name]
    assert stage.label != PruningStage.label, f"{stage.__name__} declares no label"
    assert "presets" in vars(stage), f"{stage.__name__} declares no presets of its own (or presets = {{}})"
    for preset in stage.presets:
        assert PRESETS[preset]["method"] == name
        PruneConfig.preset(preset)                  # every preset is a valid config
    values = stage.test_values()                    # ValueError when neither presets nor test_config
    assert values["method"] == name
    PruneConfig(**values)


@pytest.mark.parametrize("name", STAGES)
def test_method_declares_how_the_app_offers_it(name):
    from components import schedule

    stage = methods.REGISTRY[name]
    kind = stage.app_kind()
    assert kind in (None, "transprune_schedule", "own_preset", "pre_llm")
    assert (kind == "pre_llm") == (stage.pre_llm and bool(stage.presets))
    for label, criterion in stage.ui_choices().items():
        assert schedule.METHODS[label] == (name, criterion)
        assert schedule.method_kind(label) == kind
        schedule.build_config(label, "High")        # each offered method builds its High budget


def test_a_stage_without_presets_or_test_config_is_named():
    class Bare(PruningStage):
        name = "bare_for_test"

    with pytest.raises(ValueError, match="neither presets nor a test_config"):
        Bare.test_values()


def test_presets_collect_every_stage_in_registry_order():
    collected = [preset for stage in methods.REGISTRY.values() for preset in stage.presets]
    assert list(PRESETS) == collected
