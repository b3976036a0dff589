"""Accuracy vs. budget on your own questions: `python -m transprune.eval --questions FILE --images DIR ...`.

    python -m transprune.eval --questions llava_pope_test.jsonl --annotations pope/coco --images val2014 \\
        --model llava-1.5-7b --methods baseline,high,low,fastv,pdrop --out runs/pope
    accelerate launch --multi_gpu --num_processes 8 -m transprune.eval --questions ... --out runs/pope  # 8 processes

For each method (the bench's names: "baseline", presets such as "high", "low", "fastv", "pdrop",
"random", "visionzip-64", stacks such as "visionzip-128+high"; "ttv"/"iga" = High scored by TTV or
IGA alone, "ttv-low"/"iga-low"; a "-original" or "-compact" suffix fixes the position mode) every
question is answered greedily through `LoadedModel.generate` and scored (eval_metrics). Writes
  OUT/answers-<method>.jsonl   one line per question: id, question, answer, prediction, correct, error, tflops
  OUT/summary.json             {method: {"n", "scored", "errors", "accuracy", "tflops", ...}}
  OUT/summary.png              accuracy against analytic TFLOPs
and prints a markdown table, then one JSON line.

Resumable: answered questions already in OUT (the answers file, or the per-process part files an
interrupted run leaves) are skipped; questions that ended in an error are tried again.
Data parallel: under `accelerate launch` each process answers every k-th remaining question on its
own device and appends to OUT/answers-<method>.part<rank>.jsonl; the main process gathers the
records, writes the answers file in question order and computes the figures, so they are the same
as a one-process run's. `--device-map auto` spreads one model over all visible GPUs (one process).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

from . import eval_metrics
from .config import ConfigError, PruneConfig
from .eval_data import ImageError, Question, load_image, read_questions
from .flops import Shape, config_tflops, model_shape, trace_tflops

ANSWER_FIELDS = ("id", "question", "answer", "prediction", "correct", "error")


class EvalError(ValueError):
    """The evaluation was asked for something it cannot do; the message says what to change."""


# ------------------------------------------------------------------------------------------- methods
def method_factory(name: str):
    """A function question id -> PruneConfig (None = unpruned) for a method name; ConfigError if unknown.

    "random" draws its keep-set from a seed derived from the question id, so a question gets the
    same mask however the questions are split over processes.
    """
    key = name.strip().lower()
    if key == "baseline":
        return lambda qid: None
    overrides = {}
    for suffix in ("-original", "-compact"):
        if key.endswith(suffix):
            key, overrides["positions"] = key[: -len(suffix)], suffix[1:]
    criterion, _, budget = key.partition("-")
    if criterion in ("ttv", "iga") and budget in ("", "high", "low"):
        key, overrides["criterion"] = budget or "high", criterion
    config = PruneConfig.preset(key, **overrides)     # raises ConfigError naming the presets
    if config.method == "random":
        return lambda qid: PruneConfig.preset(key, seed=zlib.crc32(str(qid).encode()), **overrides)
    return lambda qid: config


def check_methods(names: list[str], num_layers: int) -> dict:
    """{name: factory}, every schedule checked against the model's depth before anything runs."""
    factories = {}
    for name in names:
        try:
            factory = method_factory(name)
        except ConfigError as error:
            raise ConfigError(f"Unknown method {name!r}: {error} Or use baseline, ttv, iga.") from None
        config = factory("0")
        if config is not None:
            config.resolve(num_layers)
        factories[name] = factory
    return factories


# ------------------------------------------------------------------------------------------- answers files
def answers_path(out: Path, method: str) -> Path:
    return Path(out) / f"answers-{method}.jsonl"


def part_path(out: Path, method: str, rank: int) -> Path:
    return Path(out) / f"answers-{method}.part{rank}.jsonl"


def read_records(out: Path, method: str) -> dict[str, dict]:
    """{id: record} from the answers file and any part files of an interrupted run (later lines win).

    An unreadable line (a run killed mid-write) is ignored: that question is simply asked again.
    """
    records: dict[str, dict] = {}
    paths = [answers_path(out, method)] + sorted(Path(out).glob(f"answers-{method}.part*.jsonl"))
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                records[str(record["id"])] = record
    return records


def is_done(record: dict | None) -> bool:
    return record is not None and not record.get("error")


