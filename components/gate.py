"""The request gate: every event's raw inputs are checked by the app before Gradio acts on them.

Why the app needs its own gate (found by probing the served app as an attacker would):
- Gradio checks that a file argument was uploaded only when its payload carries
  `"meta": {"_type": "gradio.FileData"}`. A payload without it, or with a URL as its `path`, went
  straight to the component, which opened (or downloaded) whatever it named, and the run showed
  the picture back. Events the page calls without the queue (`api_visibility="private"`) can be
  called by anyone with their `fn_index` too: hiding them is not protecting them.
- With `show_error=False`, anything Gradio raises before the handler (a value of the wrong type,
  too few values, a refused path) reaches an API client as `{"error": null}`, and a slider's own
  bound check echoes Python types.

So `GatedBlocks.preprocess_data`, which Gradio calls for every event (queued or not, public or
private) before it touches the inputs, first asks `refusal()` for a sentence and raises it as a
gr.Error; whatever Gradio itself still raises while preprocessing becomes UNREADABLE_REQUEST.

Files: a path is accepted only if it lies inside Gradio's upload folder (where /upload puts files)
or the bundled examples folder, decided from the path's text first, so a path outside those
folders is never looked up on disk, and then again after resolving symlinks. Every refused path
gets the same sentence, whether it exists, is a folder or is missing. A path inside the folders
that is missing is left to the component's own check, which says the upload expired.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import gradio as gr

from .examples import EXAMPLES_DIR

log = logging.getLogger("transprune.app")

NOT_AN_UPLOAD = ("This app reads only files uploaded through its page or its API's upload: send the file with "
                 "gradio_client's handle_file (or upload it on the page), then run again.")
UNREADABLE_REQUEST = ("The server could not take this request. On the page: upload the file again (or, if the "
                      "server is busy, wait a moment) and press Run. From code: send one value per input as the "
                      "page's \"Use via API\" link shows, files through gradio_client's handle_file.")
BROWSER_ONLY = ("This event runs in the page itself; there is nothing to call on the server. The endpoints "
                "the server answers are listed under the page's \"Use via API\" link.")
HANDLER_FAILED = ("The server could not handle this request (the details are in its log). The app is still "
                  "running: reload the page and try again, or send the values the page's \"Use via API\" link "
                  "shows.")
# Longest text value taken at all; the handlers' own limits (e.g. the question's) are far lower and
# say so with the text's real length. This only stops megabytes of text before any work is done.
MAX_TEXT_CHARS = 100_000


def upload_roots() -> list[Path]:
    """The folders whose files the app may read: Gradio's upload folder (read now: tests move it)
    and the bundled examples."""
    from gradio.utils import get_upload_folder

    return [Path(os.path.abspath(get_upload_folder())), EXAMPLES_DIR]


def _inside(path: str, roots) -> bool:
    return any(path == str(root) or path.startswith(str(root) + os.sep) for root in roots)


def allowed_upload(path) -> bool:
    """Whether `path` names a place inside an upload root, by its text and again with symlinks resolved.

    Nothing outside the roots is looked up on disk: the text check comes first. A path inside them
    may still be missing (an expired upload); the caller's own reading says so.
    """
    if not isinstance(path, str) or not path or "\x00" in path or not os.path.isabs(path):
        return False
    lexical = os.path.normpath(path)
    roots = upload_roots()
    if not _inside(lexical, roots + [Path(os.path.realpath(root)) for root in roots]):
        return False
    return _inside(os.path.realpath(lexical), [Path(os.path.realpath(root)) for root in roots])


def _file_payloads(value):
    """Every dict in `value` that names a file (has a "path" or "url" key), however deeply nested."""
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            yield value
        for item in value.values():
            yield from _file_payloads(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _file_payloads(item)


# Components whose value is a file: anything but a file payload (a data URL, a bare path) is refused.
FILE_COMPONENTS = (gr.Image, gr.Video, gr.Audio, gr.File)


def file_refusal(value, block=None) -> str | None:
    """NOT_AN_UPLOAD when `value` names any file outside the upload roots (or only a URL), or when a
    file component's value is not a file payload; else None."""
    if isinstance(block, FILE_COMPONENTS) and value is not None and not isinstance(value, dict):
        return NOT_AN_UPLOAD
    for payload in _file_payloads(value):
        if not allowed_upload(payload.get("path")):
            return NOT_AN_UPLOAD
    return None


def _label(block) -> str:
    return getattr(block, "label", None) or type(block).__name__


def number_refusal(block, value) -> str | None:
    """A sentence when `value` is not a number within the component's bounds (whole where it steps by 1)."""
    low, high = getattr(block, "minimum", None), getattr(block, "maximum", None)
    whole = getattr(block, "precision", None) == 0 or (
        isinstance(block, gr.Slider) and float(block.step).is_integer() and float(block.minimum).is_integer())
    kind = "a whole number" if whole else "a number"
    bounds = (f" from {_number(low)} to {_number(high)}" if low is not None and high is not None
              else f" of at least {_number(low)}" if low is not None else "")
    wanted = f"{_label(block)} must be {kind}{bounds}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{wanted}, not {_shown(value)}."
    if (low is not None and value < low) or (high is not None and value > high) or \
            (whole and not float(value).is_integer()):
        return f"{wanted}, not {_number(value)}."
    return None


