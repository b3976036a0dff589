"""DivPrune and CDPruner, before the language model, on the tiny LLaVA (N = 144 patches): the runner
equals a slow hand-written selection fed to the unpruned model as input embeddings.

Both choose among the projected visual tokens (what the model inserts for the image); the kept tokens
reach the LLM in their original order with renumbered ("compact") positions, as in both releases.

On the other families the same choice runs at layer 0, on the first decoder layer's input
(`transprune.methods.first_layer`): on LLaVA it equals the pre-LLM stage, and on Qwen2.5-VL a slow
hand-written run (the selection, then the decoder layers by hand at the kept tokens' M-RoPE positions).
"""

from __future__ import annotations

import functools

import pytest
import torch

import transprune
from transprune import flops, resolve
from transprune.config import PruneConfig
from transprune.methods import PRE_LLM, cdpruner, divprune
from transprune.adapters.llava_next import tiny_llava_next

import slow_decoder

N = 144
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model("llava")


def projected_by_hand(model, pixel_values):
    """(N, d): the select layer's patch features (CLS dropped) through the projector, computed directly."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][0, 1:])


def slow_divprune(features, keep):
    """Max-min diversity as released, in float64 with explicit loops."""
    x = features.double()
    n = len(x)
    distance = [[1 - float(x[i] @ x[j] / (x[i].norm() * x[j].norm())) for j in range(n)] for i in range(n)]
    nearest_other = [sorted(distance[j][i] for i in range(n))[1] for j in range(n)]
    chosen = [max(range(n), key=lambda j: nearest_other[j])]
    while len(chosen) < keep:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(distance[i][j] for i in chosen)))
    return sorted(chosen)


def slow_cdpruner(features, instruction, keep):
    """The conditional DPP with the release's relevance, in float64; the greedy MAP written as its
    definition (add the token that maximises det L_S), not the incremental Cholesky of the release."""
    v = features.double() / features.double().norm(dim=-1, keepdim=True)
    t = instruction.double() / instruction.double().norm(dim=-1, keepdim=True)
    relevance = torch.stack([-(v[i] @ t.T).mean() for i in range(len(v))])
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * (v @ v.T) * relevance[None, :]
    chosen = []
    for _ in range(keep):
        rest = [j for j in range(len(v)) if j not in chosen]
        chosen.append(max(rest, key=lambda j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))))
    return sorted(chosen), relevance


def generate_from_embeddings(model, inputs, kept_features, steps=STEPS):
    """The unpruned model on hand-made input embeddings: the prompt with one image token per kept feature."""
    ids = inputs["input_ids"][0]
    image_token = model.config.image_token_id
    positions = (ids == image_token).nonzero().flatten()
    new_ids = torch.cat([ids[:positions[0]], ids.new_full((len(kept_features),), image_token), ids[positions[-1] + 1:]])
    embeds = model.get_input_embeddings()(new_ids)[None].clone()
    embeds[0, new_ids == image_token] = kept_features
    output = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(new_ids)[None],
                            max_new_tokens=steps + 1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return torch.stack(output.logits)[:, 0]


def pruned_generation(model, inputs, preset, steps=STEPS):
    with torch.inference_mode(), transprune.apply(model, preset) as pruner:
        output = model.generate(**pruner.prepare_inputs(inputs), max_new_tokens=steps + 1, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    return torch.stack(output.logits)[:, 0], pruner.trace


@pytest.mark.parametrize("preset", ["divprune-64", "divprune-192", "cdpruner-64", "cdpruner-128"])
def test_pruned_run_equals_slow_reimplementation(tiny, prompt_inputs, preset):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    keep = round(PruneConfig.preset(preset).pre_llm_keep * N)
    logits, trace = pruned_generation(model, inputs, preset)
    with torch.inference_mode():
        features = projected_by_hand(model, inputs["pixel_values"])
        if preset.startswith("divprune"):
            kept = slow_divprune(features, keep)
        else:
            ids = inputs["input_ids"][0]
            after = int((ids == model.config.image_token_id).nonzero()[-1]) + 1
            kept, relevance = slow_cdpruner(features, model.get_input_embeddings()(ids[after:]), keep)
            torch.testing.assert_close(trace.stages[0].score.double(), relevance, rtol=1e-4, atol=1e-5)
        expected = generate_from_embeddings(model, inputs, features[kept])
    first = trace.stages[0]
    assert first.layer == 0 and torch.equal(first.candidates, torch.arange(N))
    assert first.kept.tolist() == kept
    assert trace.visual_tokens == N and trace.visual_tokens_per_layer == [keep] * 16
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_divprune_by_hand():
    """a = (1, 0), b = (0, 1), c = (-1, 0) and d ~ a. Nearest-other distances: a, d ~0.001, b 0.95, c 1:
    c first; then a (2 from c); then b (min(1, 1) against d's ~0.001); d last."""
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.99, 0.05]])
    assert divprune.max_min_order(divprune.cosine_distances(points), 4).tolist() == [2, 0, 1, 3]
    kept, score = divprune.DivPrune(PruneConfig.preset("divprune-64")).choose(points, None, 2)
    assert kept.tolist() == [0, 2] and score.tolist() == [0.5, 0.0, 1.0, 0.0]


