"""The app under load and bad input: every response complete, files write-once, resources capped,
no server internals in messages. Loopback only; every test stops by itself.

The served app here has a small queue (QUEUE) so a burst can overflow it quickly.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from components import examples, files, overlay
from components.compare import UNREADABLE_REQUEST, CompareOutputs, RunState, make_handlers
from components.engine import Engine
from components.errors import public_message
from transprune import ImageInputError
from transprune.images import as_image
from transprune.models import load
from transprune.video import MAX_FRAMES, VideoError, check_decoded_size

MODEL = "tiny-llava"
QUEUE = 4
FAST = dict(model=MODEL, max_new_tokens=4, repeats=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_app):
    """(url, temp folder, app) for the app served on a free loopback port with a queue of QUEUE."""
    temp = tmp_path_factory.mktemp("serving")
    with serve_app(temp / "gradio", MODEL, queue_size=QUEUE) as (url, built):
        yield url, temp, built


def _client(url, temp):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(temp / "downloads"))


def _ask(client, **kwargs):
    from gradio_client import handle_file

    path, question = examples.example_rows()[0][:2]
    return client.predict(image=handle_file(path), question=question, api_name="/compare", **dict(FAST, **kwargs))


def _complete(result) -> str:
    """The pruned answer of a /compare response, after checking every file in it is whole."""
    out = CompareOutputs(*result, state=None)
    assert "visual tokens" in out.verdict
    record = json.loads(Path(out.trace["value"]).read_text())          # the trace: parses to the end
    for path in [out.chart, out.inspect, out.preview] + [item["image"] for item in out.stages + out.heatmaps]:
        with Image.open(path) as image:
            image.load()                                                # a truncated PNG raises here
    assert "".join(s["token"] for s in out.pruned) == record["pruned"]["text"] != ""
    return record["pruned"]["text"]


# ---------------------------------------------------------------------------- load
def test_concurrent_clients_get_complete_identical_answers(server):
    url, temp, _ = server
    reference = _complete(_ask(_client(url, temp)))

    def visitor(_):
        client = _client(url, temp)
        return [_complete(_ask(client)) for _ in range(5)]
    with ThreadPoolExecutor(4) as pool:
        answers = [a for batch in pool.map(visitor, range(4)) for a in batch]
    assert answers == [reference] * 20


def test_a_burst_beyond_the_queue_is_refused_for_the_excess_only(server):
    from gradio_client import handle_file

    url, temp, _ = server
    client = _client(url, temp)
    path, question = examples.example_rows()[0][:2]
    jobs = [client.submit(image=handle_file(path), question=question, api_name="/compare",
                          **dict(FAST, repeats=3, max_new_tokens=8)) for _ in range(QUEUE + 8)]
    answered, full = [], 0
    for job in jobs:
        try:
            answered.append(_complete(job.result(timeout=300)))
        except Exception as error:    # gradio_client's QueueError, or the AppError it wraps
            assert "queue is full" in str(error).lower(), error
            full += 1
    assert full >= 1 and len(answered) >= QUEUE
    assert len(set(answered)) == 1
    assert _complete(_ask(client))     # and the server still answers


# ---------------------------------------------------------------------------- files
def test_outputs_are_written_once_under_content_names(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    store = files.FileStore()
    first = store.write(b"abc" * 1000, "card", ".png")
    inode, size = os.stat(first).st_ino, os.path.getsize(first)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: store.write(b"abc" * 1000, "card", ".png"), range(32)))
    assert set(paths) == {first} and os.stat(first).st_ino == inode and os.path.getsize(first) == size
    assert Path(first).parent == tmp_path / files.OUTPUT_FOLDER
    assert store.write(b"other", "card", ".png") != first
    assert not list(Path(first).parent.glob("*.part"))       # no staging file left behind


def test_trim_removes_the_oldest_beyond_the_caps(tmp_path):
    now = time.time()
    for i in range(10):   # f0 oldest ... f9 newest, 100 bytes each, in two folders
        path = tmp_path / ("a" if i % 2 else "b") / f"f{i}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 1000 + i * 10, now - 1000 + i * 10))
    kept_example = tmp_path / "b" / "f0"
    removed = files.trim_folder(tmp_path, max_files=6, max_bytes=10**6, min_age_s=0, keep={kept_example}, now=now)
    left = sorted(p.name for p in tmp_path.rglob("f*"))
    assert removed == 4 and left == ["f0", "f5", "f6", "f7", "f8", "f9"]
    files.trim_folder(tmp_path, max_files=100, max_bytes=250, min_age_s=0, now=now)
    assert sorted(p.name for p in tmp_path.rglob("f*")) == ["f8", "f9"]
    # Files younger than min_age_s stay even over the cap; empty folders go.
    files.trim_folder(tmp_path, max_files=0, max_bytes=0, min_age_s=915, now=now)
    assert sorted(p.name for p in tmp_path.rglob("f*")) == ["f9"]
    assert not (tmp_path / "a").exists() or any((tmp_path / "a").iterdir())


def test_served_cache_stays_within_its_caps_and_keeps_the_examples(server, monkeypatch):
    url, temp, built = server
    client = _client(url, temp)
    for seed in range(3):   # the random method: other overlays (other files) each time
        _complete(_ask(client, method="Random", seed=seed))
    cache = temp / "gradio"
    before = [p for p in cache.rglob("*") if p.is_file()]
    monkeypatch.setattr(files.STORE, "max_files", 12)
    monkeypatch.setattr(files.STORE, "min_age_s", 0)
    assert files.STORE.trim() >= len(before) - 12 - len(files.gradio_keeps(built.demo))
    assert len([p for p in cache.rglob("*") if p.is_file()]) <= 12 + len(files.gradio_keeps(built.demo))
    for kept in files.gradio_keeps(built.demo):
        assert Path(kept).exists()
    monkeypatch.undo()
    _complete(_ask(client))    # the next visitor is served as before


def test_a_sessions_run_state_is_small_and_redraws_the_same_canvas():
    engine = Engine()
    compare, _ = make_handlers(engine, MODEL)
    image = Image.open(examples.example_rows()[0][0]).convert("RGB")
    out = compare(image, "What color is the circle?", progress=lambda *a, **k: None, **FAST)
    state = out.state
    assert isinstance(state, RunState)
    spec_free = replace(state, comparison=replace(state.comparison, spec=None))   # the spec is shared, not per session
    assert len(pickle.dumps(spec_free)) < 250_000
    assert state.comparison.baseline.inputs.keys() == {"input_ids"} and state.comparison.pruned.video is None
    with Image.open(out.inspect) as shown:
        redrawn = state.canvas
        again = overlay.inspect_view(redrawn, redrawn.segments[-1])
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(again))


# ---------------------------------------------------------------------------- messages
def test_public_message_hides_server_paths_but_not_urls_or_hub_ids():
    text = ("Could not read /tmp/gradio/4f2a/clip.mp4 (see https://huggingface.co/llava-hf/llava-1.5-7b-hf or "
            "llava-hf/llava-1.5-7b-hf)")
    shown = public_message(text)
    assert "/tmp" not in shown and "(a file on the server)" in shown
    assert "https://huggingface.co/llava-hf/llava-1.5-7b-hf" in shown and " llava-hf/llava-1.5-7b-hf)" in shown
    assert len(public_message("x" * 2000)) == 500


def _stream(url: str, path: str, payload: dict) -> tuple[int, str]:
    """POST to a Gradio /call endpoint and read its event stream: (status of the POST, stream text)."""
    with httpx.Client(timeout=60) as http:
        posted = http.post(url + "gradio_api/call/" + path, json=payload)
        if posted.status_code != 200:
            return posted.status_code, posted.text
        event = posted.json()["event_id"]
        return 200, http.get(url + f"gradio_api/call/{path}/{event}").text


def test_malformed_payloads_and_foreign_paths_get_no_internals(server):
    url, _, _ = server
    status, text = _stream(url, "compare", {"data": "not a list"})
    assert status == 422 and "Use via API" in text and "pydantic" not in text.lower() and "loc" not in text
    secret = "/etc/hostname"
    file_data = {"path": secret, "meta": {"_type": "gradio.FileData"}}
    status, text = _stream(url, "compare", {"data": [file_data, "What color is the circle?"]})
    assert "error" in text and secret not in text and "Traceback" not in text and os.getcwd() not in text


def test_the_page_explains_a_request_refused_before_the_handler(tmp_path, monkeypatch):
    from components.compare import ErrorInbox
    from components.gate import NOT_AN_UPLOAD
    from components.inputs import UNREADABLE_IMAGE

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))    # the files below are uploads

    request = type("Request", (), {"session_hash": "abc"})()
    verdict, *cleared = ErrorInbox().show(None, request)
    assert UNREADABLE_REQUEST in verdict and cleared == [None] * len(ErrorInbox.CLEARED)
    junk = tmp_path / "holiday.png"         # an upload Gradio could not decode: its own sentence
    junk.write_text("not a PNG")
    assert UNREADABLE_IMAGE in ErrorInbox().show({"path": str(junk)}, request)[0]
    good = tmp_path / "fine.png"
    Image.new("RGB", (8, 8)).save(good)
    assert UNREADABLE_REQUEST in ErrorInbox().show({"path": str(good)}, request)[0]
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "elsewhere"))   # no longer an upload: not read
    assert NOT_AN_UPLOAD in ErrorInbox().show({"path": str(junk)}, request)[0]


def test_bug_messages_name_a_log_reference_not_the_exception(monkeypatch):
    engine = Engine()
    compare, _ = make_handlers(engine, MODEL)

    def broken(*args, **kwargs):
        raise KeyError("/srv/secret/weights.bin missing in transformers.models.llava internals")
    monkeypatch.setattr(engine, "compare", broken)
    import gradio as gr
    with pytest.raises(gr.Error) as raised:
        compare(Image.new("RGB", (64, 64)), "What is it?", progress=lambda *a, **k: None, **FAST)
    message = raised.value.message
    assert "/srv" not in message and "KeyError" not in message and "internals" not in message
    assert "error " in message and "still running" in message


def _zero_frame_video(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        container.start_encoding()  # header only, no frame
    return path


def test_video_messages_name_no_server_path_or_decoder_text(tmp_path):
    import gradio as gr

    engine = Engine()
    compare, _ = make_handlers(engine, MODEL)
    secret = tmp_path / "private-upload-folder"
    secret.mkdir()
    garbage = secret / "clip.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    cases = {_zero_frame_video(secret / "empty.avi"): "no decodable frames", garbage: "not a video",
             secret / "gone.mp4": "no longer on the server"}
    for video, expected in cases.items():
        with pytest.raises(gr.Error) as raised:
            compare(None, "What happens?", video=str(video), progress=lambda *a, **k: None,
                    **dict(FAST, model="tiny-video-llava"))
        message = raised.value.message
        assert expected in message
        assert "private-upload-folder" not in message and "/tmp" not in message
        assert "decoder" not in message and "Errno" not in message


# ---------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def tiny():
    return load(MODEL)


def test_generate_accepts_a_path_bytes_an_array_or_a_tensor(tiny, tmp_path):
    picture = Image.open(examples.example_rows()[0][0]).convert("RGB")
    path = tmp_path / "picture.png"
    picture.save(path)
    question = "What color is the circle?"
    expected = tiny.generate(picture, question, "high", max_new_tokens=3).output_ids
    array = np.asarray(picture)
    for image in (str(path), path, path.read_bytes(), array, torch.from_numpy(array).permute(2, 0, 1),
                  array.astype(np.float32) / 255):
        assert torch.equal(tiny.generate(image, question, "high", max_new_tokens=3).output_ids, expected), type(image)


@pytest.mark.parametrize("image, message", [
    ("no/such/file.png", "does not exist"),
    (b"not an image", "could not be decoded"),
    (np.zeros((4, 4, 2), np.uint8), "HxWxC"),
    (torch.zeros(5, 4, 4), "CxHxW"),
    (np.full((4, 4, 3), np.nan), "NaN"),
    ({"image": 1}, "Cannot use a dict"),
])
def test_unusable_images_raise_a_clear_error(image, message):
    with pytest.raises(ImageInputError, match=message):
        as_image(image)


@pytest.mark.parametrize("num_frames", [0, -3, MAX_FRAMES + 1, 10_000, 2.5, True, "8"])
def test_num_frames_outside_the_documented_range_is_refused(num_frames, tmp_path):
    """Checked before the file is opened: the path need not even exist."""
    video_model = load("tiny-video-llava")
    with pytest.raises(VideoError, match="num_frames"):
        video_model.as_video(tmp_path / "clip.mp4", num_frames)


def test_frames_that_would_not_fit_in_memory_are_refused_before_decoding():
    check_decoded_size(640, 480, 32, available=2**32)                 # 29 MB: fine
    with pytest.raises(VideoError, match=r"num_frames=\d+ or fewer"):
        check_decoded_size(3840, 2160, 64, available=2**30)            # 1.6 GB with 0.5 GB to spare
