#!/usr/bin/env bash
# The checks to run the day a GPU machine is lent: one script, at most ~8 minutes on one GPU, no network.
#
#   bash scripts/gpu_check.sh              # on the GPU machine; writes docs/gpu_check_<date>.json and .log
#   bash scripts/gpu_check.sh --dry-run    # on a CPU: the same steps at toy size, into $TMPDIR (tests it)
#
# Steps, each under its own `timeout` inside an overall budget (TRANSPRUNE_GPU_BUDGET seconds, default 470);
# a failing step is recorded and the next one still runs:
#   1. install  the pinned set: wheels in .whl/ (scripts/gpu_wheels.sh fills it here; carry it along, since the
#               GPU machine has no network) into /tmp/transprune-site with
#               --no-index --no-deps (the machine's own torch is kept: a CUDA torch does not travel), else
#               `pip install -r requirements.txt` minus torch, which fails offline and is recorded as such;
#               flash-attn too where a wheel for it is in .whl/;
#   2. doctor   versions, device and the keep-all / reference self-check (python -m transprune.doctor --json);
#   3. tests    the CUDA-only tests (tests/test_gpu.py);
#   4. bench    LLaVA-1.5-7B's full shape, random weights, float16, sdpa (then flash_attention_2 if flash_attn
#               imports): baseline, fastv, pdrop, high, low;
#   5. eval     shapes-llava on 40 generated yes/no questions, once as one process, once as two processes
#               (accelerate launch --multi_gpu --num_processes 2, both on the one GPU), compared.
# The JSON holds every step's exit status and seconds, the versions, both benches and both eval summaries.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; fi
stamp=$(date -u +%Y-%m-%d)
if [ "$dry_run" = 1 ]; then
    out=${TRANSPRUNE_GPU_OUT:-$(mktemp -d)}
else
    out=${TRANSPRUNE_GPU_OUT:-docs}
fi
mkdir -p "$out"
work=$(mktemp -d)
json=$out/gpu_check_$stamp.json
log=$out/gpu_check_$stamp.log
budget=${TRANSPRUNE_GPU_BUDGET:-470}
scale=1     # step limits are sized for the GPU machine; a shared CPU running the dry run gets 4x as long
if [ "$dry_run" = 1 ]; then scale=4; budget=${TRANSPRUNE_GPU_BUDGET:-1800}; fi
start=$(date +%s)
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$log"
: > "$work/steps.jsonl"

# step NAME SECONDS COMMAND...: runs COMMAND under timeout (never past the overall budget), logs its output,
# appends {"name", "rc", "seconds"} to steps.jsonl. rc 124 = timed out; "skipped" when no time is left.
step() {
    local name=$1 limit=$(( $2 * scale )); shift 2
    local left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 10 ]; then
        echo "{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"no time left\"}" >> "$work/steps.jsonl"
        echo "== $name: skipped, no time left" | tee -a "$log"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (at most ${limit} s): $*" | tee -a "$log"
    local t0=$(date +%s) rc=0
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1 || rc=$?
    echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$work/steps.jsonl"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

# 1. install
install_pinned() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/transprune-site .whl/*.whl
    else
        grep -v '^torch==' requirements.txt > "$work/requirements-no-torch.txt"
        "$py" -m pip install -q --disable-pip-version-check -r "$work/requirements-no-torch.txt"
    fi
}
if [ "$dry_run" = 1 ]; then
    step install 30 "$py" -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__)"
else
    export py work
    step install 90 bash -c "$(declare -f install_pinned); install_pinned"
    if [ -d /tmp/transprune-site ]; then export PYTHONPATH="/tmp/transprune-site:$PYTHONPATH"; fi
fi

# 2. doctor
step doctor 90 bash -c "\"$py\" -m transprune.doctor --json > \"$work/doctor.json\""

# 3. the CUDA-only tests (they skip themselves without CUDA, so the dry run only checks they collect)
step cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py

# 4. bench
if [ "$dry_run" = 1 ]; then
    bench_args=(--arch tiny-llava --device cpu --dtype float32 --repeats 1 --decode-repeats 1 --new-tokens 2
                --scoring-repeats 1 --threads 1)
else
    bench_args=(--arch llava-1.5-7b --device cuda --dtype float16 --repeats 5 --decode-repeats 2 --new-tokens 16
                --scoring-repeats 2)
fi
step bench_sdpa 150 "$py" -m transprune.bench "${bench_args[@]}" --attn sdpa --methods baseline,fastv,pdrop,high,low \
    --json "$work/bench_sdpa.json" --plot "$work/bench_sdpa.png"
if [ "$dry_run" = 0 ] && "$py" -c "import flash_attn" > /dev/null 2>&1; then
    step bench_flash_attention_2 120 "$py" -m transprune.bench "${bench_args[@]}" --attn flash_attention_2 \
        --methods baseline,fastv,pdrop,high,low --json "$work/bench_fa2.json" --plot "$work/bench_fa2.png"
else
    echo '{"name": "bench_flash_attention_2", "rc": null, "seconds": 0, "skipped": "flash_attn does not import"}' \
        >> "$work/steps.jsonl"
fi

# 5. eval: one process, then two processes through accelerate; the summaries must be equal
n_questions=40
if [ "$dry_run" = 1 ]; then n_questions=4; fi
step eval_data 30 "$py" scripts/shapes_questions.py "$work/shapes" --n "$n_questions" --yes-no
eval_args=(--questions "$work/shapes/questions.jsonl" --images "$work/shapes/images" --model shapes-llava
           --methods baseline,high,low --max-new-tokens 3)
step eval_one_process 90 "$py" -m transprune.eval "${eval_args[@]}" --out "$work/eval_one"
step eval_two_processes 120 "$py" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port 29533 \
    -m transprune.eval "${eval_args[@]}" --out "$work/eval_two"

# the report
"$py" - "$work" "$json" "$dry_run" "$start" <<'PY'
import json, platform, sys, time
from pathlib import Path

work, path, dry_run, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])


def load(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None


try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception as error:      # the report must be written whatever broke
    device = f"unknown ({error})"
one, two = load("eval_one/summary.json"), load("eval_two/summary.json")
report = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dry_run=dry_run, device=device,
              python=platform.python_version(), seconds=int(time.time()) - start,
              steps=[json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()],
              doctor=load("doctor.json"), bench_sdpa=load("bench_sdpa.json"),
              bench_flash_attention_2=load("bench_fa2.json"),
              eval_one_process=one, eval_two_processes=two,
              eval_same_metrics=(one == two) if one is not None and two is not None else None)
path.write_text(json.dumps(report, indent=1) + "\n")
failed = [s["name"] for s in report["steps"] if s.get("rc") not in (0, None)]
print(f"wrote {path}; failed steps: {', '.join(failed) or 'none'}; same eval metrics with two processes: "
      f"{report['eval_same_metrics']}")
PY
rm -rf "$work"
echo "log: $log"
