"""The Gradio demo: handlers called directly, and the running app driven through gradio_client.

The app is launched in-process on a free port with the offline tiny model; bad inputs must come
back as clear error messages, and the next good request must still be answered.
"""

from __future__ import annotations

import dataclasses
import json
import re
import os
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app as app_module
from components import answers, card, downloads, drawing, engine, examples, hub, inputs, loading, metrics, overlay, policy, schedule
from components.compare import CompareOutputs, make_handlers
from components.engine import Engine, Settings, UserError
from transprune import PruneConfig
from transprune.models import REGISTRY, LoadedModel, ModelLoadError

MODEL = "tiny-llava"
FAST = dict(max_new_tokens=4, repeats=1)   # keeps each request well under a second on CPU


def noop_progress(*args, **kwargs):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two CPU threads shared with other jobs thrash badly; the tiny model needs one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def eng():
    e = Engine()
    e.get(MODEL)
    return e


@pytest.fixture(scope="module")
def handlers(eng):
    return make_handlers(eng, MODEL)


@pytest.fixture(scope="module")
def example_image():
    return Image.open(examples.example_rows()[0][0]).convert("RGB")


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_app):
    """(client, app) for the app launched in-process on a free port; closed afterwards."""
    from gradio_client import Client

    temp = tmp_path_factory.mktemp("gradio")
    with serve_app(temp, MODEL) as (url, built):
        yield Client(url, verbose=False, download_files=str(temp / "downloads")), built


# ---------------------------------------------------------------------------- schedules
def test_budget_presets_match_library_presets():
    assert build("TransPrune", "High") == PruneConfig.preset("high")
    assert build("TransPrune", "Low").keep_ratios == PruneConfig.preset("low").keep_ratios
    assert build("FastV", "High").prune_layers == PruneConfig.preset("fastv").prune_layers
    assert build("PDrop", "Low").keep_ratios == (0.25, 0.125, 0.0625)
    assert build("TTV-only", "High").effective_alpha == 1.0
    assert build("IGA-only", "High").effective_alpha == 0.0
    assert build("Random", "High").method == "random"


def build(method, budget, **kw):
    return schedule.build_config(method, budget, **kw)


def test_custom_keep_ratio_rule():
    assert build("TransPrune", "Custom", keep_ratio=0.125).keep_ratios == PruneConfig.preset("high").keep_ratios
    ratios = build("TransPrune", "Custom", keep_ratio=0.3).keep_ratios
    assert ratios[-1] == pytest.approx(0.3) and ratios[0] > ratios[1] > ratios[2]
    assert build("FastV", "Custom", keep_ratio=0.3).keep_ratios == (0.3,)
    assert build("PDrop", "Custom", keep_ratio=0.4).keep_ratios == (1.0, 0.8, 0.4)
    with pytest.raises(Exception, match="Keep ratio 0.0 must lie in"):
        build("TransPrune", "Custom", keep_ratio=0.0)


def test_visionzip_budgets():
    assert build("VisionZip", "High") == PruneConfig.preset("visionzip-192", reference_depth=None)
    assert build("VisionZip", "Low").pre_llm_keep == PruneConfig.preset("visionzip-64").pre_llm_keep
    assert build("VisionZip", "Custom", keep_ratio=0.25).pre_llm_keep == 0.25
    with pytest.raises(Exception, match="no pruning layers"):
        build("VisionZip", "High", layers_text="3, 4")
    assert schedule.describe(build("VisionZip", "Low"), 16) == "VisionZip keeps 11.1% of the patches before the LLM"
    assert inputs.on_method("VisionZip")[2]["interactive"] is False


def test_custom_layers_use_the_models_numbers():
    config = build("TransPrune", "High", layers_text="3, 8")
    assert config.prune_layers == (3, 8) and config.reference_depth is None
    assert config.keep_ratios == pytest.approx((0.125 ** 0.5, 0.125), abs=1e-6)
    assert config.resolve(16).prune_layers == (3, 8)


@pytest.mark.parametrize("text, message", [("6, 4", "strictly increasing"), ("a, b", "whole layer numbers")])
def test_impossible_custom_layers_raise(text, message):
    with pytest.raises(Exception, match=message):
        build("TransPrune", "High", layers_text=text)


# ---------------------------------------------------------------------------- validation
def test_prepare_image_rejects_missing_and_downscales_large():
    with pytest.raises(UserError, match="No image"):
        inputs.prepare_image(None)
    big = Image.new("RGB", (3000, 1500), "white")
    image, notices = inputs.prepare_image(big)
    assert max(image.size) == inputs.MAX_SIDE and image.size[0] / image.size[1] == pytest.approx(2.0, rel=0.01)
    assert notices and "downscaled" in notices[0]


def test_prepare_image_refuses_a_sliver():
    with pytest.raises(UserError, match=r"This image is 8000x100, 80 times as wide as it is tall; the limit is 12:1"):
        inputs.prepare_image(Image.new("RGB", (8000, 100), "white"))
    assert inputs.prepare_image(Image.new("RGB", (1200, 100), "white"))[0].size == (1200, 100)


def test_question_counter_counts_what_the_handler_counts():
    assert inputs.question_count("  What   colour?  ") == f"12 / {inputs.MAX_QUESTION_CHARS} characters"
    assert len(inputs.prepare_question("  What   colour?  ")) == 12


def test_image_files_checked_from_the_header(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("this is not an image")
    with pytest.raises(UserError, match="not an image"):
        inputs.check_image_file(str(junk))
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)   # 48 megapixels, a few kB on disk
    with pytest.raises(UserError, match="megapixels"):
        inputs.check_image_file(str(huge))


@pytest.mark.parametrize("question, message", [("", "empty"), ("   ", "empty"), ("why " * 200, "characters")])
def test_prepare_question(question, message):
    with pytest.raises(UserError, match=message):
        inputs.prepare_question(question)
    assert inputs.prepare_question("  What   color?  ") == "What color?"


