"""The registry and LoadedModel.generate: the entry point the app, bench and eval share."""

import pytest
import torch

from transprune import adapters, flops, models


OFFLINE = [name for name, spec in models.REGISTRY.items() if spec.offline and name.startswith("tiny-")]
CHECKPOINTS = [name for name, spec in models.REGISTRY.items() if not spec.offline]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_checkpoints_shape_is_declared_by_its_familys_adapter(name):
    adapter = adapters.by_family(models.REGISTRY[name].family)
    assert flops.ARCHITECTURES[name] is adapter.architectures[name]


def test_architectures_are_exactly_the_adapters_declarations():
    declared = {name: shape for adapter in adapters.FAMILIES.values() for name, shape in adapter.architectures.items()}
    assert flops.ARCHITECTURES == declared
    for adapter in adapters.FAMILIES.values():      # a family with real checkpoints is timed at one of them
        assert adapter.timing_arch in adapter.architectures or not adapter.architectures


def test_register_refuses_inherited_architectures_and_a_borrowed_timing_arch():
    class Forgetful(adapters.LlavaAdapter):       # no `architectures` of its own: LLaVA's are inherited
        family = "forgetful"
        model_classes = ("ForgetfulForConditionalGeneration",)

    class Borrower(adapters.Adapter):             # times at another family's shape
        family = "borrower"
        model_classes = ("BorrowerForConditionalGeneration",)
        timing_arch = "llava-1.5-7b"

    with pytest.raises(ValueError, match="declares its own `architectures`"):
        adapters.register(Forgetful)
    with pytest.raises(ValueError, match="not one of its architectures"):
        adapters.register(Borrower)
    assert "forgetful" not in adapters.FAMILIES and "borrower" not in adapters.FAMILIES


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_models_generate_pruned_and_unpruned(name, sample_image):
    loaded = models.load(name, device="cpu")
    image = sample_image(200, 120)
    baseline = loaded.generate(image, "What color is the circle ?", config=None, max_new_tokens=4)
    pruned = loaded.generate(image, "What color is the circle ?", config="high", max_new_tokens=4)
    assert baseline.trace is None and isinstance(baseline.text, str)
    trace = pruned.trace
    assert trace.visual_tokens > 0 and len(trace.stages) == 3
    # One image is one span: each stage keeps floor(N * r).
    assert [len(s.kept) for s in trace.stages] == [int(trace.visual_tokens * s.keep_ratio) for s in trace.stages]
    for result in (baseline, pruned):
        timings = result.timings
        assert timings["prefill_ms"] > 0 and timings["total_ms"] >= timings["prefill_ms"]
        assert timings["new_tokens"] == result.output_ids.shape[1] - result.inputs["input_ids"].shape[1]
        assert timings["peak_mb"] > 0
    layout = trace.layout
    assert layout is not None and layout.boxes.shape == (trace.visual_tokens, 4)
    placed = layout.boxes[~layout.boxes.isnan().any(dim=1)]
    assert placed[:, 0].min() >= -1e-3 and placed[:, 2].max() <= 200 + 1e-3
    assert placed[:, 1].min() >= -1e-3 and placed[:, 3].max() <= 120 + 1e-3


def test_generate_is_deterministic_and_pruning_is_per_call(sample_image):
    loaded = models.load("tiny-llava")
    image = sample_image()
    plain = loaded.generate(image, "What is in the picture ?", config=None, max_new_tokens=6)
    # transformers installs a few hooks of its own on the first call; ours must all be gone after each call.
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())
    first = loaded.generate(image, "What is in the picture ?", config="low", max_new_tokens=6)
    again = loaded.generate(image, "What is in the picture ?", config="low", max_new_tokens=6)
    assert torch.equal(first.output_ids, again.output_ids)
    assert plain.trace is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules()) == hooks


def test_keep_all_through_generate_matches_unpruned_text(sample_image):
    loaded = models.load("tiny-llava-next")
    image = sample_image(160, 90)
    assert torch.equal(loaded.generate(image, "Describe the image", config="off", max_new_tokens=6).output_ids,
                       loaded.generate(image, "Describe the image", config=None, max_new_tokens=6).output_ids)


def test_text_only_prompt_runs_unpruned():
    loaded = models.load("tiny-llava")
    pruned = loaded.generate(None, "What color is the circle ?", config="high", max_new_tokens=4)
    plain = loaded.generate(None, "What color is the circle ?", config=None, max_new_tokens=4)
    assert pruned.trace is None and pruned.text == plain.text


def test_unknown_model_lists_the_registry():
    with pytest.raises(models.ModelLoadError, match="tiny-llava"):
        models.load("llava-99b")


def test_checkpoint_that_cannot_download_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match="Could not load llava-hf/llava-1.5-7b-hf"):
        models.load("llava-1.5-7b", device="cpu")


def test_registry_labels_say_size_and_availability():
    spec = models.REGISTRY["llava-1.5-7b"]
    assert spec.checkpoint == "llava-hf/llava-1.5-7b-hf" and not spec.offline
    assert "7B" in spec.display_name and "Hub" in spec.display_name
    assert models.REGISTRY["tiny-llava"].display_name == "Tiny LLaVA (random weights) · " + models.REGISTRY["tiny-llava"].size
    families = {spec.family for spec in models.REGISTRY.values()}
    assert families >= {"llava", "llava_next", "video_llava", "llava_onevision", "qwen2_5_vl"}


def test_tiny_models_get_the_same_weights_when_built_in_parallel_threads():
    """The app builds one while its start-up self-check builds others: the seed must still decide."""
    import threading

    from transprune.adapters.llava import tiny_llava
    from transprune.adapters.qwen2_5_vl import tiny_qwen2_5_vl

    serial = tiny_llava()[0].state_dict()
    built = {}

    def build(index):
        builder = tiny_llava if index % 2 else tiny_qwen2_5_vl
        built[index] = builder()[0]

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (1, 3):
        state = built[index].state_dict()
        assert all(torch.equal(serial[name], state[name]) for name in serial)
