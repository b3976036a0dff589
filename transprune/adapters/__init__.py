"""Model-family adapters, registered by class name. A new family = module + one line here."""

from __future__ import annotations

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register(adapter_class: type[Adapter]) -> type[Adapter]:
    for name in adapter_class.model_classes:
        if name in ADAPTERS:
            raise ValueError(f"Model class {name} already has an adapter ({ADAPTERS[name].__name__}).")
        ADAPTERS[name] = adapter_class
    return adapter_class


register(LlavaAdapter)
register(LlavaNextAdapter)
register(LlavaOnevisionAdapter)
register(Qwen2_5_VLAdapter)
register(VideoLlavaAdapter)


class UnsupportedModelError(TypeError):
    """The model is not one of the supported families."""


def for_model(model) -> Adapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise UnsupportedModelError(
            f"TransPrune does not support {name}. Supported models: {', '.join(sorted(ADAPTERS))}. "
            "Pass the full *ForConditionalGeneration model, not its language or vision part.")
    return ADAPTERS[name]()