# ---------------------------------------------------------------------------- answers
def test_diff_marks_only_differing_words():
    left, right = answers.diff_segments("the red circle", "the blue circle")
    assert "".join(t for t, _ in left) == "the red circle"
    assert "".join(t for t, _ in right) == "the blue circle"
    assert [t.strip() for t, label in left if label] == ["red"]
    assert [t.strip() for t, label in right if label] == ["blue"]
    same_left, same_right = answers.diff_segments("red", "red")
    assert all(label is None for _, label in same_left + same_right)
    same = answers.verdict("red", "red", 18, 144, 0.6, "prefill **2.10×** at real size")
    assert same.startswith("✓ **Same answer**") and "**144 → 18** visual tokens" in same and "**60%**" in same
    assert "2.10×" in same and "<small>" not in same
    differ = answers.verdict("red", "blue", 18, 144, 0.6, "x", heldout="98 % of 500")
    assert "differ" in differ and differ.endswith("<small>98 % of 500</small>")
    line = answers.heldout_line({"n": 500, "accuracy": 0.98}, {"accuracy": 1.0})
    assert "On 500 held-out scene questions" in line and "98.0%" in line and "100.0%" in line
    assert answers.heldout_line(None, None) is None
    long = answers.verdict("red", "red", 18, 144, 0.6, "x", question="word " * 100)
    assert "word " * 23 + "word…</small>" in long and long.count("word") == 24     # cut at 120 characters
    asked = answers.verdict("red", "red", 18, 144, 0.6, "x", question="**bold** <b>x</b> [link](y)?")
    assert asked.startswith("<small>Q: \\*\\*bold\\*\\* \\<b\\>x\\</b\\> \\[link\\]\\(y\\)?</small>")


# ---------------------------------------------------------------------------- engine and models
def test_default_model_falls_back_to_an_offline_model(monkeypatch):
    def broken():
        raise ModelLoadError("weights missing")
    monkeypatch.setitem(REGISTRY, "shapes-llava", dataclasses.replace(REGISTRY["shapes-llava"], builder=broken))
    e = Engine()
    assert e.default_model("auto", log=lambda *_: None) == "tiny-llava"
    assert "not available" in e.label("shapes-llava")
    # A checkpoint that cannot be downloaded also falls back.
    assert e.default_model("llava-1.5-7b", log=lambda *_: None) == "tiny-llava"


def test_hub_model_offline_is_a_clear_message():
    e = Engine()
    with pytest.raises(UserError, match="cannot be downloaded"):
        e.get("llava-1.5-7b")


def test_hub_model_load_failure_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)   # HF_HUB_OFFLINE makes it fail fast
    monkeypatch.setattr(hub, "free_memory_bytes", lambda device: None)
    with pytest.raises(UserError, match="Hugging Face Hub"):
        Engine().get("llava-1.5-7b")


def test_model_too_big_for_memory_is_refused(monkeypatch):
    monkeypatch.setattr(hub, "cached_on_disk", lambda checkpoint: True)
    monkeypatch.setattr(hub, "free_memory_bytes", lambda device: 2 * 2**30)
    with pytest.raises(UserError, match="does not fit in memory"):
        Engine().get("llava-1.5-7b")


def test_allowed_models_restrict_the_dropdown():
    e = Engine(Settings(allowed_models=("tiny-llava",)))
    assert [name for _, name in e.choices()] == ["tiny-llava"]
    with pytest.raises(UserError, match="not offered"):
        e.get("tiny-llava-next")
    open_engine = Engine()
    assert open_engine.allowed("llava-hf/llava-1.5-7b-hf") and not open_engine.allowed("../etc/passwd")
    # Each label says the size, and a Hub checkpoint says it downloads.
    assert all(label.endswith("from the Hub") == (not REGISTRY[name].offline) and REGISTRY[name].size in label
               for label, name in open_engine.choices())
    assert app_module.allowed_from("registry") == tuple(REGISTRY)
    assert app_module.allowed_from("") is None


