"""Checks that need a CUDA GPU (and, for the last one, the Hugging Face Hub). Skipped elsewhere."""

import importlib.util
import os

import pytest
import torch

import transprune
from transprune import PruneConfig
from transprune.adapters.llava import tiny_llava


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_model(builder, attn, dtype):
    model, processor = builder(attn_implementation=attn)
    return model.to("cuda", dtype), processor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keep_all_is_identical_on_gpu(dtype, make_inputs, sample_image):
    model, processor = _cuda_model(tiny_llava, "sdpa", dtype)
    inputs = {k: v.to("cuda") for k, v in make_inputs(processor, [sample_image()], ["What is it ?"]).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with transprune.apply(model, "off"):
            pruned = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ids, pruned)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_2_selects_like_sdpa(make_inputs, sample_image):
    kept = {}
    for attn in ("sdpa", "flash_attention_2"):
        model, processor = _cuda_model(tiny_llava, attn, torch.float16)
        inputs = {k: v.to("cuda") for k, v in make_inputs(processor, [sample_image()], ["What is it ?"]).items()}
        inputs["pixel_values"] = inputs["pixel_values"].half()
        with torch.no_grad(), transprune.apply(model, PruneConfig.preset("high")) as pruner:
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
        kept[attn] = [s.kept for s in pruner.trace.stages]
    assert all(torch.equal(a, b) for a, b in zip(kept["sdpa"], kept["flash_attention_2"]))


@pytest.mark.skipif(os.environ.get("TRANSPRUNE_REAL_CHECKPOINTS") != "1",
                    reason="set TRANSPRUNE_REAL_CHECKPOINTS=1 to download and test llava-hf/llava-1.5-7b-hf")
def test_real_llava_1_5_keeps_its_answer_with_high(sample_image):
    from transprune import models
    loaded = models.load("llava-1.5-7b", device="cuda", dtype="float16")
    image = sample_image(336, 336)
    baseline = loaded.generate(image, "What is in this image?", config=None, max_new_tokens=16)
    off = loaded.generate(image, "What is in this image?", config="off", max_new_tokens=16)
    high = loaded.generate(image, "What is in this image?", config="high", max_new_tokens=16)
    assert off.text == baseline.text
    assert [len(s.kept) for s in high.trace.stages] == [504, 360, 72]
