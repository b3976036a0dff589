"""Limits of the library's public entries: bad arguments are refused with a sentence, and scoring
memory grows linearly with the prompt (a long question must not cost an L x L attention matrix)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import transprune
from transprune import images, models
from transprune.adapters import llava as llava_family
from transprune.images import ImageInputError, as_image
from transprune.measure import torch_cpu_peak_bytes


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("config", [5, 0.5, ["high"], {"method": "transprune"}, object()])
def test_apply_and_pruner_refuse_a_config_of_another_type(tiny_model, config):
    model, _ = tiny_model("llava")
    for attach in (transprune.apply, transprune.Pruner):
        with pytest.raises(TypeError, match=r"config must be a transprune.PruneConfig or a preset name such as "
                                            r"'high', got " + type(config).__name__):
            attach(model, config)
    with transprune.apply(model, "high"):   # nothing was left attached by the refusals
        pass


def test_a_dict_config_is_pointed_to_from_dict(tiny_model):
    model, _ = tiny_model("llava")
    with pytest.raises(TypeError, match=r"pass PruneConfig.from_dict\(it\)"):
        transprune.apply(model, transprune.PruneConfig.preset("high").to_dict())


def test_pruner_takes_a_preset_name_like_apply(tiny_model):
    model, _ = tiny_model("llava")
    with transprune.Pruner(model, "fastv") as pruner:
        assert pruner.config.method == "fastv"


# ---------------------------------------------------------------------------- LoadedModel.generate
@pytest.fixture(scope="module")
def tiny_llava():
    return models.load("tiny-llava")


@pytest.mark.parametrize("config", [5, {"method": "fastv"}, 1.0])
def test_generate_refuses_a_config_of_another_type(tiny_llava, config):
    with pytest.raises(TypeError, match=r"config must be a transprune.PruneConfig or a preset name such as 'high' "
                                        r"\(or None for no pruning\), got " + type(config).__name__):
        tiny_llava.generate(None, "what is it ?", config=config, max_new_tokens=1)


@pytest.mark.parametrize("value", [2.5, "x", "8", None, True, torch.tensor(3)])
def test_generate_refuses_max_new_tokens_that_is_not_a_whole_number(tiny_llava, value):
    with pytest.raises(TypeError, match=r"max_new_tokens must be a whole number of tokens such as 32, got "
                                        + type(value).__name__):
        tiny_llava.generate(None, "what is it ?", max_new_tokens=value)


@pytest.mark.parametrize("value", [0, -1])
def test_generate_refuses_max_new_tokens_below_one(tiny_llava, value):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be at least 1, got {value}\."):
        tiny_llava.generate(None, "what is it ?", max_new_tokens=value)


def test_generate_refuses_more_new_tokens_than_the_context_holds(tiny_llava):
    context = models.context_length(tiny_llava.model)
    assert context == tiny_llava.model.config.text_config.max_position_embeddings == 4096
    prompt = tiny_llava.prepare(None, "what is it ?")["input_ids"].shape[1]
    fits = context - prompt
    with pytest.raises(ValueError, match=rf"The prompt is {prompt} tokens and this model's context is {context} "
                                         rf"positions, so at most {fits} new tokens fit; pass "
                                         rf"max_new_tokens={fits} or less \(got {10 ** 9}\)\."):
        tiny_llava.generate(None, "what is it ?", max_new_tokens=10 ** 9)
    assert tiny_llava.generate(None, "what is it ?", max_new_tokens=np.int64(2)).timings["new_tokens"] <= 2


def test_generate_refuses_a_prompt_longer_than_the_context_before_running_the_model(tiny_llava, monkeypatch):
    monkeypatch.setattr(tiny_llava.model, "generate", lambda **kwargs: pytest.fail("the model ran"))
    question = " ".join(["red"] * 5000)
    with pytest.raises(ValueError, match=r"The prompt is \d+ tokens, and this model's context is 4096 positions; "
                                         r"shorten the question"):
        tiny_llava.generate(None, question, max_new_tokens=1)


@pytest.mark.parametrize("prompt, new, context", [(10, 5, 15), (10, 5, None)])
def test_a_prompt_that_fits_passes(prompt, new, context):
    models.check_fits_context(prompt, new, context)


# ---------------------------------------------------------------------------- images
def _png(width, height, mode="L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uint16_arrays_are_scaled_to_8_bits_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert np.asarray(as_image(values))[0, :, 0].tolist() == [0, 1, 128, 255]
    deep = np.array([[0, 2 ** 32 - 1]], dtype=np.uint32)
    assert np.asarray(as_image(deep))[0, :, 0].tolist() == [0, 255]
    tensor = torch.from_numpy(np.full((3, 2, 2), 65535, dtype=np.uint16).astype(np.int32)).to(torch.uint16)
    assert np.asarray(as_image(tensor)).min() == 255


def test_8_bit_arrays_of_any_integer_dtype_are_unchanged():
    pixels = np.arange(256).reshape(16, 16)     # int64: what np.array of Python ints gives
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        assert np.asarray(as_image(pixels.astype(dtype)))[:, :, 0].tolist() == pixels.tolist(), dtype


@pytest.mark.parametrize("values", [[[0, 256]], [[-1, 10]]])
def test_signed_arrays_outside_0_255_are_refused_not_clipped(values):
    with pytest.raises(ImageInputError, match=r"The int64 image array holds values from -?\d+ to \d+, outside "
                                              r"0..255; pass uint8 values 0..255, a uint16 array for 16-bit images"):
        as_image(np.array(values))


def test_float_arrays_are_read_as_0_to_1():
    assert np.asarray(as_image(np.array([[0.0, 0.5, 1.0, 2.0]])))[0, :, 0].tolist() == [0, 128, 255, 255]


def test_a_directory_is_named_as_a_directory(tmp_path):
    with pytest.raises(ImageInputError, match=r"is a directory, not an image file; pass the path of one image file"):
        as_image(tmp_path)


def test_an_image_larger_than_max_pixels_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    path.write_bytes(_png(3000, 2000))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    for source, what in ((path, "The file"), (path.read_bytes(), "The bytes passed as image")):
        with pytest.raises(ImageInputError, match=rf"{what}.* is a 3000x2000 image \(6.0 megapixels\), more than the "
                                                  r"limit of 5.0 megapixels; pass a smaller image"):
            as_image(source, max_pixels=5_000_000)


def test_the_default_pixel_limit_is_40_megapixels_and_none_lifts_it():
    assert images.MAX_PIXELS == 40_000_000
    with pytest.raises(ImageInputError, match=r"\(41 megapixels\), more than the limit of 40 megapixels"):
        as_image(_png(8200, 5000))
    assert as_image(_png(40, 30), max_pixels=None).size == (40, 30)


def test_pil_decompression_bomb_error_becomes_a_sentence(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageInputError, match=r"The bytes passed as image is too large to decode safely .*; pass a "
                                              r"smaller image"):
        as_image(_png(20, 20), max_pixels=None)


# ---------------------------------------------------------------------------- scoring memory
@pytest.mark.parametrize("block_elements", [1, 40 * 4 * 96, 2 ** 30])   # head_dim (8) rows a block, 40, all
def test_block_scores_equal_the_whole_attention_bit_for_bit(block_elements, monkeypatch):
    from transprune import scoring

    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", block_elements)
    torch.manual_seed(3)
    heads, kv_heads, n, dim = 4, 2, 16 * 6, 8
    query, key = torch.randn(heads, n, dim), torch.randn(kv_heads, n, dim)
    rows, columns = torch.arange(10, n), torch.tensor([0, 3, 4, 9])
    valid = torch.ones(n, dtype=torch.bool)
    valid[1] = False
    whole = scoring.attention_probs(query, key, rows, valid, 0.3).mean(dim=0)[:, columns]
    assert torch.equal(scoring.attention_to_columns(query, key, rows, valid, columns, 0.3), whole)


def test_the_peak_counter_sees_a_large_temporary():
    small = torch_cpu_peak_bytes(lambda: torch.ones(10))
    large = torch_cpu_peak_bytes(lambda: torch.ones(1000, 1000).sum())
    assert small < 1000 and 4_000_000 <= large < 4_100_000


@pytest.fixture(scope="module")
def long_prompt():
    """A 3-layer tiny LLaVA (SDPA: no L x L mask of its own), ~8k tokens (~6k of text, the image, then a
    ~2k-token question: the instruction, whose rows the scores read), and the unpruned prefill's peak."""
    model, processor = llava_family.tiny_llava(layers=3)
    words = ["what", "color", "is", "the", "red", "circle", "?"]
    content = [{"type": "text", "text": " ".join(words * 860)}, {"type": "image"},
               {"type": "text", "text": " ".join(words * 290)}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(images=Image.new("RGB", (168, 168), "red"), text=prompt, return_tensors="pt"))
    assert 8000 <= inputs["input_ids"].shape[1] <= 8300

    def baseline():
        with torch.no_grad():
            model(**inputs)

    return model, inputs, torch_cpu_peak_bytes(baseline)


