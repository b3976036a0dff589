"""The benchmark CLI: analytic figures, the model it builds, and one end-to-end run on the tiny model.

Nothing here asserts a speed: timings on a shared CI machine are not testable; the bench reports them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from transprune import PruneConfig, bench, benchmarking, flops

PAPER = {"baseline": 3.82, "fastv": 2.01, "pdrop": 1.78, "high": 1.56, "low": 1.19}


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_flops_only_cli_gives_the_paper_table(tmp_path):
    path = tmp_path / "flops.json"
    done = subprocess.run([sys.executable, "-m", "transprune.bench", "--arch", "llava-1.5-7b", "--methods",
                           "baseline,fastv,pdrop,high,low", "--flops-only", "--json", str(path)],
                          capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(path.read_text())
    assert list(data) == list(PAPER)
    for method, tflops in PAPER.items():
        assert round(data[method]["tflops"], 2) == tflops
        assert data[method]["tflops_full_sequence"] > data[method]["tflops"]
        assert "prefill_ms" not in data[method]
    assert data["high"]["bound"] == pytest.approx(2.158, abs=1e-3)   # full sequence, 637-token prompt
    assert "| high |" in done.stdout
    assert last_json_line(done.stdout)["results"]["low"]["tflops"] == pytest.approx(data["low"]["tflops"])


def test_flops_only_reduced_width_bound():
    results = bench.main(["--arch", "llava-1.5-7b", "--methods", "baseline,high", "--flops-only",
                          "--width-scale", "0.25"])
    # Paper TFLOPs stay those of the full-size architecture; the bound is that of the timed shape.
    assert round(results["high"]["tflops"], 2) == 1.56
    assert results["high"]["bound"] == pytest.approx(2.20, abs=0.01)
    assert results["high"]["run"]["hidden"] == 1024


def test_parse_method():
    assert bench.parse_method("baseline").config is None
    assert bench.parse_method("high").config.keep_ratios == (0.875, 0.625, 0.125)
    stacked = bench.parse_method("visionzip-128+high")
    assert stacked.pre_llm and stacked.config.method == "transprune"
    assert stacked.config.pre_llm == "visionzip" and stacked.config.pre_llm_keep == 128 / 576
    assert bench.parse_method("visionzip").config == PruneConfig.preset("visionzip-64")
    with pytest.raises(bench.BenchError, match="Unknown method"):
        bench.parse_method("fastest")
    with pytest.raises(SystemExit, match="Unknown method"):
        bench.main(["--flops-only", "--methods", "fastest"])


def test_visual_schedule_composes_visionzip():
    spec = bench.parse_method("visionzip-64+high")
    assert bench.visual_schedule(spec, 576, 32) == [64] * 7 + [56] * 2 + [40] * 3 + [8] * 20


def test_random_llava_has_the_reduced_llava15_shape():
    model = bench.random_llava(flops.ARCHITECTURES["llava-1.5-7b"], width_scale=0.25, layers=2)
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads) == (1024, 2752, 8)
    assert text.hidden_size // text.num_attention_heads == 128
    inputs = bench.synthetic_inputs(model, text_before=35, text_after=25)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert inputs["input_ids"].shape[1] == 637
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (1, 1, text.vocab_size)


def test_bench_end_to_end_on_tiny_model(tmp_path, capsys):
    path = tmp_path / "bench.json"
    methods = "baseline,fastv,pdrop,high,low,random,visionzip-64+high"
    results = bench.main(["--arch", "tiny-llava", "--methods", methods, "--repeats", "2", "--new-tokens", "3",
                          "--scoring-repeats", "1", "--threads", "1", "--json", str(path)])
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert list(data) == methods.split(",")
    for name, figures in data.items():
        for key in ("tflops", "prefill_ms", "speedup", "speedup_over_bound", "scoring_share", "decode_tokens_per_s",
                    "peak_mb", "bound"):
            assert key in figures, (name, key)
        assert figures["prefill_ms"] > 0 and figures["peak_mb"] > 0
        assert len(figures["prefill_ms_all"]) == 2
    assert data["baseline"]["speedup"] == 1.0 and data["baseline"]["scoring_share"] is None
    assert 0 < data["high"]["scoring_share"] < 1
    # Key reuse: the net share subtracts the measured time of the projections it avoided.
    assert data["high"]["reused_keys_ms"] > 0
    assert data["high"]["scoring_share_net"] < data["high"]["scoring_share"]
    assert "reused_keys_ms" not in data["random"] and "reused_keys_ms" not in data["fastv"]
    assert data["high"]["overhead_vs_random"] is not None and data["fastv"]["overhead_vs_random"] is None
    # The measured token counts are the analytic schedule's.
    assert data["high"]["visual_tokens_per_layer"] == bench.visual_schedule(bench.parse_method("high"), 144, 16)
    # VisionZip presets are shares of the patches: 64/576 of the tiny model's 144 is 16 (13 + 3).
    assert data["visionzip-64+high"]["visual_tokens_per_layer"][0] == 16
    assert data["visionzip-64+high"]["pre_llm_split"] == [13, 3]
    assert results["pdrop"]["final_visual_tokens"] == 18
    assert "| method |" in out and "| visionzip-64+high |" in out
    assert set(last_json_line(out)["results"]) == set(methods.split(","))
    # The fixed-cost probe is timed with the methods but is not one of them.
    fixed = last_json_line(out)["run"]["fixed_cost"]
    assert len(fixed["text_only_ms_all"]) == 2 and fixed["vision_ms"] > 0
    assert fixed["zero_visual_ms"] == fixed["text_only_ms"] + fixed["vision_ms"]
    assert fixed["zero_visual_tflops"] == flops.tflops([61] * 16, 64, 128)   # 61 text tokens, no visual ones
    assert data["baseline"]["bound_fixed"] == 1.0 and "Fixed cost: with no visual tokens" in out
    for name, figures in data.items():
        expected = bench.bound_with_fixed_cost(fixed["baseline_ms"], fixed["zero_visual_ms"], fixed["baseline_tflops"],
                                               fixed["zero_visual_tflops"], figures["bench_tflops_full_sequence"])
        assert figures["bound_fixed"] == expected, name
        if expected is not None:
            assert figures["speedup_over_bound_fixed"] == figures["speedup"] / expected
    plot = path.with_suffix(".png")
    assert plot.exists() and plot.read_bytes()[:4] == b"\x89PNG"


def test_the_bound_with_fixed_cost():
    # No fixed cost (time proportional to FLOPs): the plain analytic bound, baseline / method FLOPs.
    assert bench.bound_with_fixed_cost(100.0, 20.0, 10.0, 2.0, 4.0) == pytest.approx(10.0 / 4.0)
    # 40 ms with no visual tokens (2 TFLOPs), 100 ms at 10: 7.5 ms per further TFLOP, so 4 TFLOPs take 55 ms.
    assert bench.bound_with_fixed_cost(100.0, 40.0, 10.0, 2.0, 4.0) == pytest.approx(100.0 / 55.0)
    assert bench.bound_with_fixed_cost(100.0, 40.0, 10.0, 2.0, 10.0) == 1.0
    # A probe no faster than the baseline supports no rate.
    assert bench.bound_with_fixed_cost(100.0, 100.0, 10.0, 2.0, 4.0) is None


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "smolvlm"])
def test_the_fixed_cost_probe_takes_every_visual_token_and_the_pixels_out(tiny_model, sample_image, family):
    from transprune import adapters
    model, processor = tiny_model(family)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": "What is it?"}]}], add_generation_prompt=True)
    inputs = dict(processor(images=sample_image(), text=prompt, return_tensors="pt"))
    text = benchmarking.text_only_inputs(model, inputs)
    visual = adapters.for_model(model).visual_mask(model, inputs["input_ids"])
    assert set(text) == {"input_ids", "attention_mask"}
    assert text["input_ids"].tolist() == [inputs["input_ids"][0][~visual[0]].tolist()]
    assert text["input_ids"].shape[1] == inputs["input_ids"].shape[1] - int(visual.sum()) < inputs["input_ids"].shape[1]
    with torch.inference_mode():
        model(**text)   # a prompt the model takes as it is


def test_baseline_is_added_when_missing(tmp_path):
    results = bench.main(["--arch", "tiny-llava", "--methods", "random", "--repeats", "1", "--new-tokens", "0",
                          "--plot", str(tmp_path / "p.png")])
    assert list(results) == ["baseline", "random"]
    assert results["random"]["decode_tokens_per_s"] is None
    assert (tmp_path / "p.png").exists()


def test_timing_and_memory_helpers():
    cpu = torch.device("cpu")
    value, ms = bench.timed_ms(lambda: 3, cpu)
    assert value == 3 and ms >= 0
    bench.reset_peak_memory(cpu)
    assert bench.peak_memory_mb(cpu) > 0
