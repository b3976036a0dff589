"""Peer methods (FastV, PDrop, random, SparseVLM, DART, and the pre-LLM VisionZip, DivPrune, CDPruner) and
the analytic FLOPs, on tiny offline models.

The tiny LLaVA has 16 decoder layers and N = 144 visual tokens; presets are written for 32 layers
and scaled (config.scale_layers): FastV K=2 -> 1, PDrop (8, 16, 24) -> (4, 8, 12),
TransPrune / random (7, 9, 12) -> (4, 5, 6).
"""

from __future__ import annotations

import pytest
import torch

import transprune
from transprune import flops
from transprune.config import PruneConfig
from transprune.methods import PRE_LLM, visionzip
from transprune.scoring import keep_count
from transprune.adapters.llava import tiny_llava
from transprune.adapters.llava_next import tiny_llava_next

N = 144
LAYERS = 16


def assert_close(actual, expected, atol=1e-5, rtol=1e-4):
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    diff = (actual - expected).abs()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), \
        f"max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}"


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava()


@pytest.fixture(scope="module")
def tiny_eager():
    return tiny_llava(attn_implementation="eager")


def chat(processor, content) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def two_image_batch(processor):
    """A left-padded batch of two prompts of different lengths, one plain-colour image each."""
    from PIL import Image
    images = [Image.new("RGB", (64, 80), c) for c in ((200, 10, 10), (10, 10, 200))]
    prompts = [chat(processor, [{"type": "image"}, {"type": "text", "text": q}])
               for q in ("what is it ?", "what color is the big square in the middle ?")]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def pruned_trace(model, inputs, config):
    with torch.inference_mode(), transprune.apply(model, config) as pruner:
        model(**inputs, use_cache=True)
        return pruner.trace


def visual_positions(model, inputs):
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()


# ------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("preset, expected", [(None, 3.82), ("fastv", 2.01), ("pdrop", 1.78), ("high", 1.56),
                                              ("low", 1.19)])
def test_paper_tflops_llava15_7b(preset, expected):
    config = PruneConfig.preset(preset) if preset else None
    assert round(flops.config_tflops(config, flops.ARCHITECTURES["llava-1.5-7b"]), 2) == expected


def test_layer_flops_formula():
    n, d, m = 7, 16, 40
    assert flops.layer_flops(n, d, m) == 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    assert flops.tflops([n, n], d, m) == pytest.approx(2 * flops.layer_flops(n, d, m) / 1e12)


