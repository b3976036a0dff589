"""Analytic prefill FLOPs with the paper's accounting (FastV / TransPrune convention).

Per decoder layer with n tokens: 4*n*d^2 + 2*n^2*d + 3*n*d*m (d hidden size, m MLP size), the
q/k/v/o projections, the attention products and the gated MLP. The paper counts visual tokens
only; `full_sequence=True` counts every token of the sequence instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import methods
from .config import PruneConfig
from .scoring import keep_count


@dataclass(frozen=True)
class Shape:
    """The language-model shape that FLOPs depend on (public config values, no download needed)."""
    hidden: int
    intermediate: int
    layers: int
    visual_tokens: int


# Public config.json values of the registry's real checkpoints (LLM part) and their usual N.
ARCHITECTURES: dict[str, Shape] = {
    "llava-1.5-7b": Shape(hidden=4096, intermediate=11008, layers=32, visual_tokens=576),
    "llava-1.5-13b": Shape(hidden=5120, intermediate=13824, layers=40, visual_tokens=576),
    "llava-next-vicuna-7b": Shape(hidden=4096, intermediate=11008, layers=32, visual_tokens=2880),
    "llava-next-mistral-7b": Shape(hidden=4096, intermediate=14336, layers=32, visual_tokens=2880),
    # Video: 8 frames x 257 (Video-LLaVA); 8 frames x 196 pooled + 1 (OneVision); Qwen2.5-VL 448x448 image.
    "video-llava-7b": Shape(hidden=4096, intermediate=11008, layers=32, visual_tokens=2056),
    "llava-onevision-0.5b": Shape(hidden=896, intermediate=4864, layers=24, visual_tokens=1569),
    "llava-onevision-7b": Shape(hidden=3584, intermediate=18944, layers=28, visual_tokens=1569),
    "qwen2.5-vl-3b": Shape(hidden=2048, intermediate=11008, layers=36, visual_tokens=256),
    "qwen2.5-vl-7b": Shape(hidden=3584, intermediate=18944, layers=28, visual_tokens=256),
}


def layer_flops(n: int, hidden: int, intermediate: int) -> float:
    """FLOPs of one decoder layer over n tokens: 4nd^2 + 2n^2d + 3ndm."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 3 * n * hidden * intermediate


def tflops(tokens_per_layer, hidden: int, intermediate: int) -> float:
    """Sum of layer_flops over layers, in TFLOPs."""
    return sum(layer_flops(n, hidden, intermediate) for n in tokens_per_layer) / 1e12


def schedule_tokens(config: PruneConfig | None, visual_tokens: int, layers: int) -> list[int]:
    """Visual tokens seen by each layer under `config` (scaled to `layers`), None = unpruned."""
    if config is None:
        return [visual_tokens] * layers
    config = config.resolve(layers)
    pre_stage = methods.pre_llm_stage(config)
    if pre_stage is not None:   # e.g. VisionZip: the LLM sees fewer tokens (N stays the patches)
        visual_tokens = pre_stage.tokens_entering_llm(visual_tokens)
    counts, alive = [], visual_tokens
    stages = dict(zip(config.prune_layers, config.keep_ratios))
    method = methods.METHODS.get(config.method)
    for number in range(1, layers + 1):
        counts.append(alive)
        if number in stages:
            kept = min(keep_count(visual_tokens, stages[number]), alive)
            alive = kept + method.inserted_count(alive, kept)   # e.g. SparseVLM's recycled tokens
    return counts


def config_tflops(config: PruneConfig | None, shape: Shape) -> float:
    """Analytic TFLOPs of `config` on an architecture, visual tokens only (the paper's table)."""
    return tflops(schedule_tokens(config, shape.visual_tokens, shape.layers), shape.hidden, shape.intermediate)


def trace_tflops(trace, hidden: int, intermediate: int, full_sequence: bool = False) -> float:
    """TFLOPs of the prefill recorded in a PruneTrace (visual tokens only, or the whole sequence)."""
    counts = trace.tokens_per_layer if full_sequence else trace.visual_tokens_per_layer
    return tflops(counts, hidden, intermediate)


def model_shape(model) -> tuple[int, int, int]:
    """(hidden, intermediate, layers) of a loaded model's language model."""
    text = getattr(model.config, "text_config", model.config)
    return text.hidden_size, text.intermediate_size, text.num_hidden_layers