def test_out_of_memory_during_a_run_is_a_clear_message(eng, example_image, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(LoadedModel, "generate", oom)
    with pytest.raises(UserError, match="Ran out of memory"):
        eng.compare(MODEL, example_image, "what color is the circle?", PruneConfig.preset("high"), **FAST)


def test_schedule_that_does_not_fit_the_model(eng, example_image):
    config = build("TransPrune", "High", layers_text="10, 16")
    with pytest.raises(UserError, match="Impossible pruning schedule"):
        eng.compare(MODEL, example_image, "what color is the circle?", config, **FAST)


def test_gpu_task_is_identity_without_spaces():
    def f():
        return 1
    try:
        import spaces  # noqa: F401
    except ImportError:
        assert engine.gpu_task(f) is f


# ---------------------------------------------------------------------------- the compare handler
def _trace_json(outputs) -> dict:
    return json.loads(Path(outputs.trace["value"]).read_text())


def test_compare_handler_outputs(handlers, example_image):
    compare, _ = handlers
    out = compare(example_image, "What color is the circle?", progress=noop_progress, **FAST)
    record = _trace_json(out)
    trace = record["trace"]
    assert "".join(t for t, _ in out.baseline) == record["baseline"]["text"]
    assert "".join(t for t, _ in out.pruned) == record["pruned"]["text"]
    table = out.table
    rows = {r[0]: r[1:] for r in table.values.tolist()}
    for stage in trace["stages"]:
        assert rows[metrics.kept_row_name(stage["layer"], out.state.comparison.pruned.trace)][1] == \
            str(len(stage["kept"]))
        assert stage["kept"] == sorted(stage["kept"])
    assert rows[metrics.SPEEDUP_ROW][1] == f"{record['measured_prefill_speedup']:.2f}×"
    assert "a toy: the verdict quotes the real-size figure" in rows[metrics.SPEEDUP_ROW][2]
    # Where the time went: the vision encoder, the LLM prefill and decoding add up to the answer pass.
    parts = ("Vision encoder ms (answer pass)", "LLM prefill ms (answer pass)", "Decode ms (answer pass)")
    for column in (0, 1):
        assert float(rows[parts[0]][column]) > 0
        assert sum(float(rows[part][column]) for part in parts) == pytest.approx(
            float(rows["End-to-end ms (answer pass)"][column]), abs=0.2)
    # Memory: what each run's KV cache holds at the end, counted exactly: every layer keeps the tokens it
    # saw in prefill (fewer after a pruning stage) plus one per decode step, the same bytes per token.
    comparison = out.state.comparison
    seen = comparison.pruned.trace.tokens_per_layer
    held = {"baseline": [seen[0] + comparison.baseline.timings["new_tokens"] - 1] * len(seen),
            "pruned": [n + comparison.pruned.timings["new_tokens"] - 1 for n in seen]}
    per_token = comparison.baseline.timings["kv_cache_mb"] * 2**20 / sum(held["baseline"])
    assert per_token == int(per_token) and per_token % 8 == 0               # keys + values, float32
    assert comparison.pruned.timings["kv_cache_mb"] * 2**20 == per_token * sum(held["pruned"])
    assert rows["KV cache at the end"] == [metrics._megabytes(comparison.baseline.timings["kv_cache_mb"]),
                                           metrics._megabytes(comparison.pruned.timings["kv_cache_mb"]),
                                           rows["KV cache at the end"][2]]
    assert "Run memory MB (peak RSS above the model)" not in rows      # a CPU's peak RSS reads 0 after a first run
    assert list(table.columns)[2] == "TransPrune"
    assert record["resolved_config"]["prune_layers"] == [4, 5, 6]
    assert len(out.stages) == len(trace["stages"])          # one overlay per stage
    for path, _ in out.stages:
        with Image.open(path) as image:
            assert image.size[0] / image.size[1] == pytest.approx(example_image.width / example_image.height,
                                                                  rel=0.01)
    card_image = Image.open(out.card["value"])
    assert card_image.size == (card.WIDTH, card.HEIGHT)


@pytest.mark.parametrize("row", range(len(examples.EXAMPLES)), ids=[e.label for e in examples.EXAMPLES])
def test_every_example_agrees_at_the_default_settings_except_the_control(eng, row):
    """On the offline default model, with the app's defaults (High, the model's position mode)."""
    compare, _ = make_handlers(eng, "shapes-llava")
    path, question, method, budget = examples.example_rows()[row]
    out = compare(Image.open(path).convert("RGB"), question, model="shapes-llava", method=method, budget=budget,
                  progress=noop_progress, max_new_tokens=4, repeats=1)
    record = _trace_json(out)
    same = record["baseline"]["text"] == record["pruned"]["text"]
    assert record["resolved_config"]["positions"] == "original"   # shapes-llava's recommended mode
    if examples.EXAMPLES[row].control:
        assert not same and "⚠ **Answers differ**" in out.verdict
    else:
        assert same and "✓ **Same answer**" in out.verdict, (question, record["baseline"]["text"],
                                                       record["pruned"]["text"])
    # The question, the model and the schedule that ran: a verdict left on the page names its run.
    ran = f"{answers.escape_markdown(REGISTRY['shapes-llava'].label)} · {method} · {budget}"
    assert out.verdict.startswith(f"<small>Q: {answers.escape_markdown(question)} — {ran}</small>")


def test_compare_handler_with_visionzip(handlers, example_image):
    """VisionZip runs before the LLM: its stage (layer 0) shows in the table, the overlays, the
    patch inspector and the card, and the token counts are the baseline's 144 patches."""
    compare, _ = handlers
    out = compare(example_image, "What color is the circle?", method="VisionZip", budget="Low",
                  progress=noop_progress, **FAST)
    record = _trace_json(out)
    stages = record["trace"]["stages"]
    assert [(s["layer"], len(s["kept"])) for s in stages] == [(0, 16)]
    assert record["resolved_config"]["pre_llm_keep"] == pytest.approx(1 / 9)
    rows = {r[0]: r[1:] for r in out.table.values.tolist()}
    assert rows["Visual tokens in"][:2] == ["144", "144"]
    assert rows[metrics.kept_row_name(0, out.state.comparison.pruned.trace)][:2] == ["144", "16"]
    assert "Visual tokens before the LLM (VisionZip)" in rows
    (path, caption), = out.stages
    assert caption.startswith("Before the LLM (VisionZip):")
    image = Image.open(path)
    assert image.size[0] / image.size[1] == pytest.approx(example_image.width / example_image.height, rel=0.01)
    assert Image.open(out.card["value"]).size == (card.WIDTH, card.HEIGHT)


def test_compare_handler_with_sparsevlm_recycled_tokens(handlers, example_image):
    """SparseVLM inserts recycled tokens: the table counts what the LLM sees (kept + recycled), the
    overlays and the patch inspector cover the image's own 144 patches only."""
    compare, _ = handlers
    out = compare(example_image, "What color is the circle?", method="SparseVLM", budget="High",
                  progress=noop_progress, **FAST)
    stages = _trace_json(out)["trace"]["stages"]
    assert [s["layer"] for s in stages] == [2, 4, 8] and all(s["inserted"] for s in stages)
    own = [len([k for k in s["kept"] if k < 144]) for s in stages]
    rows = {r[0]: r[1:] for r in out.table.values.tolist()}
    recycled = len(stages[0]["kept"]) - own[0]
    assert rows[metrics.kept_row_name(2)][:2] == ["144", f"{len(stages[0]['kept'])} ({own[0]} + {recycled} recycled)"]
    assert [int(caption.split(": ")[1].split(" of ")[0]) for _, caption in out.stages] == own
    assert all(caption.endswith("recycled (not drawn: merged from pruned patches)") for _, caption in out.stages)
    assert f"visual tokens ({len(stages[-1]['kept']) - own[-1]} recycled)" in str(out.verdict)
    for path, _ in out.stages:
        assert Image.open(path).size[0] > 0
    assert Image.open(out.card["value"]).size == (card.WIDTH, card.HEIGHT)


def test_overlay_status_covers_the_patches_when_recycled_tokens_follow_visionzip(eng, example_image):
    comparison = eng.compare(MODEL, example_image, "What color is the circle?",
                             PruneConfig.preset("visionzip-128+sparsevlm"), **FAST)
    trace = comparison.pruned.trace
    assert all(len(stage.inserted) for stage in trace.stages[1:])
    for index, stage in enumerate(trace.stages):
        status = overlay._status(trace, index)
        assert len(status) == trace.visual_tokens == 145   # VisionZip: 144 patches + CLS
        assert int((status == 0).sum()) == len(trace.own(stage.kept))


def test_visionzip_on_another_family_is_a_clear_message(example_image):
    with pytest.raises(UserError, match="VisionZip runs on LLaVA-1.5-family models only"):
        Engine().compare("tiny-llava-next", example_image, "What shape is yellow?",
                         build("VisionZip", "High"), **FAST)


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-llava-next"])
@pytest.mark.parametrize("method", ["DivPrune", "CDPruner"])
def test_divprune_and_cdpruner_on_another_family_prune_the_first_layers_input(example_image, model, method):
    comparison = Engine().compare(model, example_image, "What shape is yellow?", build(method, "High"), **FAST)
    trace = comparison.pruned.trace
    (stage,) = trace.stages
    assert stage.layer == 0 and comparison.resolved.pre_llm is None
    assert comparison.resolved.method == f"{method.lower()}_first_layer"
    assert metrics.stage_place(0, trace) == f"before the LLM ({method} (layer 0))"
    numbers = metrics.numbers(comparison)
    assert numbers.kept == [(0, len(stage.kept), 0)]
    canvas = overlay.Canvas.from_trace(example_image, trace)   # the overlays draw this stage
    assert canvas is not None
    assert "on other models at the LLM's first layer" in inputs.budget_info(method)


def test_stacked_visionzip_overlays_and_patch_table(eng, example_image):
    comparison = eng.compare(MODEL, example_image, "What color is the circle?",
                             PruneConfig.preset("visionzip-128+high"), **FAST)
    trace = comparison.pruned.trace
    assert [(s.layer, len(s.kept)) for s in trace.stages] == [(0, 32), (4, 28), (5, 20), (6, 4)]
    canvas = overlay.Canvas.from_trace(example_image, trace)
    assert [c.split(":")[0] for _, c in overlay.stage_gallery(canvas)] == [
        "Before the LLM (VisionZip)", "After layer 4", "After layer 5", "After layer 6"]
    titles = [c for _, c in overlay.heatmap_gallery(canvas, 0)]
    assert titles == ["CLS attention before the LLM (VisionZip)"]
    survivor = int(trace.kept[trace.kept < 144][0])
    table = overlay.patch_table(trace, survivor)
    assert list(table.columns) == ["", "VisionZip", "Layer 4", "Layer 5", "Layer 6"]
    assert list(table.iloc[0, 1:]) == ["kept"] * 4


@pytest.mark.parametrize("preset, label", [("divprune-64", "DivPrune"), ("cdpruner-128+high", "CDPruner")])
def test_every_pre_llm_stage_is_named_by_its_own_label(eng, example_image, preset, label):
    """A stage before the LLM is called by its method's name in the table, captions, heatmaps and
    patch table (not "VisionZip", the first such stage)."""
    from components.compare import render_outputs

    comparison = eng.compare(MODEL, example_image, "What color is the circle?", PruneConfig.preset(preset), **FAST)
    trace = comparison.pruned.trace
    out = render_outputs(comparison, example_image, label, "High")
    rows = {r[0]: r[1:] for r in out.table.values.tolist()}
    assert f"Visual tokens before the LLM ({label})" in rows
    assert out.stages[0][1].startswith(f"Before the LLM ({label})")
    canvas = overlay.Canvas.from_trace(example_image, trace)
    assert [c for _, c in overlay.heatmap_gallery(canvas, 0)] == [f"Score before the LLM ({label})"]
    assert list(overlay.patch_table(trace, int(trace.kept[0])).columns)[1] == label
    assert not any("VisionZip" in str(value) for value in [*rows, *(c for _, c in out.stages)])


def test_model_loader_describes_or_warns(handlers):
    _, load_model = handlers
    text = load_model(MODEL, "auto", "sdpa", progress=noop_progress)
    assert "16 decoder layers" in text and "layers 4, 5, 6" in text
    with pytest.warns(UserWarning):
        text = load_model("llava-1.5-7b", "auto", "sdpa", progress=noop_progress)
    assert "not available" in text and "cannot be downloaded" in text


def test_two_users_at_once_keep_their_own_settings(handlers, example_image):
    compare, _ = handlers
    results, errors = {}, []

    def user(budget):
        try:
            for _ in range(2):
                out = compare(example_image, "What color is the circle?", budget=budget, progress=noop_progress,
                              **FAST)
                results.setdefault(budget, []).append(_trace_json(out)["resolved_config"]["keep_ratios"])
        except Exception as error:  # surfaced below
            errors.append(error)
    threads = [threading.Thread(target=user, args=(b,)) for b in ("High", "Low")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results["High"] == [list(PruneConfig.preset("high").keep_ratios)] * 2
    assert results["Low"] == [list(PruneConfig.preset("low").keep_ratios)] * 2


def test_patch_click_reports_scores_per_stage(eng, example_image):
    comparison = eng.compare(MODEL, example_image, "What color is the circle?", PruneConfig.preset("high"), **FAST)
    canvas = overlay.Canvas.from_trace(example_image, comparison.pruned.trace)
    state = type("State", (), {"canvas": canvas})()
    kept = int(comparison.pruned.trace.kept[0])
    x0, y0, x1, y1 = canvas.rect(kept)
    event = gr.SelectData(None, {"index": [(x0 + x1) / 2, (y0 + y1) / 2], "value": None, "selected": True})
    path, note, table = overlay.on_patch_click(state, "image", event)
    assert f"#{kept}" in note and Image.open(path).size == canvas.image.size
    stages = comparison.pruned.trace.stages
    assert list(table.columns) == ["", *[f"Layer {s.layer}" for s in stages]]
    assert list(table[""]) == overlay.PATCH_ROWS
    assert list(table.iloc[0, 1:]) == ["kept"] * len(stages)   # a survivor of the last stage was kept throughout
    for column, stage in zip(table.columns[1:], stages):
        at = stage.candidates.tolist().index(kept)
        assert float(table[column][3]) == pytest.approx(float(stage.score[at]), rel=1e-2)
        assert float(table[column][1]) == pytest.approx(float(stage.ttv[at]), rel=1e-2)
    # A click outside the center crop finds no patch.
    wide = Image.open(examples.example_rows()[3][0]).convert("RGB")
    comparison = eng.compare(MODEL, wide, "What shape is yellow?", PruneConfig.preset("high"), **FAST)
    canvas = overlay.Canvas.from_trace(wide, comparison.pruned.trace)
    assert overlay.find_patch(canvas, "image", 2, canvas.image.height / 2) is None


@pytest.mark.parametrize("method, row", [("DivPrune", "divprune-192"), ("CDPruner", "cdpruner-64"), ("DART", "dart-64")])
def test_the_held_out_line_reads_the_bundled_frontier_for_methods_the_eval_file_lacks(example_image, method, row):
    """shapes-llava's own eval JSON predates DART, DivPrune and CDPruner; its bundled frontier scored them on the
    same 500 held-out questions, so the verdict quotes that."""
    from components import frontier

    budget = "High" if row.endswith("192") else "Low"
    comparison = Engine().compare("shapes-llava", example_image, "What color is the circle?", build(method, budget),
                                  **FAST)
    record, baseline = comparison.heldout
    expected = json.loads(frontier.results_for("shapes-llava").read_text())
    assert record["accuracy"] == expected[row]["accuracy"] and baseline["n"] == 500
    assert "held-out scene questions" in answers.heldout_line(record, baseline)


def test_a_comparison_leaves_torchs_global_generator_alone(eng, example_image):
    """A tiny model built in another thread draws its weights from torch's shared generator (under
    tiny.BUILD_LOCK); a comparison running meanwhile must not reseed or draw from it."""
    before = torch.get_rng_state()
    eng.compare(MODEL, example_image, "What color is the circle?", build("Random", "High"), **FAST)
    assert torch.equal(torch.get_rng_state(), before)


def picture_below_the_scale(image: Image.Image) -> Image.Image:
    """A heatmap without the colour-scale strip above it: the part that lines up with the source image."""
    return image.crop((0, drawing.scale_bar_height(image.width), image.width, image.height))


def test_heatmaps_carry_their_colour_scale(eng, example_image):
    comparison = eng.compare(MODEL, example_image, "What color is the circle?", PruneConfig.preset("high"), **FAST)
    canvas = overlay.Canvas.from_trace(example_image, comparison.pruned.trace)
    image = overlay.heatmap(canvas, 0, "score")
    bar = drawing.scale_bar_height(image.width)
    assert image.size == (canvas.image.width, canvas.image.height + bar)
    # The middle of the strip (on top: a gallery caption covers the bottom) is the ramp: colours of the map,
    # darker to brighter from left to right.
    row = np.asarray(image)[bar // 2].astype(int)
    middle = row[int(image.width * 0.4):int(image.width * 0.6)]
    scale = drawing.colormap(np.linspace(0.0, 1.0, 256)).astype(int)
    distance = np.abs(middle[:, None, :] - scale[None, :, :]).sum(axis=-1)
    assert distance.min(axis=1).max() <= 6                 # every pixel is a colour of the map
    place = distance.argmin(axis=1)
    assert (np.diff(place) >= 0).all() and place[-1] > place[0]
    low, high = comparison.pruned.trace.stages[0].score.min(), comparison.pruned.trace.stages[0].score.max()
    assert float(low) < float(high)


def test_anyres_overlays_map_both_views_onto_the_image(example_image):
    e = Engine()
    wide = Image.open(examples.example_rows()[3][0]).convert("RGB")
    comparison = e.compare("tiny-llava-next", wide, "What shape is yellow?", PruneConfig.preset("high"), **FAST)
    canvas = overlay.Canvas.from_trace(wide, comparison.pruned.trace)
    assert canvas.segments == ["base", "high-res"]
    gallery = overlay.stage_gallery(canvas)
    assert len(gallery) == 2 * len(comparison.pruned.trace.stages)
    assert {"(base)" in c for _, c in gallery} == {True, False}
    heatmaps = [picture_below_the_scale(image) for image, _ in overlay.heatmap_gallery(canvas, 0)]
    for image in [image for image, _ in gallery] + heatmaps:
        assert image.size == canvas.image.size
        assert image.size[0] / image.size[1] == pytest.approx(2.0, rel=0.01)
    # Newline tokens have no place: every drawn token has a finite box.
    drawn = np.concatenate([canvas.tokens(s) for s in canvas.segments])
    assert len(drawn) < comparison.pruned.trace.visual_tokens


def test_stage_view_dims_pruned_patches(eng, example_image):
    comparison = eng.compare(MODEL, example_image, "What color is the circle?", PruneConfig.preset("high"), **FAST)
    canvas = overlay.Canvas.from_trace(example_image, comparison.pruned.trace)
    view = np.asarray(overlay.stage_view(canvas, 2), dtype=float)
    original = np.asarray(canvas.image, dtype=float)
    trace = comparison.pruned.trace
    pruned = sorted(set(range(trace.visual_tokens)) - set(trace.kept.tolist()))

    def centre(token):
        x0, y0, x1, y1 = canvas.rect(token)
        return (y0 + y1) // 2, (x0 + x1) // 2
    for token in pruned[:5]:
        assert view[centre(token)].sum() < original[centre(token)].sum() * 0.6
    for token in trace.kept.tolist()[:5]:
        assert np.allclose(view[centre(token)], original[centre(token)])


def test_sequence_chart_and_examples_are_reproducible(tmp_path):
    chart = metrics.sequence_chart([100] * 8, [100] * 4 + [20] * 4, scale=1)
    assert chart.size == (760, 300)
    redrawn = examples.write_examples(tmp_path)
    for path in redrawn:
        bundled = examples.EXAMPLES_DIR / path.name
        assert bundled.exists(), f"{bundled} missing: run python -m components.examples"
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(bundled)))


def test_examples_draw_with_the_training_scenes_geometry(monkeypatch):
    """One geometry: the examples call the shapes package's draw_shape, at the centres of its grid's cells."""
    from transprune.shapes import scenes

    assert examples.draw_shape is scenes.draw_shape
    calls = []
    monkeypatch.setattr(examples, "draw_shape", lambda draw, kind, cx, cy, radius, fill: calls.append((kind, cx, cy)))
    scene = examples.SCENES[1]                    # four shapes, each in a named cell
    examples.draw_scene(scene)
    assert [kind for kind, _, _ in calls] == [shape.kind for shape in scene.shapes]
    for shape, (_, cx, cy) in zip(scene.shapes, calls):
        x, y = cx / examples.SUPERSAMPLE / examples.VIEW, cy / examples.SUPERSAMPLE / examples.VIEW
        assert (int(y * scenes.GRID), int(x * scenes.GRID)) == scenes.CELLS[shape.where]
        assert (x * scenes.GRID % 1, y * scenes.GRID % 1) == pytest.approx((0.5, 0.5))


# ---------------------------------------------------------------------------- video
def make_clip(write_clip, path: Path, frames: int = 24, size=(160, 120)) -> Path:
    """A small MP4: a white bar sweeping across a dark background, 8 frames per second."""
    def draw(i):
        pixels = np.full((size[1], size[0], 3), 30, np.uint8)
        pixels[:, (i * 6) % size[0]:(i * 6) % size[0] + 20] = 255
        return pixels

    return write_clip(path, draw, frames, size[0], size[1], fps=8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, write_clip):
    return make_clip(write_clip, tmp_path_factory.mktemp("video") / "clip.mp4")


def test_video_comparison_draws_every_frame(handlers, clip, monkeypatch):
    compare, _ = handlers
    quoted = []      # the real-size figure the comparison card is drawn with
    render = downloads.card.render
    monkeypatch.setattr(downloads.card, "render", lambda *args: quoted.append(args[4]) or render(*args))
    out = compare(None, "What happens in the video?", video=str(clip), model="tiny-video-llava",
                  progress=noop_progress, **FAST)
    # Video-LLaVA's 8-frame prompts are timed on a CPU at LLaVA-1.5-7B's shape: the verdict, the card and
    # the panel quote that figure, and the verdict says it stands in.
    assert len(quoted) == 1 and quoted[0] is not None and "stands in" in quoted[0].note
    assert f"**{quoted[0].speedup:.2f}×** prefill at real size" in out.verdict
    assert "standing in for this family's longer prompts" in out.verdict
    record = _trace_json(out)
    assert record["trace"]["layout"]["frame"] is not None
    assert record["baseline"]["text"] and record["pruned"]["text"]
    sheet = Image.open(out.inspect)
    canvas = out.state.canvas
    assert sheet.size == canvas.image.size and len(out.stages) == 3
    # Every placed token's box lies on the sheet; tokens of later frames sit further right or down.
    boxes = canvas.layout.boxes[torch.isfinite(canvas.layout.boxes).all(dim=1)]
    assert boxes[:, 2].max() <= sheet.width + 1 and boxes[:, 3].max() <= sheet.height + 1
    first, last = canvas.tokens("video")[[0, -1]]
    assert (canvas.rect(int(last))[1], canvas.rect(int(last))[0]) > (canvas.rect(int(first))[1],
                                                                    canvas.rect(int(first))[0])
    # One token count everywhere: each caption's drawn + undrawn tokens equal the table's row for its
    # stage (a frame's class token has no patch to draw, but it is counted), and the verdict's.
    rows = {r[0]: r[1:] for r in out.table.values.tolist()}
    for (_, caption), stage in zip(out.stages, record["trace"]["stages"]):
        numbers = [int(n) for n in re.findall(r"(\d+) (?:of \d+ kept|not drawn)", caption)]
        assert sum(numbers) == len(stage["kept"]) == int(rows[metrics.kept_row_name(stage["layer"])][1]), caption
    assert f"→ {len(record['trace']['stages'][-1]['kept'])}** visual tokens" in out.verdict


def test_a_video_timed_at_its_familys_image_shape_says_so(handlers, clip):
    """Qwen2.5-VL is timed at its own shape, one image's visual tokens: a video's verdict says its prompt is longer."""
    compare, _ = handlers
    out = compare(None, "What happens in the video?", video=str(clip), model="tiny-qwen2.5-vl",
                  progress=noop_progress, **FAST)
    assert "prefill at real size" in out.verdict and "a video prompt carries more" in out.verdict


def test_video_errors(handlers, clip, example_image, tmp_path, monkeypatch):
    compare, _ = handlers
    cases = [
        (dict(image=example_image, video=str(clip), model="tiny-video-llava"), "clear one of them"),
        (dict(image=None, video=str(clip), model=MODEL), "takes images only"),
    ]
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4000)
    cases.append((dict(image=None, video=str(junk), model="tiny-video-llava"), "not a video"))
    for kwargs, message in cases:
        with pytest.raises(gr.Error, match=message):
            compare(question="What happens?", progress=noop_progress, **kwargs, **FAST)
    monkeypatch.setattr(inputs, "MAX_VIDEO_SECONDS", 1)
    with pytest.raises(gr.Error, match="the limit is 1 s"):
        compare(None, "What happens?", video=str(clip), model="tiny-video-llava", progress=noop_progress, **FAST)


