"""The "Speed at real size" panel: the chosen schedule timed on LLaVA-1.5-7B's language-model shape."""

from __future__ import annotations

import dataclasses
import math

import gradio as gr
import pytest

from components import compare, speed
from components.engine import Engine
from transprune import PruneConfig, flops


@pytest.fixture(autouse=True)
def steady_clock(monkeypatch):
    """A timing at 1/32 of the width on a shared machine may come out "noisy", which the app measures
    again instead of quoting: these tests are about caching, so nothing counts as noisy here (the
    noisy-timing test sets the real threshold back)."""
    monkeypatch.setattr(speed, "NOISY_SPREAD", math.inf)


@pytest.fixture(scope="module")
def narrow():
    """The real shape (32 layers, 576 visual tokens) at 1/32 of the width, so the test takes seconds."""
    return speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=None)


def test_measures_baseline_and_schedule_on_the_real_shape_and_caches(narrow, monkeypatch):
    steps, prefills = [], []
    real_prefill = speed.benchmarking._Attached.prefill
    monkeypatch.setattr(speed.benchmarking._Attached, "prefill",
                        lambda self: prefills.append(self.pruner is not None) or real_prefill(self))
    result = narrow.measure(PruneConfig.preset("high"), lambda fraction, text: steps.append((fraction, text)))
    # One warm-up of each, then REPEATS alternating pairs, and nothing else.
    assert prefills.count(True) == prefills.count(False) == 1 + speed.REPEATS
    assert len(result.pair_speedups) == result.repeats == speed.REPEATS
    pairs = sorted(result.pair_speedups)
    assert f"pairs {pairs[0]:.2f}× and {pairs[1]:.2f}×" in result.markdown()
    assert result.visual_tokens == 576 and result.final_visual_tokens == 72     # 576 * 0.125
    assert result.baseline_ms > 0 and result.pruned_ms > 0 and math.isfinite(result.speedup)
    # The analytic whole-sequence bound of High at 32 layers, at this width (hidden 128, MLP 344), for the
    # bench prompt: 1 + 35 text tokens, 576 visual, 25 text; survivors 504 / 360 / 72 after layers 7 / 9 / 12.
    text = 61
    pruned = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    full = flops.tflops([576 + text] * 32, 128, 344)
    assert result.bound == pytest.approx(full / flops.tflops([n + text for n in pruned], 128, 344), rel=1e-9)
    fractions = [fraction for fraction, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "1/32" not in result.markdown() and "0.03125× width" in result.where
    assert "random weights" in result.markdown().lower() and f"{result.bound:.2f}×" in result.markdown()
    # Cached per schedule, whatever the position mode or the seed (they do not change the speed).
    assert narrow.cached(PruneConfig.preset("high", positions="original", seed=3)) == result
    assert narrow.measure(PruneConfig.preset("high")) == result
    assert narrow.cached(PruneConfig.preset("low")) is None


def test_the_handler_answers_in_markdown_and_reports_bad_schedules_inline(narrow):
    engine = Engine()
    engine.real_size = narrow
    handler = compare.make_speed_handler(engine)
    text, verdict = handler("shapes-llava", "TransPrune", "High", progress=lambda *a, **k: None)
    assert text.startswith("### TransPrune · High: ") and "faster prefill at real size" in text   # names what it timed
    assert verdict == gr.skip()                      # no run in this session yet: the verdict stays
    bad, _ = handler("shapes-llava", "TransPrune", "Custom", keep_ratio=0.0, progress=lambda *a, **k: None)
    assert bad.startswith("⚠ This schedule cannot be timed at real size")


def test_measuring_updates_the_verdict_of_the_sessions_last_run():
    """After a run, measuring its schedule re-renders its verdict with the real-size figure."""
    from PIL import Image

    from components import examples

    engine = Engine()
    engine.real_size = fresh = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=None)   # nothing measured yet
    compare_run, _ = compare.make_handlers(engine, "shapes-llava")
    path, question, *_ = examples.example_rows()[0]
    out = compare_run(Image.open(path).convert("RGB"), question, model="shapes-llava", max_new_tokens=2, repeats=1,
                      progress=lambda *a, **k: None)
    state = out.state
    before = out.verdict
    text, verdict = compare.make_speed_handler(engine)("shapes-llava", "TransPrune", "High", state=state,
                                                       progress=lambda *a, **k: None)
    result = fresh.cached(PruneConfig.preset("high"), "llava")
    assert "prefill at real size" not in before and result is not None
    assert isinstance(verdict, str) and f"**{result.speedup:.2f}×** prefill at real size" in verdict
    assert verdict.split("visual tokens")[0] == before.split("visual tokens")[0]   # same answers and counts
    _, other = compare.make_speed_handler(engine)("shapes-llava", "TransPrune", "Low", state=state,
                                                  progress=lambda *a, **k: None)
    assert other == gr.skip()                        # another schedule: the run's verdict is not about it


