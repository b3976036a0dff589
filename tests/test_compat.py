"""The dependency contract (DESIGN §6b): forward arguments read by type and spelling, decode-step
invariants, and a faked future transformers that renames or hides the KV cache."""

import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

import transprune
from transprune import PruneConfig, compat

from transprune.reference import Reference

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- pure helpers
def test_cache_is_found_by_type_under_any_name_or_position():
    cache = DynamicCache()
    assert compat.find_cache(kwargs={"cache": cache}) is cache
    assert compat.find_cache(kwargs={"past_key_values": cache}) is cache
    assert compat.find_cache(kwargs={"kv_store_of_transformers_9": cache, "attention_mask": None}) is cache
    assert compat.find_cache(args=(torch.zeros(1), cache)) is cache
    assert compat.find_cache(args=(torch.zeros(1),), kwargs={"past_key_values": None}) is None
    assert compat.output_cache({"logits": torch.zeros(1), "cache": cache}) is cache
    assert compat.output_cache((torch.zeros(1), cache)) is cache
    assert compat.output_cache(torch.zeros(1)) is None


def test_arguments_are_read_and_written_under_the_callers_spelling():
    old = {"past_key_values": 1, "attention_mask": 2}
    assert compat.get(old, "cache") == 1 and compat.get({"cache": 3}, "cache") == 3
    assert compat.get(old, "position_ids", "default") == "default"
    assert compat.replace(old, cache=9, position_ids=4) == {"past_key_values": 9, "attention_mask": 2,
                                                            "position_ids": 4}
    assert compat.hidden_states((5,), {}) == 5 and compat.hidden_states((), {"hidden_states": 6}) == 6
    with pytest.raises(compat.IncompatibleTransformersError, match=re.escape(transformers.__version__)):
        compat.require({"rotary": 1}, "position_embeddings", "A decoder layer")


def test_cache_keyword_follows_the_installed_signature(tiny_model):
    model, _ = tiny_model("llava")
    layer = model.model.language_model.layers[0]
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert compat.cache_keyword(layer) == compat.cache_keyword(layer.self_attn) == expected


def test_version_range_and_error_message():
    assert compat.transformers_is_tested(compat.PINNED_TRANSFORMERS)
    assert compat.transformers_is_tested(compat.OLDEST_TESTED_TRANSFORMERS)
    assert not compat.transformers_is_tested("6.0.0")
    assert not compat.transformers_is_tested("5.99.0.dev0")
    message = str(compat.IncompatibleTransformersError("something moved."))
    assert transformers.__version__ in message and compat.tested_range() in message
    assert "pip install -r requirements.txt" in message and "transprune.doctor" in message


