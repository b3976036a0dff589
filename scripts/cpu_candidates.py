"""Which real checkpoint should a free CPU Space (2 vCPU, 16 GB) load by default? Measured, not guessed.

    python scripts/cpu_candidates.py --threads 2 --json docs/cpu_candidates.json
    python scripts/cpu_candidates.py --report docs/cpu_candidates.json     # the table again

Each candidate is a registry model at its full size (random weights: the speed does not depend on
them) on one 640x480 photo, at the app's settings and at cheaper processor settings (fewer tiles /
crops). Per setting, in a fresh child process (so each peak RSS is its own and the memory is freed):

- the visual and prompt token counts the processor gives;
- vision-encoder ms (forward hooks around the vision tower, inside the real generate call) and the LLM
  prefill (the model's first forward after it: the language model with the pruning hooks; the small
  connector between them is in neither), for the baseline and the "high" preset; first calls (the
  warm-up) reported apart, then `--rounds` alternating runs of `--decode-tokens` tokens;
- decode tokens/s and CPU ms per token (every later forward of the model);
- the seconds a visitor waits: `Engine.compare` with the app's defaults (32 new tokens, 3 timing
  repeats) is estimated from the parts (two warm-ups, two answers, 2 x (repeats - 1) prefills), and
  for settings flagged `run_compare` it is also timed end to end (`--compare-repeats`, e.g. 1 and 3);
- peak RSS (VmHWM of the child) and process CPU time next to every wall time: the machine may be
  shared, and CPU time / wall time shows how much of the 2 threads the run actually got.

Random weights would often stop at an end-of-sequence token after a few tokens; EOS is switched off so
every answer has all its tokens (a visitor's worst case). `uptime` is recorded before and after each
setting. Output: a markdown table, then one JSON line (also written to `--json`).

Configs: SmolVLM-256M from the real config.json in /work/shared/fixtures/hf-hub (or $TRANSPRUNE_FIXTURES);
SmolVLM-500M is that config with SmolLM2-360M's text shape; LLaVA-OneVision-0.5B is Qwen2-0.5B + the
26-layer SigLIP-so400m tower transformers' conversion script keeps. Sources: docs/cpu_space.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaOnevisionProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = Path(os.environ.get("TRANSPRUNE_FIXTURES", "/work/shared/fixtures/hf-hub"))
SMOLVLM_256M_FILES = FIXTURES / "HuggingFaceTB--SmolVLM-256M-Instruct"
QWEN2_TOKENIZER_FILES = FIXTURES / "Qwen--Qwen2.5-VL-7B-Instruct"   # Qwen2 BPE; OneVision adds <image>, <video>
QUESTION = "What is in the picture? Describe it."
APP_NEW_TOKENS = 32      # components/inputs.py "Max new tokens" default
APP_REPEATS = 3          # components/inputs.py "Timing repeats" default

# SmolLM2-360M, the text model of SmolVLM-500M (public config values; see docs/cpu_space.md).
SMOLLM2_360M = dict(hidden_size=960, num_hidden_layers=32, intermediate_size=2560, num_attention_heads=15,
                    num_key_value_heads=5, head_dim=64)
# Qwen2-0.5B, the text model of llava-onevision-qwen2-0.5b-ov (public config values).
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                 max_position_embeddings=32768, tie_word_embeddings=True)
# A minimal ChatML template in OneVision's layout (image first, then the question).
ONEVISION_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                      "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
                      "{% elif item['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
                      "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
                      "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Candidate:
    key: str                      # unique, used on the command line
    model: str                    # registry name
    setting: str                  # what differs from the checkpoint's processor, in words
    processor_kwargs: dict = field(default_factory=dict)
    run_compare: bool = False     # time Engine.compare end to end (only where it takes under a minute or so)
    rounds: int | None = None     # timed rounds after the warm-up (None: --rounds; 0: first calls only)


CANDIDATES = (
    Candidate("smolvlm-256m/app", "smolvlm-256m", "checkpoint processor (4x3 tiles + global view)", rounds=0),
    Candidate("smolvlm-256m/edge1024", "smolvlm-256m", "size longest_edge=1024 (2x2 tiles + global)",
              {"size": {"longest_edge": 1024}}, rounds=1),
    Candidate("smolvlm-256m/nosplit", "smolvlm-256m", "do_image_splitting=False (one 512-px view)",
              {"do_image_splitting": False}, run_compare=True),
    Candidate("smolvlm-500m/app", "smolvlm-500m", "checkpoint processor (4x3 tiles + global view)", rounds=0),
    Candidate("smolvlm-500m/nosplit", "smolvlm-500m", "do_image_splitting=False (one 512-px view)",
              {"do_image_splitting": False}, run_compare=True),
    Candidate("llava-onevision-0.5b/app", "llava-onevision-0.5b", "checkpoint processor (AnyRes: 2x2 crops + base)",
              rounds=0),
    Candidate("llava-onevision-0.5b/1crop", "llava-onevision-0.5b", "image_grid_pinpoints=[[384, 384]] (1 crop + base)",
              {"image_grid_pinpoints": [[384, 384]]}, rounds=1),
)
BY_KEY = {c.key: c for c in CANDIDATES}


# ---------------------------------------------------------------------------------------- building
def build_smolvlm(candidate: Candidate):
    """Idefics3ForConditionalGeneration at the checkpoint's full size, random weights, and its processor."""
    from transformers import AutoConfig, Idefics3ForConditionalGeneration, Idefics3Processor

    config = AutoConfig.from_pretrained(SMOLVLM_256M_FILES)
    if candidate.model == "smolvlm-500m":
        for name, value in SMOLLM2_360M.items():
            setattr(config.text_config, name, value)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    model = Idefics3ForConditionalGeneration(config)
    processor = Idefics3Processor.from_pretrained(SMOLVLM_256M_FILES, **candidate.processor_kwargs)
    return model, processor


