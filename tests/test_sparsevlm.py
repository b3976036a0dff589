"""SparseVLM on tiny-llava: raters, rater attention, released budgets, rank-adaptive count, recycling.

The tiny LLaVA has 16 layers and N = 144; the released layers (3, 7, 16 of 32) scale to (2, 4, 8)
and the 192-budget ratios 300/200/110 of 576 keep 75 / 50 / 27 of 144.
"""

from __future__ import annotations

import functools

import pytest
import torch

import transprune
from transprune import flops
from transprune.config import PruneConfig
from transprune.methods import sparsevlm
from transprune.adapters.llava import tiny_llava

import slow_decoder

N = 144


@pytest.fixture(scope="module")
def tiny_eager():
    return tiny_llava(attn_implementation="eager")


def slow_raters(embeds, visual, text):
    """Released rater selection written out with loops over text tokens."""
    v, t = embeds[visual].double(), embeds[text].double()
    m = []
    for j in range(len(text)):
        column = []
        for i in range(len(visual)):
            logits = v[i] @ t.T
            column.append(torch.exp(logits[j] - logits.max()) / torch.exp(logits - logits.max()).sum())
        m.append(torch.stack(column).mean())
    m = torch.stack(m)
    return [j for j in range(len(text)) if m[j] > m.mean()]


