"""Analytic prefill FLOPs with the paper's accounting (FastV / TransPrune convention).

Per decoder layer with n tokens: 4*n*d^2 + 2*n^2*d + 3*n*d*m (d hidden size, m MLP size), the
q/k/v/o projections, the attention products and the gated MLP. The paper counts visual tokens
only; `full_sequence=True` counts every token of the sequence instead. The real checkpoints'
shapes (`ARCHITECTURES`, by name) are declared by their families' adapters.
"""

from __future__ import annotations

from . import methods
from .adapters import ARCHITECTURES, for_model   # ARCHITECTURES: name -> Shape, declared by each family's adapter
from .architecture import Shape
from .config import PruneConfig


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
    for number in range(0, layers + 1):   # a stage at 0 prunes the first layer's input
        if number:
            counts.append(alive)
        if number in stages:
            kept = min(method.planned_keep(visual_tokens, stages[number]), alive)   # DART: pivots on top
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
    """(hidden, intermediate, layers) of a loaded model's language model, as its family's adapter reads them."""
    text = for_model(model).text_config(model)
    return text.hidden_size, text.intermediate_size, text.num_hidden_layers
