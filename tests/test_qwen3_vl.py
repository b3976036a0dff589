"""Qwen3-VL: DeepStack features after pruning, interleaved M-RoPE, one span per timestamped video.

The generic invariants run on tiny-qwen3-vl as on every registered family (tests/conftest.py):
keep-all bit-identical (eager and SDPA), High/Low against the slow reference (original positions;
compact is refused: M-RoPE), undo, errors; tests/test_video.py runs its video invariants on it.
These check what is particular to Qwen3-VL: DeepStack layers (after decoder layers 1, 2, 3 in the
tiny model as in the real checkpoints) before, at and after a stage, in a padded batch, and a
video written as several runs of tokens kept as one span.
"""


import numpy as np
import torch
from PIL import Image

import transprune
from transprune import PruneConfig, adapters, flops, models
from transprune.adapters.qwen3_vl import Qwen3VLAdapter
from transprune.architecture import Shape
from transprune.reference import Reference
from transprune.video import Video, video_inputs

QUESTION = "What color is the circle ?"
# Stages at layers 1 and 2 come before the DeepStack additions after layers 2 and 3 (those go to the
# survivors only), and a stage at layer 3 scores the states with its DeepStack feature added.
DEEPSTACK_SCHEDULE = PruneConfig(prune_layers=(1, 3, 6), keep_ratios=(0.75, 0.5, 0.25),
                                 accumulation_layers=(1, 2, 3), positions="original")


def _check_against_reference(model, inputs, config, spans, steps=4):
    """The pruned prefill's kept tokens, logits and every decode step's logits equal the reference's."""
    reference = Reference(model, config.resolve(16, "original"), spans=spans).run(inputs, max_new_tokens=steps)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        output = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    for stage, kept in zip(pruner.trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept), f"stage at layer {stage.layer} kept different tokens"
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(),
                               rtol=1e-4, atol=1e-5)
    assert output.sequences[0, inputs["input_ids"].shape[1]:].tolist() == reference["ids"]
    return pruner.trace


def test_tiny_model_has_deepstack_and_interleaved_mrope(make_inputs, tiny_model, sample_image):
    model, processor = tiny_model("qwen3_vl", "eager")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert list(model.config.vision_config.deepstack_visual_indexes) == [0, 1, 2]
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True
    inputs = make_inputs(processor, [sample_image()], [QUESTION])
    # 200x120 -> 128x192 px (multiples of 32, within min_pixels) -> 4x6 merged cells.
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 24
    features = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: features.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert len(features["deepstack_visual_embeds"]) == 3
    assert features["deepstack_visual_embeds"][0].shape == (24, model.config.text_config.hidden_size)


def test_deepstack_goes_to_the_surviving_tokens_and_matches_the_reference(make_inputs, tiny_model, sample_image):
    model, processor = tiny_model("qwen3_vl", "eager")
    inputs = make_inputs(processor, [sample_image()], [QUESTION])
    trace = _check_against_reference(model, inputs, DEEPSTACK_SCHEDULE, spans=[0] * 24)
    assert [len(stage.kept) for stage in trace.stages] == [18, 12, 6]
    assert trace.visual_tokens_per_layer[:4] == [24, 18, 18, 12]


def test_the_reference_is_sensitive_to_deepstack(make_inputs, tiny_model, sample_image):
    """Dropping the DeepStack features changes what is kept and the logits: the equality above is not
    blind to them."""
    model, processor = tiny_model("qwen3_vl", "eager")
    inputs = make_inputs(processor, [sample_image()], [QUESTION])
    resolved = DEEPSTACK_SCHEDULE.resolve(16, "original")
    with_features = Reference(model, resolved).run(inputs, max_new_tokens=1)
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "deepstack_visual_embeds": None}), with_kwargs=True)
    try:
        dropped = Reference(model, resolved).run(inputs, max_new_tokens=1)
    finally:
        handle.remove()
    assert not torch.allclose(with_features["logits"], dropped["logits"], atol=1e-3)


