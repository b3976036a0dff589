"""Compare all methods: every registered method's held-out accuracy against its cost, for the chosen model.

The figure and table are written by the library's own command (see FRONTIER_COMMAND), which answers
the held-out shapes questions unpruned and under every preset of every method, plus the random
control at every budget, and times each schedule's prefill on LLaVA-1.5-7B's language-model shape.
They are bundled per model as assets/frontier/<model>.png and .md; the app only shows them. Only a
model whose answers can be scored offline has one (shapes-llava); for the others the panel says how
to measure one's own data.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "assets" / "frontier"
FRONTIER_COMMAND = ("python -m transprune.eval --suite shapes --seed 1 --n 500 --threads 2 "
                    "--frontier assets/frontier/shapes-llava.png")
SUITE_MODEL = "shapes-llava"      # the built-in model whose held-out questions are scored offline
MISSING = ("The frontier of **shapes-llava** is not in this install. Make it with `{command}` (it writes "
           "assets/frontier/shapes-llava.png and .md; about 15 minutes on two CPU threads), then reload the page.")
NONE_YET = ("No frontier is bundled for **{model}**. The app bundles the one of `shapes-llava`, the built-in model "
            "whose held-out questions are scored offline (choose it in Model to see it). For **{model}**, score your "
            "own questions under every method: `python -m transprune.eval --questions FILE --images DIR "
            "--model {model} --methods baseline,high,low,dart,cdpruner-128 --out runs/mine` (docs/evaluation.md).")


def files_for(model: str | None) -> tuple[Path, Path] | None:
    """(figure, table) bundled for `model`, or None."""
    if not model:
        return None
    figure, table = FOLDER / f"{model}.png", FOLDER / f"{model}.md"
    return (figure, table) if figure.is_file() and table.is_file() else None


def results_for(model: str | None) -> Path | None:
    """The frontier's JSON for `model` (an eval JSON: a record per row, with its config), or None."""
    path = FOLDER / f"{model}.json" if model else None
    return path if path is not None and path.is_file() else None


def show(model: str | None):
    """The panel for `model`: (markdown, figure path or None)."""
    found = files_for(model)
    if found is None and model == SUITE_MODEL:
        return MISSING.format(command=FRONTIER_COMMAND), None
    if found is None:
        return NONE_YET.format(model=model or "this model"), None
    figure, table = found
    return (f"Every method's presets on the held-out shapes questions, against its analytic prefill cost at "
            f"LLaVA-1.5-7B's size; the number by each point is its measured CPU prefill speedup (its own run, "
            f"two threads: it can differ from the speed panel's figure). The dotted grey line is the random "
            f"control: a method is only worth its cost above it. Each row runs the positions its method was "
            f"released with (the table's *positions*); the verdict's held-out line runs this model's own "
            f"default, so the same method can score differently there. On a phone, scroll the figure and the "
            f"table sideways, or open the figure full screen.\n\n{table.read_text()}"), str(figure)


def build():
    """The closed accordion; returns (markdown, image) for the model-change event to fill."""
    import gradio as gr   # here, not at the top: the engine reads `results_for` without the UI (and without gradio)

    with gr.Accordion("Compare all methods: accuracy vs cost", open=False, elem_id="frontier"):
        # No fixed height: the figure takes the box's width and its own aspect (theme.CSS), so nothing is cut.
        figure = gr.Image(None, label="Accuracy vs TFLOPs", interactive=False, show_label=False,
                          buttons=["download", "fullscreen"], elem_id="frontier-figure")
        text = gr.Markdown("", elem_id="frontier-table")
    return text, figure
