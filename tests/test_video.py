"""Video input end to end on the three video families: a file written here with PyAV is decoded,
turned into each family's inputs, pruned, checked against the slow reference and drawn."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import transprune
from transprune import PruneConfig, adapters, models
from transprune.video import (DEFAULT_FRAMES, Video, VideoError, read_video, sample_indices,
                              video_inputs, video_overlay)

from transprune.reference import Reference

VIDEO_FAMILIES = adapters.video_families()
# Each video family's tiny model in the registry (its adapter declares it: "tiny-<family>").
REGISTRY_NAME = {family: next(spec.name for spec in adapters.FAMILIES[family].models
                              if spec.name.startswith("tiny-")) for family in VIDEO_FAMILIES}
QUESTION = "What color is the square in this video ?"
FRAMES, WIDTH, HEIGHT, FPS = 10, 96, 64, 5
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
# Frames for the model-level tests: the family's default (Video-LLaVA needs 8), except Qwen2.5-VL and Qwen3-VL with 4
# (two temporal patches), which keeps the slow reference quick. The end-to-end test uses DEFAULT_FRAMES.
TEST_FRAMES = {family: adapters.FAMILIES[family].video_frames for family in VIDEO_FAMILIES} | {"qwen2_5_vl": 4, "qwen3_vl": 4}


def write_video(write_clip, path, frames=FRAMES, width=WIDTH, height=HEIGHT, codec="mpeg4", fps=FPS):
    """Frame i: a background of COLOURS[i % 3] and a white square moving right (`write_clip`: the fixture)."""
    def draw(i):
        pixels = np.empty((height, width, 3), np.uint8)
        pixels[:] = COLOURS[i % 3]
        x = 4 + 8 * i
        pixels[16:40, x:x + 24] = 255
        return pixels

    return write_clip(path, draw, frames, width, height, fps=fps, codec=codec)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, write_clip):
    return write_video(write_clip, tmp_path_factory.mktemp("video") / "squares.mp4")


@pytest.fixture(params=VIDEO_FAMILIES)
def video_family(request):
    return request.param


@pytest.fixture
def video_prompt(tiny_model):
    """(family, attn, path, image=None, question=QUESTION) -> (model, inputs, video)."""
    return lambda *args, **kwargs: _inputs(tiny_model, *args, **kwargs)


def _inputs(tiny_model, family, attn, path, image=None, question=QUESTION):
    model, processor = tiny_model(family, attn)
    video = read_video(path, TEST_FRAMES[family])
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "video"},
                                                                    {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = video_inputs(processor, family, [prompt], [video], images=[image] if image is not None else None)
    return model, inputs, video


def _video_span(model, inputs):
    ids = inputs["input_ids"][0]
    return int((ids == model.config.video_token_id).sum())


# ------------------------------------------------------------------------------ decoding
def test_read_video_samples_uniformly_in_order(video_file):
    video = read_video(video_file, 4)
    assert video.indices == [0, 3, 6, 9] == sample_indices(FRAMES, 4)
    assert video.total_frames == FRAMES and video.fps == pytest.approx(FPS)
    frames = read_video(video_file, 4).frames
    assert [f.size for f in frames] == [(WIDTH, HEIGHT)] * 4 and all(f.mode == "RGB" for f in frames)
    for frame, index in zip(frames, video.indices):
        background = np.asarray(frame)[50:60, :].reshape(-1, 3).mean(0)
        assert int(background.argmax()) == index % 3, f"frame {index} decoded out of order"
    # A clip shorter than the request repeats frames; one frame takes the middle one.
    assert sample_indices(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]
    assert sample_indices(10, 1) == [4]


def test_default_frame_counts():
    assert DEFAULT_FRAMES["video_llava"] == 8
    assert DEFAULT_FRAMES["qwen2_5_vl"] % 2 == 0


# ------------------------------------------------------------------------------ inputs
def test_inputs_carry_exactly_the_video_tokens_the_model_expects(video_family, video_file, tiny_model, video_prompt):
    model, inputs, video = video_prompt(video_family, "sdpa", video_file)
    _, processor = tiny_model(video_family)
    expected = adapters.by_family(video_family).video_token_count(model.config, processor, len(video.frames),
                                                                  video.size)
    assert _video_span(model, inputs) == expected
    if video_family == "qwen2_5_vl":
        grid = inputs["video_grid_thw"][0].tolist()
        assert grid[0] == len(video.frames) // 2
        # 4 of 10 frames at 5 fps: 2 sampled frames per second, two frames per temporal patch.
        torch.testing.assert_close(inputs["second_per_grid_ts"], torch.tensor([1.0]))
        assert (inputs["mm_token_type_ids"][0] == 2).sum() == expected
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      video_grid_thw=inputs["video_grid_thw"],
                                                      second_per_grid_ts=inputs["second_per_grid_ts"])
        video_positions = positions[:, 0, inputs["input_ids"][0] == model.config.video_token_id]
        assert len(video_positions[0].unique()) == grid[0]   # real temporal positions, not 1-D
    with torch.no_grad():
        model(**inputs)  # the model itself checks features against placeholders


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_still_video_frames_match_the_image_processor(family, tiny_model, sample_image):
    """Without torchvision the frames are prepared by us; a still video must match the image path
    (OneVision: the image's base tile; Qwen: an image is one temporal patch of two equal frames)."""
    from transprune.video import FramesVideoProcessor

    _, processor = tiny_model(family)
    image = sample_image(200, 120)
    still = FramesVideoProcessor(family, processor.image_processor)([np.stack([np.asarray(image)] * 2)])
    reference = processor.image_processor(images=[image], return_tensors="pt")
    if family == "qwen2_5_vl":
        assert torch.equal(still["video_grid_thw"], reference["image_grid_thw"])
        torch.testing.assert_close(still["pixel_values_videos"], reference["pixel_values"], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(still["pixel_values_videos"][0, 0], reference["pixel_values"][0, 0],
                                   rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ invariants
def test_keep_all_video_is_bit_identical(video_family, video_file, video_prompt):
    model, inputs, _ = video_prompt(video_family, "sdpa", video_file)
    with torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with transprune.apply(model, PruneConfig.preset("off")) as pruner:
            pruned_logits = model(**inputs).logits
            pruned_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(logits, pruned_logits)
    assert torch.equal(ids, pruned_ids)
    trace = pruner.trace
    assert trace.visual_tokens == _video_span(model, inputs)
    assert all(torch.equal(stage.kept, torch.arange(trace.visual_tokens)) for stage in trace.stages)


def test_pruned_video_generation_matches_slow_reference(video_family, video_file, video_prompt):
    """Default positions: compact for the 1-D RoPE families, original M-RoPE for Qwen2.5-VL."""
    model, inputs, _ = video_prompt(video_family, "eager", video_file)
    config = PruneConfig.preset("high")
    resolved = config.resolve(len(model.model.language_model.layers),
                              transprune.adapters.for_model(model).default_positions)
    # One video = one span (Qwen3-VL writes it as several runs, one per timestamped frame group).
    spans = [0] * _video_span(model, inputs)
    reference = Reference(model, resolved, spans=spans).run(inputs, max_new_tokens=4)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        logits = model(**inputs).logits[0, -1]
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    for stage, kept in zip(pruner.trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept), f"stage at layer {stage.layer} kept different tokens"
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(output.logits)[:, 0], reference["step_logits"].float(),
                               rtol=1e-4, atol=1e-5)
    assert output.sequences[0, inputs["input_ids"].shape[1]:].tolist() == reference["ids"]


def test_image_and_video_prompt_prunes_each_span_with_its_own_budget(video_family, video_file, sample_image, video_prompt):
    image = sample_image(120, 90, seed=7)
    model, inputs, _ = video_prompt(video_family, "eager", video_file, image=image)
    ids = inputs["input_ids"][0]
    sizes = [int((ids == model.config.image_token_id).sum()), _video_span(model, inputs)]
    assert min(sizes) > 0
    config = PruneConfig.preset("high", positions="original")
    spans = [0] * sizes[0] + [1] * sizes[1]
    reference = Reference(model, config.resolve(16), spans=spans).run(inputs, max_new_tokens=3)
    with torch.no_grad(), transprune.apply(model, config) as pruner:
        logits = model(**inputs).logits[0, -1]
    for stage, kept in zip(pruner.trace.stages, reference["kept"], strict=True):
        assert torch.equal(stage.kept, kept)
        per_span = [int((stage.kept < sizes[0]).sum()), int((stage.kept >= sizes[0]).sum())]
        assert per_span == [int(size * stage.keep_ratio) for size in sizes]
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ end to end
def test_video_file_to_pruned_answer_and_overlay(video_family, video_file):
    lm = models.load(REGISTRY_NAME[video_family])
    result = lm.generate(None, QUESTION, config="high", max_new_tokens=3, video=str(video_file))
    frames = DEFAULT_FRAMES[video_family]
    assert result.video is not None and len(result.video.frames) == frames
    assert result.output_ids.shape[1] == result.inputs["input_ids"].shape[1] + 3
    trace, layout = result.trace, result.trace.layout
    n = trace.visual_tokens
    assert layout is not None and layout.boxes.shape == (n, 4) and layout.frame.shape == (n,)
    assert layout.image_size == (WIDTH, HEIGHT)
    # Each family's exact layout where this file knows it (a Qwen token covers two consecutive frames;
    # Video-LLaVA's CLS tokens and OneVision's newline token have no place); any family: frames from 0.
    frame_steps = {"video_llava": 1, "llava_onevision": 1, "qwen2_5_vl": 2, "qwen3_vl": 2}
    shown = sorted(layout.frame.unique().tolist())
    if video_family in frame_steps:
        assert shown == list(range(0, frames, frame_steps[video_family]))
    assert shown[0] == 0 and set(shown) <= set(range(frames))
    placeless = torch.isnan(layout.boxes).any(dim=1)
    expected_placeless = {"video_llava": frames, "llava_onevision": 1, "qwen2_5_vl": 0, "qwen3_vl": 0}.get(video_family)
    assert expected_placeless is None or int(placeless.sum()) == expected_placeless
    boxes = layout.boxes[~placeless]
    assert (boxes[:, 0] >= -1e-4).all() and (boxes[:, 2] <= WIDTH + 1e-4).all()
    assert (boxes[:, 1] >= -1e-4).all() and (boxes[:, 3] <= HEIGHT + 1e-4).all()
    if frame_steps.get(video_family) == 2:  # Qwen: the merged cells of each pair tile the whole frame
        per_step = boxes[layout.frame[~placeless] == 0]
        area = ((per_step[:, 2] - per_step[:, 0]) * (per_step[:, 3] - per_step[:, 1])).sum()
        assert float(area) == pytest.approx(WIDTH * HEIGHT, rel=1e-4)

    picture = video_overlay(result.video.frames, layout, trace, height=32)
    width = round(WIDTH * 32 / HEIGHT)
    assert picture.size == (width * frames, 32 * (1 + len(trace.stages)))
    pixels = np.asarray(picture, dtype=np.float32)
    top, last = pixels[:32], pixels[-32:]
    # The last stage keeps 1/8: most of each frame is dimmed, the kept cells are untouched.
    assert last.mean() < 0.75 * top.mean()
    kept = trace.stages[-1].kept
    placed = kept[~torch.isnan(layout.boxes[kept]).any(dim=1)]
    token = int(placed[0])
    x0, y0, x1, y1 = (layout.boxes[token] * 32 / HEIGHT).tolist()
    column = int(layout.frame[token]) * width
    cx, cy = column + int((x0 + x1) / 2), int((y0 + y1) / 2)
    assert np.array_equal(last[cy, cx], top[cy, cx])


def test_frames_list_is_accepted_and_video_llava_needs_eight(video_file):
    frames = read_video(video_file, 4).frames
    lm = models.load("tiny-llava-onevision")
    result = lm.generate(None, QUESTION, config="high", max_new_tokens=2, video=frames)
    assert len(result.video.frames) == 4 and result.trace.layout.frame.max() == 3
    with pytest.raises(VideoError, match="exactly 8 frames"):
        models.load("tiny-video-llava").prepare_video(frames, QUESTION)


# ------------------------------------------------------------------------------ errors
def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="corrupt, truncated or not a video"):
        read_video(path, 8).frames
    with pytest.raises(VideoError, match="corrupt"):
        read_video(path.read_bytes(), 8).frames


def test_audio_only_file_is_a_clear_error(tmp_path):
    import av

    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match="only audio"):
        read_video(path, 8).frames


def test_zero_frame_video_is_a_clear_error(tmp_path):
    import av

    path = tmp_path / "empty.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        container.start_encoding()  # header only, no frame
    with pytest.raises(VideoError, match="no decodable frames"):
        read_video(path, 8).frames
    with pytest.raises(VideoError, match="zero frames"):
        Video.from_frames([])


def test_missing_file_and_image_only_model_are_clear_errors(tmp_path, video_file):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "nope.mp4", 8).frames
    with pytest.raises(VideoError, match="takes images only"):
        models.load("tiny-llava").generate(None, QUESTION, video=str(video_file))
    assert os.path.exists(video_file)