def test_declared_versions_agree_with_the_tested_range():
    """pyproject's range starts at the oldest version CI tests; requirements.txt pins the newest."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"transformers>={compat.OLDEST_TESTED_TRANSFORMERS},<6" in project["project"]["dependencies"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt must pin exactly: {line!r}"
            pins[name.strip().lower()] = version.strip()
    assert pins["transformers"] == compat.PINNED_TRANSFORMERS
    assert {"torch", "gradio", "accelerate", "av"} <= set(pins)
    readme = (ROOT / "README.md").read_text()
    assert compat.PINNED_TRANSFORMERS in readme and compat.OLDEST_TESTED_TRANSFORMERS in readme
    # scripts/test_oldest.sh reads the version from this line of compat.py with sed.
    source = (ROOT / "transprune" / "compat.py").read_text()
    assert f'\nOLDEST_TESTED_TRANSFORMERS = "{compat.OLDEST_TESTED_TRANSFORMERS}"\n' in source
    assert "OLDEST_TESTED_TRANSFORMERS" in (ROOT / "scripts" / "test_oldest.sh").read_text()


def test_package_exposes_models_after_a_plain_import():
    import importlib
    import subprocess
    import sys
    code = "import transprune; print(transprune.models.load.__name__, transprune.compat.PINNED_TRANSFORMERS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["load", compat.PINNED_TRANSFORMERS]
    assert importlib.import_module("transprune").models is transprune.models


# ---------------------------------------------------------------------------- a faked future transformers
class _Boxed:
    """Hides a cache from find-by-type: what a future release passing a wrapper object would do."""

    def __init__(self, cache):
        self.cache = cache


def _fake_future_release(model, pruner_attach, hide: bool, hide_others: bool = False):
    """Attach the pruner between two pre-hooks that make its hooks see a future transformers.

    The first hook (runs before the pruner's) moves the cache to an unknown keyword (boxed when
    `hide`) and, with `hide_others`, the attention mask and position ids too; the second (runs
    after) puts everything back so the model itself computes as usual. Returns (pruner, remove_fakes).
    """
    modules = [model, *model.model.language_model.layers]
    handles = []

    def disguise(module, args, kwargs):
        kwargs = dict(kwargs)
        for spelling in ("cache", "past_key_values"):
            if spelling in kwargs:
                cache = kwargs.pop(spelling)
                kwargs["kv_state_of_transformers_9"] = _Boxed(cache) if hide else cache
        for name in ("attention_mask", "position_ids"):
            if hide_others and name in kwargs:
                kwargs[f"{name}_of_transformers_9"] = kwargs.pop(name)
        return args, kwargs

    def restore(module, args, kwargs):
        kwargs = dict(kwargs)
        if "kv_state_of_transformers_9" in kwargs:
            value = kwargs.pop("kv_state_of_transformers_9")
            kwargs[compat.cache_keyword(module)] = value.cache if isinstance(value, _Boxed) else value
        for name in ("attention_mask", "position_ids"):
            if f"{name}_of_transformers_9" in kwargs:
                kwargs[name] = kwargs.pop(f"{name}_of_transformers_9")
        return args, kwargs

    for module in modules:
        handles.append(module.register_forward_pre_hook(disguise, with_kwargs=True, prepend=True))
    pruner = pruner_attach()
    for module in modules:
        handles.append(module.register_forward_pre_hook(restore, with_kwargs=True))

    def remove():
        pruner.remove()
        for handle in handles:
            handle.remove()
    return pruner, remove


@pytest.fixture
def llava_inputs(tiny_model, make_inputs, sample_image):
    """(attn="eager") -> (model, inputs): the tiny LLaVA and one prompt."""
    def build(attn="eager"):
        model, processor = tiny_model("llava", attn)
        return model, make_inputs(processor, [sample_image()], ["What color is the circle ?"])
    return build


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_a_renamed_cache_is_still_found_and_answers_match_the_reference(positions, llava_inputs):
    model, inputs = llava_inputs()
    config = PruneConfig.preset("high", positions=positions)
    reference = Reference(model, config.resolve(16)).run(inputs, max_new_tokens=5)
    pruner, remove = _fake_future_release(model, lambda: transprune.apply(model, config), hide=False)
    try:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        trace = pruner.trace
    finally:
        remove()
    assert trace is not None, "the decode steps were taken for new prompts"
    assert output.sequences[0, inputs["input_ids"].shape[1]:].tolist() == reference["ids"]
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("hide_others", [False, True], ids=["positions-visible", "mask-and-positions-hidden"])
def test_a_cache_the_pruner_cannot_find_raises_instead_of_answering_wrong(hide_others, attn, llava_inputs):
    """Caught before the step from the positions (or a mask over the cache), else right after it
    from the per-layer cache lengths: before generate can use the step's logits. With everything
    hidden, eager attention fails even earlier on its full-width 4-D mask (also never an answer)."""
    model, inputs = llava_inputs(attn)
    pruner, remove = _fake_future_release(model, lambda: transprune.apply(model, "high"), hide=True,
                                          hide_others=hide_others)
    expected = RuntimeError if hide_others and attn == "eager" else compat.IncompatibleTransformersError
    try:
        with torch.no_grad(), pytest.raises(expected) as raised:
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        remove()
    if expected is compat.IncompatibleTransformersError:
        message = str(raised.value)
        assert transformers.__version__ in message and compat.tested_range() in message
        assert "pip install -r requirements.txt" in message


def test_the_same_fakes_without_a_pruner_change_nothing(llava_inputs):
    """The fakes are faithful: with no pruner between them the model computes exactly as before."""
    model, inputs = llava_inputs()
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    class _NoPruner:
        def remove(self):
            pass
    _, remove = _fake_future_release(model, _NoPruner, hide=True, hide_others=True)
    try:
        with torch.no_grad():
            faked = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        remove()
    assert torch.equal(plain, faked)


def test_a_cache_the_pruned_prefill_did_not_fill_is_refused_at_the_next_step(llava_inputs):
    model, inputs = llava_inputs()
    with torch.no_grad():
        unpruned = model(**inputs, use_cache=True)
        with transprune.apply(model, "high"):
            pruned = model(**inputs, use_cache=True)
            assert compat.output_cache(pruned) is not compat.output_cache(unpruned)
            step = {compat.cache_keyword(model): compat.output_cache(unpruned),
                    "input_ids": pruned.logits[:, -1:].argmax(-1),
                    "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
            with pytest.raises(compat.IncompatibleTransformersError, match="tokens per decoder layer"):
                model(**step)


def test_decode_steps_keep_the_trace_and_per_layer_cache_lengths(family, tiny_model, make_inputs, sample_image):
    """The 5.24 regression: after generate, the trace of the prefill is still there."""
    model, processor = tiny_model(family)
    inputs = make_inputs(processor, [sample_image()], ["What color is the circle ?"])
    with torch.no_grad(), transprune.apply(model, "high") as pruner:
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert pruner.trace is not None and len(pruner.trace.stages) == 3
    cache = compat.output_cache(output)
    steps = output.sequences.shape[1] - inputs["input_ids"].shape[1] - 1   # the last token is not cached
    assert [compat.cache_length(cache, i) for i in range(16)] == [n + steps for n in pruner.trace.tokens_per_layer]
