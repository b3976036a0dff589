"""DART on the tiny LLaVA and Qwen2.5-VL: the runner equals a slow hand-written DART.

The released layer 2 (of 32) scales to layer 1 on the 16-layer tiny models; the "dart" preset
(max_num_trunction 128 of 576) keeps M = floor(N * 128 / 576) per image, 4 image pivots + 8 pivots
taking M // 8 tokens each.
"""

from __future__ import annotations

import functools

import pytest
import torch

import transprune
from transprune import adapters, flops
from transprune.config import ConfigError, PruneConfig
from transprune.methods import dart

import slow_decoder

STEPS = 3


def slow_dart(model, inputs, config, steps=STEPS):
    """DART as released, for one unpadded prompt, written out: the decoder layers run by hand with their
    own causal mask and KV cache. After pruning layer K: pivots by the L1 norm of layer K's cached keys
    (post-rotary, what llmc reads from `past_key_value`), duplication by cosine similarity of layer K's
    output after the final norm, each pivot in turn taking the M // 8 least similar visual tokens left.
    Positions "original" (the release) or "compact". Returns logits per step, the kept visual indices
    and the per-layer cache lengths."""
    from transformers import DynamicCache
    from transprune import compat
    from transprune.reference import Reference
    reference = Reference(model, config)
    language = reference.lm
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().flatten()
    hidden, model_positions = reference._embeds(inputs)
    mrope = model_positions is not None and model_positions.dim() == 3
    if mrope:
        model_positions = model_positions[-3:]
    length = hidden.shape[1]
    sequence = list(range(length))                 # original positions still in the sequence
    cache, keyword = DynamicCache(config=language.config), compat.cache_keyword(language.layers[0].self_attn)
    (layer_k,), (ratio,) = config.prune_layers, config.keep_ratios
    lengths, kept_visual, removed = [], None, 0

    def positions():
        if mrope:
            return model_positions[:, :, sequence]
        if config.positions == "original":
            return torch.tensor([sequence])
        return torch.arange(len(sequence))[None]

    run_layer = functools.partial(slow_decoder.layer_step, language, {keyword: cache})

    def cosine(a, b):
        a, b = a.double(), b.double()
        return float(a @ b / (a.norm() * b.norm()))

    for number, layer in enumerate(language.layers, start=1):
        lengths.append(len(sequence))
        out = run_layer(layer, hidden, positions())
        if number == layer_k:
            keys = cache.layers[number - 1].keys[0]                      # (Hkv, n, hd) after rotary
            l1 = [float(keys[:, slot].double().abs().sum()) for slot in range(len(sequence))]
            states = language.norm(out)[0]
            image_slots = [int(v) for v in visual]                       # nothing pruned yet: slot = position
            text_slots = list(range(int(visual[-1]) + 1, length))
            image_pivots = sorted(image_slots, key=lambda s: -l1[s])[:dart.PIVOT_IMAGE_TOKENS]
            text_pivots = sorted(text_slots, key=lambda s: -l1[s])[:dart.PIVOT_TEXT_TOKENS]
            per_pivot = int(len(visual) * ratio + 1e-9) // (dart.PIVOT_IMAGE_TOKENS + dart.PIVOT_TEXT_TOKENS)
            valid = [s for s in image_slots if s not in image_pivots]
            kept = list(image_pivots)
            for pivot in image_pivots + text_pivots:
                least_similar = sorted(valid, key=lambda s: cosine(states[pivot], states[s]))[:per_pivot]
                kept += least_similar
                valid = [s for s in valid if s not in least_similar]
            keep = sorted(set(range(length)) - set(image_slots) | set(kept))
            out = out[:, keep]
            sequence = keep
            kept_visual = sorted(image_slots.index(s) for s in kept)
            removed = length - len(keep)
        hidden = out
    logits = [model.lm_head(language.norm(hidden[:, -1:]))[0, -1]]
    for step in range(steps):
        hidden = language.embed_tokens(torch.tensor([[int(logits[-1].argmax())]]))
        for number, layer in enumerate(language.layers, start=1):
            if mrope:
                position = (model_positions.max() + 1 + step).view(1, 1, 1).expand(3, 1, 1)
            else:
                shift = removed if config.positions == "compact" and number > layer_k else 0
                position = torch.tensor([[length + step - shift]])
            hidden = run_layer(layer, hidden, position)
        logits.append(model.lm_head(language.norm(hidden))[0, -1])
    return dict(logits=torch.stack(logits), kept=torch.tensor(kept_visual), cache_lengths=lengths)