# One stage each, on the 3-layer model: every method that reads attention (and TransPrune, TTV).
MEMORY_CONFIGS = {
    "transprune": transprune.PruneConfig(method="transprune", prune_layers=(1,), keep_ratios=(0.5,),
                                         accumulation_layers=(1,)),
    "fastv": transprune.PruneConfig(method="fastv", prune_layers=(2,), keep_ratios=(0.5,)),
    "pdrop": transprune.PruneConfig(method="pdrop", prune_layers=(1,), keep_ratios=(0.5,)),
    "sparsevlm": transprune.PruneConfig(method="sparsevlm", prune_layers=(1,), keep_ratios=(0.5,)),
}


@pytest.mark.parametrize("method", list(MEMORY_CONFIGS))
def test_scoring_memory_stays_within_10_percent_of_the_baseline_at_8k_tokens(long_prompt, method):
    """Before scores were computed in row blocks (transprune.scoring.attention_to_columns), IGA and
    SparseVLM's raters held the instruction x sequence attention of all heads at once (~0.5 GB here)."""
    model, inputs, baseline_peak = long_prompt

    def pruned():
        with torch.no_grad(), transprune.apply(model, MEMORY_CONFIGS[method]) as pruner:
            model(**inputs)
            assert pruner.trace.stages     # it did prune

    assert torch_cpu_peak_bytes(pruned) <= 1.1 * baseline_peak


# ---------------------------------------------------------------------------- command-line entries
@pytest.mark.parametrize("value", ["0", "-2", "2.5", "x"])
def test_the_eval_refuses_max_new_tokens_that_is_not_a_whole_number(value, capsys):
    from transprune import eval as evaluation

    with pytest.raises(SystemExit):
        evaluation.parser().parse_args(["--questions", "q.json", "--max-new-tokens", value])
    assert f"--max-new-tokens: must be a whole number >= 1, such as 16; got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, "2.5", "x", True])
def test_the_lmms_eval_model_refuses_max_new_tokens_that_is_not_a_whole_number(value):
    lmms_eval = pytest.importorskip("transprune.lmms_eval", exc_type=ImportError)
    assert lmms_eval._whole_number("32", "max_new_tokens") == 32
    with pytest.raises(ValueError, match=rf"max_new_tokens must be a whole number >= 1, such as 32; got {value!r}"):
        lmms_eval._whole_number(value, "max_new_tokens")