class OneVisionInputs:
    """The processor pieces LoadedModel uses (chat template, __call__, decode) for LLaVA-OneVision, from
    its image processor and tokenizer: LlavaOnevisionProcessor itself cannot be built on this install
    (its video processor needs torchvision). The image-token count is transformers' own
    (its two counting methods, borrowed as they are, read the attributes set here)."""

    _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features
    _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features

    def __init__(self, image_processor, tokenizer, num_image_tokens: int = 729,
                 vision_aspect_ratio: str = "anyres_max_9"):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.num_image_tokens, self.vision_aspect_ratio = num_image_tokens, vision_aspect_ratio

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=ONEVISION_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text=None, return_tensors="pt") -> dict:
        pixels = self.image_processor(images, return_tensors="pt")
        original_height, original_width = pixels["image_sizes"][0].tolist()
        height, width = pixels["pixel_values"].shape[-2:]
        count = self._get_number_of_features(original_height, original_width, height, width)
        text = text.replace("<image>", "<image>" * count)
        return {**self.tokenizer(text, return_tensors=return_tensors), **pixels}

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def build_onevision(candidate: Candidate):
    """LlavaOnevisionForConditionalGeneration at 0.5B-ov's size, random weights, with the PIL image
    processor (the default one needs torchvision, which this torch lacks) and a Qwen2 tokenizer."""
    from transformers import AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER_FILES)
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    pinpoints = candidate.processor_kwargs.get("image_grid_pinpoints")
    config = LlavaOnevisionConfig(text_config=QWEN2_05B, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                      image_grid_pinpoints=config.image_grid_pinpoints)
    return model, OneVisionInputs(image_processor, tokenizer)


def vision_tower(model) -> torch.nn.Module:
    inner = model.model
    return inner.vision_model if hasattr(inner, "vision_model") else inner.vision_tower