def slow_layer_attention(layer, rotary, hidden, position_ids):
    """Head-mean attention probabilities (n, n) of `layer` on its input `hidden` (1, n, d), eager, by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    attn = layer.self_attn
    n = hidden.shape[1]
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(hidden, position_ids=position_ids)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    logits = (q[0].double() @ k[0].double().transpose(-1, -2)) * attn.scaling
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return logits.softmax(dim=-1).mean(dim=0)


def test_released_budgets_and_tflops():
    shape = flops.ARCHITECTURES["llava-1.5-7b"]
    tokens = {name: flops.schedule_tokens(PruneConfig.preset(name), 576, 32) for name in
              ("sparsevlm", "sparsevlm-128", "sparsevlm-64")}
    # Kept + recycled: 300 kept, 276 deleted -> int(0.3 * 276) + 1 = 83 clustered -> 9 tokens; then
    # 200 of 309 kept, 109 deleted -> 33 -> 4; then 110 of 204, 94 deleted -> 29 -> 3.
    assert tokens["sparsevlm"] == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert sorted(set(tokens["sparsevlm-128"]), reverse=True) == [576, 303 + 9, 110 + 7, 36 + 3]
    assert sorted(set(tokens["sparsevlm-64"]), reverse=True) == [576, 66 + 16, 30 + 2, 17 + 1]
    # The paper's accounting (visual tokens only): 1.35 / 0.95 / 0.54 TFLOPs. TransPrune's table prints
    # 1.57 for SparseVLM; no released budget gives that (see the method's module doc).
    assert [round(flops.config_tflops(PruneConfig.preset(name), shape), 2) for name in tokens] == [1.35, 0.95, 0.54]


def slow_sparsevlm(model, inputs, config, rank=None, steps=3):
    """SparseVLM as released, written out for one unpadded prompt: the decoder layers run by hand with
    their own causal mask and KV cache; at each pruning layer the raters' head-mean attention on the
    layer's input, top-k deletion, and the recycled tokens (cluster means of the best deleted ones, by
    `sparsevlm.recycle`, unit-tested on its own) concatenated after the kept visual tokens. Positions:
    "compact" renumbers 0..n-1 (the release); "original" keeps each token's own, a recycled token its
    cluster centre's. `rank`: (scale, bias) for the rank-adaptive count. Returns logits per step, the
    alive visual indices per stage (recycled ones numbered from N on) and per-layer cache lengths."""
    from transformers import DynamicCache
    from transprune import compat
    from transprune.reference import Reference
    language = model.model.language_model
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().flatten()
    text = torch.arange(int(visual[-1]) + 1, len(ids))
    hidden, _ = Reference(model, config)._embeds(inputs)
    raters = torch.tensor(slow_raters(hidden[0], visual, text))
    library_raters = sparsevlm.select_raters(hidden[0][visual], hidden[0][text])
    # The sequence as entries: visual index (>= 0, recycled from N on) or -1 - position for text.
    entries = [int(v) for v in torch.where(ids == model.config.image_token_id, 0, -1 - torch.arange(len(ids)))]
    entries = [-1 - i if e < 0 else int((visual == i).nonzero()) for i, e in enumerate(entries)]
    position_of = {i: int(p) for i, p in enumerate(visual)}        # visual index -> (borrowed) position
    cache, keyword = DynamicCache(config=language.config), compat.cache_keyword(language.layers[0].self_attn)
    stages, lengths = dict(zip(config.prune_layers, config.keep_ratios)), []
    kept_per_stage, scores = [], []

    def positions():
        if config.positions == "compact":
            return torch.arange(len(entries))[None]
        return torch.tensor([[-1 - e if e < 0 else position_of[e] for e in entries]])

    run_layer = functools.partial(slow_decoder.layer_step, language, {keyword: cache})

    for number, layer in enumerate(language.layers, start=1):
        position_ids = positions()
        out = run_layer(layer, hidden, position_ids)
        lengths.append(len(entries))
        if number in stages:
            probs = slow_layer_attention(layer, language.rotary_emb, hidden, position_ids)
            slots = {e: s for s, e in enumerate(entries)}
            alive = [e for e in entries if e >= 0]
            rows = [slots[-1 - int(text[j])] for j in raters]
            relation = probs[rows][:, [slots[a] for a in alive]]
            score = relation.mean(dim=0)
            scores.append(score)
            if rank is None:
                k = int(N * stages[number] + 1e-9)
            else:
                r = int(torch.linalg.matrix_rank(relation.float()))
                k = len(alive) if r == len(alive) else min(int(r * rank[0] + rank[1]), len(alive) - 1)
            keep = score.topk(min(k, len(alive))).indices.sort().values
            deleted = torch.tensor(sorted(set(range(len(alive))) - set(keep.tolist())), dtype=torch.long)
            candidates_out = out[0, [slots[a] for a in alive]]
            kept = [alive[i] for i in keep.tolist()]
            new = []
            if len(deleted):
                # DPC-KNN's tie-breaking noise: a generator seeded with the config's seed at every stage.
                generator = torch.Generator().manual_seed(config.seed)
                recycled = sparsevlm.recycle(candidates_out.float(), score.float(), deleted, generator)
                for token, anchor in zip(recycled.tokens, recycled.anchors.tolist()):
                    position_of[max(position_of) + 1] = position_of[alive[anchor]]
                    new.append((max(position_of), token))
            first_text_after = slots[-1 - int(text[0])]
            before = [e for e in entries[:first_text_after] if e < 0 or e in kept]
            after = entries[first_text_after:]
            rows_out = [out[0, slots[e]] for e in before] + [t.to(out.dtype) for _, t in new] + \
                       [out[0, slots[e]] for e in after]
            entries = before + [i for i, _ in new] + after
            out = torch.stack(rows_out)[None]
            kept_per_stage.append(torch.tensor(sorted(kept + [i for i, _ in new])))
        hidden = out
    logits = [model.lm_head(language.norm(hidden[:, -1:]))[0, -1]]
    for step in range(steps):
        hidden = language.embed_tokens(torch.tensor([[int(logits[-1].argmax())]]))
        for number, layer in enumerate(language.layers, start=1):
            start = lengths[number - 1] if config.positions == "compact" else len(ids)
            hidden = run_layer(layer, hidden, torch.tensor([[start + step]]))
        logits.append(model.lm_head(language.norm(hidden))[0, -1])
    return dict(logits=torch.stack(logits), kept=kept_per_stage, scores=scores, cache_lengths=lengths,
                raters=raters, library_raters=library_raters)


def pruned_generation(model, inputs, config, steps=3):
    with torch.inference_mode(), transprune.apply(model, config) as pruner:
        output = model.generate(**inputs, max_new_tokens=steps + 1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    return torch.stack(output.logits)[:, 0], pruner.trace


@pytest.mark.parametrize("preset, positions", [("sparsevlm", "compact"), ("sparsevlm-64", "compact"),
                                               ("sparsevlm", "original")])
def test_pruned_run_equals_slow_reimplementation(tiny_eager, prompt_inputs, preset, positions):
    """Raters, the pruning layer's own attention, deletion and recycling, prefill and decode steps."""
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    config = PruneConfig.preset(preset, positions=positions).resolve(16)
    assert config.prune_layers == (2, 4, 8)
    logits, trace = pruned_generation(model, inputs, config)
    with torch.inference_mode():
        expected = slow_sparsevlm(model, inputs, config)
    assert torch.equal(expected["library_raters"], expected["raters"])
    assert [s.kept.tolist() for s in trace.stages] == [k.tolist() for k in expected["kept"]]
    for stage, score in zip(trace.stages, expected["scores"], strict=True):
        torch.testing.assert_close(stage.score.double(), score, rtol=1e-4, atol=1e-6)
    assert trace.tokens_per_layer == expected["cache_lengths"]      # what each layer saw, and cached
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)
    for stage, before in zip(trace.stages, [torch.arange(N)] + [s.kept for s in trace.stages]):
        assert torch.equal(stage.candidates, before)
        assert len(stage.inserted) == sparsevlm.recycled_count(len(before) - (len(stage.kept) - len(stage.inserted)))
        assert all(set(s.tolist()) <= set(before.tolist()) for s in stage.sources)
        assert torch.equal(stage.inserted, torch.arange(int(before.max()) + 1, int(before.max()) + 1 +
                                                        len(stage.inserted)).clamp_min(N))