def write_answers(out: Path, method: str, records: list[dict]):
    """Write the answers file in one go (temporary file, then rename) and remove the part files."""
    path = answers_path(out, method)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    for part in Path(out).glob(f"answers-{method}.part*.jsonl"):
        part.unlink()


# ------------------------------------------------------------------------------------------- one question
def error_record(question: Question, error: str) -> dict:
    return _record(question, prediction=None, correct=False, error=error)


def _record(question: Question, prediction, correct, error, tflops=None, tflops_full=None) -> dict:
    record = dict(id=question.id, question=question.text, answer=question.answer, prediction=prediction,
                  correct=bool(correct), error=error, tflops=tflops, tflops_full=tflops_full, image=question.image)
    if question.category is not None:
        record["category"] = question.category
    return record


def answer_question(lm, question: Question, images: Path, config, yes_no_data: bool, max_new_tokens: int = 16,
                    prompt_suffix: str = "") -> dict:
    """One answers-file record: the model's answer, whether it is right, analytic TFLOPs; or the error.

    A missing or unreadable image, or one the processor rejects, becomes the record's error; a
    failure of the model itself is raised (it is not the data's fault).
    """
    if question.error:
        return error_record(question, question.error)
    try:
        image = load_image(images, question.image) if question.image else None
        inputs = lm.prepare(image, question.text + prompt_suffix)
    except ImageError as error:
        return error_record(question, str(error))
    except (ValueError, TypeError, OSError) as error:
        return error_record(question, f"the processor rejected image {question.image}: {error}")
    result = lm.generate(image, question.text + prompt_suffix, config=config, max_new_tokens=max_new_tokens,
                         inputs=inputs)
    tflops, tflops_full = result_tflops(lm, result)
    correct = eval_metrics.is_correct(result.text, question.answer, yes_no_data)
    return _record(question, result.text, correct, None, tflops, tflops_full)


def result_tflops(lm, result) -> tuple[float, float]:
    """Analytic prefill TFLOPs of one generate() result: (visual tokens only, every token)."""
    hidden, intermediate, layers = model_shape(lm.model)
    if result.trace is not None:
        return (trace_tflops(result.trace, hidden, intermediate),
                trace_tflops(result.trace, hidden, intermediate, full_sequence=True))
    # Unpruned (or nothing visual to prune): every layer sees every token.
    from .adapters import for_model
    input_ids = result.inputs["input_ids"]
    visual = int(for_model(lm.model).visual_mask(lm.model, input_ids).sum())
    return (config_tflops(None, Shape(hidden, intermediate, layers, visual)),
            config_tflops(None, Shape(hidden, intermediate, layers, input_ids.shape[1])))


# ------------------------------------------------------------------------------------------- the run
def distributed_state():
    """accelerate's PartialState: one process unless started by `accelerate launch` (or torchrun).

    The processes only exchange answer records, so they always talk over gloo (accelerate's
    multi-CPU mode, chosen with cpu=True), whatever the devices; each process then puts its model
    on a GPU itself (`process_device`). That also lets several processes share one GPU.
    accelerate's own `--cpu` flag starts a single process: start N processes with
    `accelerate launch --multi_gpu --num_processes N` (it is what accelerate picks by itself on a
    machine with several GPUs).
    """
    from accelerate import PartialState
    return PartialState(cpu=True)


def process_device(state) -> str:
    """This process's device: GPU (local index modulo the GPUs there are) where CUDA is available, else CPU."""
    import torch
    if torch.cuda.is_available():
        return f"cuda:{state.local_process_index % torch.cuda.device_count()}"
    return "cpu"


