"""The runner on tiny models of every family: exactness, the slow reference, batches, undo, errors."""

import pytest
import torch

import transprune
from transprune import PruneConfig, compat
from transprune.adapters import UnsupportedModelError

from transprune.reference import Reference

QUESTION = "What color is the circle ?"


@pytest.fixture
def single(tiny_model, make_inputs, sample_image):
    """(family, attn="sdpa", question=QUESTION, image=None) -> (model, inputs) of one prompt."""
    def build(family, attn="sdpa", question=QUESTION, image=None):
        model, processor = tiny_model(family, attn)
        return model, make_inputs(processor, [image or sample_image()], [question])
    return build


def _greedy(model, inputs, tokens=5):
    return model.generate(**inputs, max_new_tokens=tokens, do_sample=False)


def test_keep_all_schedule_is_bit_identical(family, attn, single):
    model, inputs = single(family, attn)
    with torch.no_grad():
        logits, ids = model(**inputs).logits, _greedy(model, inputs)
        with transprune.apply(model, PruneConfig.preset("off")) as pruner:
            pruned_logits, pruned_ids = model(**inputs).logits, _greedy(model, inputs)
    assert torch.equal(logits, pruned_logits)
    assert torch.equal(ids, pruned_ids)
    trace = pruner.trace
    assert len(trace.stages) == 3
    assert all(torch.equal(stage.kept, torch.arange(trace.visual_tokens)) for stage in trace.stages)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("preset", ["high", "low"])
def test_pruned_prefill_and_generation_match_slow_reference(family, positions, preset, single):
    model, inputs = single(family, "eager")
    config = PruneConfig.preset(preset, positions=positions)
    if positions not in transprune.adapters.by_family(family).allowed_positions:   # M-RoPE: original only
        with pytest.raises(transprune.ConfigError, match=f"not valid for {family}"):
            transprune.apply(model, config)
        return
    layers = transprune.adapters.for_model(model).decoder_layers(model)
    # One image = one span, written here independently of the adapter (for SmolVLM the image's
    # tiles and global view, which text markup separates).
    visual = int(transprune.adapters.for_model(model).visual_mask(model, inputs["input_ids"]).sum())
    reference = Reference(model, config.resolve(len(layers)), spans=[0] * visual).run(inputs, max_new_tokens=5)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        logits = model(**inputs).logits[0, -1]
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    trace = pruner.trace
    for stage, kept in zip(trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept), f"stage at layer {stage.layer} kept different tokens"
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)
    # Every decode step's logits, not just the argmax: decode positions and cached columns must agree.
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(), rtol=1e-4, atol=1e-5)
    assert output.sequences[0, inputs["input_ids"].shape[1]:].tolist() == reference["ids"]


def test_sdpa_matches_eager_selection(family, single, attention_implementations):
    """The side passes never read the model's attention weights, so the kernel does not matter."""
    kept = {}
    for attn in attention_implementations:
        model, inputs = single(family, attn)
        with torch.no_grad(), transprune.apply(model, "high") as pruner:
            model(**inputs)
        kept[attn] = [stage.kept for stage in pruner.trace.stages]
    assert all(torch.equal(a, b) for a, b in zip(kept["eager"], kept["sdpa"]))


def test_trace_counts_and_kv_cache_lengths(family, single):
    model, inputs = single(family)
    config = PruneConfig.preset("high")
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        output = model(**inputs, use_cache=True)
    trace = pruner.trace
    n = trace.visual_tokens
    layers = len(transprune.adapters.for_model(model).decoder_layers(model))
    resolved = config.resolve(layers)
    expected = [n] * layers
    for layer, ratio in zip(resolved.prune_layers, resolved.keep_ratios):
        expected[layer:] = [int(n * ratio)] * (layers - layer)
    assert trace.visual_tokens_per_layer == expected
    prompt = inputs["input_ids"].shape[1]
    assert trace.tokens_per_layer == [prompt - (n - v) for v in expected]
    cache = compat.output_cache(output)
    assert [cache.layers[i].get_seq_length() for i in range(layers)] == trace.tokens_per_layer
    assert output.logits.shape[1] == trace.tokens_per_layer[-1]
    for stage, layer in zip(trace.stages, resolved.prune_layers):
        assert stage.layer == layer
        assert stage.score.shape == stage.ttv.shape == stage.iga.shape == stage.candidates.shape
        assert torch.all(stage.kept[1:] > stage.kept[:-1])
        assert torch.isin(stage.kept, stage.candidates).all()


