"""The app's one error type and how a failure reaches a visitor: a sentence, never server internals.

`UserError` is something the person at the page can fix; its message says what to do and is shown
as is. An unexpected failure is logged with its traceback under a short reference (`logged`), and
the visitor's message names only that reference; `public_message` strips server paths.
"""

from __future__ import annotations

import logging
import re
import uuid

import torch

# An upload the cache clean-up (components/files.py) or Gradio's age limit already removed.
GONE = ("The uploaded {what} is no longer on the server (uploads are kept for a limited time): upload it again, "
        "then press Run.")


log = logging.getLogger("transprune.app")


class UserError(Exception):
    """Something the person at the UI can fix; the message says what to do and is shown as is."""


def logged(error: BaseException, what: str) -> str:
    """Log `error` with its traceback under a short reference, and return the reference, so a
    visitor's message can point to the log without showing server internals."""
    reference = uuid.uuid4().hex[:8]
    log.error("%s [%s]", what, reference, exc_info=error)
    return reference


# An absolute path that is not part of a URL (no ':' '/' '.' or word character just before it).
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.@+~-]+/)+[\w.@+~-]*")


def public_message(text: str, limit: int = 500) -> str:
    """`text` fit to show a visitor: server paths replaced, at most `limit` characters."""
    text = _SERVER_PATH.sub("(a file on the server)", str(text))
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device (or the host) running out of memory."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()

