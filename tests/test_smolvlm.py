"""SmolVLM: tiles + global view with text markup in between, pruned as one visual set per image.

The generic invariants (keep-all, slow reference, undo, errors) run on tiny-smolvlm as on every
registered family (tests/conftest.py); these check what is particular to the Idefics3-style layout,
in both transformers classes of the family (`VARIANTS`: SmolVLMForConditionalGeneration, and
Idefics3ForConditionalGeneration, the class of SmolVLM-256M/500M-Instruct), keep-all and the slow
reference included.
"""

import functools

import pytest
import torch

import transprune
from transprune import PruneConfig, adapters, flops
from transprune.adapters.smolvlm import VARIANTS, SmolVLMAdapter, smolvlm_processor, smolvlm_tokenizer
from transprune.architecture import Shape
from transprune.reference import Reference

QUESTION = "What color is the circle ?"


@functools.lru_cache(maxsize=None)
def _build(model_type: str, attn: str):
    return SmolVLMAdapter.build_tiny(model_type=model_type, attn_implementation=attn)


@pytest.fixture(params=list(VARIANTS))
def tiny(request):
    """(attn="sdpa") -> (model, processor): the tiny SmolVLM in each transformers class, built once and
    shared (never mutate it)."""
    return lambda attn="sdpa": _build(request.param, attn)


@pytest.fixture
def inputs_of(make_inputs, sample_image):
    """(processor, images=None, question=QUESTION) -> inputs of one prompt (default: a 200x120 image)."""
    return lambda processor, images=None, question=QUESTION: make_inputs(processor, images or [sample_image()],
                                                                          [question])


def _image_mask(model, inputs):
    return inputs["input_ids"][0] == model.config.image_token_id


def test_each_class_is_built_with_its_own_config_and_processor(tiny):
    model, processor = tiny()
    variant = VARIANTS[model.config.model_type]
    assert type(model).__name__ == variant.model and type(model.config).__name__ == variant.config
    assert type(processor).__name__ == variant.processor
    assert type(processor.image_processor).__name__ == variant.image_processor


