"""A real browser against the running app: upload an example, Run, wait for both answers, click a
patch, save screenshots.

Needs Chromium from the distribution (`apt-get install -y chromium`) and playwright from pip
(`pip install playwright`; never `playwright install`: no browser download). Skipped only when
one of them is absent. Screenshots go to $TRANSPRUNE_SCREENSHOT_DIR (default out/screenshots/).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install -y chromium)")


@contextlib.contextmanager
def _served(serve_app, temp, model: str, **build_kwargs):
    """The demo served (conftest's serve_app) with one torch thread: the browser needs the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with serve_app(temp, model, **build_kwargs) as (address, _):
            yield address
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def url(tmp_path_factory, serve_app):
    # The offline default: real answers on screen.
    with _served(serve_app, tmp_path_factory.mktemp("gradio"), "shapes-llava") as address:
        yield address


VIEWPORTS = {"desktop": {"width": 1440, "height": 900}, "phone": {"width": 390, "height": 844}}


def _shots() -> Path:
    shots = Path(os.environ.get("TRANSPRUNE_SCREENSHOT_DIR", ROOT / "out" / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@contextlib.contextmanager
def _page(address: str, viewport: dict, ready: str = "#run"):
    """A Chromium page on `address` at `viewport`, once `ready` is on it; the browser closes afterwards."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport=viewport)
            page.goto(address, wait_until="load")
            page.wait_for_selector(ready, timeout=60_000)
            yield page
        finally:
            browser.close()


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def test_browser_run_and_screenshot(url):
    from components import examples

    shots = _shots()
    image_path, question = examples.example_rows()[0][:2]
    with _page(url, {"width": 1600, "height": 1200}) as page:
        page.locator("#input-image input[type=file]").set_input_files(image_path)
        page.locator("#input-image img").first.wait_for(timeout=30_000)
        page.locator("#question textarea").fill(question)
        page.locator("#run").click()
        page.wait_for_function(
            "() => { const v = document.querySelector('#verdict');"
            " return v && v.innerText.includes('visual tokens'); }", timeout=120_000)
        baseline, pruned = _text(page, "#answer-baseline"), _text(page, "#answer-pruned")
        assert baseline and pruned, "both answers must be shown"
        assert "Prefill speedup" in _text(page, "#metrics-table")
        assert page.locator("#stage-gallery img").count() >= 3
        assert page.locator("#heatmap-gallery img").count() >= 1

        # A presenter clicks the middle of the overlay: that patch's scores appear per stage.
        inspect = page.locator("#inspect-image img").first
        inspect.scroll_into_view_if_needed()
        box = inspect.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_function(
            "() => document.querySelector('#patch-table').innerText.includes('kept') ||"
            " document.querySelector('#patch-table').innerText.includes('pruned')", timeout=30_000)

        # ... and switches the heatmaps to the last stage.
        last = page.locator("#heat-stage label").last
        last.scroll_into_view_if_needed()
        last.click()
        layer = last.inner_text().split("layer")[-1].strip()
        page.wait_for_function(
            f"() => document.querySelector('#heatmap-gallery').innerText.includes('after layer {layer}')",
            timeout=30_000)

        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")   # let lazy images load
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "app-full.png"), full_page=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        page.screenshot(path=str(shots / "app.png"))
    assert (shots / "app.png").stat().st_size > 10_000


def test_a_failed_self_check_shows_one_warning_line(tmp_path_factory, serve_app):
    """The start-up self-check (transprune.doctor) runs in the background; its warning reaches the page."""
    import transformers

    from components import health
    from transprune import doctor

    def failing():
        return doctor.Report(versions=doctor.versions(), device="cpu", transformers_tested=True, checks=[
            doctor.Check("llava: high vs reference", False, "pruned decoding differs from the reference.")])
    with _served(serve_app, tmp_path_factory.mktemp("gradio"), "tiny-llava",
                 self_check=health.StartupCheck(failing)) as address, \
            _page(address, VIEWPORTS["desktop"], ready="#health-warning") as page:
        warning = page.locator("#health-warning")
        text = warning.inner_text()
        assert f"Self-check failed with transformers {transformers.__version__}" in text
        assert "pip install -r requirements.txt" in text
        assert warning.bounding_box()["y"] < 900, "the warning must be visible without scrolling"
        page.screenshot(path=str(_shots() / "app-self-check-warning.png"))


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=list(VIEWPORTS))
def test_hero_first_and_no_horizontal_scroll(url, viewport):
    """The answers and the verdict are on screen without scrolling; the page never scrolls sideways."""
    size = VIEWPORTS[viewport]
    with _page(url, size) as page:
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"]
        page.locator("#run").click()
        page.wait_for_function(
            "() => { const v = document.querySelector('#verdict');"
            " return v && v.innerText.includes('visual tokens'); }", timeout=120_000)
        page.wait_for_timeout(500)
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"], \
            "the page scrolls sideways after a run"
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        for selector in ("#verdict", "#answer-baseline", "#answer-pruned"):
            box = page.locator(selector).bounding_box()
            assert box["y"] + box["height"] <= size["height"] + 1, f"{selector} is below the fold"
            assert box["x"] >= 0 and box["x"] + box["width"] <= size["width"] + 1
        verdict = _text(page, "#verdict")
        assert "144 → 18" in verdict and "held-out" in verdict
        assert "×" not in verdict.split("held-out")[0] or "real size" in verdict   # no toy speed headline
        page.screenshot(path=str(_shots() / f"app-{viewport}.png"))


def test_speed_at_real_size_panel_runs(url):
    """Times the chosen schedule on LLaVA-1.5-7B's shape (quarter width on a CPU): only that it ran and
    gave a finite figure is asserted here; the measured value goes in the README, not in a test."""
    import re

    with _page(url, VIEWPORTS["desktop"], ready="#speed-run") as page:
        page.locator("#speed-run").click()
        page.wait_for_function("() => document.querySelector('#speed-result').innerText.includes('faster "
                               "prefill') || document.querySelector('#speed-result').innerText.includes('⚠')",
                               timeout=300_000)
        text = _text(page, "#speed-result")
        match = re.search(r"([\d.]+)× faster prefill at real size", text)
        assert match, text
        assert 0 < float(match.group(1)) < 100 and "analytic bound" in text
        print(f"\nspeed at real size (browser): {match.group(0)}")
        # The next run's verdict carries the real-size figure instead of the toy model's.
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('at real size')",
                               timeout=120_000)


def test_an_error_is_one_inline_sentence_in_the_result_area(url):
    """An empty question after a good run: the sentence replaces the verdict, no toast, no red badge on
    the panels, and nothing of the earlier run (table, overlays, images) is left to read as this one's."""
    with _page(url, VIEWPORTS["desktop"]) as page:
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('visual tokens')",
                               timeout=120_000)
        assert page.locator("#stage-gallery img").count() > 0 and "Visual tokens in" in _text(page, "#metrics-table")
        page.locator("#question textarea").fill("   ")
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('Could not run')",
                               timeout=60_000)
        page.wait_for_timeout(1500)
        assert page.locator("#stage-gallery img").count() == 0, "an earlier run's overlays are still shown"
        assert page.locator("#inspect-image img").count() == 0
        assert "Visual tokens in" not in _text(page, "#metrics-table")
        verdict = _text(page, "#verdict")
        assert "question is empty" in verdict.lower() or "empty" in verdict.lower(), verdict
        assert page.locator(".toast-body").count() == 0, "the error must not (also) be a toast"
        for selector in ("#verdict", "#answer-baseline", "#answer-pruned"):
            assert "Error" not in page.locator(selector).inner_text(), f"red badge on {selector}"
        page.screenshot(path=str(_shots() / "app-error.png"))
        # The message stays until the next run, which replaces it with the answers.
        page.locator("#question textarea").fill("What color is the circle?")
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('visual tokens')",
                               timeout=120_000)