class Calls:
    """(wall s, process CPU s) of each forward of one module, collected until `take()`.

    CPU time counts every thread of the process: on an idle machine with 2 threads it approaches
    2 x wall; on a busy one the wall time grows while the CPU time stays near what the work needs."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self._start = [], None
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, module, args):
        self._start = (time.perf_counter(), time.process_time())

    def _leave(self, module, args, output):
        self.calls.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    def take(self) -> list[tuple[float, float]]:
        calls, self.calls = self.calls, []
        return calls


def photo(width: int = 640, height: int = 480):
    """A seeded photo-like picture (smooth colour field plus grain); token counts depend only on its size."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(3, height // 40, width // 40, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bicubic")[0]
    grain = 0.08 * torch.randn(3, height, width, generator=generator)
    pixels = ((smooth + grain).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------- measuring
def measure_one(candidate: Candidate, rounds: int, decode_tokens: int, compare_repeats: tuple[int, ...]) -> dict:
    """All numbers of one candidate setting (runs in its own process)."""
    from components.engine import Engine, Settings
    from transprune import PruneConfig
    from transprune.measure import peak_memory_mb
    from transprune.models import REGISTRY, LoadedModel

    spec = REGISTRY[candidate.model]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    torch.manual_seed(0)
    builder = build_onevision if spec.family == "llava_onevision" else build_smolvlm
    model, processor = builder(candidate)
    model = model.to(torch.float32).eval()
    model.generation_config.eos_token_id = None      # every answer runs to its token budget
    lm = LoadedModel(spec=spec, model=model, processor=processor)
    build = dict(wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0,
                 rss_mb=peak_memory_mb(torch.device("cpu")))
    params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in vision_tower(model).parameters())
    vision_calls, model_calls = Calls(vision_tower(model)), Calls(model)
    image = photo()
    inputs = lm.prepare(image, QUESTION)
    image_token = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    prompt_tokens = int(inputs["input_ids"].shape[1])
    visual_tokens = int((inputs["input_ids"] == image_token).sum())
    configs = {"baseline": None, "high": PruneConfig.preset("high")}

    def run(which: str, new_tokens: int) -> dict:
        """One lm.generate (the app's path). Generation runs the vision tower first (image features),
        then the model's first forward (the language model's prefill), then one forward per decode step."""
        vision_calls.take(), model_calls.take()
        result = lm.generate(image, QUESTION, configs[which], max_new_tokens=new_tokens, inputs=inputs)
        vision, (llm, *steps) = vision_calls.take(), model_calls.take()
        vision_wall, vision_cpu = (sum(call[i] for call in vision) for i in (0, 1))
        trace = result.trace
        return dict(which=which, prefill_ms=(vision_wall + llm[0]) * 1000, prefill_cpu_ms=(vision_cpu + llm[1]) * 1000,
                    vision_ms=vision_wall * 1000, vision_cpu_ms=vision_cpu * 1000,
                    llm_ms=llm[0] * 1000, llm_cpu_ms=llm[1] * 1000,
                    app_prefill_ms=result.timings["prefill_ms"],
                    decode_tokens_per_s=len(steps) / sum(s[0] for s in steps) if steps else None,
                    decode_cpu_ms_per_token=1000 * sum(s[1] for s in steps) / len(steps) if steps else None,
                    new_tokens=result.timings["new_tokens"],
                    final_visual_tokens=trace.visual_tokens_per_layer[-1] if trace and trace.visual_tokens_per_layer
                    else None)

    first_calls = [run(which, 1) for which in configs]          # the warm-up: first-call costs
    timed = []
    order = list(configs)
    for round_index in range(candidate.rounds if candidate.rounds is not None else rounds):
        for which in (order if round_index % 2 == 0 else order[::-1]):
            timed.append(run(which, decode_tokens))

    def median(which: str, key: str):
        values = [r[key] for r in timed if r["which"] == which and r[key] is not None]
        return statistics.median(values) if values else None

    fields = ("prefill_ms", "prefill_cpu_ms", "vision_ms", "vision_cpu_ms", "llm_ms", "llm_cpu_ms",
              "decode_tokens_per_s", "decode_cpu_ms_per_token")
    summary = {which: {key: median(which, key) for key in fields} for which in configs}
    if not timed:   # an expensive setting measured by its first calls only (they include first-call costs)
        summary = {r["which"]: {key: r[key] for key in fields} for r in first_calls}
    summary["from_first_calls"] = not timed

    compares = []
    if candidate.run_compare:
        engine = Engine(Settings(device="cpu"))
        engine._models[(candidate.model, "auto", "sdpa")] = lm   # the model built here stands in for the download
        for repeats in compare_repeats:
            for _ in range(2):
                cpu, wall = time.process_time(), time.perf_counter()
                comparison = engine.compare(candidate.model, image, QUESTION, PruneConfig.preset("high"),
                                            max_new_tokens=APP_NEW_TOKENS, repeats=repeats)
                compares.append(dict(repeats=repeats, wall_s=time.perf_counter() - wall,
                                     cpu_s=time.process_time() - cpu,
                                     new_tokens=[comparison.baseline.timings["new_tokens"],
                                                 comparison.pruned.timings["new_tokens"]],
                                     prefill_ms={which: statistics.median(samples)
                                                 for which, samples in comparison.prefill_samples.items()}))
    return dict(key=candidate.key, model=candidate.model, setting=candidate.setting,
                processor_kwargs=candidate.processor_kwargs, params=params, vision_params=vision_params,
                prompt_tokens=prompt_tokens, visual_tokens=visual_tokens,
                pixel_values=list(inputs["pixel_values"].shape), build=build, first_calls=first_calls, timed=timed,
                summary=summary, compare=compares, peak_rss_mb=peak_memory_mb(torch.device("cpu")),
                threads=torch.get_num_threads())