# ---------------------------------------------------------------------------- the wiring
def test_compare_endpoint_wiring(served):
    _, built = served
    fn = next(f for f in built.demo.fns.values() if f.api_name == "compare")
    assert isinstance(fn.inputs[0], gr.Image)
    assert isinstance(fn.inputs[1], gr.Textbox) and fn.inputs[1].label == "Question"
    assert fn.concurrency_id == app_module.GPU_QUEUE and fn.concurrency_limit == 1
    loaders = [f for f in built.demo.fns.values() if f.concurrency_id == app_module.GPU_QUEUE]
    assert len(loaders) >= 2                                # the run and the model loader share the queue
    assert built.demo._queue.max_size == app_module.QUEUE_SIZE


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("TRANSPRUNE_PORT", "9001")
    monkeypatch.setenv("TRANSPRUNE_MODEL", "tiny-llava-next")
    monkeypatch.setenv("TRANSPRUNE_SHARE", "1")
    args = app_module.parse_args([])
    assert (args.port, args.model, args.share, args.allowed_models) == (9001, "tiny-llava-next", True, "")
    monkeypatch.setenv("SPACE_ID", "someone/transprune")
    args = app_module.parse_args(["--port", "7000"])
    assert args.port == 7000 and args.allowed_models == "registry" and args.host == "0.0.0.0"
    assert app_module.launch_kwargs(args)["max_file_size"] == inputs.MAX_UPLOAD


