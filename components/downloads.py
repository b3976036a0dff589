"""Downloads: the run's trace as JSON, and the slide-ready comparison card as PNG.

Both are written through components.files (write-once, content-named, capped with the rest of
Gradio's cache).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import gradio as gr
from . import card, metrics
from .files import STORE

def trace_record(comparison, method_label: str, budget: str) -> dict:
    """What "Download trace" saves: the config (requested and resolved), the trace with kept indices
    and scores, both answers and all timings."""
    def run(result):
        return dict(text=result.text, timings=result.timings, output_ids=result.output_ids[0].tolist())
    nums = metrics.numbers(comparison)
    return dict(
        model=comparison.model, checkpoint=comparison.spec.checkpoint, device=comparison.device,
        dtype=comparison.dtype, question=comparison.question, image_size=list(comparison.image_size),
        method=method_label, budget=budget, config=comparison.config.to_dict(),
        resolved_config=comparison.resolved.to_dict(),
        prefill_ms_samples=comparison.prefill_samples, first=comparison.first,
        baseline=run(comparison.baseline), pruned=run(comparison.pruned),
        analytic_tflops=dict(visual=list(nums.tflops_visual), whole_sequence=list(nums.tflops_full)),
        measured_prefill_speedup=nums.speedup, trace=comparison.pruned.trace.to_dict())


def write_trace(comparison, method_label: str, budget: str) -> str:
    data = json.dumps(trace_record(comparison, method_label, budget), indent=1).encode()
    return STORE.write(data, "transprune-trace", ".json")


def write_card(comparison, canvas, method_label: str, budget: str, real_size=None) -> str:
    buffer = io.BytesIO()
    card.render(comparison, canvas, method_label, budget, real_size).save(buffer, format="PNG", optimize=True)
    return STORE.write(buffer.getvalue(), "transprune-card", ".png")


@dataclass
class Downloads:
    trace: gr.DownloadButton
    card: gr.DownloadButton
    preview: gr.Image


def build() -> Downloads:
    with gr.Row():
        trace_button = gr.DownloadButton("Download trace (JSON)", interactive=False, elem_id="download-trace")
        card_button = gr.DownloadButton("Export comparison card (PNG)", variant="primary", interactive=False,
                                        elem_id="download-card")
    with gr.Accordion("Comparison card preview (1920×1080, for slides and papers)", open=False):
        preview = gr.Image(label="Comparison card", show_label=False, type="filepath", interactive=False,
                           elem_id="card-preview")
    return Downloads(trace=trace_button, card=card_button, preview=preview)