def app_seconds(summary: dict, repeats: int, new_tokens: int, cpu: bool = False) -> float | None:
    """Seconds of Engine.compare from its parts: a 1-token warm-up of each path, an answer of each
    (prefill + new_tokens - 1 decode steps), then repeats - 1 more prefill-only pairs. Wall seconds,
    or with `cpu` the process CPU seconds (what the work needs, whatever the machine's load)."""
    base, high = summary["baseline"], summary["high"]
    prefill, per_token = ("prefill_cpu_ms", "decode_cpu_ms_per_token") if cpu else ("prefill_ms", None)
    if cpu:
        decode = [base[per_token], high[per_token]]
    else:
        decode = [1000 / r["decode_tokens_per_s"] if r["decode_tokens_per_s"] else None for r in (base, high)]
    if None in decode:
        return None
    prefills = (base[prefill] + high[prefill]) * (2 + max(0, repeats - 1))
    return (prefills + (new_tokens - 1) * sum(decode)) / 1000.0


def borrow_decode(records: list[dict]):
    """A setting timed by its first calls only has no decode rate; decoding costs nearly the same at any
    prompt length here, so it takes the rate of the same model's other setting (marked in the record)."""
    for record in records:
        for which in ("baseline", "high"):
            mine = record["summary"][which]
            if mine["decode_tokens_per_s"] is None:
                donor = next((r for r in records if r["model"] == record["model"]
                              and r["summary"][which]["decode_tokens_per_s"]), None)
                if donor:
                    for key in ("decode_tokens_per_s", "decode_cpu_ms_per_token"):
                        mine[key] = donor["summary"][which][key]
                    record["summary"]["decode_from"] = donor["key"]
        for name, repeats in (("app", APP_REPEATS), ("repeats1", 1)):
            record["summary"][f"estimate_{name}_s"] = app_seconds(record["summary"], repeats, APP_NEW_TOKENS)
            record["summary"][f"estimate_{name}_cpu_s"] = app_seconds(record["summary"], repeats, APP_NEW_TOKENS,
                                                                     cpu=True)


def probe_threads(steps: int = 5) -> dict:
    """Why 2-thread timings on a busy machine mislead: wall seconds of single-token decode steps of
    SmolVLM-256M's text model (84-token cache) with 2 threads, then 1, then both again."""
    torch.manual_seed(0)
    model, _ = build_smolvlm(BY_KEY["smolvlm-256m/nosplit"])
    text_model = model.to(torch.float32).eval().model.text_model
    prompt = torch.randint(0, 49000, (1, 84))
    seconds = {}
    with torch.inference_mode():
        for threads in (2, 1, 2, 1):
            torch.set_num_threads(threads)
            cache = text_model(input_ids=prompt, use_cache=True).past_key_values
            for _ in range(steps):
                start = time.perf_counter()
                text_model(input_ids=prompt[:, :1], past_key_values=cache, use_cache=True)
                seconds.setdefault(f"{threads} thread(s)", []).append(round(time.perf_counter() - start, 3))
    return dict(uptime_before=None, seconds=seconds)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    model_name = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                           if line.startswith("Model name")), "")
    except OSError:
        pass
    return dict(cpu=model_name or platform.processor(), cores=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version())


