"""`--model transprune` in lmms-eval: declared as an entry point, found by lmms-eval, runs a local task offline.

Needs lmms-eval (the `eval` extra, or `scripts/test_lmms_eval.sh`, which installs the pinned
requirements-lmms-eval.txt); every test but the pyproject check skips cleanly without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_declares_the_entry_point_and_the_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"] == {"transprune": "transprune.lmms_eval:manifest"}
    assert any(r.startswith("lmms-eval") for r in project["optional-dependencies"]["eval"])


def test_nothing_else_imports_lmms_eval():
    users = [p.name for p in (REPO / "transprune").rglob("*.py") if "lmms_eval" in p.read_text()
             and any(line.lstrip().startswith(("import lmms_eval", "from lmms_eval"))
                     for line in p.read_text().splitlines())]
    assert users == ["lmms_eval.py"]


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'transprune[eval]')")


def test_entry_point_is_discoverable(lmms_eval):
    try:
        importlib.metadata.distribution("transprune")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("transprune is not pip-installed here, so its entry points are not on the path "
                    "(python -m transprune.lmms_eval registers the model instead)")
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert points.get("transprune") == "transprune.lmms_eval:manifest"
    from lmms_eval import models
    assert "transprune" in models.list_available_models()
    assert models.get_model("transprune").__name__ == "TransPrune"


def test_launcher_registers_the_model(lmms_eval):
    from lmms_eval import models

    from transprune import lmms_eval as plugin
    plugin.register()
    cls = models.get_model("transprune")
    assert cls is plugin.TransPrune and cls.is_simple
    with pytest.raises(ValueError, match="Unknown model_args"):
        cls.create_from_arg_string("pretrained=tiny-llava,nonsense=1")
    with pytest.raises(ValueError, match="Unknown method"):
        cls.create_from_arg_string("pretrained=tiny-llava,preset=nonsense")


def _task(folder: Path, n: int = 6) -> list[dict]:
    """A generate_until task of shape-scene questions: YAML + utils.py + a JSONL dataset + PNG images."""
    from transprune.shapes import scenes

    folder.mkdir(parents=True)
    rows = []
    for i, example in enumerate(scenes.dataset(5, n)):
        example.image.save(folder / f"{i}.png")
        rows.append(dict(question_id=i, image=f"{i}.png", question=example.question.text,
                         answer=example.question.answer))
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tp_shapes.yaml").write_text(textwrap.dedent(f"""\
        task: tp_shapes
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "data.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0.0
        """))
    (folder / "utils.py").write_text(textwrap.dedent("""\
        import os
        from PIL import Image

        HERE = os.path.dirname(os.path.abspath(__file__))


        def doc_to_visual(doc):
            return [Image.open(os.path.join(HERE, doc["image"])).convert("RGB")]


        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]


        def process_results(doc, results):
            return {"exact_match": float(results[0].strip().lower().strip(".") == doc["answer"].lower())}
        """))
    return rows


def test_local_task_runs_offline_and_agrees_with_transprune_eval(lmms_eval, tmp_path):
    """lmms-eval's own CLI through the launcher, on a task defined here, against `python -m transprune.eval`."""
    rows = _task(tmp_path / "task")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "transprune.lmms_eval", "--model", "transprune",
               "--model_args", "pretrained=shapes-llava,preset=high", "--tasks", "tp_shapes",
               "--include_path", str(tmp_path / "task"), "--output_path", str(tmp_path / "out"),
               "--batch_size", "1", "--device", "cpu", "--log_samples"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    [results_file] = (tmp_path / "out").rglob("*_results.json")
    accuracy = json.loads(results_file.read_text())["results"]["tp_shapes"]["exact_match,none"]

    from transprune import eval as eval_cli
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = eval_cli.main(["--questions", str(tmp_path / "q.jsonl"), "--images", str(tmp_path / "task"),
                          "--model", "shapes-llava", "--methods", "high", "--out", str(tmp_path / "ours"),
                          "--max-new-tokens", "3"])
    assert accuracy == pytest.approx(ours["high"]["accuracy"])
    assert accuracy >= 0.5       # the trained model answers most of them under High
