"""Real checkpoints rehearsed offline: every user path, from the checkpoint's own files.

conftest's `rehearsal_hub` builds a hub cache of LLaVA-1.5-7B, SmolVLM-256M-Instruct and Qwen2.5-VL-7B
(tests/hub_rehearsal.py: the real config, tokenizer, chat template, processor and generation config;
random weights at a reduced width, the real depth). Each test then goes through the path a user
takes: `transprune.models.load(name)` -> `from_pretrained` of the Hub id -> the checkpoint's processor
and chat template -> generate with every preset the family runs -> a padded batch -> the command-line
tools -> the app (through gradio_client and in Chromium). The visual-token counts are those the real
processors give a 640x480 photo (fixtures/hf-hub/README.md), written out here, not recomputed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import transprune
from transprune import adapters
from transprune.config import PRESETS, ConfigError, PruneConfig
from transprune.errors import UnsupportedModelError

from hub_rehearsal import REHEARSED, Rehearsed

ROOT = Path(__file__).resolve().parents[1]
BY_NAME = {item.name: item for item in REHEARSED}
QUESTION = "What is in the picture?"

# What each checkpoint's files say (its config.json, generation_config.json, tokenizer), written out.
EXPECTED = {
    "llava-1.5-7b": dict(processor="LlavaProcessor", layers=32, image_token=32000, eos=[2], pad=32001,
                         high_layers=(7, 9, 12)),
    "smolvlm-256m": dict(processor="Idefics3Processor", layers=30, image_token=49190, eos=[49279], pad=2,
                         high_layers=(7, 8, 11)),
    "qwen2.5-vl-7b": dict(processor="Qwen2_5_VLProcessor", layers=28, image_token=151655, eos=[151645, 151643],
                          pad=151643, high_layers=(6, 8, 11)),
}
IN_LLM = ["high", "low", "off", "fastv", "pdrop", "random", "sparsevlm", "sparsevlm-128", "sparsevlm-64"]
DART = ["dart", "dart-64", "dart-192"]
# The pre-LLM stages that rewrite one CLIP tile's tokens (transprune.methods.preselect, visionzip).
ONE_TILE = ["visionzip-192", "visionzip-128", "visionzip-64", "visionzip-128+high", "divprune-192", "divprune-128",
            "divprune-64", "cdpruner-192", "cdpruner-128", "cdpruner-64", "cdpruner-128+high"]
# DivPrune and CDPruner alone: on other families the same choice on the first layer's input (methods.first_layer).
SUBSET_ALONE = ["divprune-192", "divprune-128", "divprune-64", "cdpruner-192", "cdpruner-128", "cdpruner-64"]
# The presets each family runs: VisionZip and the stacks are LLaVA-1.5's (one CLIP tile);
# Qwen2.5-VL's M-RoPE runs only "original" positions, and PDrop and SparseVLM presets are "compact" ones.
VALID_PRESETS = {
    "llava-1.5-7b": IN_LLM + DART + ONE_TILE,
    "smolvlm-256m": IN_LLM + DART + SUBSET_ALONE,
    "qwen2.5-vl-7b": ["high", "low", "off", "fastv", "random"] + DART + SUBSET_ALONE,
}
# The app on a CPU loads SmolVLM with one 512-px view (components.policy.CPU_PROCESSOR_KWARGS): 64 tokens.
APP_VISUAL_TOKENS_ON_CPU = {"smolvlm-256m": 64}
NAMES = [item.name for item in REHEARSED]


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def loaded(rehearsal_hub):
    """{name: LoadedModel}, each loaded once through `transprune.models.load` from the rehearsal cache."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(rehearsal_hub))
        yield {name: transprune.models.load(name, device="cpu") for name in NAMES}


def _chat_template_file(item: Rehearsed) -> str:
    """The chat template the checkpoint ships: chat_template.jinja, else chat_template.json's."""
    jinja = item.folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    return json.loads((item.folder / "chat_template.json").read_text())["chat_template"]


def _generation_config(item: Rehearsed) -> dict:
    return json.loads((item.folder / "generation_config.json").read_text())


