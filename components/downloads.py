"""Downloads: the run's trace as JSON, and the slide-ready comparison card as PNG.

Files go to a private folder under the system temp directory; files older than an hour are
removed whenever a new one is written.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from . import card, metrics

EXPORT_DIR = Path(tempfile.gettempdir()) / "transprune-app"
EXPORT_MAX_AGE_S = 3600


def _export_path(stem: str, suffix: str) -> Path:
    """A fresh file under EXPORT_DIR; files older than an hour are removed on the way."""
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in EXPORT_DIR.iterdir():
        try:
            if now - old.stat().st_mtime > EXPORT_MAX_AGE_S:
                old.unlink()
        except OSError:
            pass
    handle = tempfile.NamedTemporaryFile(dir=EXPORT_DIR, prefix=f"{stem}-", suffix=suffix, delete=False)
    handle.close()
    return Path(handle.name)


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
    path = _export_path("transprune-trace", ".json")
    path.write_text(json.dumps(trace_record(comparison, method_label, budget), indent=1))
    return str(path)


def write_card(comparison, canvas, method_label: str, budget: str, real_size=None) -> str:
    path = _export_path("transprune-card", ".png")
    card.render(comparison, canvas, method_label, budget, real_size).save(path, optimize=True)
    return str(path)


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