def test_cdpruner_relevance_and_greedy_map_by_definition():
    generator = torch.Generator().manual_seed(0)
    visual = torch.randn(12, 6, generator=generator)
    text = torch.randn(3, 6, generator=generator)
    unit = torch.nn.functional.normalize
    raw = -(unit(visual, dim=-1) @ unit(text, dim=-1).T).mean(dim=-1)
    relevance = cdpruner.relevance(visual, text)
    torch.testing.assert_close(relevance, (raw - raw.min() + 1e-6) / (raw.max() - raw.min()))
    kernel = cdpruner.conditional_kernel(visual, relevance).double()
    torch.testing.assert_close(kernel, (relevance[:, None] * (unit(visual, dim=-1) @ unit(visual, dim=-1).T)
                                        * relevance[None]).double())
    chosen = []   # the greedy MAP by its definition: add the token that maximises det L_S
    for _ in range(5):
        rest = [j for j in range(12) if j not in chosen]
        chosen.append(max(rest, key=lambda j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))))
    assert cdpruner.greedy_map(kernel, 5).tolist() == chosen


def test_presets_tflops_and_stacks(tiny, prompt_inputs):
    shape = flops.ARCHITECTURES["llava-1.5-7b"]
    for stage in ("divprune", "cdpruner"):
        assert PRE_LLM[stage].pre_llm
        assert [round(flops.config_tflops(PruneConfig.preset(f"{stage}-{t}"), shape), 2) for t in (192, 128, 64)] == \
            [1.25, 0.83, 0.42]
        assert round(flops.config_tflops(PruneConfig.preset(f"{stage}-128+high"), shape), 2) == 0.34
    model, processor = tiny
    inputs = prompt_inputs(processor)
    with torch.inference_mode(), transprune.apply(model, "cdpruner-128+high") as pruner:
        model(**pruner.prepare_inputs(inputs))
    trace = pruner.trace
    assert [(s.layer, len(s.kept)) for s in trace.stages] == [(0, 32), (4, 28), (5, 20), (6, 4)]
    assert torch.equal(trace.stages[1].candidates, trace.stages[0].kept)       # in-LLM stages index patches
    for before, after in zip(trace.stages, trace.stages[1:]):
        assert set(after.kept.tolist()) <= set(before.kept.tolist())


def test_batch_with_padding_equals_each_prompt_alone(tiny, sample_image, make_inputs):
    model, processor = tiny
    images = [sample_image(seed=1), sample_image(seed=2)]
    questions = ["what is it ?", "what color is the big square in the middle ?"]
    batch = make_inputs(processor, images, questions)
    with torch.inference_mode(), transprune.apply(model, "cdpruner-64") as pruner:
        batch_ids = model.generate(**pruner.prepare_inputs(batch), max_new_tokens=3, do_sample=False)
    traces = pruner.traces
    for b in range(2):
        alone = make_inputs(processor, [images[b]], [questions[b]])
        with torch.inference_mode(), transprune.apply(model, "cdpruner-64") as pruner:
            ids = model.generate(**pruner.prepare_inputs(alone), max_new_tokens=3, do_sample=False)
        assert batch_ids[b, -3:].tolist() == ids[0, -3:].tolist()
        assert torch.equal(traces[b].stages[0].kept, pruner.trace.stages[0].kept)


