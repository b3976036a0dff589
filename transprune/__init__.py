"""TransPrune: training-free visual-token pruning inside the language model of a VLM.

    import transprune
    with transprune.apply(model, transprune.PruneConfig.preset("high")) as pruner:
        out = model.generate(**inputs, max_new_tokens=32)
        trace = pruner.trace
"""

from .config import ConfigError, PruneConfig
from .errors import PruningInputError
from .runner import Pruner, apply
from .trace import PruneTrace, Stage, VisualLayout
from .adapters import UnsupportedModelError
from .compat import IncompatibleTransformersError
from .images import ImageInputError
from . import compat, models  # noqa: E402  (`transprune.models.load(...)` after a plain import)

__all__ = ["ImageInputError", "PruneConfig", "ConfigError", "Pruner", "PruningInputError", "apply", "PruneTrace", "Stage",
           "VisualLayout", "UnsupportedModelError", "IncompatibleTransformersError", "compat", "models"]
__version__ = "0.1.0"
