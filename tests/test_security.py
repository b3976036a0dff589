"""The served app under attack: no server file is ever read unless it was uploaded, every refusal is a
sentence, and the expensive parts are bounded. Loopback only.

A canary image lies outside every folder of the app. Python's audit hook `open` (raised by every
`open()`, PIL's included) records any attempt to open it from this process, where the server runs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import gradio as gr
import httpx
import pytest
import torch
from PIL import Image

from components import examples, files, gate
from components.compare import make_handlers
from components.engine import Engine
from components.inputs import upload_problem

MODEL = "tiny-llava"
QUESTION = "What color is the circle?"
# The /compare inputs after the image, as the reproduction sent them.
SETTINGS = [QUESTION, None, "shapes-llava", "TransPrune", "High", 0.125, 0.5, "", "Model default", 4, "sdpa", "auto",
            0, 1]

OPENED: list[str] = []


def _record_opens(event, args):
    if event == "open" and args and "canary" in str(args[0]):
        OPENED.append(str(args[0]))


sys.addaudithook(_record_opens)   # audit hooks cannot be removed; this one only records canary paths


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    """A real PNG outside the app's folders (a sibling of the served app's cache, not inside it)."""
    path = tmp_path_factory.mktemp("outside") / "canary.png"
    Image.new("RGB", (64, 64), (255, 0, 255)).save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_app):
    temp = tmp_path_factory.mktemp("security")
    with serve_app(temp / "gradio", "shapes-llava") as (url, built):
        yield url, temp / "gradio", built


@pytest.fixture(autouse=True)
def no_opens():
    OPENED.clear()
    yield
    assert OPENED == [], f"the server opened {OPENED}"


def _call(url: str, api: str, data: list) -> str:
    """POST to a /call endpoint and read the event stream; the stream's text."""
    with httpx.Client(timeout=120) as http:
        posted = http.post(url + "gradio_api/call/" + api, json={"data": data})
        if posted.status_code != 200:
            return posted.text
        return http.get(url + f"gradio_api/call/{api}/{posted.json()['event_id']}").text


def _error(stream: str) -> str:
    """The error sentence of a failed call's event stream (asserting it failed with one)."""
    assert "event: error" in stream, stream[:500]
    data = json.loads(stream.split("event: error", 1)[1].split("data:", 1)[1].strip().splitlines()[0])
    assert isinstance(data, dict) and isinstance(data.get("error"), str), stream
    return data["error"]


def _file(path, meta=True) -> dict:
    return {"path": str(path), **({"meta": {"_type": "gradio.FileData"}} if meta else {})}


def _uploaded(url: str) -> dict:
    """The first example image uploaded through /upload, as a page would send it."""
    with httpx.Client(timeout=60) as http, open(examples.example_rows()[0][0], "rb") as image:
        reply = http.post(url + "gradio_api/upload", files={"files": ("example.png", image, "image/png")})
    return _file(reply.json()[0])