def test_recycled_token_counts(tiny_eager, prompt_inputs):
    """Sequence lengths per layer and the first-stage recycled count, as the release's arithmetic says."""
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    _, trace = pruned_generation(model, inputs, PruneConfig.preset("sparsevlm"), steps=0)
    first = trace.stages[0]
    own_kept = len(trace.own(first.kept))
    # 69 deleted -> the best int(0.3 * 69) + 1 = 21 clustered into int(21 / 10) + 1 = 3 tokens
    assert own_kept == 75 and len(first.inserted) == sparsevlm.recycled_count(N - 75) == 3
    length = inputs["input_ids"].shape[1]
    assert trace.tokens_per_layer[2] == length - N + 75 + 3
    assert trace.visual_tokens_per_layer[:3] == [N, N, 75 + 3]


def test_rank_adaptive_count(tiny_eager, prompt_inputs):
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    config = PruneConfig(method="sparsevlm_rank", prune_layers=(2, 4, 8), keep_ratios=(1.0, 1.0, 1.0),
                         accumulation_layers=(), positions="compact")
    logits, trace = pruned_generation(model, inputs, config)
    with torch.inference_mode():
        expected = slow_sparsevlm(model, inputs, config, rank=(13.5, 0.0))
    assert [s.kept.tolist() for s in trace.stages] == [k.tolist() for k in expected["kept"]]
    assert len(trace.stages[0].kept) < N            # random weights: rank 13.5 * raters < N
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_rank_keep_by_hand():
    full = torch.eye(3)
    assert sparsevlm.rank_keep(full, 13.5, 0.0) == 3                      # rank == c: keep all
    low = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]])     # rank 1 of c = 4
    assert sparsevlm.rank_keep(low, 2.0, 0.5) == 2                       # int(1 * 2 + 0.5)
    assert sparsevlm.rank_keep(low, 13.5, 0.0) == 3                      # capped at c - 1


def test_raters_by_hand():
    # Text token 0 matches every visual token best, token 2 is orthogonal, token 1 in between.
    visual = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    text = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    assert sparsevlm.select_raters(visual, text).tolist() == [0]
    assert sparsevlm.select_raters(visual, torch.ones(3, 2)).tolist() == [0, 1, 2]   # all equal: all rate