def run_method(lm, questions: list[Question], images: Path, name: str, factory, out: Path, state,
               yes_no_data: bool, max_new_tokens: int, prompt_suffix: str) -> list[dict] | None:
    """Answer the questions not yet done for one method; the merged records on the main process, else None."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    existing = read_records(out, name)
    state.wait_for_everyone()       # every process has read the files before any of them writes
    todo = [q for q in questions if q.error is None and not is_done(existing.get(q.id))]
    shard = todo[state.process_index::state.num_processes]
    skipped = sum(is_done(existing.get(q.id)) for q in questions)
    new = []
    with part_path(out, name, state.process_index).open("a", encoding="utf-8") as part, \
            tqdm(shard, desc=f"{name} ({skipped} answered before)", unit="q",
                 disable=not state.is_main_process, file=sys.stderr) as progress:
        for question in progress:
            record = answer_question(lm, question, images, factory(question.id), yes_no_data, max_new_tokens,
                                     prompt_suffix)
            part.write(json.dumps(record) + "\n")
            part.flush()
            new.append(record)
    gathered = gather_object(new)
    merged = None
    if state.is_main_process:
        fresh = {r["id"]: r for r in gathered}
        merged = []
        for q in questions:
            if q.error is not None:
                merged.append(error_record(q, q.error))
            else:
                merged.append(fresh.get(q.id) or existing[q.id])
        write_answers(out, name, merged)
    state.wait_for_everyone()
    return merged


def evaluate(model: str, questions_file, images, methods: list[str], out, annotations=None, device=None,
             dtype=None, attn=None, device_map=None, max_new_tokens: int = 16, prompt_suffix: str = "") -> dict | None:
    """Run every method over the question file; {method: summary} on the main process, None elsewhere."""
    from . import models

    state = distributed_state()
    if device_map and state.num_processes > 1:
        raise EvalError("--device-map auto spreads one model over all GPUs, so run it as one process "
                         "(python -m transprune.eval), not under a multi-process accelerate launch.")
    questions = read_questions(questions_file, annotations)
    yes_no_data = eval_metrics.is_yes_no([q.answer for q in questions if q.error is None and q.answer is not None])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or (None if device_map else process_device(state))
    lm = models.load(model, device=device, dtype=dtype, attn_implementation=attn, device_map=device_map)
    factories = check_methods(methods, model_shape(lm.model)[2])
    bad = sum(q.error is not None for q in questions)
    if state.is_main_process:
        print(f"{len(questions)} questions, {'yes/no' if yes_no_data else 'exact-match'} scoring, "
              f"{state.num_processes} process(es) on {lm.device}", file=sys.stderr)
    if state.is_main_process and bad:
        print(f"{bad} of {len(questions)} lines cannot be asked (reported in every answers file), e.g. "
              f"{next(q.error for q in questions if q.error)}", file=sys.stderr)
    summary = {}
    for name in methods:
        records = run_method(lm, questions, Path(images), name, factories[name], out, state, yes_no_data,
                             max_new_tokens, prompt_suffix)
        if records is None:
            continue
        record = eval_metrics.summarize(records, yes_no_data)
        per_category = eval_metrics.summarize_by_category(records, yes_no_data)
        if per_category:
            record["per_category"] = per_category
        config = lm.config_for(factories[name]("0"))
        record["config"] = None if config is None else config.to_dict()
        summary[name] = record
        if record["errors"]:
            first = next(r for r in records if r["error"])
            print(f"{name}: {record['errors']} of {record['n']} questions not answered, e.g. {first['id']}: "
                  f"{first['error']} (see {answers_path(out, name)})", file=sys.stderr)
    if not state.is_main_process:
        return None
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ------------------------------------------------------------------------------------------- report
def markdown_table(summary: dict) -> str:
    yes_no_data = any("f1" in r for r in summary.values())
    extra = " precision | recall | F1 | yes % |" if yes_no_data else ""
    lines = ["| method | n | errors | accuracy |" + extra + " TFLOPs (visual) |",
             "|---" * (5 + 4 * yes_no_data) + "|"]
    for name, r in summary.items():
        cells = (f" {100 * r['precision']:.1f} | {100 * r['recall']:.1f} | {100 * r['f1']:.1f} | "
                 f"{100 * r['yes_ratio']:.1f} |") if yes_no_data else ""
        tflops = "n/a" if r["tflops"] is None else f"{r['tflops']:.3g}"
        lines.append(f"| {name} | {r['n']} | {r['errors']} | {100 * r['accuracy']:.1f} |{cells} {tflops} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> bool:
    """Accuracy against mean analytic TFLOPs, one labelled point per method; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed, so no plot (pip install 'transprune[eval]').", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for name, r in summary.items():
        if r["tflops"] is None:
            continue
        ax.plot([r["tflops"]], [100 * r["accuracy"]], "k*" if name == "baseline" else "o", markersize=8)
        ax.annotate(name, (r["tflops"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("analytic prefill TFLOPs per question (visual tokens, paper's accounting)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