# ---------------------------------------------------------------------------- files
def test_only_uploads_are_read_and_every_foreign_path_gets_the_same_sentence(server, canary, tmp_path):
    url, cache, _ = server
    cache.mkdir(parents=True, exist_ok=True)
    inside_link = cache / "canary-link.png"      # a symlink inside the upload folder to a file outside it
    inside_link.symlink_to(canary)
    foreign = {
        "existing file, no meta": _file(canary, meta=False),
        "existing file, with meta": _file(canary),
        "missing file": _file(canary.parent / "missing.png", meta=False),
        "a directory": _file(canary.parent, meta=False),
        "traversal out of the upload folder": _file(f"{cache}/../{canary.parent.name}/../{canary.parent.name}/"
                                                    "canary.png", meta=False),
        "symlink inside the upload folder": _file(inside_link, meta=False),
        "relative path": _file("canary.png", meta=False),
        "URL as the path": _file("http://127.0.0.1:9/canary.png"),
        "URL only": {"url": "http://127.0.0.1:9/canary.png", "meta": {"_type": "gradio.FileData"}},
    }
    replies = {name: _error(_call(url, "compare", [payload] + SETTINGS)) for name, payload in foreign.items()}
    assert set(replies.values()) == {gate.NOT_AN_UPLOAD}, replies
    # The same as the video input (the image left empty).
    for payload in (_file(canary), _file(canary.parent / "missing.mp4", meta=False)):
        data = [None, QUESTION, payload] + SETTINGS[2:]
        data[3] = "tiny-video-llava"
        assert _error(_call(url, "compare", data)) == gate.NOT_AN_UPLOAD
    # A data URL or a bare path string instead of a file payload.
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    for value in ("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), str(canary)):
        assert _error(_call(url, "compare", [value] + SETTINGS)) in (gate.NOT_AN_UPLOAD,
                                                                     gate.UNREADABLE_REQUEST)


def test_an_upload_still_runs(server):
    from gradio_client import Client, handle_file

    url, cache, _ = server
    client = Client(url, verbose=False, download_files=str(cache.parent / "downloads"))
    path = examples.example_rows()[0][0]
    result = client.predict(handle_file(path), *SETTINGS, api_name="/compare")
    assert "visual tokens" in result[0]


def test_private_events_apply_the_same_check(server, canary):
    url, _, built = server
    fn_index = next(i for i, fn in built.demo.fns.items() if fn.name == "show")   # the failure handler
    with httpx.Client(timeout=60) as http:
        for payload in (_file(canary, meta=False), _file(canary), _file("/etc/shadow", meta=False)):
            reply = http.post(url + "gradio_api/run/predict",
                              json={"data": [payload], "fn_index": fn_index, "session_hash": "attacker"})
            assert gate.NOT_AN_UPLOAD in reply.text and "canary" not in reply.text, reply.text


def test_queued_events_cannot_be_called_around_the_queue(server):
    """POST /gradio_api/run/<name> would skip the queue's size and the concurrency limits (api_open=False)."""
    url, _, built = server
    with httpx.Client(timeout=60) as http:
        for name in ("compare", "speed_at_real_size"):
            reply = http.post(url + f"gradio_api/run/{name}", json={"data": [None] + SETTINGS})
            assert reply.status_code == 404 and "join the queue" in reply.text, (name, reply.text)
        fn_index = next(i for i, fn in built.demo.fns.items() if fn.api_name == "compare")
        reply = http.post(url + "gradio_api/run/predict", json={"data": [None] + SETTINGS, "fn_index": fn_index,
                                                               "session_hash": "attacker"})
        assert reply.status_code == 404 and "join the queue" in reply.text, reply.text


def _join(url: str, fn_index: int, data: list, event_data=None) -> dict:
    """Join the queue as the page does (fn_index, session hash) and return the completed message."""
    session = f"probe{fn_index}"
    with httpx.Client(timeout=60) as http:
        joined = http.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                               "session_hash": session, "event_data": event_data})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and '"process_completed"' in line:
                    return json.loads(line[5:])["output"]
    raise AssertionError("the queue never completed the event")


def test_an_event_number_the_app_lacks_gets_a_sentence(server):
    url, _, _ = server
    with httpx.Client(timeout=60) as http:
        for route, body in (("gradio_api/queue/join", {"data": [], "fn_index": 9999, "session_hash": "attacker"}),
                            ("gradio_api/run/predict", {"data": [], "fn_index": 9999})):
            reply = http.post(url + route, json=body)
            assert reply.status_code == 404 and "names an event the app does not have" in reply.json()["error"], \
                (route, reply.text)


def test_page_events_called_by_hand_get_a_sentence(server):
    """A browser-only listener, and a patch click without the clicked point, answered with sentences."""
    url, _, built = server
    browser_only = next(i for i, fn in built.demo.fns.items() if fn.fn is None)
    assert _join(url, browser_only, [])["error"] == gate.BROWSER_ONLY
    click = next(i for i, fn in built.demo.fns.items() if fn.name == "on_patch_click")
    # Values the gate accepts (the session state, the view's first choice), so the handler itself runs.
    values = [block.choices[0][1] if isinstance(block, gr.Radio) else None for block in built.demo.fns[click].inputs]
    for event_data in (None, {"index": "abc"}, {"index": [1.5, "x"]}):
        error = _join(url, click, values, event_data)["error"]
        assert isinstance(error, str) and error, event_data