def test_padded_batch_equals_each_prompt_alone(attn, tiny_model, make_inputs, sample_image):
    """Two prompts of different lengths and (LLaVA-NeXT) different visual-token counts."""
    model, processor = tiny_model("llava_next", attn)
    images = [sample_image(200, 120, seed=1), sample_image(120, 230, seed=2)]
    questions = ["What color is the circle ?", "How many shapes are there in this picture ?"]
    batch = make_inputs(processor, images, questions)
    config = PruneConfig.preset("high", positions="original")
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        batch_ids = _greedy(model, batch)
    batch_traces = pruner.traces
    assert batch_traces[0].visual_tokens != batch_traces[1].visual_tokens
    for b, (image, question) in enumerate(zip(images, questions)):
        alone = make_inputs(processor, [image], [question])
        with torch.no_grad(), transprune.apply(model, config) as pruner:
            ids = _greedy(model, alone)
        new = ids.shape[1] - alone["input_ids"].shape[1]
        assert batch_ids[b, -new:].tolist() == ids[0, -new:].tolist()
        for batched, alone_stage in zip(batch_traces[b].stages, pruner.trace.stages):
            assert torch.equal(batched.kept, alone_stage.kept)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_padded_batch_of_llava_prompts(positions, tiny_model, make_inputs, sample_image):
    model, processor = tiny_model("llava", "eager")
    questions = ["What color is it ?", "Is there a red square on the left of the picture ?"]
    images = [sample_image(seed=3), sample_image(seed=4)]
    batch = make_inputs(processor, images, questions)
    config = PruneConfig.preset("low", positions=positions)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        batch_ids = _greedy(model, batch)
    traces = pruner.traces
    for b in range(2):
        alone = make_inputs(processor, [images[b]], [questions[b]])
        with torch.no_grad(), transprune.apply(model, config) as pruner:
            ids = _greedy(model, alone)
        assert batch_ids[b, -5:].tolist() == ids[0, -5:].tolist()
        assert all(torch.equal(x.kept, y.kept) for x, y in zip(traces[b].stages, pruner.trace.stages))


def test_prompt_without_image_is_untouched(family, tiny_model, make_inputs):
    model, processor = tiny_model(family)
    inputs = make_inputs(processor, [None], ["What color is the circle ?"])
    with torch.no_grad():
        ids = _greedy(model, inputs)
        with transprune.apply(model, "low") as pruner:
            pruned = _greedy(model, inputs)
    assert torch.equal(ids, pruned)
    assert pruner.trace is None


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_remove_restores_the_model_exactly(family, single):
    model, inputs = single(family)
    with torch.no_grad():
        before = model(**inputs).logits  # transformers adds hooks of its own on a first call
    keys = list(model.state_dict())
    hooks = _hook_counts(model)
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    with torch.no_grad():
        pruner = transprune.apply(model, "high")
        assert _hook_counts(model) > hooks
        model(**inputs)
        pruner.remove()
        pruner.remove()  # idempotent
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert _hook_counts(model) == hooks
    assert list(model.state_dict()) == keys
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes


def test_context_manager_removes_hooks_on_error(family, single):
    model, inputs = single(family)
    with torch.no_grad():
        model(**inputs)
    hooks = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with transprune.apply(model, "high"):
            raise RuntimeError("boom")
    assert _hook_counts(model) == hooks