def test_both_classes_are_one_model(inputs_of):
    """Equal weights at one seed, equal inputs from both processors, bit-identical logits: the two classes
    differ in name, not in what the pruner sees (so one adapter serves both)."""
    smolvlm, idefics3 = _build("smolvlm", "sdpa"), _build("idefics3", "sdpa")
    weights = [model.state_dict() for model, _ in (smolvlm, idefics3)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    inputs = [inputs_of(processor) for _, processor in (smolvlm, idefics3)]
    assert inputs[0].keys() == inputs[1].keys() and all(torch.equal(inputs[0][k], inputs[1][k]) for k in inputs[0])
    with torch.no_grad():
        assert torch.equal(smolvlm[0](**inputs[0]).logits, idefics3[0](**inputs[1]).logits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_is_bit_identical(attn, tiny, inputs_of):
    model, processor = tiny(attn)
    inputs = inputs_of(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        with transprune.apply(model, "off") as pruner:
            pruned_logits = model(**inputs).logits
            pruned_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(logits, pruned_logits) and torch.equal(ids, pruned_ids)
    assert all(torch.equal(stage.kept, torch.arange(80)) for stage in pruner.trace.stages)


def test_text_model_and_image_splitting_layout(tiny, inputs_of):
    model, processor = tiny()
    adapter = adapters.for_model(model)
    assert adapter.family == "smolvlm"
    assert adapter.language_model(model) is model.model.text_model
    assert len(adapter.decoder_layers(model)) == 16
    inputs = inputs_of(processor)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    # A 200x120 image: 2x2 tiles + the global view, 16 <image> tokens each, markup in between.
    assert inputs["pixel_values"].shape[1] == 5
    assert tokens.count("<image>") == 80
    assert [t for t in tokens if t.startswith("<row_")] == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>",
                                                             "<row_2_col_2>"]
    assert tokens.count("<global-img>") == 1 and tokens.count("<fake_token_around_image>") == 6


def test_trace_counts_all_tiles_as_one_visual_set(tiny, inputs_of):
    model, processor = tiny()
    inputs = inputs_of(processor)
    is_image = _image_mask(model, inputs)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), transprune.apply(model, "high") as pruner:
        model(**inputs)
    trace = pruner.trace
    assert trace.visual_tokens == int(is_image.sum()) == 80
    # One budget for the whole image: floor(80 * r) at each stage (not per tile).
    assert [len(stage.kept) for stage in trace.stages] == [70, 50, 10]
    # Text markup is never dropped: every layer sees all text tokens + the alive image tokens.
    assert trace.tokens_per_layer == [length - 80 + n for n in trace.visual_tokens_per_layer]


def test_kept_indices_map_to_image_tokens_and_markup_survives(tiny, inputs_of):
    """Gather the last layer's input and check it against the kept <image> tokens and all text."""
    model, processor = tiny("eager")
    inputs = inputs_of(processor)
    ids = inputs["input_ids"][0]
    image_positions = _image_mask(model, inputs).nonzero().flatten()
    config = PruneConfig.preset("low", positions="original")
    layers = adapters.for_model(model).decoder_layers(model)
    seen = {}

    def grab(module, args, kwargs):    # registered after the pruner's: sees what the layer gets
        seen["position_ids"] = kwargs.get("position_ids")

    with torch.no_grad(), transprune.apply(model, config) as pruner:
        hook = layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    kept = pruner.trace.kept
    expected = torch.cat([(~_image_mask(model, inputs)).nonzero().flatten(), image_positions[kept]]).sort().values
    # "original" positions: the last layer's position ids are exactly the surviving sequence positions.
    assert torch.equal(seen["position_ids"][0], expected)
    survivors = ids[expected]
    markup = processor.tokenizer.convert_tokens_to_ids(
        ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>"])
    for token in markup:
        assert int((survivors == token).sum()) == int((ids == token).sum())


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_two_images_each_keep_their_own_budget_and_match_reference(positions, tiny, sample_image):
    model, processor = tiny("eager")
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
               {"type": "text", "text": "Which image shows a red circle ?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    # 2x2 tiles + global view, then a wide image: 1x2 tiles + global view.
    images = [sample_image(200, 120, seed=5), sample_image(200, 40, seed=6)]
    inputs = dict(processor(images=images, text=[prompt], return_tensors="pt"))
    assert int(_image_mask(model, inputs).sum()) == 80 + 48
    sizes = [80, 48]
    spans = [0] * 80 + [1] * 48      # written by hand from the layout, independent of the adapter
    adapter = adapters.for_model(model)
    positions_ = _image_mask(model, inputs).nonzero().flatten()
    assert adapter.visual_spans(model, inputs["input_ids"][0], positions_).tolist() == spans
    config = PruneConfig.preset("high", positions=positions)
    reference = Reference(model, config.resolve(16), spans=spans).run(inputs, max_new_tokens=4)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        logits = model(**inputs).logits[0, -1]
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    for stage, kept in zip(pruner.trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept)
        per_span = [int((stage.kept < 80).sum()), int((stage.kept >= 80).sum())]
        assert per_span == [int(size * stage.keep_ratio + 1e-9) for size in sizes]
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(), rtol=1e-4,
                               atol=1e-5)
    assert output.sequences[0, inputs["input_ids"].shape[1]:].tolist() == reference["ids"]


def test_visual_layout_tiles_then_global_view(tiny):
    model, processor = tiny()
    layout = adapters.for_model(model).visual_layout(model, processor, (200, 120), 80)
    assert layout.boxes.shape == (80, 4) and layout.segments == ["tiles", "global"]
    assert int((layout.segment == 1).sum()) == 16
    tiles, whole = layout.boxes[:64], layout.boxes[64:]
    torch.testing.assert_close(tiles[0], torch.tensor([0.0, 0.0, 25.0, 15.0]))          # tile (1,1), cell (0,0)
    torch.testing.assert_close(tiles[-1], torch.tensor([175.0, 105.0, 200.0, 120.0]))   # tile (2,2), last cell
    torch.testing.assert_close(whole[-1], torch.tensor([150.0, 90.0, 200.0, 120.0]))
    assert adapters.for_model(model).visual_layout(model, processor, (200, 120), 81) is None


def test_generic_flops_path(tiny, inputs_of):
    model, processor = tiny()
    inputs = inputs_of(processor)
    with torch.no_grad(), transprune.apply(model, "high") as pruner:
        model(**inputs)
    hidden, intermediate, layers = flops.model_shape(model)
    assert (hidden, layers) == (64, 16)
    expected = flops.tflops(flops.schedule_tokens(PruneConfig.preset("high"), 80, layers), hidden, intermediate)
    assert flops.trace_tflops(pruner.trace, hidden, intermediate) == pytest.approx(expected)


def test_model_shape_reads_the_adapters_text_config(tiny_model, monkeypatch):
    """flops.model_shape asks the model's adapter where its language model's config is."""
    from types import SimpleNamespace

    model, _ = tiny_model("smolvlm")
    assert flops.model_shape(model) == (64, 128, 16)
    monkeypatch.setattr(SmolVLMAdapter, "text_config",
                        lambda self, model: SimpleNamespace(hidden_size=8, intermediate_size=24, num_hidden_layers=3))
    assert flops.model_shape(model) == (8, 24, 3)
    with pytest.raises(transprune.UnsupportedModelError):
        flops.model_shape(torch.nn.Linear(2, 2))


def test_checkpoint_shapes_are_the_public_config_values():
    """text_config of HuggingFaceTB/SmolVLM-256M/-500M-Instruct (hidden, MLP, layers); N of one square image."""
    assert flops.ARCHITECTURES["smolvlm-256m"] == Shape(hidden=576, intermediate=1536, layers=30, visual_tokens=1088)
    assert flops.ARCHITECTURES["smolvlm-500m"] == Shape(hidden=960, intermediate=2560, layers=32, visual_tokens=1088)
    assert SmolVLMAdapter.timing_arch == "smolvlm-500m"     # the app times SmolVLM at its own shape


def test_checkpoint_visual_tokens_follow_from_its_processor_settings(sample_image):
    """The checkpoints' processor (Idefics3Processor) and settings (longest edge 2048 px, 512 px tiles, 64
    tokens per tile) turn a square image of any size into 4x4 tiles + the global view: 17 x 64 `<image>`
    tokens, their shapes' N."""
    processor = smolvlm_processor(smolvlm_tokenizer(), tile_size=512, image_seq_len=64, longest_edge=2048,
                                  model_type="idefics3")
    inputs = processor(images=sample_image(300, 300), text="User:<image> What is it?", return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 17
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 1088


@pytest.mark.parametrize("name, model_class", [("tiny-smolvlm", "SmolVLMForConditionalGeneration"),
                                               ("tiny-idefics3", "Idefics3ForConditionalGeneration")])
def test_registry_entries(name, model_class, sample_image):
    from transprune import models
    assert models.REGISTRY["smolvlm-256m"].checkpoint == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert models.REGISTRY["smolvlm-500m"].checkpoint == "HuggingFaceTB/SmolVLM-500M-Instruct"
    assert models.REGISTRY[name].offline and models.REGISTRY[name].family == "smolvlm"
    lm = models.load(name, device="cpu")
    assert type(lm.model).__name__ == model_class
    result = lm.generate(sample_image(), QUESTION, config="high", max_new_tokens=3)
    assert result.trace.visual_tokens == 80 and result.trace.layout is not None
    assert result.timings["new_tokens"] >= 1


@pytest.fixture
def fake_hub(monkeypatch):
    """Stands in for the Hub: AutoConfig gives `configs[checkpoint]`, every model class's from_pretrained
    records (class name, checkpoint, kwargs) in `calls` and returns a fresh tiny model of that class."""
    import transformers

    configs, calls = {}, []

    def from_pretrained(cls, checkpoint, **kwargs):
        calls.append((cls.__name__, checkpoint, kwargs))
        model_type = next(key for key, variant in VARIANTS.items() if variant.model == cls.__name__)
        return SmolVLMAdapter.build_tiny(model_type=model_type)[0]

    def processor(checkpoint):
        model_type = configs[checkpoint].model_type
        return _build(model_type, "sdpa")[1]

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda checkpoint: configs[checkpoint])
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", processor)
    for variant in VARIANTS.values():
        monkeypatch.setattr(getattr(transformers, variant.model), "from_pretrained", classmethod(from_pretrained))
    return configs, calls


@pytest.mark.parametrize("name", ["smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct"])
def test_a_checkpoint_loads_with_the_class_its_config_names(name, fake_hub, sample_image):
    """SmolVLM-256M-Instruct's config.json says model_type "idefics3", architectures
    ["Idefics3ForConditionalGeneration"]: that class is loaded (registry name or Hub id), and pruned."""
    import transformers

    from transprune import models

    configs, calls = fake_hub
    configs["HuggingFaceTB/SmolVLM-256M-Instruct"] = transformers.Idefics3Config(
        architectures=["Idefics3ForConditionalGeneration"])
    lm = models.load(name, device="cpu", dtype="float32")
    assert calls == [("Idefics3ForConditionalGeneration", "HuggingFaceTB/SmolVLM-256M-Instruct",
                      dict(dtype=torch.float32))]
    assert adapters.for_model(lm.model).family == "smolvlm"
    result = lm.generate(sample_image(), QUESTION, config="high", max_new_tokens=2)
    assert result.trace.visual_tokens == 80


def test_a_smolvlm2_style_config_loads_the_smolvlm_class(fake_hub, monkeypatch):
    """A registered SmolVLM entry whose config.json says model_type "smolvlm" gets the SmolVLM class."""
    import transformers

    from transprune import models

    configs, calls = fake_hub
    configs["someone/smolvlm2"] = transformers.SmolVLMConfig(architectures=["SmolVLMForConditionalGeneration"])
    monkeypatch.setitem(models.REGISTRY, "smolvlm2", models.ModelSpec("smolvlm2", "SmolVLM2", "smolvlm", "256M",
                                                                      checkpoint="someone/smolvlm2"))
    lm = models.load("smolvlm2", device="cpu")
    assert [call[:2] for call in calls] == [("SmolVLMForConditionalGeneration", "someone/smolvlm2")]
    assert type(lm.model).__name__ == "SmolVLMForConditionalGeneration"


def test_a_config_naming_another_familys_class_is_refused(fake_hub):
    import transformers

    from transprune import models

    configs, calls = fake_hub
    configs["HuggingFaceTB/SmolVLM-500M-Instruct"] = transformers.LlavaConfig(
        architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(models.ModelLoadError, match="names LlavaForConditionalGeneration, which is not a SmolVLM"):
        models.load("smolvlm-500m", device="cpu")
    assert calls == []


@pytest.mark.parametrize("size", [(200, 120), (120, 200), (200, 40), (40, 200), (64, 64), (65, 63), (1000, 10)])
def test_tile_grid_follows_the_image_processor(size, tiny, sample_image):
    from transprune.adapters.smolvlm import tile_grid
    _, processor = tiny()
    image_processor = processor.image_processor
    out = image_processor(images=[sample_image(*size)], return_row_col_info=True)
    assert tile_grid(image_processor, *size) == (out["rows"][0][0], out["cols"][0][0])
