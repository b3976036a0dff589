"""TransPrune as an lmms-eval model, with no edit of lmms-eval: `--model transprune`.

    pip install 'transprune[eval]'
    python -m lmms_eval --model transprune --model_args pretrained=llava-1.5-7b,preset=high --tasks pope
    python -m transprune.lmms_eval --model transprune --model_args pretrained=llava-1.5-7b,preset=high --tasks pope
    accelerate launch --num_processes 8 -m transprune.lmms_eval --model transprune ... --tasks pope,mme

How it is found: lmms-eval 0.7 builds its model registry (`lmms_eval.models.MODEL_REGISTRY_V2`)
from its own list plus the Python entry points of group "lmms_eval.models"; pyproject.toml
declares `transprune = "transprune.lmms_eval:manifest"` there, so an installed transprune is listed
by `lmms-eval models`. From a source checkout that is not pip-installed, the launcher
`python -m transprune.lmms_eval ARGS` registers the same manifest and then runs lmms-eval's own
CLI with ARGS (any of its subcommands or flags).

model_args: pretrained (a transprune registry name such as llava-1.5-7b or tiny-llava, or a
Hugging Face id of a supported family), preset (any method name of `python -m transprune.eval`:
baseline, high, low, fastv, pdrop, ttv, iga, random, visionzip-64, ...; default high), device,
dtype (float16/bfloat16/float32), attn_implementation, device_map (auto), max_new_tokens (used
when a task sets none). Answers are greedy (`LoadedModel.generate`), one image per question; tasks
with `loglikelihood` requests or several images per question are refused with an error. Under
`accelerate launch` lmms-eval shards the requests itself; each process loads the model on its GPU.

This is the only transprune module that imports lmms_eval.
"""

from __future__ import annotations

import os
import sys

try:
    from lmms_eval.api.model import lmms
except ImportError as error:
    raise ImportError("transprune.lmms_eval needs lmms-eval 0.7: pip install 'transprune[eval]'.") from error

MODEL_ID = "transprune"


def manifest():
    """The lmms-eval ModelManifest of `--model transprune` (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TransPrune")


def register():
    """Add `--model transprune` to the running lmms-eval's registry (what the entry point does when installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def _whole_number(value, name: str) -> int:
    """`value` (an int, or its digits as model_args and task configs give them) as an int >= 1."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or text.isdigit()) or int(text) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, such as 32; got {value!r}.")
    return int(text)


def _cut(text: str, until) -> str:
    """`text` up to the first of the task's stop strings."""
    for stop in ([until] if isinstance(until, str) else until or []):
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


class TransPrune(lmms):
    """Any transprune registry family through `LoadedModel.generate`, pruned with one preset."""

    is_simple = True

    def __init__(self, pretrained: str = "llava-1.5-7b", preset: str = "high", device: str | None = None,
                 dtype: str | None = None, attn_implementation: str | None = None, device_map: str | None = None,
                 max_new_tokens: int = 32, batch_size=1, max_batch_size=None, **unknown):
        super().__init__()
        import torch

        from . import models
        from .eval_questions import check_methods
        from .flops import model_shape

        if unknown:
            raise ValueError(f"Unknown model_args {sorted(unknown)} for --model transprune; use pretrained, preset, "
                             "device, dtype, attn_implementation, device_map, max_new_tokens.")
        if int(batch_size) != 1:
            raise ValueError(f"--model transprune answers one question at a time; pass --batch_size 1, not {batch_size}.")
        self.max_new_tokens = _whole_number(max_new_tokens, "max_new_tokens")
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available() and device_map is None and (device is None or self._world_size > 1):
            # One GPU per process (processes share GPUs when there are more of them than GPUs).
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
        self.loaded = models.load(pretrained, device=device or "cpu", dtype=dtype,
                                  attn_implementation=attn_implementation, device_map=device_map)
        self.preset = preset
        self.factory = check_methods([preset], model_shape(self.loaded.model)[2])[preset]
        self.tflops: list[float] = []        # analytic prefill TFLOPs (visual tokens) of each answer

    @property
    def device(self):
        return self.loaded.device

    @property
    def model(self):
        return self.loaded.model

    def _image(self, visuals):
        from PIL import Image

        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"--model transprune takes one image per question; this task gives {len(visuals)}.")
        if not visuals:
            return None
        visual = visuals[0]
        if isinstance(visual, str):
            from .images import as_image   # refuses a decompression bomb from its header

            return as_image(visual)
        if not isinstance(visual, Image.Image):
            raise ValueError(f"--model transprune takes images; this task gives {type(visual).__name__}.")
        return visual

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        from .eval_questions import result_tflops

        answers = []
        for request in tqdm(requests, desc=f"transprune {self.preset}", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = self._image(doc_to_visual(self.task_dict[task][split][doc_id]))
            max_new_tokens = _whole_number(gen_kwargs.get("max_new_tokens") or self.max_new_tokens,
                                           f"{task}'s max_new_tokens")
            result = self.loaded.generate(image, context, config=self.factory(f"{task}/{split}/{doc_id}"),
                                          max_new_tokens=max_new_tokens)
            text = _cut(result.text, gen_kwargs.get("until"))
            self.tflops.append(result_tflops(self.loaded, result)[0])
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        if self.tflops:
            print(f"transprune {self.preset}: mean analytic prefill TFLOPs {sum(self.tflops) / len(self.tflops):.4g} "
                  f"over {len(self.tflops)} answers", file=sys.stderr)
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("--model transprune answers generate_until tasks only (it prunes the prefill of "
                                  "a generated answer); pick a generation task.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("--model transprune answers single-round generate_until tasks only.")


def main(argv=None):
    """`python -m transprune.lmms_eval ARGS`: lmms-eval's CLI with `--model transprune` registered."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    sys.argv = ["lmms-eval", *(sys.argv[1:] if argv is None else argv)]
    lmms_eval_main()


if __name__ == "__main__":
    main()