# ---------------------------------------------------------------------------- through gradio_client
def _ask(client, image, question="What color is the circle?", **kwargs):
    from gradio_client import handle_file

    return api_outputs(client.predict(image=None if image is None else handle_file(str(image)), question=question,
                                      api_name="/compare", **kwargs))


def api_outputs(result) -> CompareOutputs:
    """The API's result by name: every output but the session state."""
    assert len(result) == len(CompareOutputs._fields) - 1
    return CompareOutputs(*result, state=None)


def test_client_compare_end_to_end(served):
    client, built = served
    path = examples.example_rows()[3][0]   # the wide frame: 2:1
    source = Image.open(path)
    out = _ask(client, path, "What shape is yellow?")
    verdict, baseline, pruned, table = out.verdict, out.baseline, out.pruned, out.table
    record = json.loads(Path(out.trace["value"]).read_text())
    trace = record["trace"]
    assert "visual tokens" in verdict
    assert "".join(s["token"] for s in baseline) == record["baseline"]["text"] != ""
    assert "".join(s["token"] for s in pruned) == record["pruned"]["text"] != ""
    rows = {r[0]: r[1:] for r in table["data"]}
    assert rows["Visual tokens in"][1] == str(trace["visual_tokens"])
    assert len(trace["stages"]) == 3
    for stage in trace["stages"]:
        assert rows[metrics.kept_row_name(stage["layer"])][1] == str(len(stage["kept"]))
    speedup = rows[metrics.SPEEDUP_ROW][1]
    assert speedup.endswith("×")
    assert float(speedup[:-1]) == pytest.approx(record["measured_prefill_speedup"], abs=0.006)
    assert rows["Device · dtype"][1] == "cpu · float32"
    assert record["model"] == MODEL and record["config"]["keep_ratios"] == list(PruneConfig.preset("high").keep_ratios)
    assert len(record["prefill_ms_samples"]["pruned"]) == 3
    aspect = source.width / source.height
    overlays = [item["image"] for item in out.stages] + [out.inspect]
    assert len(out.stages) == 3 and len(out.heatmaps) == 3
    for file in overlays:
        with Image.open(file) as image:
            assert image.width / image.height == pytest.approx(aspect, rel=0.01)
    for item in out.heatmaps:
        with Image.open(item["image"]) as image:
            picture = picture_below_the_scale(image)
            assert picture.width / picture.height == pytest.approx(aspect, rel=0.01)
    with Image.open(out.preview) as card_image:
        assert card_image.size == (card.WIDTH, card.HEIGHT)