def test_stacked_on_other_families_is_refused_with_a_clear_error(tiny_model):
    for model, _ in (tiny_llava_next(), tiny_model("qwen2_5_vl")):
        for preset in ("divprune-64+high", "cdpruner-128+high"):
            with pytest.raises(transprune.UnsupportedModelError, match="Run it alone"):
                transprune.apply(model, preset)


@pytest.mark.parametrize("preset", ["divprune-64", "cdpruner-128"])
def test_alone_on_other_families_it_becomes_the_layer_0_twin(tiny_model, preset):
    model, _ = tiny_model("qwen2_5_vl")
    resolved = resolve.for_model(model, preset)
    stage = PRE_LLM[preset.split("-")[0]]
    assert resolved.method == stage.first_layer_twin and resolved.pre_llm is None
    assert resolved.prune_layers == (0,) and resolved.keep_ratios == (PruneConfig.preset(preset).pre_llm_keep,)
    assert resolved.positions == "original"           # M-RoPE: each kept token keeps its own position
    assert flops.schedule_tokens(resolved, 576, 28) == [round(576 * resolved.keep_ratios[0])] * 28
    # On LLaVA-1.5 the preset stays the pre-LLM stage, as released.
    llava, _ = tiny_model("llava")
    assert resolve.for_model(llava, preset).pre_llm == stage.name


def twin_config(preset, positions):
    keep = PruneConfig.preset(preset).pre_llm_keep
    twin = PRE_LLM[preset.split("-")[0]].first_layer_twin
    return PruneConfig(method=twin, prune_layers=(0,), keep_ratios=(keep,), positions=positions)


@pytest.mark.parametrize("preset", ["divprune-64", "cdpruner-128"])
def test_the_layer_0_twin_equals_the_pre_llm_stage_on_llava(tiny, prompt_inputs, preset):
    """The same kept patches, scores and logits: the first layer's input at the image is the projected tokens."""
    model, processor = tiny
    inputs = prompt_inputs(processor)
    expected_logits, expected = pruned_generation(model, inputs, preset)
    with torch.inference_mode(), transprune.apply(model, twin_config(preset, "compact")) as pruner:
        output = model.generate(**inputs, max_new_tokens=STEPS + 1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    trace = pruner.trace
    (stage,) = trace.stages
    assert stage.layer == 0
    assert torch.equal(stage.kept, expected.stages[0].kept)
    torch.testing.assert_close(stage.score, expected.stages[0].score, rtol=1e-5, atol=1e-6)
    assert trace.visual_tokens_per_layer == expected.visual_tokens_per_layer
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], expected_logits, rtol=1e-4, atol=1e-5)