def pruned_generation(model, inputs, config, steps=STEPS):
    with torch.inference_mode(), transprune.apply(model, config) as pruner:
        output = model.generate(**inputs, max_new_tokens=steps + 1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    return torch.stack(output.logits)[:, 0], pruner.trace


@pytest.mark.parametrize("family, preset, positions", [
    ("llava", "dart", "original"), ("llava", "dart", "compact"), ("llava", "dart-192", "original"),
    ("qwen2_5_vl", "dart", "original")])
def test_pruned_run_equals_slow_reimplementation(tiny_model, sample_image, make_inputs, family, preset, positions):
    """Pivots, the duplication pass and the kept set; prefill and decode logits; per-layer cache lengths.
    SDPA models: DART reads no attention weights."""
    model, processor = tiny_model(family)
    inputs = make_inputs(processor, [sample_image()], ["what color is the circle on the left ?"])
    config = PruneConfig.preset(preset, positions=positions).resolve(16)
    assert config.prune_layers == (1,)
    logits, trace = pruned_generation(model, inputs, config)
    with torch.inference_mode():
        expected = slow_dart(model, inputs, config)
    n = trace.visual_tokens
    (stage,) = trace.stages
    assert torch.equal(stage.kept, expected["kept"])
    assert len(stage.kept) == dart.DART.planned_keep(n, config.keep_ratios[0])
    assert trace.tokens_per_layer == expected["cache_lengths"]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_released_budgets_and_tflops():
    """max_num_trunction 64 / 128 / 192 with 4 + 4 pivots keeps 68 / 132 / 196 of 576 after layer 2."""
    shape = flops.ARCHITECTURES["llava-1.5-7b"]
    tokens = {name: flops.schedule_tokens(PruneConfig.preset(name), 576, 32) for name in ("dart-64", "dart", "dart-192")}
    assert tokens["dart"] == [576] * 2 + [132] * 30
    assert [t[-1] for t in tokens.values()] == [68, 132, 196]
    assert [round(flops.config_tflops(PruneConfig.preset(name), shape), 2) for name in tokens] == [0.65, 1.04, 1.44]
    assert PruneConfig.preset("dart").positions == "original"


def test_select_by_hand():
    """Two pivots (one image, one text), two tokens each, on vectors whose similarities are obvious."""
    visual = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-0.9, -0.1]])
    text = torch.tensor([[0.0, 1.0]])
    order = dart.select(visual, text, image_pivots=torch.tensor([0]), per_pivot=2)
    # Pivot 0 (1, 0): least similar are 2 (-1, 0) and 5 (-0.9, -0.1); then the text pivot (0, 1):
    # of 1, 3, 4 the least similar are 4 (0, -1) and 1 (0.9, 0.1).
    assert order == [0, 2, 5, 4, 1]


def test_one_pruning_layer_only():
    with pytest.raises(ConfigError, match="DART prunes once"):
        PruneConfig(method="dart", prune_layers=(2, 4), keep_ratios=(0.5, 0.25))


def test_padded_batch_equals_each_prompt_alone(tiny_model, sample_image, make_inputs):
    model, processor = tiny_model("llava")
    images = [sample_image(seed=1), sample_image(seed=2)]
    questions = ["what is it ?", "what color is the big square in the middle ?"]
    batch = make_inputs(processor, images, questions)
    with torch.inference_mode(), transprune.apply(model, "dart") as pruner:
        batch_ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
    traces = pruner.traces
    for b in range(2):
        alone = make_inputs(processor, [images[b]], [questions[b]])
        with torch.inference_mode(), transprune.apply(model, "dart") as pruner:
            ids = model.generate(**alone, max_new_tokens=3, do_sample=False)
        assert batch_ids[b, -3:].tolist() == ids[0, -3:].tolist()
        assert torch.equal(traces[b].stages[0].kept, pruner.trace.stages[0].kept)


def test_runs_on_every_family_with_one_budget_per_span(family, tiny_model, sample_image, make_inputs):
    """Every family: each visual span (the image; for LLaVA-NeXT and SmolVLM its tiles are one span) keeps
    4 pivots + 8 x (M // 8), M = floor(N_span * 128 / 576); the model still generates."""
    model, processor = tiny_model(family)
    inputs = make_inputs(processor, [sample_image()], ["what is it ?"])
    with torch.inference_mode(), transprune.apply(model, "dart") as pruner:
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2
    trace = pruner.trace
    (stage,) = trace.stages
    assert stage.layer == 1 and len(stage.candidates) == trace.visual_tokens
    adapter = adapters.for_model(model)
    ids = inputs["input_ids"]
    prompt = adapter.read_prompt(model, ids, adapter.visual_mask(model, ids), inputs.get("attention_mask"))
    span_sizes = prompt.visual_spans[0].unique(return_counts=True)[1].tolist()
    assert len(stage.kept) == sum(dart.DART.planned_keep(size, 128 / 576) for size in span_sizes)
