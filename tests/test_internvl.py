"""InternVL (transformers-native): pixel-shuffled tiles + thumbnail, pruned as one visual set per image.

The generic invariants run on tiny-internvl as on every registered family (tests/conftest.py):
keep-all bit-identical (eager and SDPA), High/Low against the slow reference in both position
modes, undo, errors. These check what is particular to InternVL's tiles.
"""


import pytest
import torch

import transprune
from transprune import PruneConfig, adapters, flops, models
from transprune.adapters.internvl import InternVLAdapter, tile_grid
from transprune.architecture import Shape
from transprune.reference import Reference

QUESTION = "What color is the circle ?"


def test_an_image_is_one_run_of_tile_tokens(make_inputs, tiny_model, sample_image):
    model, processor = tiny_model("internvl", "eager")
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert model.config.downsample_ratio == 0.5 and model.config.image_seq_length == 16   # (64/8)^2 / 4
    inputs = make_inputs(processor, [sample_image()], [QUESTION])
    ids = inputs["input_ids"][0]
    # 200x120 -> 2 columns x 1 row of 64 px tiles + the thumbnail = 3 tiles of 16 tokens.
    assert inputs["pixel_values"].shape[0] == 3
    visual = (ids == model.config.image_token_id).nonzero().flatten()
    assert len(visual) == 48 and int(visual[-1] - visual[0]) == 47
    tokenizer = processor.tokenizer
    assert ids[visual[0] - 1] == tokenizer.start_image_token_id and ids[visual[-1] + 1] == tokenizer.end_image_token_id


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_two_images_keep_their_own_budget_across_their_tiles(positions, make_inputs, tiny_model,
                                                             sample_image):
    """Images with 3 and 1 tiles: each keeps floor(N_image * r) over all of its tiles, tokens and every
    decode step as the slow reference's."""
    model, processor = tiny_model("internvl", "eager")
    images = [sample_image(200, 120, seed=1), sample_image(60, 60, seed=2)]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(images=images, text=prompt, return_tensors="pt"))
    sizes = [48, 16]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(sizes)
    config = PruneConfig.preset("high", positions=positions)
    spans = [0] * sizes[0] + [1] * sizes[1]
    reference = Reference(model, config.resolve(16), spans=spans).run(inputs, max_new_tokens=4)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    for stage, kept in zip(pruner.trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept), f"stage at layer {stage.layer} kept different tokens"
        per_image = [int((stage.kept < sizes[0]).sum()), int((stage.kept >= sizes[0]).sum())]
        assert per_image == [int(size * stage.keep_ratio) for size in sizes]
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(), rtol=1e-4, atol=1e-5)
    assert output.sequences[0, inputs["input_ids"].shape[1]:].tolist() == reference["ids"]


@pytest.mark.parametrize("size", [(200, 120), (120, 200), (60, 60), (200, 40), (64, 64)])
def test_tile_grid_and_layout_follow_the_image_processor(size, make_inputs, tiny_model, sample_image):
    model, processor = tiny_model("internvl", "eager")
    tiles = processor.image_processor(images=[sample_image(*size)], return_tensors="pt")["pixel_values"].shape[0]
    rows, cols = tile_grid(processor.image_processor, *size)
    assert tiles == (rows * cols + 1 if rows * cols > 1 else 1)
    layout = InternVLAdapter().visual_layout(model, processor, size, tiles * 16)
    assert layout.boxes.shape == (tiles * 16, 4)
    # Every tile's 4x4 token grid (and the thumbnail's) covers the whole image once.
    areas = (layout.boxes[:, 2] - layout.boxes[:, 0]) * (layout.boxes[:, 3] - layout.boxes[:, 1])
    for segment in layout.segment.unique():
        assert float(areas[layout.segment == segment].sum()) == pytest.approx(size[0] * size[1], rel=1e-4)
    assert InternVLAdapter().visual_layout(model, processor, size, tiles * 16 + 16) is None


def test_presets_run_in_the_app_or_say_why_not(sample_image, presets_in_the_app, llava_only):
    """One preset per method the family runs (1-D RoPE: compact positions too), through the app's
    comparison; VisionZip (LLaVA-1.5 only) is refused with a sentence."""
    tried = presets_in_the_app("tiny-internvl", sample_image(), QUESTION, 48, llava_only, "runs on .* only")
    # DivPrune and CDPruner run as their twins at layer 0, on the first layer's input.
    assert tried == {"transprune", "fastv", "pdrop", "random", "sparsevlm", "dart", "divprune", "cdpruner"}


def test_registry_entries_and_checkpoint_shape(tiny_model):
    assert models.REGISTRY["tiny-internvl"].family == "internvl" and models.REGISTRY["tiny-internvl"].offline
    spec = models.REGISTRY["internvl3-1b"]
    assert (spec.family, spec.checkpoint, spec.video) == ("internvl", "OpenGVLab/InternVL3-1B-hf", False)
    assert flops.ARCHITECTURES["internvl3-1b"] == Shape(hidden=896, intermediate=4864, layers=24, visual_tokens=256)
    model, _ = tiny_model("internvl", "eager")
    assert adapters.FAMILIES["internvl"] is InternVLAdapter and adapters.for_model(model).family == "internvl"
