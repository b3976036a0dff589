"""Model-family adapters, registered by family and by model class name.

A new family = one module here (see `base.py` for what its Adapter provides and an example) + one
`register` line below + its test file. Everything else (models, video, flops, the reference, the
app, the tests' FAMILIES) reads this registry: the models each adapter declares (`MODELS`, read by
`transprune.models.REGISTRY`) and its checkpoints' shapes (`ARCHITECTURES`, read by `transprune.flops`).
"""

from __future__ import annotations

import dataclasses

from ..architecture import Shape
from ..spec import ModelSpec
from ..errors import UnsupportedModelError
from .base import Adapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import SmolVLMAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: dict[str, type[Adapter]] = {}      # model class name -> adapter
FAMILIES: dict[str, type[Adapter]] = {}      # family -> adapter, in registration order
ARCHITECTURES: dict[str, Shape] = {}         # real checkpoint's name -> its shape, from every adapter
MODELS: dict[str, ModelSpec] = {}            # registry name -> model, from every adapter (transprune.models)


def register(adapter_class: type[Adapter]) -> type[Adapter]:
    if adapter_class.family in FAMILIES:
        raise ValueError(f"Family {adapter_class.family!r} is already registered ({FAMILIES[adapter_class.family].__name__}).")
    # A subclass inherits its parent's `architectures`: registering them twice means it forgot its own.
    taken = [name for name in adapter_class.architectures if name in ARCHITECTURES]
    if taken:
        raise ValueError(f"{adapter_class.__name__} declares architectures already registered ({', '.join(taken)}); "
                         "an adapter subclass declares its own `architectures` (or `architectures = {}`).")
    timing = adapter_class.timing_arch
    if timing is not None and timing not in adapter_class.architectures:
        raise ValueError(f"{adapter_class.__name__}.timing_arch {timing!r} is not one of its architectures "
                         f"({', '.join(adapter_class.architectures) or 'none'}).")
    models = [_own_model(adapter_class, spec) for spec in adapter_class.models]
    FAMILIES[adapter_class.family] = adapter_class
    ARCHITECTURES.update(adapter_class.architectures)
    MODELS.update((spec.name, spec) for spec in models)
    for name in adapter_class.model_classes:
        if name in ADAPTERS:
            raise ValueError(f"Model class {name} already has an adapter ({ADAPTERS[name].__name__}).")
        ADAPTERS[name] = adapter_class
    return adapter_class


def _own_model(adapter_class: type[Adapter], spec: ModelSpec) -> ModelSpec:
    """`spec` with the family's name and video flag filled in; ValueError for a name taken, a
    spec of another family, or a model that is neither offline (builder) nor on the Hub (checkpoint)."""
    if spec.name in MODELS:
        raise ValueError(f"{adapter_class.__name__} declares model {spec.name!r}, already registered by "
                         f"{MODELS[spec.name].family!r}; an adapter subclass declares its own `models` "
                         "(or `models = ()`).")
    if spec.family not in ("", adapter_class.family):
        raise ValueError(f"{adapter_class.__name__} declares model {spec.name!r} of family {spec.family!r}; "
                         "leave ModelSpec.family unset, the adapter fills it in.")
    if (spec.builder is None) == (spec.checkpoint is None):
        raise ValueError(f"Model {spec.name!r} of {adapter_class.__name__} needs exactly one of `builder` (an offline "
                         "build) and `checkpoint` (a Hugging Face id).")
    return dataclasses.replace(spec, family=adapter_class.family, video=adapter_class.video_frames is not None)


register(LlavaAdapter)
register(LlavaNextAdapter)
register(VideoLlavaAdapter)
register(LlavaOnevisionAdapter)
register(Qwen2_5_VLAdapter)
register(SmolVLMAdapter)
register(Gemma3Adapter)
register(Qwen3VLAdapter)
register(InternVLAdapter)


def by_family(family: str) -> Adapter:
    if family not in FAMILIES:
        raise UnsupportedModelError(f"Unknown model family {family!r}. Supported: {', '.join(FAMILIES)}.")
    return FAMILIES[family]()


def video_families() -> list[str]:
    """Families whose models take video input."""
    return [name for name, adapter in FAMILIES.items() if adapter.video_frames]


def for_model(model) -> Adapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise UnsupportedModelError(
            f"TransPrune does not support {name}. Supported models: {', '.join(sorted(ADAPTERS))}. "
            "Pass the full *ForConditionalGeneration model, not its language or vision part.")
    return ADAPTERS[name]()
