"""Shared fixtures: seeded float32 tiny models of each family, offline processors, test images.

Tests take these as fixtures (`def test_x(tiny_model, make_inputs): ...`), never by importing this
module. `tiny_model`, `sample_image`, `make_inputs` and `write_clip` are session fixtures whose
value is the helper function below; `family` parametrises a test over every registered family.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The app's real-size timings persist on disk: in a folder of this test session's, never the user's.
os.environ.setdefault("TRANSPRUNE_SPEED_BOOK", os.path.join(tempfile.mkdtemp(prefix="transprune-speed-"),
                                                            "real_size_speed.json"))
# TRANSPRUNE_TEST_THREADS=1 when several test runs share the cores: two threads per run then spin
# against each other, and a tiny model's matmuls get ~20x slower.
torch.set_num_threads(int(os.environ.get("TRANSPRUNE_TEST_THREADS", min(2, os.cpu_count() or 1))))

from transprune import PruneConfig, adapters, methods
from transprune.config import PRESETS

# Every invariant runs on each registered family (a new family = its adapter's registry line).
FAMILIES = list(adapters.FAMILIES)
ATTENTION = ["eager", "sdpa"]


@functools.lru_cache(maxsize=None)
def _build(family: str, attn: str):
    return adapters.by_family(family).build_tiny(attn_implementation=attn)


def _tiny_model(family: str, attn: str = "sdpa"):
    """(model, processor); built once per (family, attention) and shared, never mutated by tests."""
    return _build(family, attn)


def _sample_image(width=200, height=120, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def _make_inputs(processor, images, questions):
    """Processor inputs for a batch of (image or None, question) pairs, left-padded."""
    conversations = []
    for image, question in zip(images, questions):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        conversations.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                           add_generation_prompt=True))
    present = [i for i in images if i is not None]
    kwargs = dict(text=conversations, return_tensors="pt", padding=True)
    if present:
        kwargs["images"] = present
    return dict(processor(**kwargs))


def _write_clip(path, draw_frame, frames: int, width: int, height: int, fps: int = 8, codec: str = "mpeg4"):
    """Encode a small video with PyAV; `draw_frame(i)` returns frame i as (height, width, 3) uint8."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=ATTENTION)
def attn(request):
    """Each attention implementation the tiny models are built with."""
    return request.param


@pytest.fixture(scope="session")
def attention_implementations():
    return list(ATTENTION)


@pytest.fixture(scope="session")
def tiny_model():
    """(family, attn="sdpa") -> (model, processor), built once and shared: never mutate it."""
    return _tiny_model


@pytest.fixture(scope="session")
def sample_image():
    """(width=200, height=120, seed=0) -> a random RGB PIL image."""
    return _sample_image


def _llava_prompt_inputs(processor, question="what color is the circle on the left ?", seed=0) -> dict:
    """Processor inputs for one seeded random 200x180 image and `question` in the processor's chat template."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(180, 200, 3, generator=generator) * 255).to(torch.uint8).numpy()
    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(processor(images=Image.fromarray(pixels), text=prompt, return_tensors="pt"))


@pytest.fixture(scope="session")
def prompt_inputs():
    """(processor, question=..., seed=0) -> inputs of one random image and a question (the peer-method tests)."""
    return _llava_prompt_inputs


def _llava_only(config) -> bool:
    """A pre-LLM stage with no way to run off LLaVA-1.5 (VisionZip; DivPrune and CDPruner have a twin at layer 0)."""
    return config.pre_llm is not None and methods.PRE_LLM[config.pre_llm].first_layer_twin is None


def _presets_in_the_app(model: str, image, question: str, visual_tokens: int, refused, refusal: str) -> set[str]:
    """Every preset through the app's comparison on `model`: those `refused(config)` names fail with a UserError
    matching `refusal`; one preset of each other method runs, seeing `visual_tokens` and drawing a layout.
    Returns the methods (config.method) that ran."""
    from components.engine import Engine, UserError

    engine, tried = Engine(), set()
    for name in PRESETS:
        config = PruneConfig.preset(name)
        if refused(config):
            with pytest.raises(UserError, match=refusal):
                engine.compare(model, image, question, config, max_new_tokens=1, repeats=1)
        elif config.method not in tried:
            tried.add(config.method)
            comparison = engine.compare(model, image, question, config, max_new_tokens=1, repeats=1)
            assert comparison.pruned.trace.visual_tokens == visual_tokens, name
            assert comparison.pruned.trace.layout is not None, name
    return tried


@pytest.fixture(scope="session")
def llava_only():
    """config -> whether it runs a pre-LLM stage that only LLaVA-1.5 takes (see _llava_only)."""
    return _llava_only


@pytest.fixture(scope="session")
def presets_in_the_app():
    """(model, image, question, visual_tokens, refused, refusal) -> the methods that ran (see _presets_in_the_app)."""
    return _presets_in_the_app


@pytest.fixture(scope="session")
def make_inputs():
    """(processor, images, questions) -> left-padded processor inputs of a batch."""
    return _make_inputs


@pytest.fixture(scope="session")
def write_clip():
    """(path, draw_frame, frames, width, height, fps=8, codec="mpeg4") -> path of a small video."""
    return _write_clip


@contextlib.contextmanager
def _serve_app(temp, model: str, **build_kwargs):
    """app.py's demo, built for `model`, served on a free loopback port with Gradio's cache in `temp`;
    yields (url, app) and closes the server afterwards."""
    import app as app_module

    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(temp)
    built = app_module.build_demo(model, **build_kwargs)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = app_module.parse_args(["--port", str(port), "--host", "127.0.0.1"])
    built.demo.launch(**app_module.launch_kwargs(args), prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", built
    finally:
        built.demo.close()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="session")
def serve_app():
    """(temp folder, model, **build_demo kwargs) -> context manager yielding (url, app) of the served demo."""
    return _serve_app


# ---------------------------------------------------------------------------- real checkpoints, offline
@pytest.fixture(scope="session")
def rehearsal_hub(tmp_path_factory):
    """The hub cache folder (HF_HUB_CACHE) of tests/hub_rehearsal.py's real checkpoints, built once a session
    from ../shared/fixtures/hf-hub; skips where that folder is absent."""
    import hub_rehearsal

    if not hub_rehearsal.fixtures_present():
        pytest.skip(f"the real checkpoints' files are not here ({hub_rehearsal.FIXTURES}); CI has them")
    return hub_rehearsal.build_hub_cache(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def rehearsal_cache(rehearsal_hub, monkeypatch):
    """Point this process and its subprocesses at the rehearsal hub cache, offline; yields the folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(rehearsal_hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(rehearsal_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return rehearsal_hub