BAD_REQUESTS = {
    "no image": (dict(image=None), "No image"),
    "not an image": (dict(image="junk"), "not an image"),
    "truncated image": (dict(image="truncated"), "not an image"),
    "huge image": (dict(image="huge"), "megapixels"),
    "empty question": (dict(question="  "), "question is empty"),
    "long question": (dict(question="why " * 200), "characters"),
    "offline checkpoint": (dict(model="llava-1.5-7b"), "cannot be downloaded"),
    "unknown model": (dict(model="no-such-model"), "not offered"),
    "layer past the model": (dict(layers="12, 40"), "Impossible pruning schedule"),
    "unordered layers": (dict(layers="6, 4"), "strictly increasing"),
    "bad custom ratio": (dict(budget="Custom", keep_ratio=0), "Custom keep ratio must be a number from 0.02 to 1, not 0"),
    "out of memory": (dict(oom=True), "Ran out of memory"),
    "model too big": (dict(model="llava-1.5-13b", too_big=True), "does not fit in memory"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "junk.png").write_text("definitely not a PNG")
    good = folder / "good.png"
    Image.new("RGB", (64, 48), "red").save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    Image.new("1", (8000, 6000)).save(folder / "huge.png")
    return folder


def test_client_visionzip_through_the_api(served):
    client, _ = served
    out = _ask(client, examples.example_rows()[0][0], method="VisionZip", budget="Custom", keep_ratio=0.25,
               max_new_tokens=3, repeats=1)
    record = json.loads(Path(out.trace["value"]).read_text())
    assert record["config"]["method"] == "visionzip" and record["config"]["pre_llm_keep"] == 0.25
    assert [(s["layer"], len(s["kept"])) for s in record["trace"]["stages"]] == [(0, 36)]
    rows = {r[0]: r[1:] for r in out.table["data"]}
    assert rows["Visual tokens before the LLM (VisionZip)"][:2] == ["144", "36"]


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_client_bad_input_then_good_request(served, bad_files, case, monkeypatch):
    from gradio_client.exceptions import AppError

    client, _ = served
    request, message = BAD_REQUESTS[case]
    request = dict(request)
    image = request.pop("image", examples.example_rows()[0][0])
    if image in ("junk", "truncated", "huge"):
        image = bad_files / f"{image}.png"
    if request.pop("oom", False):
        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")
        monkeypatch.setattr(LoadedModel, "generate", oom)
    if request.pop("too_big", False):
        monkeypatch.setattr(hub, "cached_on_disk", lambda checkpoint: True)
        monkeypatch.setattr(hub, "free_memory_bytes", lambda device: 2**30)
    kwargs = dict(FAST, **request)
    question = kwargs.pop("question", "What color is the circle?")
    with pytest.raises(AppError, match=message):
        _ask(client, image, question, **kwargs)
    monkeypatch.undo()
    out = _ask(client, examples.example_rows()[0][0], **FAST)
    assert "visual tokens" in out.verdict and out.baseline and out.pruned


def test_client_video(served, clip):
    from gradio_client import handle_file

    client, _ = served
    out = api_outputs(client.predict(image=None, question="What happens in the video?", video=handle_file(str(clip)),
                                     model="tiny-qwen2.5-vl", api_name="/compare", **FAST))
    record = json.loads(Path(out.trace["value"]).read_text())
    assert record["model"] == "tiny-qwen2.5-vl" and record["resolved_config"]["positions"] == "original"
    assert "".join(s["token"] for s in out.pruned) == record["pruned"]["text"]
    assert len(out.stages) == 3


def test_client_upload_size_is_capped(served, tmp_path):
    client, _ = served
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(21 * 2**20))   # above the 20mb cap
    with pytest.raises(Exception, match="maximum file size"):
        _ask(client, big, **FAST)
    assert "visual tokens" in _ask(client, examples.example_rows()[0][0], **FAST).verdict


