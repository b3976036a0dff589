"""Synthetic shape scenes and the small LLaVA trained on them (work in progress)."""


def load_shapes_llava():
    from ..models import ModelLoadError
    raise ModelLoadError("The trained shapes-llava weights are not shipped yet; pick tiny-llava.")
