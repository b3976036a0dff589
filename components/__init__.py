"""The Gradio demo's pieces, one module each; app.py lays them out and wires their events.

inputs (media, question, model, method, budget, Advanced) · answers (side by side, differences
highlighted) · metrics (table, sequence-length chart) · overlay (surviving patches, heatmaps,
click-to-inspect) · downloads (trace JSON, comparison card) · card (the slide PNG) · examples
(bundled scenes) · notes (header, "how this is measured") · theme. The non-UI logic lives in
engine (model cache, timed comparison, errors) and schedule (controls -> PruneConfig).
"""