def test_client_large_image_is_downscaled(served, tmp_path):
    client, _ = served
    path = tmp_path / "large.png"
    Image.new("RGB", (3000, 1500), (230, 230, 230)).save(path)
    out = _ask(client, path, **FAST)
    record = json.loads(Path(out.trace["value"]).read_text())
    assert max(record["image_size"]) == inputs.MAX_SIDE
    with Image.open(out.inspect) as image:
        assert image.width / image.height == pytest.approx(2.0, rel=0.01)
    assert "⚠ The image (3000x1500) was downscaled to 2048x1024" in out.verdict   # kept with this run's result


def test_default_model_on_a_cpu_space_is_a_small_real_checkpoint(monkeypatch):
    """Free CPU Space with the Hub reachable: CPU_SPACE_DEFAULT; offline, or it fails: shapes-llava."""
    tried = []

    def fake_get(self, name, *args, **kwargs):
        tried.append(name)
        if name == policy.CPU_SPACE_DEFAULT and not reachable[0]:
            raise UserError("cannot be downloaded")
        return object()

    reachable = [True]
    monkeypatch.setattr(Engine, "get", fake_get)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: reachable[0])
    monkeypatch.setenv("SPACE_ID", "someone/transprune")
    e = Engine(Settings(device="cpu", allowed_models=tuple(REGISTRY)))
    assert e.default_model("auto") == policy.CPU_SPACE_DEFAULT
    reachable[0] = False
    tried.clear()
    assert e.default_model("auto") == "shapes-llava" and tried == ["shapes-llava"]
    monkeypatch.delenv("SPACE_ID")
    reachable[0] = True
    assert e.default_model("auto") == "shapes-llava"                  # a laptop keeps the offline default
    assert e.default_model("tiny-llava") == "tiny-llava"              # a named model always wins


