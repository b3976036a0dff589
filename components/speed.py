"""Speed at real size: the chosen schedule timed on a language model of a real checkpoint's shape.

The tiny models the app answers with are too small for pruning to pay off in wall-clock time (the
fixed cost per layer outweighs the FLOPs saved). So this panel times the baseline and the chosen
schedule on a model with the LLaVA-1.5-7B language model's shape (32 layers, 576 visual tokens,
a LLaVA-1.5 prompt), random weights (timing only: no answer is read), built with the benchmark's
own code (transprune.bench): at full width on a GPU, at a quarter of the width on a CPU so that it
fits in memory and seconds. Results are cached per schedule for the life of the process.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
from dataclasses import dataclass

import torch

from transprune import PruneConfig, bench, flops

ARCH = "llava-1.5-7b"
CPU_WIDTH = 0.25
REPEATS = 3


@dataclass(frozen=True)
class SpeedResult:
    arch: str
    width_scale: float
    device: str
    baseline_ms: float
    pruned_ms: float
    bound: float                 # analytic prefill speedup of the timed model (all tokens)
    visual_tokens: int
    final_visual_tokens: int
    repeats: int

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.pruned_ms

    @property
    def where(self) -> str:
        width = "full width" if self.width_scale == 1 else f"{self.width_scale:g}× width"
        return f"LLaVA-1.5-7B shape ({width}, 32 layers, {self.visual_tokens} visual tokens) on {self.device}"

    def headline(self) -> str:
        return f"**{self.speedup:.2f}×** prefill at real size (bound {self.bound:.2f}×)"

    def markdown(self) -> str:
        return (f"### {self.speedup:.2f}× faster prefill at real size\n"
                f"{self.where}: baseline **{self.baseline_ms:.0f} ms**, pruned **{self.pruned_ms:.0f} ms** "
                f"({self.visual_tokens} → {self.final_visual_tokens} visual tokens), median of {self.repeats} "
                f"alternating runs after a warm-up. The analytic bound for this schedule is **{self.bound:.2f}×**, "
                f"so it reaches **{self.speedup / self.bound:.0%}** of it. Random weights: timing only, no answer "
                "is read.")


class RealSizeSpeed:
    """Measures and caches `SpeedResult`s; one measurement at a time (they share the CPU)."""

    def __init__(self, device: str | None = None, cpu_width: float = CPU_WIDTH):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpu_width = cpu_width
        self._cache: dict[PruneConfig, SpeedResult] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(config: PruneConfig) -> PruneConfig:
        # The schedule on the timed depth; the position mode and seed do not change its speed.
        resolved = config.resolve(flops.ARCHITECTURES[ARCH].layers)
        return dataclasses.replace(resolved, positions="compact", seed=0)

    def cached(self, config: PruneConfig | None) -> SpeedResult | None:
        return self._cache.get(self._key(config)) if config is not None else None

    def measure(self, config: PruneConfig, progress=None) -> SpeedResult:
        """Baseline vs `config` on the real-size shape (cached). `progress(fraction, text)` is told
        where it is. Raises ValueError for a schedule the shape cannot run."""
        key = self._key(config)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            cuda = self.device.startswith("cuda")
            width = 1.0 if cuda else self.cpu_width
            step = progress or (lambda fraction, text: None)
            step(0.05, "Building the real-size model (random weights)…")
            model = bench.build(ARCH, width_scale=width, device=self.device,
                                dtype=torch.float16 if cuda else torch.float32)
            try:
                specs = [bench.MethodSpec("baseline"), bench.MethodSpec("pruned", config)]
                done = [0]
                total = REPEATS + 2

                def log(*_, **__):
                    done[0] += 1
                    step(0.15 + 0.8 * min(done[0], total) / total, "Timing prefill, baseline and pruned alternately…")
                step(0.15, "Warming up both paths…")
                measured = bench.measure(model, specs, repeats=REPEATS, new_tokens=1, decode_repeats=0,
                                         scoring_repeats=0, log=log)
                baseline_full = flops.tflops([model.visual_tokens + model.text_tokens] * model.layers, model.hidden,
                                             model.intermediate)
                figures = bench.analytic(specs[1], flops.ARCHITECTURES[ARCH], model, baseline_full)
                result = SpeedResult(arch=ARCH, width_scale=width, device=self.device,
                                     baseline_ms=measured["baseline"]["prefill_ms"],
                                     pruned_ms=measured["pruned"]["prefill_ms"], bound=figures["bound"],
                                     visual_tokens=model.visual_tokens,
                                     final_visual_tokens=figures["final_visual_tokens"], repeats=REPEATS)
            finally:
                del model
                gc.collect()
            self._cache[key] = result
            step(1.0, "Done")
            return result


@dataclass
class Panel:
    result: object      # gr.Markdown
    run: object         # gr.Button


def build() -> Panel:
    """The "Speed at real size" panel: what it measures, a button, and the result."""
    import gradio as gr

    with gr.Group(elem_id="speed-panel"):
        result = gr.Markdown(
            "### Speed at real size\nThe built-in models are too small for pruning to pay off in wall-clock time. "
            "This times the unpruned and the chosen schedule on a language model of **LLaVA-1.5-7B's shape** "
            f"(random weights, timing only; {CPU_WIDTH:g}× width on a CPU), against the analytic bound. About half "
            "a minute on a 2-core CPU.", elem_id="speed-result")
        run = gr.Button("Measure speed at real size", elem_id="speed-run", variant="secondary")
    return Panel(result=result, run=run)