def test_a_second_pruner_on_the_same_model_is_refused(family, single):
    model, inputs = single(family)
    first = transprune.apply(model, "high")
    with pytest.raises(transprune.PruningInputError, match="already attached"):
        transprune.apply(model, "low")
    first.remove()
    with transprune.apply(model, "low"):
        first.remove()                       # a stale handle must not release the new pruner
        with pytest.raises(transprune.PruningInputError, match="already attached"):
            transprune.apply(model, "high")
    transprune.apply(model, "high").remove()  # free again after the block


def test_layer_after_a_stage_takes_the_side_pass_keys(family, single):
    """The IGA side pass projects layer p+1's keys for every token; layer p+1 then uses the
    survivors' rows instead of projecting them again (results unchanged: the reference tests)."""
    model, inputs = single(family)
    layers = transprune.adapters.for_model(model).decoder_layers(model)
    k_proj = layers[4].self_attn.k_proj      # layer 5, right after the first High stage (layer 4 of 16)
    projected = []
    project = k_proj.forward

    def counting(hidden, *args, **kwargs):
        projected.append(hidden.shape[1])
        return project(hidden, *args, **kwargs)
    k_proj.forward = counting                # stands in for another library's instance-level forward
    try:
        with torch.no_grad():
            with transprune.apply(model, "high") as pruner:
                model(**inputs)
            full, survivors = pruner.trace.tokens_per_layer[3], pruner.trace.tokens_per_layer[4]
            assert survivors < full
            assert projected == [full]           # the side pass; layer 5 itself projected nothing
            projected.clear()
            with transprune.apply(model, "random"):   # same schedule, no side pass
                model(**inputs)
            assert projected == [survivors]
        assert k_proj.forward is counting    # the pruner put back what was there
    finally:
        del k_proj.forward


@pytest.mark.parametrize("criterion", ["ttv", "iga"])
def test_single_criterion_ranks_by_that_score(criterion, single):
    model, inputs = single("llava")
    with torch.no_grad(), transprune.apply(model, PruneConfig.preset("high", criterion=criterion)) as pruner:
        model(**inputs)
    for stage in pruner.trace.stages:
        source = stage.ttv if criterion == "ttv" else stage.iga
        torch.testing.assert_close(stage.score, source)


def test_unsupported_model_names_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        transprune.apply(model, "high")


def test_schedule_too_deep_for_the_model_is_refused(family, single):
    model, _ = single(family)
    with pytest.raises(transprune.ConfigError, match="does not fit"):
        transprune.apply(model, PruneConfig(prune_layers=(10, 16), keep_ratios=(0.5, 0.25)))


def test_inputs_embeds_only_is_refused(family, single):
    model, inputs = single(family)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with transprune.apply(model, "high"), pytest.raises(transprune.PruningInputError, match="input_ids"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_static_cache_is_refused(family, single):
    model, inputs = single(family)
    with transprune.apply(model, "high"), pytest.raises(transprune.PruningInputError, match="dynamic KV cache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_two_image_prompt_prunes_each_span_with_its_own_budget(family, tiny_model, sample_image):
    model, processor = tiny_model(family, "eager")
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
               {"type": "text", "text": "Which image shows a red circle ?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [sample_image(200, 120, seed=5), sample_image(120, 160, seed=6)]
    inputs = dict(processor(images=images, text=[prompt], return_tensors="pt"))
    config = PruneConfig.preset("high", positions="original")
    reference = Reference(model, config.resolve(16)).run(inputs, max_new_tokens=3)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        logits = model(**inputs).logits[0, -1]
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor([model.config.image_token_id]))
    positions = visual.nonzero().flatten()
    first_span = int((positions < positions[0] + (positions.diff() > 1).nonzero()[0, 0] + 1).sum())
    sizes = [first_span, len(positions) - first_span]
    for stage, kept in zip(pruner.trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept)
        per_span = [int((stage.kept < sizes[0]).sum()), int((stage.kept >= sizes[0]).sum())]
        assert per_span == [int(size * stage.keep_ratio) for size in sizes]
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)