# ---------------------------------------------------------------------------- the library
@pytest.mark.parametrize("name", NAMES)
def test_processor_prompt_and_visual_tokens_are_the_checkpoints(loaded, name):
    item, expected, lm = BY_NAME[name], EXPECTED[name], loaded[name]
    assert type(lm.processor).__name__ == expected["processor"]
    assert len(adapters.for_model(lm.model).decoder_layers(lm.model)) == expected["layers"]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    own = lm.processor.apply_chat_template(conversation, chat_template=_chat_template_file(item),
                                           add_generation_prompt=True)
    assert lm.prompt(QUESTION) == own
    inputs = lm.prepare(photo(), QUESTION)
    assert int((inputs["input_ids"] == expected["image_token"]).sum()) == item.visual_tokens_640x480


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_of_the_family_runs(loaded, name):
    item, expected, lm = BY_NAME[name], EXPECTED[name], loaded[name]
    image = photo()
    inputs = lm.prepare(image, QUESTION)
    traces = {}
    for preset in VALID_PRESETS[name]:
        # One new token: the prefill prunes, and the trace is the prefill's.
        result = lm.generate(image, QUESTION, config=preset, max_new_tokens=1, inputs=inputs)
        trace = traces[preset] = result.trace
        config = lm.config_for(preset)
        stages = [] if config.pre_llm is None else [0]
        if not PRESETS.get(preset, {}).get("pre_llm_keep"):
            stages += list(lm.resolve(config).prune_layers)
        assert [stage.layer for stage in trace.stages] == stages, preset
        if config.pre_llm is None:
            assert trace.visual_tokens == item.visual_tokens_640x480, preset
        assert result.timings["new_tokens"] == 1
    high = traces["high"]
    assert tuple(stage.layer for stage in high.stages) == expected["high_layers"]
    n = item.visual_tokens_640x480
    assert [len(stage.kept) for stage in high.stages] == [int(n * r) for r in PruneConfig.preset("high").keep_ratios]
    for preset in set(PRESETS) - set(VALID_PRESETS[name]):
        with pytest.raises((ConfigError, UnsupportedModelError)):
            lm.generate(image, QUESTION, config=preset, max_new_tokens=1, inputs=inputs)


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_at_the_checkpoints_eos(loaded, name):
    """Every eos id of generation_config.json ends an answer (SmolVLM's <end_of_utterance> 49279, not its
    config.json's 2); the forced token is taken at the second step, so the answer is one token long."""
    expected, lm = EXPECTED[name], loaded[name]
    assert _generation_config(BY_NAME[name])["eos_token_id"] in (expected["eos"], expected["eos"][0])
    eos_ids = lm.model.generation_config.eos_token_id
    assert (eos_ids if isinstance(eos_ids, list) else [eos_ids]) == expected["eos"]
    image = photo()
    inputs = lm.prepare(image, QUESTION)
    head = lm.model.get_output_embeddings()
    for eos in expected["eos"]:
        calls = []

        def force_eos_second(module, args, logits):
            calls.append(None)
            if len(calls) == 2:
                logits = torch.full_like(logits, -1e4)
                logits[..., eos] = 0.0
            return logits

        handle = head.register_forward_hook(force_eos_second)
        try:
            result = lm.generate(image, QUESTION, config="high", max_new_tokens=8, inputs=inputs)
        finally:
            handle.remove()
        new_ids = result.output_ids[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(new_ids) == 2 and new_ids[-1] == eos
        assert result.text == lm.processor.decode(new_ids[:1], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_of_two_prompts(loaded, name):
    """Two prompts of different lengths in one padded batch, pruned with High: padded on the left with the
    checkpoint's pad id, and each row's answer equals that prompt's answer alone."""
    expected, lm = EXPECTED[name], loaded[name]
    processor = lm.processor
    assert processor.tokenizer.pad_token_id == expected["pad"] == _generation_config(BY_NAME[name])["pad_token_id"]
    assert lm.model.generation_config.pad_token_id == expected["pad"]
    questions = [QUESTION, "Describe the colours of this photo in a few words, please."]
    images = [photo(), photo(480, 480, seed=1)]
    prompts = [lm.prompt(q) for q in questions]
    batch = processor(text=prompts, images=[[i] for i in images], padding=True, return_tensors="pt")
    pads = batch["attention_mask"] == 0
    assert pads.any() and (batch["input_ids"][pads] == expected["pad"]).all()
    assert not pads[:, -1].any(), "padding must be on the left for generate"
    config = lm.config_for("high")
    with transprune.apply(lm.model, config):
        out = lm.model.generate(**batch, max_new_tokens=2, do_sample=False)
    for row, (image, question) in enumerate(zip(images, questions)):
        alone = lm.generate(image, question, config=config, max_new_tokens=2)
        alone_ids = alone.output_ids[0, alone.inputs["input_ids"].shape[1]:]
        assert out[row, batch["input_ids"].shape[1]:].tolist()[:len(alone_ids)] == alone_ids.tolist()


def test_qwen_video_through_the_library_video_path(loaded, write_clip, tmp_path):
    """A 4-frame 224x168 clip: frames stay 224x168 (multiples of 28), 2 temporal pairs x 6 x 8 merged cells."""
    import numpy as np

    lm = loaded["qwen2.5-vl-7b"]
    clip = write_clip(tmp_path / "clip.mp4", lambda i: np.full((168, 224, 3), 20 * i, np.uint8), 12, 224, 168)
    result = lm.generate(None, "What happens in the video?", video=str(clip), num_frames=4, config="high",
                         max_new_tokens=2)
    video_token = lm.model.config.video_token_id
    assert int((result.inputs["input_ids"] == video_token).sum()) == result.trace.visual_tokens == 2 * 6 * 8
    assert [stage.layer for stage in result.trace.stages] == list(EXPECTED["qwen2.5-vl-7b"]["high_layers"])
    assert len(result.video.frames) == 4


# ---------------------------------------------------------------------------- the command-line tools
def _run(args, env_hub: Path, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=str(env_hub), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("name", NAMES)
def test_eval_questions_cli(rehearsal_hub, name, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photo().save(images / "a.png")
    lines = [dict(question_id=1, image="a.png", text="Is there a cat in the image?", label="no")]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    _run(["-m", "transprune.eval", "--questions", str(questions), "--images", str(images), "--model", name,
          "--methods", "baseline,high", "--out", str(out), "--max-new-tokens", "2", "--threads", "2"], rehearsal_hub)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"baseline", "high"}
    for method in summary:
        assert summary[method]["n"] == 1 and summary[method]["errors"] == 0
        assert len((out / f"answers-{method}.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("name", NAMES)
def test_bench_checkpoint_cli(rehearsal_hub, name, tmp_path):
    report = tmp_path / "bench.json"
    _run(["-m", "transprune.bench", "--checkpoint", name, "--methods", "baseline,high", "--repeats", "1",
          "--decode-repeats", "1", "--scoring-repeats", "1", "--new-tokens", "0", "--threads", "2",
          "--json", str(report)], rehearsal_hub)
    figures = json.loads(report.read_text())
    n = BY_NAME[name].visual_tokens_640x480
    run = figures["high"]["run"]
    assert run["visual_tokens"] == n and run["layers"] == EXPECTED[name]["layers"]
    assert run["arch"] == name   # the analytic TFLOPs are the checkpoint's architecture's, not LLaVA-1.5-7B's
    per_layer = figures["high"]["visual_tokens_per_layer"]
    first, second, third = EXPECTED[name]["high_layers"]
    assert per_layer[0] == n and per_layer[third] == int(n * 0.125)


def test_doctor_with_the_rehearsal_cache(rehearsal_hub):
    done = _run(["-m", "transprune.doctor"], rehearsal_hub)
    assert done.stdout.strip().endswith("OK")


# ---------------------------------------------------------------------------- the app
@pytest.fixture
def roomy_memory(monkeypatch):
    """The app refuses a 7B checkpoint that would not fit at its real size; the rehearsal's weights are
    small, so let its memory guard see room for it."""
    from components import hub

    monkeypatch.setattr(hub, "free_memory_bytes", lambda device: 2**45)


@pytest.mark.parametrize("name", NAMES)
def test_app_compare_through_gradio_client(rehearsal_cache, roomy_memory, serve_app, name, tmp_path):
    from gradio_client import Client, handle_file

    image = tmp_path / "photo.png"
    photo().save(image)
    with serve_app(tmp_path / "gradio", name) as (url, built):
        assert built.default_model == name
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        result = client.predict(image=handle_file(str(image)), question=QUESTION, model=name, max_new_tokens=2,
                                repeats=1, api_name="/compare")
    traces = [item for item in result if isinstance(item, dict) and str(item.get("value", "")).endswith(".json")]
    assert traces, result
    record = json.loads(Path(traces[0]["value"]).read_text())
    assert record["model"] == name
    expected_tokens = APP_VISUAL_TOKENS_ON_CPU.get(name, BY_NAME[name].visual_tokens_640x480)
    assert record["trace"]["visual_tokens"] == expected_tokens
    assert [stage["layer"] for stage in record["trace"]["stages"]] == list(EXPECTED[name]["high_layers"])


def test_app_in_chromium_with_a_real_checkpoint(rehearsal_cache, roomy_memory, serve_app, tmp_path):
    """One browser run on the app serving llava-1.5-7b: upload a photo, Run, both answers and the verdict."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = next((c for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium") if c and Path(c).exists()), None)
    if chromium is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    image = tmp_path / "photo.png"
    photo().save(image)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the browser needs the other core
    try:
        with serve_app(tmp_path / "gradio", "llava-1.5-7b") as (url, _), \
                playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url, wait_until="load")
                page.wait_for_selector("#run", timeout=60_000)
                page.locator("#input-image input[type=file]").set_input_files(str(image))
                page.locator("#input-image img").first.wait_for(timeout=30_000)
                page.locator("#question textarea").fill(QUESTION)
                page.locator("#run").click()
                page.wait_for_function(
                    "() => { const v = document.querySelector('#verdict');"
                    " return v && v.innerText.includes('visual tokens'); }", timeout=180_000)
                table = page.locator("#metrics-table").inner_text()
                verdict = page.locator("#verdict").inner_text()
                assert page.locator("#answer-baseline").inner_text().strip()
                assert page.locator("#answer-pruned").inner_text().strip()
            finally:
                browser.close()
    finally:
        torch.set_num_threads(threads)
    assert "576" in table and "576" in verdict


# ---------------------------------------------------------------------------- video families without torchvision
# Every video family's tiny model, as its adapter declares it ("tiny-<family>").
TINY_OF_FAMILY = {family: next(spec.name for spec in adapters.FAMILIES[family].models
                               if spec.name.startswith("tiny-")) for family in adapters.video_families()}


@pytest.mark.parametrize("family", list(TINY_OF_FAMILY))
def test_video_family_checkpoint_folders_load_without_torchvision(family, tmp_path, sample_image):
    """The registry's video families (Qwen2.5-VL, LLaVA-OneVision, Video-LLaVA) list a video processor, which
    needs torchvision. A checkpoint folder of each (the tiny model's config, weights, image-processor,
    tokenizer and processor files, as on the Hub) loads through `transprune.models.load` as the
    family's processor class; without torchvision it carries no video processor and video goes through
    transprune.video."""
    from transprune.processors import torchvision_works

    model, processor = adapters.by_family(family).build_tiny()
    model.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor", "video_processor")}
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    (tmp_path / "chat_template.jinja").write_text(processor.chat_template)

    lm = transprune.models.load(str(tmp_path), device="cpu")
    assert type(lm.processor).__name__ == type(processor).__name__
    if not torchvision_works():
        assert lm.processor.video_processor is None
    image = sample_image(112, 112)
    loaded_inputs = lm.prepare(image, "what is it ?")
    tiny = transprune.models.load(TINY_OF_FAMILY[family], device="cpu")
    assert torch.equal(loaded_inputs["input_ids"], tiny.prepare(image, "what is it ?")["input_ids"])
    frames = [sample_image(112, 112, seed=i) for i in range(8)]
    result = lm.generate(None, "what happens ?", video=frames, config="high", max_new_tokens=2)
    assert result.trace.visual_tokens == int((result.inputs["input_ids"] == lm.model.config.video_token_id).sum())