def slow_first_layer_subset(model, inputs, choose, positions_mode="original", steps=STEPS):
    """The selection on the first layer's input, then the decoder layers run by hand (their own causal mask
    and KV cache) over the kept tokens. Positions: M-RoPE models keep each token's own (3, n) position and
    decode from the prompt's largest + 1; 1-D models number "original" (each token's prompt position,
    decoding from the prompt length) or "compact" (0..n'-1, decoding from n').
    `choose(visual (N, d), instruction (q, d)) -> kept indices`. Returns (logits, kept)."""
    from transformers import DynamicCache
    from transprune import compat
    from transprune.reference import Reference
    reference = Reference(model, PruneConfig(method="random", prune_layers=(1,), keep_ratios=(1.0,)).resolve(16))
    language = reference.lm
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().flatten()
    hidden, model_positions = reference._embeds(inputs)
    mrope = model_positions is not None and model_positions.dim() == 3
    after = torch.arange(int(visual[-1]) + 1, len(ids))
    kept = choose(hidden[0, visual], hidden[0, after])
    keep = sorted(set(range(len(ids))) - set(visual.tolist()) | set(visual[kept].tolist()))
    if mrope:
        positions = model_positions[-3:][:, :, keep]
        next_position = lambda step: torch.full((3, 1, 1), int(model_positions[-3:].max()) + 1 + step)  # noqa: E731
    elif positions_mode == "original":
        positions = torch.tensor([keep])
        next_position = lambda step: torch.tensor([[len(ids) + step]])  # noqa: E731
    else:
        positions = torch.arange(len(keep))[None]
        next_position = lambda step: torch.tensor([[len(keep) + step]])  # noqa: E731
    hidden = hidden[:, keep]
    cache = DynamicCache(config=language.config)
    run_layer = functools.partial(slow_decoder.layer_step, language,
                                  {compat.cache_keyword(language.layers[0].self_attn): cache})
    for layer in language.layers:
        hidden = run_layer(layer, hidden, positions)
    logits = [model.lm_head(language.norm(hidden[:, -1:]))[0, -1]]
    for step in range(steps):
        hidden = language.embed_tokens(torch.tensor([[int(logits[-1].argmax())]]))
        for layer in language.layers:
            hidden = run_layer(layer, hidden, next_position(step))
        logits.append(model.lm_head(language.norm(hidden))[0, -1])
    return torch.stack(logits), kept


def slow_choice(preset, keep):
    if preset.startswith("divprune"):
        return lambda visual, instruction: slow_divprune(visual, keep)
    return lambda visual, instruction: slow_cdpruner(visual, instruction, keep)[0]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("preset", ["divprune-64", "cdpruner-128"])
def test_the_layer_0_twin_on_llava_equals_slow_reimplementation_in_both_position_modes(tiny, prompt_inputs, preset,
                                                                                       positions):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    keep = round(PruneConfig.preset(preset).pre_llm_keep * N)
    with torch.inference_mode(), transprune.apply(model, twin_config(preset, positions)) as pruner:
        output = model.generate(**inputs, max_new_tokens=STEPS + 1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    with torch.inference_mode():
        expected, kept = slow_first_layer_subset(model, inputs, slow_choice(preset, keep), positions)
    (stage,) = pruner.trace.stages
    assert stage.kept.tolist() == kept and len(kept) == keep
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["divprune-64", "divprune-192", "cdpruner-64", "cdpruner-128"])
def test_on_qwen2_5_vl_the_run_equals_slow_reimplementation(tiny_model, sample_image, make_inputs, preset):
    model, processor = tiny_model("qwen2_5_vl")
    inputs = make_inputs(processor, [sample_image()], ["what color is the circle on the left ?"])
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    keep = round(PruneConfig.preset(preset).pre_llm_keep * n)
    with torch.inference_mode(), transprune.apply(model, preset) as pruner:
        output = model.generate(**inputs, max_new_tokens=STEPS + 1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    with torch.inference_mode():
        expected, kept = slow_first_layer_subset(model, inputs, slow_choice(preset, keep))
    (stage,) = pruner.trace.stages
    assert stage.layer == 0 and pruner.trace.visual_tokens == n
    assert stage.kept.tolist() == kept and len(kept) == keep
    assert pruner.trace.visual_tokens_per_layer == [keep] * len(pruner.trace.visual_tokens_per_layer)
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_cdpruner_keeps_distinct_tokens_when_the_kernel_runs_out_of_rank():
    """Repeated or uniform patches make the DPP kernel singular: the greedy MAP still returns exactly
    `keep` distinct tokens (the released update would divide by zero and repeat a token)."""
    from transprune.methods.cdpruner import greedy_map

    base = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    features = base[torch.arange(12) % 3]               # 12 tokens, rank 3
    kernel = features @ features.T
    order = greedy_map(kernel, 8)
    assert len(order) == 8 and len(set(order.tolist())) == 8
    assert sorted(order[:3].tolist()) == [0, 1, 2]     # one of each distinct patch first
