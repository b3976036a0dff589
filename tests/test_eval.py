"""The shipped shapes-llava: loads offline, reaches the accuracy targets; the eval CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from transprune import PruneConfig
from transprune import eval as shapes_eval
from transprune import heldout
from transprune import models
from transprune import flops
from transprune.flops import model_shape
from transprune.shapes import model as shapes_model
from transprune.shapes import scenes

WEIGHTS = shapes_model.ASSET_DIR / shapes_model.WEIGHTS
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(),
                                   reason=f"shapes-llava weights not shipped ({WEIGHTS} is absent)")

CI_SEED, CI_N = 2024, 200        # the fixed 200-question set (40 per type)


@pytest.fixture(scope="module")
def shapes_lm(tmp_path_factory):
    return models.load("shapes-llava", device="cpu")


@needs_weights
def test_loads_offline_float32_eval(shapes_lm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert shapes_lm.spec.offline
    assert shapes_lm.dtype == torch.float32 and not shapes_lm.model.training
    text = shapes_lm.model.config.text_config
    assert text.num_hidden_layers >= 12
    assert shapes_lm.model.config.image_seq_length >= 144
    assert sum(p.stat().st_size for p in shapes_model.ASSET_DIR.iterdir()) <= 25 * 2**20


@needs_weights
def test_answers_one_word_then_stops(shapes_lm):
    example = scenes.dataset(CI_SEED, 1)[0]
    result = shapes_lm.generate(example.image, example.question.text, max_new_tokens=5)
    assert result.text in scenes.ANSWERS[example.question.qtype]
    assert result.timings["new_tokens"] == 2          # the word, then </s>


@needs_weights
def test_reaches_targets_on_fixed_set(shapes_lm):
    record = shapes_eval.evaluate_method(shapes_lm, scenes.dataset(CI_SEED, CI_N), shapes_eval._fixed(None),
                                         model_shape(shapes_lm.model))
    assert record["n"] == CI_N
    assert record["accuracy"] >= 0.90, record
    for qtype, accuracy in record["per_type"].items():
        assert accuracy >= 0.80, (qtype, record)


def test_missing_files_raise_clear_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="missing"):
        shapes_model.load_shapes_llava(tmp_path)


def test_saved_model_round_trips(tmp_path):
    tokenizer = shapes_model.build_tokenizer()
    model = shapes_model.build_model(tokenizer, seed=3).eval()
    shapes_model.save(model, tokenizer, tmp_path, dict(note="untrained"), dtype=torch.float32)
    loaded, processor = shapes_model.load_shapes_llava(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_eval_cli_end_to_end(tmp_path, monkeypatch, capsys):
    """Runs on an untrained model saved to tmp_path, so it needs no shipped weights."""
    tokenizer = shapes_model.build_tokenizer()
    shapes_model.save(shapes_model.build_model(tokenizer, seed=1).eval(), tokenizer, tmp_path / "model", {})
    monkeypatch.setenv("TRANSPRUNE_SHAPES_DIR", str(tmp_path / "model"))
    out = tmp_path / "eval.json"
    shapes_eval.main(["--suite", "shapes", "--seed", "0", "--n", "5", "--methods", "baseline,high,random-low,visionzip-64",
                      "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"baseline", "high", "random-low", "visionzip-64"}
    for record in results.values():
        assert 0.0 <= record["accuracy"] <= 1.0 and record["tflops"] > 0
        assert set(record["per_type"]) <= set(scenes.QUESTION_TYPES)
    assert results["high"]["tflops"] < results["baseline"]["tflops"]
    assert results["random-low"]["tflops"] < results["high"]["tflops"]
    assert results["visionzip-64"]["tflops"] < results["random-low"]["tflops"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["results"]["baseline"]["accuracy"] == results["baseline"]["accuracy"]


def test_eval_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        shapes_eval.main(["--n", "1", "--methods", "nonsense"])


def test_the_table_keeps_its_row_names():
    """Docs and scripts name these rows; every preset has one (a new method's preset adds a row)."""
    table = shapes_eval.method_table()
    assert list(table)[0] == "baseline"
    assert {"high", "low", "ttv-high", "iga-low", "random-high", "random-low-original", "fastv", "pdrop",
            "sparsevlm", "visionzip-192", "visionzip-64", "visionzip-192+high", "high-original"} <= set(table)
    assert table["visionzip-64"][:2] == ("VisionZip", "visionzip-64")
    assert table["high"][2](0) == PruneConfig.preset("high", positions="compact")


def test_heldout_record_finds_results_saved_with_visionzip_keep():
    """The shipped eval.json predates pre_llm / pre_llm_keep; the app still quotes its VisionZip rows,
    and tells the stacked row from plain High (same schedule) by the pre-LLM stage."""
    path = shapes_model.ASSET_DIR / "eval.json"
    saved = json.loads(path.read_text())
    layers = 12                       # shapes-llava's depth: High's (7, 9, 12) ran as (3, 4, 5)
    for name in ("visionzip-192", "visionzip-192+high", "high"):
        resolved = PruneConfig.preset(name, positions="compact").resolve(layers)
        record, baseline = heldout.heldout_record(path, resolved)
        assert record == saved[name] and baseline == saved["baseline"]


def test_plot_takes_a_series_per_method_of_the_table(tmp_path):
    """Every row label of the method table gets a series, more labels than markers included."""
    from transprune import eval as shapes_eval
    table = shapes_eval.method_table()
    results = {name: dict(method=label, budget=budget, accuracy=0.5, tflops=1e-3 * i)
               for i, (name, (label, budget, _)) in enumerate(table.items())}
    assert len({r["method"] for r in results.values()}) > 12
    path = tmp_path / "eval.png"
    shapes_eval.plot(results, path, "all rows")
    assert path.stat().st_size > 0


def test_pareto_front_by_hand():
    points = [(3.8, 90.0), (1.0, 80.0), (1.5, 79.0), (2.0, 88.0), (0.4, 60.0), (2.0, 85.0)]
    assert shapes_eval.pareto_front(points) == [(0.4, 60.0), (1.0, 80.0), (2.0, 88.0), (3.8, 90.0)]


def test_frontier_rows_are_every_preset_and_the_cli_draws_them(tmp_path, monkeypatch, capsys):
    """Every method's presets (DART, DivPrune, CDPruner included) and the random control at every budget,
    no ablations; the CLI on an untrained model (no shipped weights needed) writes the figure, its JSON with
    each row's 7B TFLOPs and measured CPU prefill speedup, and the table with its command."""
    rows = shapes_eval.frontier_rows()
    assert rows[0] == "baseline" and {"dart", "divprune-64", "cdpruner-192", "visionzip-128"} <= set(rows)
    assert {"random-high", "random-low", "random-64", "random-128", "random-192"} <= set(rows)
    assert "ttv-high" not in rows and "high-original" not in rows
    # The random control at 64 kept tokens: once after layer 2, a new keep-set per question.
    factory = shapes_eval.method_table()["random-64"][2]
    assert factory(0).prune_layers == (2,) and round(factory(0).keep_ratios[0] * 576) == 64
    assert factory(0).seed != factory(1).seed
    monkeypatch.setattr(shapes_eval, "FRONTIER_WIDTH", 1 / 32)     # the real shape's depth and N, narrow
    tokenizer = shapes_model.build_tokenizer()
    shapes_model.save(shapes_model.build_model(tokenizer, seed=1).eval(), tokenizer, tmp_path / "model", {})
    monkeypatch.setenv("TRANSPRUNE_SHAPES_DIR", str(tmp_path / "model"))
    figure = tmp_path / "frontier.png"
    shapes_eval.main(["--seed", "0", "--n", "2", "--methods", "high,dart,cdpruner-64", "--frontier", str(figure),
                      "--speed-repeats", "1"])
    results = json.loads(figure.with_suffix(".json").read_text())
    assert [round(results[name]["tflops_llava15_7b"], 2) for name in ("baseline", "high", "dart", "cdpruner-64")] == \
        [3.82, 1.56, 1.04, 0.42]
    # Speed: measured on the 32-layer, 576-token shape; High's bound at this width (hidden 128, MLP 344,
    # 61 text tokens; 504 / 360 / 72 visual tokens after layers 7 / 9 / 12) as in test_speed.
    assert "cpu_speedup" not in results["baseline"]
    assert all(results[name]["cpu_speedup"] > 0 and len(results[name]["cpu_pairs"]) == 1
               for name in ("high", "dart", "cdpruner-64"))
    full = flops.tflops([576 + 61] * 32, 128, 344)
    pruned = [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert results["high"]["cpu_bound"] == pytest.approx(full / flops.tflops([n + 61 for n in pruned], 128, 344))
    # The bound with the measured fixed cost: below the plain bound whenever the probe costs more than its FLOPs' share.
    assert all(results[name]["cpu_bound_fixed"] is None or 0 < results[name]["cpu_bound_fixed"]
               for name in ("high", "dart", "cdpruner-64"))
    table = figure.with_suffix(".md").read_text()
    assert "Command: `python -m transprune.eval --seed 0 --n 2" in table and "0.03125x width" in table
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "row" not in line] == \
        ["| baseline", "| high", "| dart", "| cdpruner-64"]     # cheapest last
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["frontier"] == str(figure)
