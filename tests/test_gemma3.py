"""Gemma 3: sliding-window and full-attention layers interleaved, bidirectional attention within an
image, a rotary per layer type. The invariants every family passes (keep-all bit-identical, the
slow reference in both position modes, undo, errors) run on it through `tests/conftest.py`'s
FAMILIES; this file checks what is Gemma's own."""

import pytest
import torch

import transprune
from transprune import PruneConfig, adapters, compat, flops, models
from transprune.config import PRESETS
from transprune.errors import PruningInputError, UnsupportedModelError
from transprune.reference import Reference

pytest.importorskip("transformers.models.gemma3", reason="this transformers has no Gemma 3")

QUESTION = "What color is the circle ?"


@pytest.fixture
def gemma(tiny_model, make_inputs, sample_image):
    """(attn="eager", questions=(QUESTION,)) -> (model, processor, inputs), one image per prompt."""
    def build(attn="eager", questions=(QUESTION,)):
        model, processor = tiny_model("gemma3", attn)
        images = [sample_image(seed=seed) for seed in range(len(questions))]
        return model, processor, make_inputs(processor, images, list(questions))
    return build


def _greedy(model, inputs, tokens):
    return model.generate(**inputs, max_new_tokens=tokens, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def test_tiny_model_interleaves_layer_types_and_prompts_outrun_the_window(gemma):
    model, processor, inputs = gemma()
    adapter = adapters.for_model(model)
    specs = adapter.layer_masks(model)
    assert [n for n, spec in enumerate(specs, 1) if spec.layer_type == "full_attention"] == [6, 12]
    assert {spec.window for spec in specs if spec.layer_type == "sliding_attention"} == {12}
    assert adapter.language_model(model) is model.model.language_model
    # One image: 16 soft tokens, bidirectional among themselves (token_type_ids), inside a longer prompt.
    visual = adapter.visual_mask(model, inputs["input_ids"])
    assert int(visual.sum()) == 16 and torch.equal(inputs["token_type_ids"].bool(), visual)
    assert inputs["input_ids"].shape[1] > 2 * 12


def test_sliding_layers_count_the_window_over_the_survivors(gemma):
    """The mask a sliding layer after the last stage receives, read on the real model (SDPA, bool)."""
    model, _, inputs = gemma("sdpa")
    config = PruneConfig.preset("high")
    layers = adapters.for_model(model).decoder_layers(model)
    last = config.resolve(len(layers)).prune_layers[-1]          # layer `last + 1` is sliding (7 of 16)
    seen = {}

    def read_mask(module, args, kwargs):   # registered after the pruner's hooks: sees what the layer gets
        seen["mask"] = compat.get(kwargs, "attention_mask")

    with torch.no_grad(), transprune.apply(model, config) as pruner:
        hook = layers[last].register_forward_pre_hook(read_mask, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    mask = seen["mask"][0, 0]
    kept = pruner.trace.stages[-1].kept
    width = inputs["input_ids"].shape[1] - pruner.trace.visual_tokens + len(kept)
    assert mask.shape == (width, width) and mask.dtype == torch.bool
    start = int(inputs["input_ids"][0].tolist().index(model.config.image_token_id))   # first soft token's slot
    query, key = torch.arange(width)[:, None], torch.arange(width)[None, :]
    image = (query >= start) & (query < start + len(kept)) & (key >= start) & (key < start + len(kept))
    expected = ((key <= query) & (key > query - 12)) | image           # window over slots; the image both ways
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_a_sequence_shorter_than_the_window_after_pruning_matches_the_reference(positions, gemma):
    """Low prunes the 26-token prompt to 11 tokens by layer 7: the sliding layers' caches hold fewer
    tokens than the first sliding layer's (which sizes the model's decode masks), until decoding fills
    the window; 8 decode steps cross it."""
    model, _, inputs = gemma(questions=("What ?",))
    config = PruneConfig.preset("low", positions=positions)
    resolved = config.resolve(len(adapters.for_model(model).decoder_layers(model)))
    reference = Reference(model, resolved).run(inputs, max_new_tokens=8)
    assert inputs["input_ids"].shape[1] >= 12 > reference["cache_lengths"][-1] - 8
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        output = _greedy(model, inputs, 8)
    assert all(torch.equal(stage.kept, kept) for stage, kept in zip(pruner.trace.stages, reference["kept"]))
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_padded_batch_equals_each_prompt_alone(positions, tiny_model, sample_image):
    """Left padding; one image in the first prompt and two in the second, so the rows keep different
    numbers of tokens (dummy slots); the window; image blocks: each row decodes as its prompt alone."""
    model, processor = tiny_model("gemma3", "sdpa")
    questions = ("What ?", "Is there a red square on the left of the picture ?")
    images = [[sample_image(seed=0)], [sample_image(seed=1), sample_image(seed=2)]]

    def inputs(rows):
        contents = [[{"type": "image"}] * len(images[b]) + [{"type": "text", "text": questions[b]}] for b in rows]
        prompts = [processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
                   for content in contents]
        # Gemma 3's processor takes a batch's images one list per prompt.
        return dict(processor(text=prompts, images=[images[b] for b in rows], padding=True, return_tensors="pt"))

    batch = inputs([0, 1])
    assert not batch["attention_mask"][0, 0]   # the short prompt is left-padded
    config = PruneConfig.preset("low", positions=positions)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        batch_ids = _greedy(model, batch, 6).sequences
    traces = pruner.traces
    assert [trace.visual_tokens for trace in traces] == [16, 32]
    for b in range(2):
        with torch.no_grad(), transprune.apply(model, config) as pruner:
            ids = _greedy(model, inputs([b]), 6).sequences
        assert batch_ids[b, -6:].tolist() == ids[0, -6:].tolist()
        assert all(torch.equal(x.kept, y.kept) for x, y in zip(traces[b].stages, pruner.trace.stages))


def test_every_preset_runs_or_says_why_not(gemma, llava_only):
    model, _, inputs = gemma("sdpa")
    layers = len(adapters.for_model(model).decoder_layers(model))
    for name in PRESETS:
        config = PruneConfig.preset(name)
        if llava_only(config):   # VisionZip
            with pytest.raises((UnsupportedModelError, PruningInputError), match="LlavaForConditionalGeneration"):
                transprune.apply(model, config)
            continue
        with torch.no_grad(), transprune.apply(model, config) as pruner:
            output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert output.shape[1] == inputs["input_ids"].shape[1] + 2, name
        # DivPrune and CDPruner: the same choice on the first layer's input (one stage at layer 0).
        expected = [0] if config.pre_llm else list(config.resolve(layers).prune_layers)
        assert [stage.layer for stage in pruner.trace.stages] == expected, name


def test_registry_entries_and_checkpoint_shape():
    tiny, real = models.REGISTRY["tiny-gemma3"], models.REGISTRY["gemma-3-4b"]
    assert (tiny.family, tiny.offline) == ("gemma3", True)
    assert (real.family, real.checkpoint) == ("gemma3", "google/gemma-3-4b-it")
    # google/gemma-3-4b-it config.json: text_config 2560 / 10240 / 34 layers; 256 soft tokens per image.
    shape = flops.ARCHITECTURES["gemma-3-4b"]
    assert (shape.hidden, shape.intermediate, shape.layers, shape.visual_tokens) == (2560, 10240, 34, 256)
    assert adapters.FAMILIES["gemma3"].model_class().__name__ == "Gemma3ForConditionalGeneration"


def test_visual_layout_is_one_grid_over_the_whole_image(gemma):
    model, processor, _ = gemma()
    layout = adapters.for_model(model).visual_layout(model, processor, (200, 120), 16)
    assert layout.boxes.shape == (16, 4) and layout.boxes[-1].tolist() == [150.0, 90.0, 200.0, 120.0]
    assert adapters.for_model(model).visual_layout(model, processor, (200, 120), 64) is None


def test_the_app_compares_the_tiny_model(sample_image):
    from components.engine import Engine

    comparison = Engine().compare("tiny-gemma3", sample_image(), QUESTION, PruneConfig.preset("high"),
                                  max_new_tokens=3, repeats=1)
    trace = comparison.pruned.trace
    assert trace.visual_tokens == 16 and len(trace.stages) == 3
