"""`python -m transprune.eval --questions`: scoring by hand, question files, bad data, resume, two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transprune import eval as eval_cli
from transprune import eval_questions
from transprune.config import ConfigError
from transprune.eval_data import DataError, read_questions
from transprune.eval_metrics import (is_correct, is_yes_no, normalize, summarize, summarize_by_category, yes_no,
                                     yes_no_metrics)

from transprune.shapes import scenes

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- metrics, by hand
@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a cat.", "yes"), ("No.", "no"), ("no, there is none", "no"), ("There is not a cat", "no"),
    ("Yes. No dog though.", "yes"),          # only the first sentence counts (LLaVA's eval_pope.py)
    ("Nope", "yes"), ("NO", "yes"),          # ... and only the words No / no / not mean no
    ("", "yes"),
])
def test_yes_no_reads_answers_like_llava_pope(text, expected):
    assert yes_no(text) == expected


def test_yes_no_metrics_hand_checked():
    predictions = ["Yes", "yes", "No", "no", "Yes, it is"]
    answers = ["yes", "no", "no", "yes", "yes"]
    # TP: 1st, 5th; FP: 2nd; TN: 3rd; FN: 4th.
    m = yes_no_metrics(predictions, answers)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)


def test_yes_no_metrics_empty_denominators_are_zero():
    m = yes_no_metrics(["no", "no"], ["no", "no"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_exact_match_normalizes_case_space_and_end_punctuation():
    assert normalize("  The   Cat. ") == "the cat"
    assert is_correct("The Cat.", "the cat", yes_no_data=False)
    assert is_correct("(A)", "A", yes_no_data=False)
    assert not is_correct("cats", "cat", yes_no_data=False)
    assert is_correct("No, there is not.", "no", yes_no_data=True)
    assert is_yes_no(["Yes", "no."]) and not is_yes_no(["yes", "maybe"]) and not is_yes_no([])


def test_summary_counts_errors_and_scores_the_rest():
    records = [dict(prediction="yes", answer="yes", correct=True, error=None, tflops=1.0, category="a"),
               dict(prediction="yes", answer="no", correct=False, error=None, tflops=3.0, category="a"),
               dict(prediction="no", answer="no", correct=True, error=None, tflops=2.0, category="b"),
               dict(prediction=None, answer="yes", correct=False, error="image not found: x.jpg", tflops=None,
                    category="b")]
    s = summarize(records, yes_no_data=True)
    assert (s["n"], s["scored"], s["errors"]) == (4, 3, 1)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["tflops"] == pytest.approx(2.0)
    assert s["precision"] == pytest.approx(1 / 2) and s["recall"] == 1.0 and s["f1"] == pytest.approx(2 / 3)
    by = summarize_by_category(records, yes_no_data=True)
    assert by["a"]["accuracy"] == 0.5 and (by["b"]["n"], by["b"]["errors"], by["b"]["accuracy"]) == (2, 1, 1.0)
    plain = summarize(records[:3], yes_no_data=False)
    assert "f1" not in plain and plain["accuracy"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------- question files
def _write_jsonl(path: Path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_question_file_spellings_and_bad_lines(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [
        dict(question_id=7, image="a.png", text="Is it red?", label="yes", category="random"),
        dict(id="x", question="What colour?", answer="red"),                 # the other spellings, text only
        "{broken",
        "",
        dict(question_id=8, image="b.png", label="no"),                      # no question
        dict(question_id=9, image="c.png", text="Is it?"),                   # no gold answer
        dict(question_id=7, image="d.png", text="Again?", label="no"),       # duplicate id
        "[1, 2]",
    ])
    questions = read_questions(path)
    assert [q.id for q in questions] == ["7", "x", "line-3", "8", "9", "7#2", "line-8"]
    assert questions[0].error is None and questions[0].category == "random" and questions[0].image == "a.png"
    assert questions[1].error is None and questions[1].image is None and questions[1].answer == "red"
    errors = [q.error for q in questions[2:]]
    assert "not valid JSON" in errors[0] and "no question" in errors[1] and "no gold answer" in errors[2]
    assert "duplicate question id '7'" in errors[3] and "JSON object" in errors[4]


def test_unreadable_question_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="Cannot read the question file"):
        read_questions(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no questions"):
        read_questions(_write_jsonl(tmp_path / "empty.jsonl", ["", " "]))


def test_pope_annotations_by_id_and_by_category_folder(tmp_path):
    questions = _write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        dict(question_id=1, image="a.png", text="Is there a dog?", category="random"),
        dict(question_id=2, image="a.png", text="Is there a cat?", category="adversarial"),
        dict(question_id=3, image="b.png", text="Is there a car?", category="random"),
    ])
    by_id = _write_jsonl(tmp_path / "labels.jsonl", [dict(question_id=3, label="no"), dict(question_id=1, label="yes"),
                                                     dict(question_id=2, answer="yes")])
    assert [q.answer for q in read_questions(questions, by_id)] == ["yes", "yes", "no"]
    folder = tmp_path / "coco"
    folder.mkdir()
    _write_jsonl(folder / "coco_pope_random.json", [dict(question_id=1, label="no"), dict(question_id=2, label="yes")])
    _write_jsonl(folder / "coco_pope_adversarial.json", [dict(question_id=1, label="no")])
    assert [q.answer for q in read_questions(questions, folder)] == ["no", "no", "yes"]
    _write_jsonl(folder / "coco_pope_adversarial.json", [dict(label="no"), dict(label="yes")])
    with pytest.raises(DataError, match="1 questions but 2 annotations"):
        read_questions(questions, folder)


def test_method_names_follow_the_bench():
    assert eval_questions.method_factory("baseline")("1") is None
    high = eval_questions.method_factory("high")("1")
    assert high.keep_ratios == (0.875, 0.625, 0.125) and high.criterion == "transprune" and high.positions is None
    assert eval_questions.method_factory("ttv")("1").criterion == "ttv"
    iga_low = eval_questions.method_factory("iga-low-original")("1")
    assert (iga_low.criterion, iga_low.keep_ratios[0], iga_low.positions) == ("iga", 0.5, "original")
    assert eval_questions.method_factory("visionzip-128+high")("1").pre_llm_keep == pytest.approx(128 / 576)
    random = eval_questions.method_factory("random")
    assert random("a").seed == random("a").seed != random("b").seed     # per question, not per process
    with pytest.raises(ConfigError, match="Unknown method 'nonsense'"):
        eval_questions.check_methods(["nonsense"], 16)


# ------------------------------------------------------------------------------------- end to end
def _dataset(root: Path, n_good: int = 4) -> tuple[Path, Path]:
    """Shape scenes the shipped shapes-llava answers (yes/no "is there" questions: POPE-like), plus bad data."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    examples = [e for e in scenes.dataset(5, 5 * n_good) if e.question.qtype == "exists"]
    for i, example in enumerate(examples):
        example.image.save(images / f"{i}.png")
        lines.append(dict(question_id=i, image=f"{i}.png", text=example.question.text, label=example.question.answer,
                          category=("random", "popular")[i % 2]))
    (images / "broken.png").write_bytes(b"not a png")
    lines += [dict(question_id="gone", image="missing.png", text="Is there a red square?", label="yes"),
              dict(question_id="broken", image="broken.png", text="Is there a red square?", label="no"),
              "{malformed"]
    return _write_jsonl(root / "questions.jsonl", lines), images