def test_a_bad_upload_is_one_inline_sentence_saying_what_to_upload(url, tmp_path):
    """A text file named .png fails while Gradio reads the inputs (before the handler): the page still
    shows the sentence about the file inline, not a generic one, and no toast."""
    junk = tmp_path / "holiday.png"
    junk.write_text("definitely not a PNG")
    with _page(url, VIEWPORTS["desktop"]) as page:
        page.locator("#input-image input[type=file]").set_input_files(str(junk))
        page.wait_for_timeout(1500)
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('Could not run')",
                               timeout=60_000)
        page.wait_for_timeout(1500)
        verdict = _text(page, "#verdict")
        assert "not an image this app can read" in verdict, verdict
        assert "/tmp" not in verdict and page.locator(".toast-body").count() == 0
        page.screenshot(path=str(_shots() / "app-bad-upload.png"))


def test_every_example_agrees_in_the_browser_except_the_control(url):
    """Click each example row (it fills image, question, method and budget), run, read the verdict."""
    from components import examples

    with _page(url, VIEWPORTS["desktop"]) as page:
        for example in examples.EXAMPLES:
            page.get_by_text(example.label, exact=True).click()
            page.wait_for_function(
                "(q) => document.querySelector('#question textarea').value === q", arg=example.scene.question,
                timeout=30_000)
            page.locator("#run").click()
            page.wait_for_function(
                "(q) => { const v = document.querySelector('#verdict').innerText;"
                " return v.includes('visual tokens') && v.includes(q); }", arg=example.scene.question,
                timeout=120_000)
            verdict = _text(page, "#verdict")
            expected = "Answers differ" if example.control else "Same answer"
            assert expected in verdict, (example.label, verdict)