def test_full_sequence_variant_counts_text_tokens(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    trace = pruned_trace(model, inputs, PruneConfig.preset("high"))
    hidden, intermediate, layers = flops.model_shape(model)
    text = inputs["input_ids"].shape[1] - N
    visual = flops.trace_tflops(trace, hidden, intermediate)
    full = flops.trace_tflops(trace, hidden, intermediate, full_sequence=True)
    assert visual == pytest.approx(flops.tflops(flops.schedule_tokens(PruneConfig.preset("high"), N, layers),
                                                hidden, intermediate))
    assert full == pytest.approx(flops.tflops([n + text for n in trace.visual_tokens_per_layer], hidden, intermediate))
    assert full > visual
    # Unpruned: full sequence = every layer over the whole prompt.
    assert flops.tflops([N + text] * layers, hidden, intermediate) > full
    # The full-sequence LLaVA-1.5-7B baseline with a 61-token text part (the bench prompt): 4.23 > 3.82.
    shape = flops.ARCHITECTURES["llava-1.5-7b"]
    assert flops.tflops([576 + 61] * 32, shape.hidden, shape.intermediate) == pytest.approx(4.2316, abs=1e-3)


# ------------------------------------------------------------------------------------ token counts
# (preset, expected [(layer, kept)] on 16 layers with N = 144), computed by hand; every registered
# method also runs in test_every_registered_method_keeps_its_planned_tokens.
SCHEDULES = {
    "fastv": [(1, 72)],
    "pdrop": [(4, 72), (8, 36), (12, 18)],
    "sparsevlm": [(2, 75), (4, 50), (8, 27)],
    # DART: M = floor(144 * 128 / 576) = 32 -> 4 image pivots + 8 pivots x 4 tokens.
    "dart": [(1, 36)],
    "random": [(4, 126), (5, 90), (6, 18)],
    "high": [(4, 126), (5, 90), (6, 18)],
    "low": [(4, 72), (5, 36), (6, 9)],
}


@pytest.mark.parametrize("preset", list(SCHEDULES))
def test_peer_keeps_right_tokens_at_right_layers(tiny, preset, prompt_inputs):
    """The hand-computed counts of the presets above."""
    model, processor = tiny
    trace = pruned_trace(model, prompt_inputs(processor), PruneConfig.preset(preset))
    # Survivors of each stage's candidates (SparseVLM also inserts recycled tokens: `inserted`).
    assert [(s.layer, len(s.kept) - (0 if s.inserted is None else len(s.inserted))) for s in trace.stages] == \
        SCHEDULES[preset]


@pytest.mark.parametrize("name", list(transprune.methods.METHODS))
def test_every_registered_method_keeps_its_planned_tokens(tiny, name, prompt_inputs):
    """Every registered in-LLM method, at the config it declares for the shared tests (`test_values`):
    floor(N * r) per stage or its own planned count (DART), at most that for a method that decides its
    count per input; the trace agrees with the analytic schedule, and every stage keeps a subset."""
    model, processor = tiny
    inputs = prompt_inputs(processor)
    length = inputs["input_ids"].shape[1]
    method = transprune.methods.METHODS[name]
    config = PruneConfig(**method.test_values(), reference_depth=32)
    trace = pruned_trace(model, inputs, config)
    assert trace.visual_tokens == N
    survivors = [(s.layer, len(s.kept) - (0 if s.inserted is None else len(s.inserted))) for s in trace.stages]
    resolved = config.resolve(LAYERS)
    planned = [(layer, method.planned_keep(N, ratio)) for layer, ratio in zip(resolved.prune_layers,
                                                                               resolved.keep_ratios)]
    assert [layer for layer, _ in survivors] == [layer for layer, _ in planned]
    if method.adaptive_keep:
        assert all(0 < kept <= N for _, kept in survivors)
    else:
        assert survivors == planned
        assert trace.visual_tokens_per_layer == flops.schedule_tokens(config, N, LAYERS)
        assert trace.tokens_per_layer == [length - (N - v) for v in trace.visual_tokens_per_layer]
    for before, after in zip(trace.stages, trace.stages[1:]):
        inserted = set() if after.inserted is None else set(after.inserted.tolist())
        assert set(after.kept.tolist()) - inserted <= set(before.kept.tolist())
    for stage in trace.stages:
        assert torch.equal(stage.kept, stage.kept.sort().values)


def test_planned_keep_is_floor_n_r_except_for_dart():
    for name, method in transprune.methods.METHODS.items():
        for ratio in (0.875, 0.5, 128 / 576, 0.0625):
            assert (method.planned_keep(N, ratio) == keep_count(N, ratio)) == (name != "dart"), (name, ratio)


# ------------------------------------------------------------------------------------ scores
def eager_attentions(model, inputs):
    with torch.inference_mode():
        out = model(**inputs, output_attentions=True)
    return out.attentions


@pytest.mark.parametrize("layer", [1, 3])
def test_fastv_score_is_last_token_attention_of_layer_k(tiny_eager, layer, prompt_inputs):
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    config = PruneConfig(method="fastv", prune_layers=(layer,), keep_ratios=(0.5,), accumulation_layers=(),
                         positions="original")
    trace = pruned_trace(model, inputs, config)
    attention = eager_attentions(model, inputs)[layer - 1]          # (1, H, L, L) of layer K
    reference = attention[0, :, -1, visual_positions(model, inputs)].mean(dim=0)
    stage = trace.stages[0]
    assert stage.layer == layer and torch.equal(stage.candidates, torch.arange(N))
    assert_close(stage.score, reference)
    assert torch.equal(stage.kept, reference.topk(72).indices.sort().values)


def test_fastv_preset_on_sdpa_model_matches_eager_reference(tiny, tiny_eager, prompt_inputs):
    # The side pass does not need eager attention: same weights, SDPA model, same scores.
    inputs = prompt_inputs(tiny[1])
    sdpa = pruned_trace(tiny[0], inputs, PruneConfig.preset("fastv"))
    eager = pruned_trace(tiny_eager[0], inputs, PruneConfig.preset("fastv"))
    assert_close(sdpa.stages[0].score, eager.stages[0].score)


def test_pdrop_score_is_last_token_attention_with_next_layer_projections(tiny_eager, prompt_inputs):
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    trace = pruned_trace(model, inputs, PruneConfig.preset("pdrop"))
    first = trace.stages[0]
    assert first.layer == 4
    # Before any pruning, layer p+1 of the unpruned model attends from layer p's output with its
    # own norm, projections and rotary embedding: exactly PDrop's side pass at stage 1.
    attention = eager_attentions(model, inputs)[first.layer]        # layer p + 1 (0-based index p)
    reference = attention[0, :, -1, visual_positions(model, inputs)].mean(dim=0)
    assert_close(first.score, reference)
    assert torch.equal(first.kept, reference.topk(72).indices.sort().values)


def test_pdrop_later_stage_matches_hand_computation(tiny_eager, prompt_inputs):
    """Stage 2 by hand: compact positions, next layer's q/k on layer 8's pruned output."""
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    language = model.model.language_model
    captured = {}
    hook = language.layers[7].register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
    try:
        trace = pruned_trace(model, inputs, PruneConfig.preset("pdrop"))
    finally:
        hook.remove()
    stage = trace.stages[1]
    assert stage.layer == 8
    hidden = captured["h"]                                           # (1, n', d) survivors of stage 1
    layer = language.layers[8]
    attn = layer.self_attn
    n = hidden.shape[1]
    positions = torch.arange(n)[None]                                # compact: renumbered 0..n'-1
    cos, sin = language.rotary_emb(hidden, position_ids=positions)
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, n, -1, attn.head_dim).transpose(1, 2)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    probs = torch.softmax((q[0, :, -1:] @ k[0].transpose(-1, -2)).float() * attn.scaling, dim=-1)[:, 0].mean(0)
    # Survivors keep their order: text before the image, then the kept visual tokens, then the text after.
    start = int(visual_positions(model, inputs)[0])
    reference = probs[start:start + len(stage.candidates)]
    assert_close(stage.score, reference)


