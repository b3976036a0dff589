"""Speed at real size: the chosen schedule timed on a language model of a real checkpoint's shape.

The tiny models the app answers with are too small for pruning to pay off in wall-clock time (the
fixed cost per layer outweighs the FLOPs saved). So this panel times the baseline and the chosen
schedule on a model with the language-model shape of the selected family's checkpoint (hidden and
MLP width, depth, visual tokens; `FAMILY_ARCH`), random weights (timing only: no answer is read),
built with the benchmark's own code (transprune.bench, a LLaVA-1.5-style model whose vision tower
gives a square patch grid, so N is rounded to the nearest square): at full width on a GPU, at a
quarter of the width on a CPU so that it fits in memory and seconds. On a CPU, a shape whose
unpruned prefill costs more FLOPs than LLaVA-1.5-7B's (the AnyRes and video families: thousands of
visual tokens into a 7B model) would take minutes, so it is timed at LLaVA-1.5-7B's shape instead,
and the panel says so; SmolVLM's ~1k visual tokens into a 0.5B model cost far less and run at its
own shape. Results are cached per (shape, schedule).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import threading
from dataclasses import dataclass

import torch

from transprune import PruneConfig, bench, flops
from transprune.adapters import FAMILIES

ARCH = "llava-1.5-7b"       # the default shape, and the CPU stand-in for long visual prompts
# Family -> the architecture whose shape it is timed at (each adapter's `timing_arch`).
FAMILY_ARCH = {name: adapter.timing_arch for name, adapter in FAMILIES.items() if adapter.timing_arch}
CPU_WIDTH = 0.25
REPEATS = 3


def timed_shape(family: str | None, cuda: bool) -> tuple[str, flops.Shape, str]:
    """(arch name, the shape timed, a note) for a family: its checkpoint's language-model shape with N
    rounded to a square; on a CPU, LLaVA-1.5-7B's when that shape's prefill costs more (minutes)."""
    arch = FAMILY_ARCH.get(family or "", ARCH)
    shape = flops.ARCHITECTURES[arch]
    note = ""
    if not cuda and flops.config_tflops(None, shape) > flops.config_tflops(None, flops.ARCHITECTURES[ARCH]):
        note = (f"this family's prompts carry {shape.visual_tokens} visual tokens, minutes per run on a CPU, "
                "so the LLaVA-1.5-7B shape stands in")
        arch, shape = ARCH, flops.ARCHITECTURES[ARCH]
    side = round(math.sqrt(shape.visual_tokens))
    return arch, dataclasses.replace(shape, visual_tokens=side * side), note


@dataclass(frozen=True)
class SpeedResult:
    arch: str
    layers: int
    width_scale: float
    device: str
    baseline_ms: float
    pruned_ms: float
    bound: float                 # analytic prefill speedup of the timed model (all tokens)
    visual_tokens: int
    final_visual_tokens: int
    repeats: int
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.pruned_ms

    @property
    def where(self) -> str:
        width = "full width" if self.width_scale == 1 else f"{self.width_scale:g}× width"
        return (f"{self.arch} language-model shape ({width}, {self.layers} layers, {self.visual_tokens} visual "
                f"tokens) on {self.device}")

    def headline(self) -> str:
        return f"**{self.speedup:.2f}×** prefill at real size (bound {self.bound:.2f}×)"

    def markdown(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return (f"### {self.speedup:.2f}× faster prefill at real size\n"
                f"{self.where}{note}: baseline **{self.baseline_ms:.0f} ms**, pruned **{self.pruned_ms:.0f} ms** "
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

    def _key(self, arch: str, config: PruneConfig) -> tuple:
        # What a timing depends on: the shape, the schedule on its depth (the position mode and seed do
        # not change its speed), the device and the CPU threads torch uses now.
        resolved = config.resolve(flops.ARCHITECTURES[arch].layers)
        return arch, dataclasses.replace(resolved, positions="compact", seed=0), self.device, torch.get_num_threads()

    def _shape(self, family: str | None):
        return timed_shape(family, self.device.startswith("cuda"))

    def cached(self, config: PruneConfig | None, family: str | None = None) -> SpeedResult | None:
        if config is None:
            return None
        return self._cache.get(self._key(self._shape(family)[0], config))

    def measure(self, config: PruneConfig, progress=None, family: str | None = None) -> SpeedResult:
        """Baseline vs `config` on the real-size shape of `family` (cached). `progress(fraction, text)`
        is told where it is. Raises ValueError (ConfigError) for a schedule the shape cannot run."""
        arch, shape, note = self._shape(family)
        key = self._key(arch, config)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            cuda = self.device.startswith("cuda")
            width = 1.0 if cuda else self.cpu_width
            step = progress or (lambda fraction, text: None)
            step(0.05, "Building the real-size model (random weights)…")
            model = bench.build_shape(shape, description=arch, width_scale=width, device=self.device,
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
                figures = bench.analytic(specs[1], shape, model, baseline_full)
                result = SpeedResult(arch=arch, layers=model.layers, width_scale=width, device=self.device,
                                     baseline_ms=measured["baseline"]["prefill_ms"],
                                     pruned_ms=measured["pruned"]["prefill_ms"], bound=figures["bound"],
                                     visual_tokens=model.visual_tokens,
                                     final_visual_tokens=figures["final_visual_tokens"], repeats=REPEATS, note=note)
            finally:
                del model
                release_memory()
            self._cache[key] = result
            step(1.0, "Done")
            return result


def release_memory():
    """Give a real-size model's memory back: to torch's CUDA cache's owner, and on Linux to the system
    (glibc keeps freed blocks of a CPU model in the process otherwise, so RSS stayed at its peak)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


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
            "This times the unpruned and the chosen schedule on a language model of the **selected family's real "
            f"checkpoint shape** (e.g. LLaVA-1.5-7B; random weights, timing only; {CPU_WIDTH:g}× width on a CPU), "
            "against the analytic bound. About half a minute on a 2-core CPU.", elem_id="speed-result")
        run = gr.Button("Measure speed at real size", elem_id="speed-run", variant="secondary")
    return Panel(result=result, run=run)
