"""The app's "Compare all methods" panel: the bundled frontier of the chosen model, or how to make one."""

from __future__ import annotations

from PIL import Image

from components import frontier
from transprune import eval as shapes_eval


def test_the_panel_shows_the_chosen_models_bundled_figure_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "FOLDER", tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "shapes-llava.png")
    (tmp_path / "shapes-llava.md").write_text("| row | method |\n|---|---|\n| dart | DART |\n")
    text, figure = frontier.show("shapes-llava")
    assert figure == str(tmp_path / "shapes-llava.png") and "| dart | DART |" in text
    assert "random control" in text and "speedup" in text
    text, figure = frontier.show("llava-1.5-7b")
    assert figure is None and "**llava-1.5-7b**" in text and "--questions" in text and "--model llava-1.5-7b" in text
    assert frontier.show(None)[1] is None
    (tmp_path / "shapes-llava.png").unlink()
    text, figure = frontier.show("shapes-llava")
    assert figure is None and frontier.FRONTIER_COMMAND in text and "not in this install" in text


def test_the_bundled_frontier_has_a_row_for_every_registered_method_and_budget():
    """A method registered after the figure was made fails here until the figure is made again
    (frontier.FRONTIER_COMMAND)."""
    figure, table = frontier.files_for("shapes-llava")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| row ")]
    assert sorted(rows) == sorted(shapes_eval.frontier_rows())
    assert f"Command: `{frontier.FRONTIER_COMMAND}`" in table.read_text()