def test_random_is_seeded_and_deterministic(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    first = pruned_trace(model, inputs, PruneConfig.preset("random", seed=3))
    again = pruned_trace(model, inputs, PruneConfig.preset("random", seed=3))
    other = pruned_trace(model, inputs, PruneConfig.preset("random", seed=4))
    other_prompt = pruned_trace(model, prompt_inputs(processor, "how many objects are there ?", seed=1),
                                PruneConfig.preset("random", seed=3))
    for a, b in zip(first.stages, again.stages):
        assert torch.equal(a.kept, b.kept) and torch.equal(a.score, b.score)
    assert any(not torch.equal(a.kept, b.kept) for a, b in zip(first.stages, other.stages))
    # The choice depends on the seed only, not on the image or the question (a pure control).
    assert all(torch.equal(a.kept, b.kept) for a, b in zip(first.stages, other_prompt.stages))


# ------------------------------------------------------------------------------------ pre-LLM stages
@pytest.mark.parametrize("stage", list(PRE_LLM))
def test_pre_llm_stage_stacks_with_transprune(tiny, prompt_inputs, stage):
    """Every registered pre-LLM stage: its 128 preset keeps 32 of 144 before the LLM, then High keeps
    28 / 20 / 4 of those; the trace indexes the image's own tokens, with the stage at layer 0."""
    model, processor = tiny
    inputs = prompt_inputs(processor)
    with torch.inference_mode(), transprune.apply(model, f"{stage}-128+high") as pruner:
        prepared = pruner.prepare_inputs(inputs)
        model(**prepared)
    trace = pruner.trace
    assert int((prepared["input_ids"] == model.config.image_token_id).sum()) == 32
    assert [(s.layer, len(s.kept)) for s in trace.stages] == [(0, 32), (4, 28), (5, 20), (6, 4)]
    assert trace.visual_tokens_per_layer == flops.schedule_tokens(PruneConfig.preset(f"{stage}-128+high"), N, LAYERS)
    for before, after in zip(trace.stages, trace.stages[1:]):
        assert torch.equal(after.candidates, before.kept)


def test_registered_methods_are_offered_by_the_app_and_the_eval():
    from components import schedule
    from transprune import eval as eval_tool
    for label, name in (("DART", "dart"), ("DivPrune", "divprune"), ("CDPruner", "cdpruner")):
        assert schedule.METHODS[label] == (name, "transprune")
    assert schedule.method_kind("DART") == "own_preset"
    assert schedule.method_kind("DivPrune") == schedule.method_kind("CDPruner") == "pre_llm"
    assert schedule.pre_llm_budgets("cdpruner") == {"High": "cdpruner-192", "Low": "cdpruner-64"}
    table = eval_tool.method_table()
    assert {"dart", "dart-64", "dart-192", "divprune-64", "cdpruner-128"} <= set(table)


# ------------------------------------------------------------------------------------ VisionZip
def test_visionzip_is_registered_outside_the_in_llm_methods():
    assert PRE_LLM["visionzip"] is visionzip.VisionZip               # a pre-LLM stage
    assert PRE_LLM["visionzip"].pre_llm
    assert "visionzip" not in transprune.methods.METHODS       # no in-LLM stage of its own


def test_visionzip_dominant_tokens_are_cls_attention_topk(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True, return_dict=True)
    finally:
        tower.config._attn_implementation = previous
    layer = model.config.vision_feature_layer                        # -2
    cls_attention = out.attentions[layer][0, :, 0, 1:].mean(dim=0)   # (N,) CLS -> patches, mean over heads
    with torch.inference_mode():
        tokens, selection = visionzip.compress_features(model, inputs["pixel_values"], dominant=20, contextual=12)
    assert torch.equal(selection.dominant[0], cls_attention.topk(19).indices.sort().values)  # CLS + 19 patches
    # The tokens are the projected select-layer features: CLS, dominant patches, then group means.
    features = out.hidden_states[layer][0]
    projector = model.model.multi_modal_projector
    with torch.inference_mode():
        assert_close(tokens[0, 0], projector(features[:1])[0])
        assert_close(tokens[0, 1:20], projector(features[1:][selection.dominant[0]]))
        for g in range(12):
            members = (selection.group[0] == g).nonzero().flatten()
            assert selection.targets[0, g] in members
            assert_close(tokens[0, 20 + g], projector(features[1:][members].mean(dim=0, keepdim=True))[0])
    assert (selection.group[0] == -1).sum() == 19
    assert selection.token_patch.shape == (1, 32)


def test_visionzip_keys_merge_by_similarity():
    # Pure function: two obvious clusters of keys, two targets -> two groups by similarity.
    features = torch.arange(9 * 2, dtype=torch.float32).view(1, 9, 2)
    cls_attention = torch.tensor([[0.0, 0.9, 0.8, 0, 0, 0, 0, 0, 0]])
    keys = torch.tensor([[[1, 0], [0, 1], [0, 1], [1, 0], [1, 0.1], [0.1, 1], [0, 1], [0.2, 1], [1, 0.2]]])
    tokens, selection = visionzip.select_tokens(features, cls_attention, keys, dominant=2, contextual=2,
                                                keep_cls=False)
    assert selection.dominant.tolist() == [[0, 1]]                  # patches 0, 1 (tokens 1, 2)
    # Remaining patches 2..7, step 6 // 2 = 3: the targets are patches 2 and 5.
    assert selection.targets.tolist() == [[2, 5]]
    assert selection.group[0].tolist() == [-1, -1, 0, 0, 1, 1, 1, 0]
    patches = features[0, 1:]
    assert_close(tokens[0, 2], patches[[2, 3, 7]].mean(dim=0))
    assert_close(tokens[0, 3], patches[[4, 5, 6]].mean(dim=0))
    assert tokens.shape == (1, 4, 2)


def test_visionzip_then_transprune_composes_counts(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    new_inputs, kept = visionzip.compress_inputs(model, inputs, dominant=20, contextual=12)
    assert "pixel_values" not in new_inputs
    assert int((new_inputs["input_ids"] == model.config.image_token_id).sum()) == 32
    assert new_inputs["input_ids"].shape[1] == inputs["input_ids"].shape[1] - N + 32
    assert len(kept) == 1 and len(kept[0]) == 19
    trace = pruned_trace(model, new_inputs, PruneConfig.preset("high"))
    assert trace.visual_tokens == 32
    assert [(s.layer, len(s.kept)) for s in trace.stages] == [(4, 28), (5, 20), (6, 4)]
    assert trace.visual_tokens_per_layer == [32] * 4 + [28, 20] + [4] * 10


def test_visionzip_inputs_equal_manual_embedding_and_generate(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    new_inputs, _ = visionzip.compress_inputs(model, inputs, dominant=54, contextual=10)
    with torch.inference_mode():
        tokens, _ = visionzip.compress_features(model, inputs["pixel_values"], dominant=54, contextual=10)
        ids = new_inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = tokens[0]
        reference = model(inputs_embeds=embeds, attention_mask=new_inputs["attention_mask"]).logits
        logits = model(**new_inputs).logits
        assert_close(logits, reference)
        plain = model.generate(**new_inputs, max_new_tokens=4, do_sample=False)
        with transprune.apply(model, "high") as pruner:
            stacked = model.generate(**new_inputs, max_new_tokens=4, do_sample=False)
            assert pruner.trace.visual_tokens == 64
    assert plain.shape == stacked.shape == (1, ids.shape[1] + 4)


def test_visionzip_batch_with_padding(tiny):
    model, processor = tiny
    inputs = two_image_batch(processor)
    new_inputs, kept = visionzip.compress_inputs(model, inputs, dominant=10, contextual=6, keep_cls=False)
    assert len(kept) == 2
    assert ((new_inputs["input_ids"] == model.config.image_token_id).sum(dim=1) == 16).all()
    assert (new_inputs["attention_mask"].sum(dim=1) == inputs["attention_mask"].sum(dim=1) - N + 16).all()
    assert (new_inputs["attention_mask"][:, -1] == 1).all()             # left padding
    with torch.inference_mode():
        model.generate(**new_inputs, max_new_tokens=2, do_sample=False)


def test_visionzip_presets_give_the_released_tflops():
    shape = flops.ARCHITECTURES["llava-1.5-7b"]
    assert [round(flops.config_tflops(PruneConfig.preset(name), shape), 2) for name in
            ("visionzip-192", "visionzip-128", "visionzip-64", "visionzip-128+high")] == [1.25, 0.83, 0.42, 0.34]


def test_visionzip_counts_reproduce_the_released_settings():
    assert [visionzip.counts(PruneConfig.preset(name).pre_llm_keep, 576) for name in
            ("visionzip-192", "visionzip-128", "visionzip-64")] == [(162, 30), (108, 20), (54, 10)]
    assert visionzip.counts(64 / 576, 144) == (13, 3)      # T = 16, 5/32 of them contextual


def test_visionzip_configs_presets_and_stacks():
    alone = PruneConfig(method="visionzip")
    assert alone.prune_layers == () and alone.keep_ratios == ()
    assert alone.pre_llm == "visionzip" and alone.pre_llm_keep == 64 / 576
    stacked = PruneConfig.preset("visionzip-128+high")
    assert stacked.method == "transprune" and (stacked.pre_llm, stacked.pre_llm_keep) == ("visionzip", 128 / 576)
    assert stacked.resolve(LAYERS).prune_layers == (4, 5, 6)
    assert PruneConfig.preset("visionzip-64").resolve(LAYERS).prune_layers == ()
    with pytest.raises(transprune.ConfigError, match="share"):
        PruneConfig(pre_llm="visionzip", pre_llm_keep=1.5)
    with pytest.raises(transprune.ConfigError, match="in-LLM preset after"):
        PruneConfig.preset("visionzip-64+visionzip-128")
    with pytest.raises(transprune.ConfigError, match="Cannot stack"):
        PruneConfig.preset("high+low")


def test_visionzip_config_equals_compressing_by_hand(tiny, prompt_inputs):
    """apply(model, "visionzip-64+high") + prepare_inputs == compress_inputs then apply("high"),
    and its trace is the by-hand trace re-indexed into patches, with VisionZip as stage 0."""
    model, processor = tiny
    inputs = prompt_inputs(processor)
    dominant, contextual = visionzip.counts(64 / 576, N)
    with torch.inference_mode():
        by_hand, selection, _ = visionzip.compress(model, inputs, dominant, contextual)
        with transprune.apply(model, "high") as pruner:
            expected = model.generate(**by_hand, max_new_tokens=4, do_sample=False)
            token_trace = pruner.trace
        with transprune.apply(model, "visionzip-64+high") as pruner:
            prepared = pruner.prepare_inputs(inputs)
            got = model.generate(**prepared, max_new_tokens=4, do_sample=False)
            trace = pruner.trace
    assert torch.equal(got, expected)
    index = visionzip.patch_token_index(selection, 0)
    assert index[0] == N and sorted(index[1:dominant].tolist()) == selection.dominant[0].tolist()
    assert index[dominant:].tolist() == selection.targets[0].tolist()
    assert trace.visual_tokens == N + 1
    zip_stage = trace.stages[0]
    assert zip_stage.layer == 0 and len(zip_stage.candidates) == N + 1 and len(zip_stage.kept) == 16
    assert_close(zip_stage.score[:N], selection.cls_attention[0, 1:])
    assert [s.layer for s in trace.stages] == [0] + [s.layer for s in token_trace.stages]
    for mapped, raw in zip(trace.stages[1:], token_trace.stages):
        assert mapped.kept.tolist() == sorted(index[raw.kept].tolist())
        assert set(mapped.kept.tolist()) <= set(mapped.candidates.tolist())
        position = {int(t): i for i, t in enumerate(index[raw.candidates])}
        for token, score in zip(mapped.candidates.tolist(), mapped.score.tolist()):
            assert score == float(raw.score[position[token]])
    assert set(trace.stages[1].candidates.tolist()) == set(zip_stage.kept.tolist())
    assert trace.visual_tokens_per_layer == token_trace.visual_tokens_per_layer


def test_visionzip_alone_equals_plain_generation_on_compressed_inputs(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    with torch.inference_mode():
        by_hand, _ = visionzip.compress_inputs(model, inputs, *visionzip.counts(128 / 576, N))
        expected = model.generate(**by_hand, max_new_tokens=4, do_sample=False)
        with transprune.apply(model, "visionzip-128") as pruner:
            got = model.generate(**pruner.prepare_inputs(inputs), max_new_tokens=4, do_sample=False)
            trace = pruner.trace
    assert torch.equal(got, expected)
    assert [(s.layer, len(s.kept)) for s in trace.stages] == [(0, 32)]
    assert trace.visual_tokens_per_layer == [32] * LAYERS


def test_visionzip_config_refuses_raw_pixels_and_other_families(tiny, prompt_inputs):
    model, processor = tiny
    inputs = prompt_inputs(processor)
    with transprune.apply(model, "visionzip-64") as pruner, torch.inference_mode():
        with pytest.raises(transprune.PruningInputError, match="prepare_inputs"):
            model(**inputs)
        prepared = pruner.prepare_inputs(inputs)
        with pytest.raises(transprune.PruningInputError, match="made from these inputs"):
            model(**visionzip.compress_inputs(model, prompt_inputs(processor, "what is it ?"), 13, 3)[0])
        assert model(**prepared).logits.shape[1] == prepared["input_ids"].shape[1]
    next_model, _ = tiny_llava_next()
    with pytest.raises(transprune.UnsupportedModelError, match="VisionZip supports"):
        transprune.apply(next_model, "visionzip-64+high")
    with transprune.apply(model, "high") as pruner:
        assert pruner.prepare_inputs(inputs) is inputs       # nothing before the LLM: unchanged


def test_visionzip_config_batch_maps_each_row_to_its_own_image(tiny):
    model, processor = tiny
    inputs = two_image_batch(processor)
    with torch.inference_mode(), transprune.apply(model, "visionzip-128+high") as pruner:
        model(**pruner.prepare_inputs(inputs), use_cache=True)
        selection = pruner.pre_stage.selection
        traces = pruner.traces
    assert len(traces) == 2
    for row, trace in enumerate(traces):
        assert trace.stages[0].kept.tolist() == sorted(visionzip.patch_token_index(selection, row).tolist())
        assert [len(s.kept) for s in trace.stages] == [32, 28, 20, 4]


def test_visionzip_through_the_model_registry_and_its_layout():
    from PIL import Image
    from transprune import models
    lm = models.load("tiny-llava", device="cpu")
    image = Image.new("RGB", (300, 200), (30, 200, 60))
    result = lm.generate(image, "what color is it ?", config="visionzip-64+high", max_new_tokens=3)
    trace = result.trace
    assert trace.visual_tokens == N + 1 and [len(s.kept) for s in trace.stages] == [16, 14, 10, 2]
    assert int((result.inputs["input_ids"] == lm.model.config.image_token_id).sum()) == 16
    grid = lm.visual_layout(image.size, N)
    assert trace.layout.boxes.shape == (N + 1, 4)
    assert torch.equal(trace.layout.boxes[:N], grid.boxes) and torch.isnan(trace.layout.boxes[N]).all()
    # A pre-compressed input with an in-LLM config still works (trace over the VisionZip tokens).
    new_inputs, _ = visionzip.compress_inputs(lm.model, lm.prepare(image, "what color is it ?"), 54, 10)
    token_result = lm.generate(image, "what color is it ?", config="high", inputs=new_inputs, max_new_tokens=3)
    assert token_result.trace.visual_tokens == 64


def test_visionzip_rejects_other_families_and_bad_counts(tiny, prompt_inputs):
    next_model, next_processor = tiny_llava_next()
    with pytest.raises(transprune.UnsupportedModelError, match="VisionZip supports"):
        visionzip.compress_features(next_model, torch.zeros(1, 3, 112, 112))
    model, processor = tiny
    inputs = prompt_inputs(processor)
    with pytest.raises(ValueError, match="do not fit"):
        visionzip.compress_inputs(model, inputs, dominant=140, contextual=10)
    with pytest.raises(ValueError, match="pixel_values"):
        visionzip.compress_inputs(model, {k: v for k, v in inputs.items() if k != "pixel_values"})


def test_visionzip_config_batch_with_a_text_only_row(tiny):
    model, processor = tiny
    from PIL import Image
    prompts = [chat(processor, [{"type": "image"}, {"type": "text", "text": "what is it ?"}]),
               chat(processor, [{"type": "text", "text": "what color is the sky ?"}])]
    inputs = dict(processor(images=[Image.new("RGB", (64, 64), (200, 10, 10))], text=prompts, return_tensors="pt",
                            padding=True))
    with torch.inference_mode(), transprune.apply(model, "visionzip-128+high") as pruner:
        model.generate(**pruner.prepare_inputs(inputs), max_new_tokens=3, do_sample=False)
        traces = pruner.traces
    assert [t.visual_tokens for t in traces] == [N + 1, 0]
    assert [len(s.kept) for s in traces[0].stages] == [32, 28, 20, 4] and traces[1].stages == []