def test_a_handler_failure_becomes_the_gates_sentence():
    """Whatever a handler raises that is not a gr.Error reaches the client as one sentence, not {"error": null}."""
    import asyncio

    def broken():
        raise KeyError("internal detail")

    def refusing():
        raise gr.Error("A sentence of the handler's own.")

    with gate.GatedBlocks() as blocks:
        button = gr.Button()
        button.click(broken)
        button.click(refusing)
    broken_fn, refusing_fn = list(blocks.fns.values())
    with pytest.raises(gr.Error) as failure:
        asyncio.run(blocks.call_function(broken_fn, []))
    assert failure.value.message == gate.HANDLER_FAILED and "internal detail" not in failure.value.message
    with pytest.raises(gr.Error, match="A sentence of the handler's own."):
        asyncio.run(blocks.call_function(refusing_fn, []))


@pytest.mark.parametrize("point", [None, "abc", [1.5, "x"], [1], [float("nan"), 2], [True, 3]])
def test_a_patch_click_without_a_point_gets_a_sentence(point):
    from types import SimpleNamespace

    from components import overlay

    with pytest.raises(gr.Error, match="needs the clicked point"):
        overlay.on_patch_click(SimpleNamespace(canvas=None), "image", SimpleNamespace(index=point))


def test_the_failure_handler_reads_nothing_outside_the_uploads(canary):
    assert upload_problem(_file(canary)) == gate.NOT_AN_UPLOAD
    assert upload_problem(_file("/proc/self/environ")) == gate.NOT_AN_UPLOAD


def test_allowed_upload_decides_from_the_text_before_the_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "gradio" / "abc").mkdir(parents=True)
    assert gate.allowed_upload(str(tmp_path / "gradio" / "abc" / "photo.png"))       # missing: its reader says so
    assert gate.allowed_upload(str(examples.EXAMPLES_DIR / "four_shapes.png"))
    for path in (str(tmp_path / "gradio-other" / "x.png"), str(tmp_path / "gradio" / ".." / "x.png"), "x.png", "",
                 None, 5, str(tmp_path / "gradio" / "a\x00.png"), "https://example.com/x.png"):
        assert not gate.allowed_upload(path), path


# ---------------------------------------------------------------------------- refusals are sentences
@pytest.mark.parametrize("position, value, sentence", [
    (6, "abc", "Custom keep ratio must be a number from 0.02 to 1, not 'abc'."),
    (7, 7, "α (TTV weight) must be a number from 0 to 1, not 7."),
    (10, "32", "Max new tokens must be a whole number from 1 to 256, not '32'."),
    (10, 512, "Max new tokens must be a whole number from 1 to 256, not 512."),
    (10, 2.5, "Max new tokens must be a whole number from 1 to 256, not 2.5."),
    (14, 20, "Timing repeats must be a whole number from 1 to 9, not 20."),
    (13, "seven", "Seed must be a whole number from 0 to 2147483647, not 'seven'."),
    (4, "FastV++", "Method must be one of:"),
    (1, 12, "Question must be text, not 12."),
])
def test_values_outside_the_components_get_the_apps_sentence(server, position, value, sentence):
    url, _, _ = server
    data = [_uploaded(url)] + SETTINGS
    data[position] = value
    error = _error(_call(url, "compare", data))
    assert sentence in error and "<class" not in error and "type:" not in error


@pytest.mark.parametrize("depth", [900, 5000])
def test_a_deeply_nested_payload_gets_a_sentence(server, depth):
    """Nested within Python's recursion limit: the gate's own sentence; beyond it: a sentence too
    (the gate's, or the JSON parser's refusal answered by the app's 422 handler)."""
    url, _, _ = server
    question = "[" * depth + json.dumps(QUESTION) + "]" * depth          # written by hand: json.dumps recurses
    body = '{"data": [null, ' + question + ", " + json.dumps(SETTINGS[1:])[1:] + "}"
    with httpx.Client(timeout=120) as http:
        posted = http.post(url + "gradio_api/call/compare", content=body, headers={"content-type": "application/json"})
        if posted.status_code != 200:
            assert posted.status_code == 422 and "Use via API" in posted.text, (posted.status_code, posted.text[:300])
            return
        reply = http.get(url + f"gradio_api/call/compare/{posted.json()['event_id']}").text
    assert _error(reply) in ("Question must be text, not a list.", gate.UNREADABLE_REQUEST)