CLIPPED_JS = """() => {
  // Text cut off by its own box: labels, buttons, tabs and text inputs whose text is wider than they are
  // and that hide what does not fit (an input always does; others by overflow or an ellipsis).
  const out = [];
  for (const el of document.querySelectorAll('label span, button, [role=tab], input[type=text], textarea')) {
    const style = getComputedStyle(el), text = (el.value || el.innerText || '').trim();
    if (!text || el.getBoundingClientRect().width === 0 || style.visibility === 'hidden') continue;
    const hides = el.tagName === 'INPUT' || el.tagName === 'TEXTAREA' || style.overflowX !== 'visible'
                  || style.textOverflow === 'ellipsis';
    if (hides && el.scrollWidth > el.clientWidth + 1) out.push((el.id || el.tagName) + ': ' + text.slice(0, 40));
  }
  return out;
}"""
DUPLICATE_IDS_JS = """() => { const seen = {}; for (const e of document.querySelectorAll('[id]')) if (e.id) seen[e.id] = (seen[e.id] || 0) + 1;
  return Object.keys(seen).filter(k => seen[k] > 1); }"""


@pytest.mark.parametrize("viewport", list(VIEWPORTS) + ["projector"])
def test_first_screen_run_then_answers_with_a_labelled_real_size_figure(url, viewport):
    """Without pressing anything but Run: Run is on the first screen, then both answers and a real-size
    speed figure labelled with where it was measured; no duplicate ids, no clipped text."""
    size = VIEWPORTS.get(viewport, {"width": 1280, "height": 720})
    with _page(url, size) as page:
        box = page.locator("#run").bounding_box()
        assert box["y"] + box["height"] <= size["height"], "Run is below the first screen"
        assert page.evaluate(DUPLICATE_IDS_JS) == []
        assert page.evaluate(CLIPPED_JS) == []
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('visual tokens')",
                               timeout=120_000)
        verdict = _text(page, "#verdict")
        assert "at real size" in verdict and ("recorded on" in verdict or "measured by this server" in verdict)
        assert "faster prefill at real size" in _text(page, "#speed-result")
        if viewport == "phone":
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
        assert page.evaluate(CLIPPED_JS) == []
        assert page.evaluate(DUPLICATE_IDS_JS) == []
        page.screenshot(path=str(_shots() / f"app-first-screen-{viewport}.png"))


def test_the_video_example_runs_in_one_click(url):
    """The video example replaces the preloaded image, shows the video tab, picks a video model; Run
    answers, the verdict's and the table's token counts agree, and so do the verdict's and the panel's
    speed figure."""
    import re

    with _page(url, VIEWPORTS["desktop"]) as page:
        page.get_by_text("Video: a red circle moves", exact=True).click()
        page.wait_for_function("() => document.querySelector('#tab-video') && "
                               "[...document.querySelectorAll('[role=tab]')].some(t => t.innerText.includes('Video')"
                               " && t.getAttribute('aria-selected') === 'true')", timeout=30_000)
        page.wait_for_timeout(1500)
        assert page.locator("#input-image img").count() == 0, "the example image must make way for the video"
        assert "Video-LLaVA" in page.locator("#model input").input_value() or \
            "Qwen" in page.locator("#model input").input_value()
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('visual tokens')",
                               timeout=180_000)
        verdict = _text(page, "#verdict")
        final = int(re.search(r"→ (\d+) visual tokens", verdict).group(1))
        assert re.search(rf"\b{final}\b", _text(page, "#metrics-table")), "the table must show the verdict's count"
        # The verdict quotes the panel's figure, which LLaVA-1.5-7B's shape times for this family's prompts.
        assert "standing in for this family's longer prompts" in verdict
        figure = re.search(r"([\d.]+)×\*?\*? prefill at real size", verdict).group(1)
        panel = _text(page, "#speed-result")
        assert f"{figure}× faster prefill at real size" in panel and "stands in" in panel
        page.screenshot(path=str(_shots() / "app-video-example.png"))
        # An image example afterwards: the image replaces the video, the default model comes back, Run works.
        page.get_by_text("Colour: red circle, blue square", exact=True).click()
        page.wait_for_function("() => document.querySelector('#model input').value.includes('Shapes LLaVA')",
                               timeout=30_000)
        page.wait_for_timeout(1500)
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('Same answer')",
                               timeout=180_000)


@pytest.mark.parametrize("viewport", VIEWPORTS, ids=list(VIEWPORTS))
def test_compare_all_methods_shows_the_frontier_without_widening_the_page(url, viewport):
    """The accordion opens on the bundled figure and its table (every row), and its wide table scrolls
    inside its box: the page never scrolls sideways, on a phone either."""
    size = VIEWPORTS[viewport]
    with _page(url, size) as page:
        page.locator("#frontier button").first.click()
        page.wait_for_selector("#frontier-figure img", timeout=30_000)
        page.wait_for_function("() => document.querySelector('#frontier-table')?.innerText.includes('cdpruner-64')",
                               timeout=30_000)
        table = _text(page, "#frontier-table")
        assert "random-64" in table and "positions" in table and "Command:" in table
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"], \
            "the frontier's table widens the page"
        page.locator("#frontier-figure").scroll_into_view_if_needed()
        page.screenshot(path=str(_shots() / f"app-frontier-{viewport}.png"))