def test_cpu_space_default_fits_the_free_tier_and_loads_with_its_cpu_settings(monkeypatch):
    """The choice of docs/cpu_space.md: a downloadable checkpoint of a supported family whose float32
    weights take at most a quarter of the free tier's 16 GB, loaded on a CPU with CPU_PROCESSOR_KWARGS
    (not on a GPU); a CPU Space presets fewer timing repeats."""
    from transprune import adapters

    name = policy.CPU_SPACE_DEFAULT
    spec = REGISTRY[name]
    assert not spec.offline and adapters.by_family(spec.family).family == spec.family
    assert hub.parameter_count(spec.size) * hub.BYTES_PER_PARAM["float32"] <= 16 * 2**30 / 4
    assert policy.CPU_PROCESSOR_KWARGS[name] == {"do_image_splitting": False}

    loaded = {}

    def fake_load(model_name, **kwargs):
        loaded[model_name] = kwargs["processor_kwargs"]
        return LoadedModel(spec=spec, model=torch.nn.Linear(1, 1), processor=None)

    monkeypatch.setattr(loading, "load", fake_load)
    monkeypatch.setattr(loading, "for_model", lambda model: None)
    Engine(Settings(device="cpu"))._load(spec, name, "auto", "sdpa")
    assert loaded[name] == {"do_image_splitting": False}
    Engine(Settings(device="cuda"))._load(spec, name, "auto", "sdpa")
    assert loaded[name] == {}
    Engine(Settings(device="cpu"))._load(REGISTRY["llava-1.5-7b"], "llava-1.5-7b", "auto", "sdpa")
    assert loaded["llava-1.5-7b"] == {}

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert Engine(Settings(device="cpu")).default_repeats() == policy.DEFAULT_REPEATS == 3
    monkeypatch.setenv("SPACE_ID", "someone/transprune")
    assert Engine(Settings(device="cpu")).default_repeats() == policy.CPU_SPACE_REPEATS == 1
    assert Engine(Settings(device="cuda")).default_repeats() == 3


def test_cpu_processor_setting_gives_one_view_that_pruning_still_thins(tmp_path):
    """CPU_PROCESSOR_KWARGS through from_pretrained, as models.load applies it, on the offline Idefics3
    stand-in of SmolVLM-256M (same processor class): a 640x480 photo becomes one view of image_seq_len
    tokens instead of tiles + global view, and High still removes visual tokens from it."""
    from transformers import AutoProcessor

    from transprune.models import load

    lm = load("tiny-idefics3", device="cpu")
    lm.processor.save_pretrained(tmp_path)
    photo = Image.new("RGB", (640, 480), (120, 140, 160))
    question = "What is in the picture?"
    image_token = lm.model.config.image_token_id
    tiled = int((lm.prepare(photo, question)["input_ids"] == image_token).sum())
    lm.processor = AutoProcessor.from_pretrained(tmp_path, **policy.CPU_PROCESSOR_KWARGS[policy.CPU_SPACE_DEFAULT])
    inputs = lm.prepare(photo, question)
    one_view = int((inputs["input_ids"] == image_token).sum())
    assert one_view == lm.processor.image_seq_len < tiled
    trace = lm.generate(photo, question, "high", max_new_tokens=1, inputs=inputs).trace
    assert trace.visual_tokens == one_view and 0 < trace.visual_tokens_per_layer[-1] < one_view


def test_header_links_the_code_on_a_space(monkeypatch):
    from components import notes

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert "repository" in notes.code_link() and "http" not in notes.code_link()
    monkeypatch.setenv("SPACE_ID", "someone/transprune")
    assert "(https://huggingface.co/spaces/someone/transprune/tree/main)" in notes.code_link()


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 2.7, "Max new tokens must be a whole number from 1 to 256, not 2.7"),
    ("max_new_tokens", 0, "Max new tokens must be a whole number from 1 to 256"),
    ("max_new_tokens", 257, "Max new tokens must be a whole number from 1 to 256, not 257"),
    ("max_new_tokens", True, "Max new tokens must be a whole number from 1 to 256, not True"),
    ("repeats", "many", "Timing repeats must be a whole number from 1 to 9, not 'many'"),
    ("repeats", 10, "Timing repeats must be a whole number from 1 to 9, not 10"),
    ("seed", 2**63, "Seed must be a whole number from 0 to 2147483647"),
    ("seed", -3, "Seed must be a whole number from 0 to 2147483647"),
    ("keep_ratio", "abc", "Keep ratio r must be a number from 0 to 1, not 'abc'"),
    ("keep_ratio", float("nan"), "Keep ratio r must be a number from 0 to 1, not nan"),
    ("alpha", 1.5, "α (the TTV vs IGA weight) must be a number from 0 to 1, not 1.5"),
])
def test_numeric_settings_are_whole_numbers_in_range(handlers, example_image, field, value, message):
    compare, _ = handlers
    settings = dict(FAST, **{field: value})
    with pytest.raises(gr.Error, match=re.escape(message)):
        compare(example_image, "What color is the circle?", progress=noop_progress, **settings)


def test_a_prompt_and_answer_beyond_the_context_name_the_setting_to_change(handlers, example_image):
    """shapes-llava's context is 512 positions: a long question with 256 new tokens does not fit."""
    compare, _ = handlers
    with pytest.raises(gr.Error, match=r"set Max new tokens \(Advanced\) to at most \d+"):
        compare(example_image, "why " * 120, model="shapes-llava", max_new_tokens=256, repeats=1,
                progress=noop_progress)