def test_each_family_is_timed_at_its_checkpoints_shape_where_a_cpu_can():
    arch, shape, note = speed.timed_shape("qwen2_5_vl", cuda=False)
    assert arch == "qwen2.5-vl-7b" and (shape.hidden, shape.layers, shape.visual_tokens) == (3584, 28, 256)
    assert note == ""
    arch, shape, note = speed.timed_shape("llava_next", cuda=False)     # 2880 visual tokens: too slow on a CPU
    assert arch == "llava-1.5-7b" and shape.visual_tokens == 576 and "2880 visual tokens" in note
    arch, shape, note = speed.timed_shape("llava_next", cuda=True)      # on a GPU: its own, N rounded to a square
    assert arch == "llava-next-vicuna-7b" and shape.visual_tokens == 54 * 54 and note == ""
    assert speed.timed_shape(None, cuda=False)[0] == "llava-1.5-7b"
    # SmolVLM: ~1k visual tokens, but into a 0.5B model (far fewer FLOPs than LLaVA-1.5-7B): its own shape.
    arch, shape, note = speed.timed_shape("smolvlm", cuda=False)
    assert arch == "smolvlm-500m" and (shape.hidden, shape.layers, shape.visual_tokens) == (960, 32, 33 * 33)
    assert note == ""


def test_qwen_shape_measured_and_cached_separately(narrow):
    result = narrow.measure(PruneConfig.preset("high"), family="qwen2_5_vl")
    assert result.arch == "qwen2.5-vl-7b" and result.layers == 28 and result.visual_tokens == 256
    assert narrow.cached(PruneConfig.preset("high"), family="qwen2_5_vl") == result
    assert narrow.cached(PruneConfig.preset("high"), family="llava") != result


def test_measurements_survive_a_restart_and_recorded_figures_answer_first(tmp_path):
    """A live figure is written to the book on disk and read back by a new server; before any live
    figure, a recorded one (same shape, schedule, kind of device and width) answers, labelled as recorded."""
    book, recorded = tmp_path / "book.json", tmp_path / "recorded.json"
    first = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=book, recorded=None)
    live = first.measure(PruneConfig.preset("high"))
    assert live.machine and live.threads >= 1 and live.date and not live.recorded
    assert "Measured by this server on" in live.markdown()
    again = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=book, recorded=None)
    assert again.cached(PruneConfig.preset("high", seed=5)) == live           # read back from disk, pairs too
    # The same figure as a bundled recording, for a server that has measured nothing.
    recorded.write_text(book.read_text())
    newcomer = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=None, recorded=recorded)
    quoted = newcomer.cached(PruneConfig.preset("high"))
    assert quoted.recorded and quoted.speedup == live.speedup
    assert "Recorded on " in quoted.markdown() and f"{live.threads} thread" in quoted.markdown()
    assert speed.RECORD_COMMAND in quoted.markdown() and "(R)" not in quoted.provenance
    assert newcomer.cached(PruneConfig.preset("low")) is None
    assert speed.RealSizeSpeed(device="cpu", cpu_width=1 / 8, book=None, recorded=recorded).cached(
        PruneConfig.preset("high")) is None                                      # another width: not this figure
    assert speed.RealSizeSpeed(device="cuda", book=None, recorded=recorded).cached(PruneConfig.preset("high")) is None
    # A live measurement replaces the recorded one.
    measured = newcomer.measure(PruneConfig.preset("high"))
    assert not measured.recorded and newcomer.cached(PruneConfig.preset("high")) == measured