def _number(value) -> str:
    """2147483647 stays whole, 0.020000000000000004 reads 0.02."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else f"{value:.6g}"


def _shown(value) -> str:
    """A value as the sentence quotes it: short, no type names."""
    text = repr(value) if isinstance(value, str) else "nothing" if value is None else "a list" \
        if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict) else str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def choice_refusal(block, value) -> str | None:
    if getattr(block, "allow_custom_value", False) or getattr(block, "multiselect", False):
        return None if isinstance(value, (str, int, float, list)) or value is None else \
            f"{_label(block)} must be a name, not {_shown(value)}."
    values = [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in block.choices or ()]
    if value in values:
        return None
    offered = ", ".join(str(v) for v in values)
    return f"{_label(block)} must be one of: {offered}; not {_shown(value)}."


def text_refusal(block, value) -> str | None:
    if value is not None and not isinstance(value, str):
        return f"{_label(block)} must be text, not {_shown(value)}."
    if value is not None and len(value) > MAX_TEXT_CHARS:
        return f"{_label(block)} is {len(value):,} characters long; far more than this app reads. Shorten it."
    return None


VALUE_CHECKS = ((gr.Slider, number_refusal), (gr.Number, number_refusal), (gr.Radio, choice_refusal),
                (gr.Dropdown, choice_refusal), (gr.Textbox, text_refusal))


class Refusal(NamedTuple):
    sentence: str
    about_a_file: bool       # the page shows a file's refusal inline (its failure handler), not as a toast


def refusal(blocks, inputs: list, values_checked: bool = True, file_checks=None) -> Refusal | None:
    """Why a request whose raw `inputs` do not fit the event's input `blocks` is refused, or None.

    Files are always checked to lie inside the upload roots. With `values_checked` (events whose handler
    gets Gradio-preprocessed values), also each file by `file_checks` ({component class: fn(path) ->
    sentence or None}, reading a header at most) and each value by its component's bounds; an event
    with preprocess=False reads its raw inputs itself (the page's failure handler does).
    """
    if not isinstance(inputs, list) or len(inputs) < len(blocks):   # extra values are ignored, as Gradio does
        names = ", ".join(_label(block) for block in blocks)
        count = len(inputs) if isinstance(inputs, list) else "no list of"
        return Refusal(f"This request sends {count} values; this endpoint takes {len(blocks)} ({names}). Send one "
                       "value per input, in that order, as the page's \"Use via API\" link shows (or use "
                       "gradio_client).", False)
    for block, value in zip(blocks, inputs):
        if getattr(block, "stateful", False):
            continue
        problem = file_refusal(value, block) or (_checked_files(block, value, file_checks or {}) if values_checked
                                                 else None)
        if problem:
            return Refusal(problem, True)
        if values_checked:
            check = next((check for kind, check in VALUE_CHECKS if isinstance(block, kind)), None)
            problem = check(block, value) if check else None
            if problem:
                return Refusal(problem, False)
    return None


def _checked_files(block, value, file_checks) -> str | None:
    check = next((check for kind, check in file_checks.items() if isinstance(block, kind)), None)
    if check is None:
        return None
    return next((problem for payload in _file_payloads(value) if (problem := check(payload["path"]))), None)


class GatedBlocks(gr.Blocks):
    """gr.Blocks whose every event passes `refusal()` before Gradio preprocesses its inputs.

    `file_checks`: {component class: fn(path) -> sentence or None}, run on every uploaded file of such a
    component before Gradio decodes it (an image's header: a decompression bomb is never decoded).
    `explain`: fn(component, raw value) -> sentence or None, asked when Gradio still fails to read a
    value (a file whose header was fine but whose data is not). Both live with the gate, not on the
    components: Gradio replaces a session's component with a fresh copy when an event updates it, so
    anything attached to a component instance can silently vanish.
    """

    def __init__(self, *args, file_checks=None, explain=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.file_checks = file_checks or {}
        self.explain = explain

    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        if block_fn.fn is None:     # an event the page handles in the browser (a JavaScript-only listener)
            raise gr.Error(BROWSER_ONLY, print_exception=False)
        # The session's copy of a component (a dropdown whose choices a run updated) is the one to check.
        blocks = [block if block.stateful or state is None or block._id not in state else state[block._id]
                  for block in block_fn.inputs]
        try:
            refused = refusal(blocks, inputs, values_checked=block_fn.preprocess, file_checks=self.file_checks)
        except RecursionError:       # a payload nested deeper than anything the page sends
            refused = Refusal(UNREADABLE_REQUEST, False)
        if refused:
            raise gr.Error(refused.sentence, print_exception=False, visible=not refused.about_a_file)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as error:
            # Logged for the server's owner; the client gets one sentence without Gradio's internals.
            log.info("request refused while Gradio read its inputs: %s: %s", type(error).__name__, error)
            explained = next((sentence for block, value in zip(blocks, inputs)
                              if self.explain and (sentence := self.explain(block, value))), None)
            raise gr.Error(explained or UNREADABLE_REQUEST, print_exception=False,
                           visible=explained is None) from None

    async def call_function(self, block_fn, *args, **kwargs):
        # The handlers turn what they expect into sentences; anything else (a page event called by hand
        # with values the page never sends, a bug) is logged with its traceback and answered with one
        # sentence instead of Gradio's `{"error": null}`.
        try:
            return await super().call_function(block_fn, *args, **kwargs)
        except gr.Error:
            raise
        except Exception:
            log.exception("an event's handler failed")
            raise gr.Error(HANDLER_FAILED, print_exception=False) from None
