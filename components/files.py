"""Every file the app hands out (overlays, chart, card, trace): written once, complete, and capped.

Why not return PIL images and let Gradio save them: Gradio writes a returned image to
`<cache>/<hash of its bytes>/image.png` and rewrites that file each time the same picture is
returned. Two visitors running the same example get the same overlay, so one request truncated
the file while the other was still sending it, and the second response ended early ("peer closed
connection without sending complete message body"). Here a file is named after its content,
written to a temporary name and renamed into place, so a path a page may be fetching is never
rewritten; a file that already exists is only touched.

The folder sits inside Gradio's cache folder, which Gradio serves in place (no second copy).
After each write the whole cache folder (these outputs and the visitors' uploads) is trimmed to
MAX_FILES files and MAX_MEGABYTES, oldest first; a file younger than MIN_AGE_S is never removed
(a page may still be fetching it), nor a file Gradio keeps for the examples. Gradio's own
clean-up (`delete_cache` in app.py) still removes anything older than an hour. Uploads are
checked as they arrive too (TrimBeforeUpload), not only when a run writes its outputs: a client
that only uploads would otherwise fill the disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

OUTPUT_FOLDER = "transprune-outputs"
MAX_FILES = 600
MAX_MEGABYTES = 200
MIN_AGE_S = 120


def cache_root() -> Path:
    """Gradio's cache folder (GRADIO_TEMP_DIR, or <temp>/gradio), read now: tests move it."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


class FileStore:
    """Content-named, write-once files under Gradio's cache, with the whole cache trimmed after writes.

    `keep` returns paths that must survive trimming (the examples Gradio copied into its cache).
    """

    def __init__(self, max_files: int = MAX_FILES, max_megabytes: float = MAX_MEGABYTES,
                 min_age_s: float = MIN_AGE_S, keep=lambda: (), trim_every_s: float = 1.0):
        self.max_files = max_files
        self.max_bytes = int(max_megabytes * 2**20)
        self.min_age_s = min_age_s
        self.keep = keep
        self.trim_every_s = trim_every_s     # a run writes ~10 files: walk the cache once, not ten times
        self._trim_lock = threading.Lock()
        self._last_trim = 0.0

    @property
    def folder(self) -> Path:
        return cache_root() / OUTPUT_FOLDER

    def write(self, data: bytes, stem: str, suffix: str) -> str:
        """The path of a file holding `data`: an existing one with this content, or a new one."""
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
        try:
            os.utime(path)          # already there, complete: mark it as fresh for trimming
        except FileNotFoundError:
            handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{stem}-", suffix=".part")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(data)
                os.replace(staging, path)   # atomic: readers see no file or the whole file
            except BaseException:
                Path(staging).unlink(missing_ok=True)
                raise
        if time.monotonic() - self._last_trim >= self.trim_every_s:
            self.trim()
        return str(path)

    def image(self, image: Image.Image, stem: str = "image") -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.write(buffer.getvalue(), stem, ".png")

    def gallery(self, items, stem: str = "image") -> list[tuple[str, str]]:
        """[(PIL image, caption)] -> [(path, caption)]."""
        return [(self.image(image, stem), caption) for image, caption in items]

    def over_caps(self) -> bool:
        """Trim the cache folder now; whether it is still over its caps (all of it too young to go)."""
        _, count, size = self._trim()
        return count > self.max_files or size > self.max_bytes

    def trim(self) -> int:
        """Remove the oldest files of the cache folder beyond the caps; returns how many went."""
        return self._trim()[0]

    def _trim(self) -> tuple[int, int, int]:
        with self._trim_lock:
            self._last_trim = time.monotonic()
            return _trim_folder(cache_root(), self.max_files, self.max_bytes, self.min_age_s, set(self.keep()))


def _files(root: Path) -> list[tuple[float, int, Path]]:
    """(modification time, size, path) of every file under `root`."""
    files = []
    for path in Path(root).rglob("*"):
        try:
            stat = path.stat()
        except OSError:      # removed meanwhile
            continue
        if path.is_file():
            files.append((stat.st_mtime, stat.st_size, path))
    return files


def trim_folder(root: Path, max_files: int, max_bytes: int, min_age_s: float, keep=frozenset(),
                now: float | None = None) -> int:
    """Delete files under `root`, oldest (by modification time) first, until at most `max_files` files
    and `max_bytes` bytes remain, never a file in `keep` or one modified less than `min_age_s` ago.
    Folders left empty are removed. Returns the number of files deleted."""
    return _trim_folder(root, max_files, max_bytes, min_age_s, keep, now)[0]


def _trim_folder(root, max_files, max_bytes, min_age_s, keep=frozenset(), now=None) -> tuple[int, int, int]:
    """trim_folder's work: (files deleted, files left, bytes left), from one walk of the folder."""
    now = time.time() if now is None else now
    keep = {str(Path(p).resolve()) for p in keep}
    files = _files(root)
    count, size = len(files), sum(f[1] for f in files)
    removed = 0
    for mtime, bytes_, path in sorted(files, key=lambda f: f[0]):
        if count <= max_files and size <= max_bytes:
            break
        if now - mtime < min_age_s or str(path.resolve()) in keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        count, size, removed = count - 1, size - bytes_, removed + 1
        parent = path.parent
        if parent != Path(root) and not any(parent.iterdir()):
            try:
                parent.rmdir()
            except OSError:
                pass
    return removed, count, size


def gradio_keeps(demo) -> set[str]:
    """Files Gradio keeps in its cache for this Blocks (the examples' images)."""
    kept = set()
    for block in getattr(demo, "blocks", {}).values():
        kept.update(getattr(block, "keep_in_cache", ()) or ())
    return kept


STORE = FileStore()


class TrimBeforeUpload:
    """ASGI middleware: before each POST to Gradio's upload route, trim the cache folder; while it
    is still over its caps (everything in it younger than MIN_AGE_S), refuse the upload with a sentence.

    Gradio's /upload writes the file itself and calls nothing of the app's, so this is where the app
    sees uploads: the cache stays within its caps plus one upload, whatever a client sends.
    """

    FULL = ("The server's space for uploads is full right now (many uploads in the last minutes). Wait a "
            "minute or two, then upload again.")

    def __init__(self, app, store: FileStore):
        self.app = app
        self.store = store

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").endswith("/upload"):
            import anyio
            from starlette.responses import JSONResponse

            if await anyio.to_thread.run_sync(self.store.over_caps):
                return await JSONResponse({"error": self.FULL}, status_code=507)(scope, receive, send)
        return await self.app(scope, receive, send)