def test_padded_batch_gives_each_sample_its_own_deepstack_rows(make_inputs, tiny_model, sample_image):
    """Two images of different sizes: each sample's features start after the other sample's rows."""
    model, processor = tiny_model("qwen3_vl", "eager")
    images = [sample_image(200, 120, seed=1), sample_image(130, 130, seed=2)]
    questions = [QUESTION, "is there a red square ?"]
    batch = make_inputs(processor, images, questions)
    with torch.no_grad(), transprune.apply(model, DEEPSTACK_SCHEDULE):
        together = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    for row, (image, question) in enumerate(zip(images, questions)):
        alone_inputs = make_inputs(processor, [image], [question])
        with torch.no_grad(), transprune.apply(model, DEEPSTACK_SCHEDULE):
            alone = model.generate(**alone_inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        torch.testing.assert_close(torch.stack(together.logits)[:, row], torch.stack(alone.logits)[:, 0],
                                   rtol=1e-4, atol=1e-4)


def test_a_video_is_one_span_across_its_timestamped_frame_groups(tiny_model):
    """Four frames = two temporal patches, written as two runs of video tokens with a timestamp
    between them; one span (one budget), against the reference told so, with DeepStack stages."""
    model, processor = tiny_model("qwen3_vl", "eager")
    rng = np.random.default_rng(3)
    frames = [Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)
    inputs = video_inputs(processor, "qwen3_vl", [prompt], [Video.from_frames(frames, fps=2.0)])
    is_video = inputs["input_ids"][0] == model.config.video_token_id
    runs = int((is_video[1:] & ~is_video[:-1]).sum())
    n = int(is_video.sum())
    assert runs == 2 and n == Qwen3VLAdapter().video_token_count(model.config, processor, 4, (96, 64)) == 2 * 4 * 5
    trace = _check_against_reference(model, inputs, DEEPSTACK_SCHEDULE, spans=[0] * n)
    assert [len(stage.kept) for stage in trace.stages] == [int(n * r) for r in DEEPSTACK_SCHEDULE.keep_ratios]


def test_presets_run_in_the_app_or_say_why_not(sample_image, presets_in_the_app, llava_only):
    """Every preset either runs in the app's comparison (one preset per method it can run, to keep this
    quick; the others of a method differ only in numbers) or is refused with a sentence: compact
    positions (PDrop, SparseVLM) and VisionZip (LLaVA-1.5 only). The layout: 32 px cells over the image."""
    tried = presets_in_the_app("tiny-qwen3-vl", sample_image(), QUESTION, 24,
                               lambda config: config.positions == "compact" or llava_only(config),
                               "Impossible pruning schedule|runs on .* only")
    # DivPrune and CDPruner run as their twins at layer 0, on the first layer's input.
    assert tried == {"transprune", "fastv", "random", "dart", "divprune", "cdpruner"}


def test_registry_entries_and_checkpoint_shape(sample_image):
    assert models.REGISTRY["tiny-qwen3-vl"].family == "qwen3_vl" and models.REGISTRY["tiny-qwen3-vl"].offline
    spec = models.REGISTRY["qwen3-vl-2b"]
    assert (spec.family, spec.checkpoint, spec.video) == ("qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct", True)
    # Qwen/Qwen3-VL-2B-Instruct config.json text_config; 448x448 px / 32 px merged cells = 14 x 14.
    assert flops.ARCHITECTURES["qwen3-vl-2b"] == Shape(hidden=2048, intermediate=6144, layers=28, visual_tokens=196)
    assert adapters.FAMILIES["qwen3_vl"] is Qwen3VLAdapter
    lm = models.load("tiny-qwen3-vl")
    assert lm.generate(sample_image(), QUESTION, config="high", max_new_tokens=2).trace.visual_tokens == 24
