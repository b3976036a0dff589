"""`Shape`: the language-model size that analytic FLOPs and the real-size timings depend on.

Each family's adapter declares its checkpoints' shapes (`Adapter.architectures`) and
`transprune.flops` reads them through the adapter registry; `Shape` lives here, apart from both,
so that neither has to import the other to name it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A checkpoint's language-model shape (public config.json values, no download needed) and the
    number of visual tokens N of its usual input."""
    hidden: int
    intermediate: int
    layers: int
    visual_tokens: int
