"""Synthetic shape scenes and the small LLaVA trained on them ("shapes-llava", the offline default).

    from transprune.shapes import scenes, load_shapes_llava
    model, processor = load_shapes_llava()          # the weights shipped in transprune/assets/
    example = scenes.dataset(seed=0, n=1)[0]        # example.image, example.question.text / .answer
"""

from . import scenes
from .model import ASSET_DIR, load_shapes_llava

__all__ = ["scenes", "load_shapes_llava", "ASSET_DIR"]