def test_a_live_figure_is_quoted_to_the_session_that_measured_it(tmp_path, monkeypatch):
    """A visitor's measurement does not replace the recorded headline other visitors see; where nothing
    was recorded, the server's own figure is the only one and everyone gets it. No file is written unless
    TRANSPRUNE_SPEED_BOOK names one."""
    monkeypatch.delenv("TRANSPRUNE_SPEED_BOOK", raising=False)
    monkeypatch.setattr(speed.Path, "home", lambda: tmp_path)    # a write into a home folder would show here
    book = tmp_path / "book.json"
    speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=book, recorded=None).measure(PruneConfig.preset("high"))
    server = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, recorded=book)    # the default book: none
    assert speed.default_book_path() is None and server.book.path is None
    high, low = PruneConfig.preset("high"), PruneConfig.preset("low")
    live = server.measure(high, session="visitor")
    assert not live.recorded
    assert server.cached(high, session="visitor") == live
    assert server.cached(high, session="someone else").recorded            # still the recorded headline
    assert server.cached(high, session="").recorded
    assert server.cached(high) == live                                       # the library: its own figure first
    # Nothing recorded for Low: the server's measurement is the one figure there is.
    measured = server.measure(low, session="visitor")
    assert server.cached(low, session="someone else") == measured
    # A second session asking to measure High gets the cached figure, and from then on quotes it.
    assert server.measure(high, session="someone else") == live and server.cached(high, session="someone else") == live
    # A request without a session ("") measures for nobody in particular: others still see the recording.
    fresh = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, recorded=book)
    fresh.measure(high, session="")
    assert fresh.cached(high, session="").recorded and fresh.cached(high, session="anyone").recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.json"]


def test_an_unreadable_book_is_an_empty_one(tmp_path):
    broken = tmp_path / "book.json"
    broken.write_text("{not json")
    assert list(speed.SpeedBook(broken).items()) == [] and speed.SpeedBook(None).get("x") is None


def test_the_bundled_figures_cover_the_apps_default_schedules():
    """The page opens with a figure: every app method at High and Low on LLaVA-1.5-7B's shape (CPU)."""
    from components.schedule import METHODS, build_config

    quoted = speed.RealSizeSpeed(device="cpu", book=None)
    for label in ("TransPrune", "FastV", "PDrop", "SparseVLM", "DART", "VisionZip", "DivPrune", "CDPruner", "Random"):
        assert label in METHODS
        for budget in ("High", "Low"):
            result = quoted.cached(build_config(label, budget), "llava")
            assert result is not None and result.recorded, (label, budget)
            assert result.arch == "llava-1.5-7b" and result.width_scale == speed.CPU_WIDTH and result.date


def _result(**changes) -> speed.SpeedResult:
    values = dict(arch="llava-1.5-7b", layers=32, width_scale=0.25, device="cpu", baseline_ms=3000.0, pruned_ms=1400.0,
                  bound=2.2, visual_tokens=576, final_visual_tokens=72, repeats=2, pair_speedups=(2.1, 2.2))
    return speed.SpeedResult(**{**values, **changes})


def test_a_timing_whose_pairs_disagree_is_flagged_and_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "NOISY_SPREAD", 1.25)
    steady = _result()
    assert not steady.noisy and "Noisy" not in steady.markdown() and "noisy" not in steady.headline()
    busy = _result(pruned_ms=1200.0, pair_speedups=(1.91, 3.66))         # pairs 1.9x apart
    assert busy.noisy and "**Noisy**" in busy.markdown() and "(noisy, bound 2.20×)" in busy.headline()
    assert _result(pruned_ms=1000.0, pair_speedups=(2.9, 3.1)).noisy       # 3.0x against a 2.2x bound
    # A noisy figure in the book is measured again when asked, not quoted back.
    narrow = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=tmp_path / "book.json", recorded=None)
    config = PruneConfig.preset("high")
    arch, _, _ = narrow._shape(None)
    narrow.book.put(narrow._key(arch, config), dataclasses.replace(busy, width_scale=1 / 32))
    assert narrow.cached(config).noisy
    again = narrow.measure(config)
    assert again.pair_speedups != busy.pair_speedups and narrow.cached(config).pair_speedups == again.pair_speedups


def test_a_figure_carries_the_stand_in_note_of_the_family_it_is_quoted_for(tmp_path):
    """A family timed at LLaVA-1.5-7B's shape on a CPU says so, whichever family measured the figure."""
    narrow = speed.RealSizeSpeed(device="cpu", cpu_width=1 / 32, book=tmp_path / "book.json", recorded=None)
    config = PruneConfig.preset("high")
    arch, _, own_note = narrow._shape(None)
    _, _, stand_in_note = narrow._shape("llava_next")
    assert not own_note and "stands in" in stand_in_note
    narrow.book.put(narrow._key(arch, config), _result(width_scale=1 / 32))
    assert narrow.cached(config, "llava_next").note == stand_in_note
    assert stand_in_note in narrow.cached(config, "llava_next").markdown()
    assert narrow.cached(config).note == ""