def test_recycling_by_formula():
    """Two well-separated groups among the deleted tokens; cluster means by hand."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.zeros(40, 2)
    hidden[:20] = torch.tensor([10.0, 0.0]) + 0.01 * torch.randn(20, 2, generator=generator)
    hidden[20:] = torch.tensor([0.0, 10.0]) + 0.01 * torch.randn(20, 2, generator=generator)
    scores = torch.arange(40, dtype=torch.float32)
    deleted = torch.arange(40)                         # all candidates deleted: 40 -> top 13 -> 2 clusters
    recycled = sparsevlm.recycle(hidden, scores, deleted, generator=torch.Generator().manual_seed(1))
    members = torch.cat(recycled.sources)
    assert sorted(members.tolist()) == list(range(27, 40))   # int(0.3 * 40) + 1 = 13 highest scores
    tokens = recycled.tokens
    assert tokens.shape == (2, 2)                          # int(13 / 10) + 1 clusters
    # All 13 come from the second group, so both clusters sit at (0, 10) and their means are of members.
    assert torch.allclose(tokens, torch.tensor([[0.0, 10.0]]).expand(2, 2), atol=0.05)
    for token, anchor, source in zip(tokens, recycled.anchors, recycled.sources):
        assert anchor in source                            # a token borrows its centre's position
        torch.testing.assert_close(token, hidden[source].mean(0), atol=1e-4, rtol=1e-4)
    merged = sparsevlm.cluster_and_merge(hidden[None, [0, 1, 2, 20, 21]], 2, torch.Generator().manual_seed(1))[0]
    expected = torch.stack([hidden[[0, 1, 2]].mean(0), hidden[[20, 21]].mean(0)])
    order = merged[:, 0].argsort(descending=True)
    assert torch.allclose(merged[order], expected, atol=1e-4)


def test_generation_runs_and_keeps_cache_consistent(tiny_eager, prompt_inputs):
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    for config in (PruneConfig.preset("sparsevlm"), PruneConfig.preset("sparsevlm-64")):
        with torch.inference_mode(), transprune.apply(model, config) as pruner:
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert output.shape[1] == inputs["input_ids"].shape[1] + 4
        assert len(pruner.trace.stages) == 3 and pruner.trace.method == "sparsevlm"


def test_registered_everywhere_it_is_listed():
    from components import schedule
    from transprune import eval as eval_tool
    assert transprune.methods.METHODS["sparsevlm"] is sparsevlm.SparseVLM
    assert transprune.methods.METHODS["sparsevlm_rank"] is sparsevlm.SparseVLMRank
    assert schedule.METHODS["SparseVLM"] == ("sparsevlm", "transprune")     # by registration + preset
    assert schedule.method_kind("SparseVLM") == "own_preset"
    assert "sparsevlm" in eval_tool.method_table()


def test_what_it_needs_decides_what_the_runner_provides(tiny_eager, prompt_inputs):
    """Needs.input_embeddings hands the stage the input embeddings; methods that do not declare it get None."""
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    seen = {}

    def spy(method):
        score = method.score

        def recording(ctx):
            seen[method.name] = None if ctx.input_embeddings is None else ctx.input_embeddings()
            return score(ctx)
        method.score = recording

    for preset in ("sparsevlm", "pdrop"):
        with torch.inference_mode(), transprune.apply(model, preset) as pruner:
            spy(pruner.method)
            model(**inputs)
    assert transprune.methods.stage_class("sparsevlm")(PruneConfig.preset("sparsevlm")).needs() == \
        transprune.methods.Needs(this_layer_qk=True, input_embeddings=True)
    assert seen["pdrop"] is None
    visual, text = seen["sparsevlm"]
    ids = inputs["input_ids"][0]
    positions = (ids == model.config.image_token_id).nonzero().flatten()
    assert visual.shape == (N, model.config.text_config.hidden_size)
    assert text.shape[0] == len(ids) - 1 - int(positions[-1])
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(text, embeds[int(positions[-1]) + 1:])


def test_padded_batch_equals_each_prompt_alone(tiny_eager):
    """The release runs batch 1; here each sample picks its own raters and keeps its own tokens."""
    model, processor = tiny_eager
    from PIL import Image
    images = [Image.new("RGB", (64, 80), c) for c in ((200, 10, 10), (10, 10, 200))]
    questions = ["what is it ?", "what color is the big square in the middle ?"]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in questions]
    batch = dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    config = PruneConfig.preset("sparsevlm")
    with torch.inference_mode(), transprune.apply(model, config) as pruner:
        batch_ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
    traces = pruner.traces
    for b in range(2):
        alone = dict(processor(images=images[b], text=prompts[b], return_tensors="pt"))
        with torch.inference_mode(), transprune.apply(model, config) as pruner:
            ids = model.generate(**alone, max_new_tokens=3, do_sample=False)
        assert batch_ids[b, -3:].tolist() == ids[0, -3:].tolist()
        assert all(torch.equal(x.kept, y.kept) for x, y in zip(traces[b].stages, pruner.trace.stages))


def test_stacked_after_visionzip_the_trace_indexes_patches_then_recycled_tokens(tiny_eager, prompt_inputs):
    """VisionZip re-indexes the in-LLM trace into the image's patches; recycled tokens come after them."""
    model, processor = tiny_eager
    inputs = prompt_inputs(processor)
    with torch.inference_mode(), transprune.apply(model, "visionzip-128+sparsevlm") as pruner:
        model(**pruner.prepare_inputs(inputs))
    trace = pruner.trace
    assert trace.stages[0].layer == 0 and len(trace.stages) == 4
    patches = trace.visual_tokens
    for stage in trace.stages[1:]:
        assert len(stage.inserted) > 0 and bool((stage.inserted >= patches).all())
        assert set(stage.inserted.tolist()) <= set(stage.kept.tolist())
        assert all(bool((s < patches + 100).all()) for s in stage.sources)
    previous = trace.stages[0].kept
    for stage in trace.stages[1:]:
        assert torch.equal(stage.candidates, previous)
        previous = stage.kept
    assert all(bool((trace.own(stage.kept) < patches).all()) for stage in trace.stages)