def _run(questions, images, out, methods="baseline,high"):
    return eval_cli.main(["--questions", str(questions), "--images", str(images), "--model", "shapes-llava",
                          "--methods", methods, "--out", str(out), "--max-new-tokens", "3", "--threads", "1"])


def test_cli_reports_bad_data_and_resumes(tmp_path, monkeypatch, capsys):
    questions, images = _dataset(tmp_path)
    out = tmp_path / "out"
    asked = []
    real = eval_questions.answer_question
    monkeypatch.setattr(eval_questions, "answer_question",
                        lambda lm, q, *a, **k: asked.append(q.id) or real(lm, q, *a, **k))
    summary = _run(questions, images, out)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for method in ("baseline", "high"):
        record = summary[method]
        assert (record["n"], record["errors"], record["scored"]) == (7, 3, 4)
        assert {"accuracy", "tflops", "precision", "recall", "f1"} <= set(record)
        assert set(record["per_category"]) == {"random", "popular"}
        lines = [json.loads(l) for l in (out / f"answers-{method}.jsonl").read_text().splitlines()]
        assert [l["id"] for l in lines] == ["0", "1", "2", "3", "gone", "broken", "line-7"]
        assert all(set(eval_questions.ANSWER_FIELDS) <= set(l) for l in lines)
        errors = {l["id"]: l["error"] for l in lines if l["error"]}
        assert "image not found" in errors["gone"] and "cannot read image" in errors["broken"]
        assert "not valid JSON" in errors["line-7"]
        assert all(l["prediction"] is not None and l["tflops"] > 0 for l in lines if not l["error"])
    assert summary["high"]["tflops"] < summary["baseline"]["tflops"]
    assert summary["baseline"]["accuracy"] >= 0.75       # the trained model does answer these
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "| baseline | 7 | 3 |" in stdout and json.loads(stdout.strip().splitlines()[-1])["processes"] == 1
    # Every method tried the four good questions and the two image errors (the malformed line is never asked).
    assert sorted(asked) == sorted(["0", "1", "2", "3", "gone", "broken"] * 2)

    # Rerun: answered questions are skipped, errors tried again, figures unchanged.
    asked.clear()
    again = _run(questions, images, out)
    assert sorted(asked) == sorted(["gone", "broken"] * 2)
    assert again == summary

    # An interrupted run leaves part files: they count as done; a fixed image is answered on the rerun.
    high = (out / "answers-high.jsonl").read_text().splitlines()
    (out / "answers-high.jsonl").unlink()
    (out / "answers-high.part1.jsonl").write_text("\n".join(high[:2]) + "\n{half a li")
    shutil.copy(images / "0.png", images / "missing.png")
    asked.clear()
    fixed = _run(questions, images, out, methods="high")
    assert sorted(asked) == ["2", "3", "broken", "gone"]
    assert fixed["high"]["errors"] == 2 and not list(out.glob("*.part*"))