# ---------------------------------------------------------------------------------------- output
def table(records: list[dict]) -> str:
    """Milliseconds and seconds as wall (process CPU), medians of the timed runs."""
    def num(value, spec=".0f"):
        return "–" if value is None else format(value, spec)

    def pair(summary, key):
        return f"{num(summary[key])} ({num(summary[key.replace('_ms', '_cpu_ms')])})"

    rows = ["| model | setting | visual tokens (High keeps) / prompt | vision ms | LLM prefill ms: baseline → High "
            "| decode tok/s base / High (CPU ms per token) | est. s, app (3 repeats) | est. s, 1 repeat "
            "| measured Engine.compare s "
            "| peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["summary"]
        b, h = s["baseline"], s["high"]
        measured = "; ".join(f"r{c['repeats']}: {c['wall_s']:.1f} ({c['cpu_s']:.1f})" for c in r["compare"]) or "–"
        note = " †" if s.get("from_first_calls") else ""
        kept = next((c["final_visual_tokens"] for c in r["first_calls"] if c["which"] == "high"), None)
        rows.append(f"| {r['model']} | {r['setting']}{note} | {r['visual_tokens']} ({kept}) / {r['prompt_tokens']} "
                    f"| {pair(b, 'vision_ms')} | {pair(b, 'llm_ms')} → {pair(h, 'llm_ms')} "
                    f"| {num(b['decode_tokens_per_s'], '.1f')} / {num(h['decode_tokens_per_s'], '.1f')} "
                    f"({num(b['decode_cpu_ms_per_token'])} / {num(h['decode_cpu_ms_per_token'])} ms) "
                    f"| {num(s['estimate_app_s'], '.1f')} ({num(s['estimate_app_cpu_s'], '.1f')}) "
                    f"| {num(s['estimate_repeats1_s'], '.1f')} ({num(s['estimate_repeats1_cpu_s'], '.1f')}) "
                    f"| {measured} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(rows) + "\n† first calls only (warm-up runs; decode rate from the same model's other setting)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(BY_KEY), help="comma-separated keys: " + ", ".join(BY_KEY))
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/High runs after the warm-up")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--compare-repeats", default="1,3", help="timing repeats of the end-to-end Engine.compare runs")
    parser.add_argument("--json", type=Path, help="write the record here too")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="print the table of earlier --json outputs (runs nothing)")
    parser.add_argument("--probe-threads", action="store_true",
                        help="time text-model decode steps at 2 and 1 threads (shows a busy machine's thrashing)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_threads:
        before = uptime()
        result = probe_threads()
        result.update(uptime_before=before, uptime_after=uptime())
        print(json.dumps(result))
        return 0
    if args.report:
        for path in args.report:
            run = json.loads(path.read_text())
            print(f"\n{path.name}: {run['threads']} thread(s), started {run['started']}, {run['machine']['cpu']}\n")
            print(table(run["records"]))
        return 0
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        parser.error(f"unknown candidate {', '.join(unknown)}; choose from {', '.join(BY_KEY)}")
    compare_repeats = tuple(int(x) for x in args.compare_repeats.split(",") if x.strip())
    torch.set_num_threads(args.threads)
    if args.child:   # one candidate, in this process; the parent reads the last stdout line
        print(json.dumps(measure_one(BY_KEY[keys[0]], args.rounds, args.decode_tokens, compare_repeats)))
        return 0

    records = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for key in keys:
        before = uptime()
        print(f"[{key}] {before}", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, "--child", "--only", key, "--threads", str(args.threads),
                                "--rounds", str(args.rounds), "--decode-tokens", str(args.decode_tokens),
                                "--compare-repeats", args.compare_repeats],
                               capture_output=True, text=True, cwd=ROOT)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            print(f"[{key}] failed (exit {child.returncode}); skipped", file=sys.stderr)
            continue
        record = json.loads(child.stdout.strip().splitlines()[-1])
        record["uptime_before"], record["uptime_after"] = before, uptime()
        print(f"[{key}] done: {record['uptime_after']}", file=sys.stderr, flush=True)
        records.append(record)
    borrow_decode(records)
    print(table(records))
    output = dict(command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])), started=started,
                  machine=machine(), threads=args.threads, question=QUESTION, image_size=[640, 480],
                  app_new_tokens=APP_NEW_TOKENS, app_repeats=APP_REPEATS, records=records)
    if args.json:
        args.json.write_text(json.dumps(output, indent=1) + "\n")
    print(json.dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
