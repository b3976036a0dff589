"""The installation self-check at start-up: `transprune.doctor.self_check()` once per process, in a
background thread so the first page is not delayed, and a one-line warning on the page when it
fails or the installed transformers lies outside the tested range (nothing is shown otherwise).
"""

from __future__ import annotations

import threading

import gradio as gr

from transprune import doctor

WAIT_SECONDS = 120      # a page load waits at most this long for the check before showing nothing


class StartupCheck:
    """Runs `check` (default: the doctor's self-check) once, in the background, from construction."""

    def __init__(self, check=doctor.self_check):
        self.report: doctor.Report | None = None
        self.error: str | None = None
        self._done = threading.Event()
        # Not a daemon: a process that exits during the check waits the few seconds it has left rather
        # than killing torch mid-computation (which aborts the interpreter).
        self._thread = threading.Thread(target=self._run, args=(check,), name="transprune-self-check")
        self._thread.start()

    def _run(self, check):
        try:
            self.report = check()
        except Exception as error:  # the check reports its own failures; this is a last resort
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self._done.set()
            if self.warning:
                print(f"[transprune] {self.warning}")

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def warning(self) -> str | None:
        if self.error:
            return f"The installation self-check could not run ({self.error}); run `python -m transprune.doctor`."
        return self.report.warning if self.report else None

    def banner(self):
        """Event handler for page load: the warning line, shown only when there is one."""
        self.wait(WAIT_SECONDS)
        warning = self.warning
        return gr.update(value=f"⚠️ {warning}" if warning else "", visible=bool(warning))


_shared: StartupCheck | None = None
_lock = threading.Lock()


def startup_check() -> StartupCheck:
    """The process's one StartupCheck (the installation does not change while the app runs)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = StartupCheck()
        return _shared


def build() -> gr.Markdown:
    return gr.Markdown("", visible=False, elem_id="health-warning")