def test_a_short_payload_is_told_what_the_endpoint_takes(server):
    url, _, _ = server
    error = _error(_call(url, "compare", [None, QUESTION]))
    assert "sends 2 values; this endpoint takes 15" in error and "Question" in error


def test_the_component_limits_are_the_handlers(server):
    from components.inputs import LIMITS

    _, _, built = server
    by_label = {getattr(b, "label", None): b for b in built.demo.blocks.values()}
    for label, (low, high) in LIMITS.items():
        assert (by_label[label].minimum, by_label[label].maximum) == (low, high), label


# ---------------------------------------------------------------------------- question text
@pytest.mark.parametrize("question, part", [
    ("What color \ud800 is it?", "a broken character (a lone UTF-16 surrogate) at position 12"),
    ("What color\x00 is it?", "an invisible control character (U+0000) at position 11"),
    ("What \u202ecolor is it?", "a text-direction control (U+202E) at position 6"),
])
def test_unreadable_question_characters_are_refused_before_tokenising(question, part):
    compare, _ = make_handlers(Engine(), MODEL)
    with pytest.raises(Exception) as raised:
        compare(Image.new("RGB", (64, 64)), question, model=MODEL, max_new_tokens=2, repeats=1,
                progress=lambda *a, **k: None)
    message = str(raised.value)
    assert part in message and "inside the model" not in message and "\x00" not in message \
        and "\u202e" not in message


def test_a_control_character_sent_over_http_gets_a_sentence(server):
    url, _, _ = server
    data = [_uploaded(url)] + SETTINGS
    data[1] = "What \u202ecolor\x00 is the circle?"
    assert "text-direction control (U+202E)" in _error(_call(url, "compare", data))


def test_a_processor_failure_is_not_called_a_model_failure(monkeypatch):
    from transprune.models import LoadedModel

    def broken(*args, **kwargs):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")
    monkeypatch.setattr(LoadedModel, "prepare", broken)
    compare, _ = make_handlers(Engine(), MODEL)
    with pytest.raises(Exception) as raised:
        compare(Image.new("RGB", (64, 64)), QUESTION, model=MODEL, max_new_tokens=2, repeats=1,
                progress=lambda *a, **k: None)
    assert "processor could not read this question or image" in str(raised.value)
    assert "inside the model" not in str(raised.value)


# ---------------------------------------------------------------------------- bounded cost
def test_real_size_timings_have_their_own_queue_and_a_key_per_threads_and_device(server):
    from components.speed import RealSizeSpeed
    from transprune import PruneConfig

    _, _, built = server
    ids = {fn.api_name: fn.concurrency_id for fn in built.demo.fns.values()}
    assert ids["speed_at_real_size"] != ids["compare"]
    speed = RealSizeSpeed("cpu")
    config = PruneConfig.preset("high")
    threads = torch.get_num_threads()
    try:
        one = speed._key("llava-1.5-7b", config)
        torch.set_num_threads(1 if threads != 1 else 2)
        assert speed._key("llava-1.5-7b", config) != one
    finally:
        torch.set_num_threads(threads)
    assert RealSizeSpeed("cuda")._key("llava-1.5-7b", config) != one


def test_uploads_are_refused_with_a_sentence_while_the_cache_is_full(server, monkeypatch):
    url, _, _ = server
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    with httpx.Client(timeout=60) as http:
        def upload():
            return http.post(url + "gradio_api/upload", files={"files": ("a.png", png.getvalue(), "image/png")})
        assert upload().status_code == 200
        monkeypatch.setattr(files.STORE, "max_bytes", 1)   # everything in the cache is too young to go
        reply = upload()
        assert reply.status_code == 507 and files.TrimBeforeUpload.FULL in reply.text
        monkeypatch.undo()
        assert upload().status_code == 200


def test_the_over_caps_check_trims_old_uploads_first(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    store = files.FileStore(max_files=3, max_megabytes=1, min_age_s=60)
    for i in range(5):
        path = tmp_path / f"upload{i}" / "photo.png"
        path.parent.mkdir()
        path.write_bytes(b"x" * 100)
        os.utime(path, (1, 1))           # old enough to go
    assert not store.over_caps() and len(list(tmp_path.rglob("*.png"))) == 3


def test_the_canary_recorder_sees_an_open(canary):
    with open(canary, "rb"):
        pass
    assert OPENED == [str(canary)]
    OPENED.clear()