def test_cli_rejects_unknown_method_and_missing_out(tmp_path):
    questions, images = _dataset(tmp_path, n_good=1)
    with pytest.raises(SystemExit, match="Unknown method 'nonsense'"):
        _run(questions, images, tmp_path / "out", methods="baseline,nonsense")
    with pytest.raises(SystemExit, match="--out"):
        eval_cli.main(["--questions", str(questions)])


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_same_answers_and_metrics(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (two processes over gloo, on the CPU here; accelerate's
    own `--cpu` flag would start only one) against one process, on the same questions."""
    questions, images = _dataset(tmp_path, n_good=4)
    methods = "baseline,high,random"
    one = _run(questions, images, tmp_path / "one", methods=methods)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # accelerate's CLI as a module of this interpreter, so the processes run in this environment.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(_free_port()), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "transprune.eval", "--questions", str(questions), "--images",
               str(images), "--model", "shapes-llava", "--methods", methods, "--out", str(tmp_path / "two"),
               "--max-new-tokens", "3", "--threads", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["processes"] == 2
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two == json.loads(json.dumps(one))
    for method in methods.split(","):
        assert ((tmp_path / "two" / f"answers-{method}.jsonl").read_text()
                == (tmp_path / "one" / f"answers-{method}.jsonl").read_text())


def test_registry_names_load_real_checkpoints_with_device_map(monkeypatch):
    """--model llava-1.5-7b goes to from_pretrained("llava-hf/llava-1.5-7b-hf"); --device-map auto is passed on."""
    import transformers

    from transprune import models

    calls = []

    class FakeModel:
        @classmethod
        def from_pretrained(cls, checkpoint, **kwargs):
            calls.append((checkpoint, kwargs))
            return cls()

        def to(self, *args, **kwargs):
            raise AssertionError("a model placed by device_map must not be moved")

        def eval(self):
            return self

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name: transformers.LlavaConfig())
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda name: "processor")
    family = models.adapters.FAMILIES[models.REGISTRY["llava-1.5-7b"].family]
    monkeypatch.setattr(family, "model_class", classmethod(lambda cls, config=None: FakeModel))
    loaded = models.load("llava-1.5-7b", dtype="float16", device_map="auto")
    assert calls == [("llava-hf/llava-1.5-7b-hf", dict(dtype=torch.float16, device_map="auto"))]
    assert loaded.processor == "processor"


def test_gpu_check_script_parses_and_its_commands_exist():
    """scripts/gpu_check.sh cannot run here; its syntax and every flag it hands our CLIs are checked
    (the whole script runs on a CPU with --dry-run, in about two minutes)."""
    from transprune import bench

    for script in ("gpu_check.sh", "gpu_wheels.sh", "test_lmms_eval.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert "set -euo pipefail" in text and "timeout" in text and "gpu_check_$stamp.json" in text
    bench.parser().parse_args(["--arch", "llava-1.5-7b", "--device", "cuda", "--dtype", "float16", "--repeats", "5",
                               "--decode-repeats", "2", "--new-tokens", "16", "--scoring-repeats", "2", "--attn",
                               "flash_attention_2", "--methods", "baseline,fastv,pdrop,high,low", "--json", "x.json",
                               "--plot", "x.png"])
    eval_cli.parser().parse_args(["--questions", "q.jsonl", "--images", "i", "--model", "shapes-llava", "--methods",
                                  "baseline,high,low", "--max-new-tokens", "3", "--out", "o"])
