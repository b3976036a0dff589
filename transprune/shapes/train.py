"""Train shapes-llava on generated scenes; resumable, seeded, CPU-friendly.

    python -m transprune.shapes.train --out runs/shapes            # trains, resumes if a checkpoint exists
    python -m transprune.shapes.train --out runs/shapes --export   # write the checkpoint into the package

What makes it learn in about an hour on one CPU core (a first attempt trained on answers alone
reached 57 %: it never bound a colour to a shape or an object to a place):

- Dense supervision of the vision tower: a linear head on every patch feature predicts the colour,
  shape and grid cell of the object covering that patch (or background), so every visual token
  carries its object's identity before the language model ever sees it. The head is dropped at
  export; the shipped model is a plain LLaVA.
- Several independent questions per image at the price of one: the prompt is
  "USER: <image> {question} ASSISTANT:", so everything up to the last visual token is the same for
  all questions about one image. The language model runs that prefix once, its KV cache is
  repeated per question, and each question runs as its own continuation -- no question can see
  another's answer (a leak a packed multi-question sequence has). Mathematically this is the
  same computation as the full prompt; `check_prefix_equivalence` verifies it at start-up.
- Loss on the answer word and on the </s> after it (the model must stop after one word).
- Binding needed more than that (with the two points above the run sat at ~50 %: counting
  perfect, colour/shape questions at chance). What broke the plateau is supervising *where one
  late layer looks* (`--attn-layer`, default 9 of 12): the attention, mean over heads, of the
  question's last word (the shape or colour it names) and of the answer position (":") should
  fall on the patches of the object the question is about (loss -log of that mass; count
  questions and "no" answers carry none). Two linear probes help the same layer: the visual
  tokens entering it must still say colour/shape/cell, and the answer position leaving it must
  say the asked object's colour/shape/cell. Probes are dropped at export.
  This shapes the model's attention at layer 9 only; the pruning presets scaled to 12 layers
  score tokens at layers 3-6 (TransPrune/IGA/TTV) and 1-10 (FastV, PDrop), which are not
  supervised -- see docs/shapes-llava.md ("Training") for what that means for the benchmark.

The data stream is a pure function of (seed, step), so a resumed run sees the data it would have
seen without the interruption.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .. import compat
from . import model as shapes_model
from . import scenes

CLIP_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)    # what the CLIP image processor normalises with
CLIP_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)
COLOR_IDS = {c: i + 1 for i, c in enumerate(scenes.COLORS)}     # 0 = background
SHAPE_IDS = {s: i + 1 for i, s in enumerate(scenes.SHAPES)}
CELL_IDS = {c: i + 1 for i, c in enumerate(scenes.CELLS)}
NOUN_OFFSET = 3      # "... {noun} ? ASSISTANT :": the noun sits 3 tokens before the answer position
AUX_CLASSES = (len(COLOR_IDS) + 1, len(SHAPE_IDS) + 1, len(CELL_IDS) + 1)


def pixels(image) -> torch.Tensor:
    """(3, H, W) CLIP-normalised pixels; equal to the processor's for a 168x168 image."""
    array = (np.asarray(image, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def patch_labels(scene: scenes.Scene) -> torch.Tensor:
    """(3, patches) long: colour, shape and cell id of the object covering each patch (0 = none)."""
    owner = scene.patch_objects(shapes_model.PATCH_SIZE)
    labels = np.zeros((3, owner.size), dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        hit = owner == i
        labels[0, hit], labels[1, hit], labels[2, hit] = COLOR_IDS[obj.color], SHAPE_IDS[obj.shape], CELL_IDS[obj.cell]
    return torch.from_numpy(labels)


class Batch:
    """B images with Q questions each, tokenised as a shared prefix and per-question suffixes."""

    def __init__(self, tokenizer, items: list[tuple[scenes.Scene, list[scenes.Question]]], image_tokens: int):
        self.questions = [q for _, qs in items for q in qs]
        self.per_image = len(items[0][1])
        self.pixel_values = torch.stack([pixels(scene.render()) for scene, _ in items])
        self.patch_labels = torch.stack([patch_labels(scene) for scene, _ in items])
        # Per question, the patches of the object it asks about (none for count and "no" answers).
        owners = [scene.patch_objects(shapes_model.PATCH_SIZE) for scene, _ in items]
        asked = [(scene, asked_object(scene, q)) for scene, qs in items for q in qs]
        self.asked_labels = torch.tensor([
            (COLOR_IDS[sc.objects[k].color], SHAPE_IDS[sc.objects[k].shape], CELL_IDS[sc.objects[k].cell]) if k >= 0
            else (-100, -100, -100) for sc, k in asked])
        self.target_patches = torch.from_numpy(np.stack([
            (owners[i] == k) & (k >= 0) for i, (scene, qs) in enumerate(items) for q in qs
            for k in [asked_object(scene, q)]]))
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        prefix = tokenizer("USER:", add_special_tokens=False)["input_ids"] + [image_id] * image_tokens
        self.prefix_ids = torch.tensor(prefix).unsqueeze(0).expand(len(items), -1)
        suffixes, answer_at, targets = [], [], []
        for question in self.questions:
            ids = tokenizer(f" {question.text} ASSISTANT:", add_special_tokens=False)["input_ids"]
            answer = tokenizer(question.answer, add_special_tokens=False)["input_ids"]
            assert len(answer) == 1, f"answer {question.answer!r} is not one token"
            answer_at.append(len(ids) - 1)             # ":" predicts the answer, the answer predicts </s>
            targets.append((answer[0], tokenizer.eos_token_id))
            suffixes.append(ids + answer)
        width = max(len(s) for s in suffixes)
        # Right padding: causal attention means pads never influence the positions we read.
        self.suffix_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in suffixes])
        self.answer_at = torch.tensor(answer_at)
        self.targets = torch.tensor(targets)
        self.qtypes = [q.qtype for q in self.questions]


def asked_object(scene: scenes.Scene, question: scenes.Question) -> int:
    """Index of the object a question is about; -1 for count questions and absent objects."""
    words = question.text.lower().rstrip("?").split()
    if question.qtype == "color":
        obj = scene.find(shape=words[-1])
    elif question.qtype == "shape":
        obj = scene.find(color=words[-1])
    elif question.qtype in ("where", "exists"):
        obj = scene.find(color=words[-2], shape=words[-1])
    else:
        obj = None
    return -1 if obj is None else scene.objects.index(obj)


def sample_items(rng: random.Random, images: int, per_image: int, offset: int = 0):
    """`images` scenes with `per_image` questions each; question types cycle through the batch."""
    items = []
    for i in range(images):
        scene = scenes.sample_scene(rng)
        types = [scenes.QUESTION_TYPES[(offset + i * per_image + j) % len(scenes.QUESTION_TYPES)]
                 for j in range(per_image)]
        items.append((scene, [scenes.sample_question(scene, rng, t) for t in types]))
    return items


def step_batch(tokenizer, seed: int, step: int, images: int, per_image: int, image_tokens: int) -> Batch:
    rng = random.Random(seed * 1_000_003 + step)
    return Batch(tokenizer, sample_items(rng, images, per_image, offset=step), image_tokens)


def forward(model, heads, batch: Batch, attn_layer: int | None = None):
    """(answer logits (BQ, 2, V), patch logits tuple of (B, patches, C), extra dict) for a Batch.

    With `attn_layer` (0-based), `extra` holds the attention of each question's last prompt token
    at that layer over the prefix (see `answer_attention`) and the two probes' logits.
    """
    inner = model.model
    tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
    features = tower.hidden_states[model.config.vision_feature_layer][:, 1:]      # drop CLS ("default")
    visual = inner.multi_modal_projector(features)
    embed = model.get_input_embeddings()
    prefix = embed(batch.prefix_ids)
    is_image = batch.prefix_ids[0] == model.config.image_token_index
    prefix = torch.cat([prefix[:, ~is_image], visual.to(prefix.dtype)], dim=1)    # image tokens end the prefix
    assert bool(is_image[-visual.shape[1]:].all()) and int(is_image.sum()) == visual.shape[1]
    lm = inner.language_model
    captured = {}
    handles = []
    if attn_layer is not None:
        def visual_in(module, args, kwargs):
            captured["visual_in"] = compat.hidden_states(args, kwargs)[:, -visual.shape[1]:]
        handles.append(lm.layers[attn_layer].register_forward_pre_hook(visual_in, with_kwargs=True))
    try:
        cache = compat.output_cache(lm(inputs_embeds=prefix, use_cache=True))
    finally:
        while handles:
            handles.pop().remove()
    cache.batch_repeat_interleave(batch.per_image)
    if attn_layer is not None:
        def capture(module, args, kwargs):
            captured["hidden"] = compat.hidden_states(args, kwargs)
            captured["rope"] = compat.require(kwargs, "position_embeddings", "The attention module")

        def answer_out(module, args, output):
            captured["answer_out"] = output[0] if isinstance(output, tuple) else output
        handles.append(lm.layers[attn_layer].self_attn.register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(lm.layers[attn_layer].register_forward_hook(answer_out))
    try:
        hidden = lm(inputs_embeds=embed(batch.suffix_ids), use_cache=True,
                    **{compat.cache_keyword(lm): cache}).last_hidden_state
    finally:
        while handles:
            handles.pop().remove()
    rows = torch.arange(hidden.shape[0])
    picked = torch.stack([hidden[rows, batch.answer_at], hidden[rows, batch.answer_at + 1]], dim=1)
    aux_logits = torch.split(heads["patch"](features), AUX_CLASSES, dim=-1)
    extra = {}
    if attn_layer is not None:
        # From the answer position (":") and from the question's last word (the shape or colour named).
        extra["attention"] = [answer_attention(lm.layers[attn_layer].self_attn, captured,
                                               cache.layers[attn_layer].keys, at, prefix.shape[1])
                              for at in (batch.answer_at, batch.answer_at - NOUN_OFFSET)]
        extra["visual_probe"] = torch.split(heads["visual"](captured["visual_in"]), AUX_CLASSES, dim=-1)
        extra["answer_probe"] = torch.split(heads["answer"](captured["answer_out"][rows, batch.answer_at]),
                                            AUX_CLASSES, dim=-1)
    return model.lm_head(picked), aux_logits, extra


def make_heads(model) -> nn.ModuleDict:
    """Training-only linear probes (dropped at export): on the tower's patch features, on the
    language model's visual tokens entering the supervised layer, and on the answer position
    leaving it; each predicts colour, shape and cell ids."""
    vision, text = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    return nn.ModuleDict(dict(patch=nn.Linear(vision, sum(AUX_CLASSES)), visual=nn.Linear(text, sum(AUX_CLASSES)),
                              answer=nn.Linear(text, sum(AUX_CLASSES))))


def answer_attention(attn, captured, keys, answer_at, prefix_length):
    """(BQ, heads, prefix_length) attention of each question's token `answer_at` over the prefix.

    Recomputed from the layer's q projection and RoPE and the cached (already rotated) keys; the
    softmax runs over every key the token can see (prefix and its own question), as in the model.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden, (cos, sin) = captured["hidden"], captured["rope"]
    rows = torch.arange(hidden.shape[0])
    cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)   # (BQ, S, hd)
    query = attn.q_proj(hidden[rows, answer_at]).view(hidden.shape[0], -1, attn.head_dim)   # (BQ, H, hd)
    query, _ = apply_rotary_pos_emb(query.unsqueeze(2), query.unsqueeze(2), cos[rows, answer_at][:, None],
                                    sin[rows, answer_at][:, None])
    keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)                          # (BQ, H, T, hd)
    logits = torch.einsum("bhd,bhtd->bht", query[:, :, 0].float(), keys.float()) * attn.scaling
    visible = torch.arange(keys.shape[2]) <= (prefix_length + answer_at)[:, None]            # causal
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    return logits.softmax(-1)[:, :, :prefix_length]


def _probe_loss(logits, labels):
    return sum(F.cross_entropy(l.float().flatten(0, -2), labels[..., i].flatten(), ignore_index=-100)
               for i, l in enumerate(logits)) / len(logits)


def losses(model, heads, batch: Batch, attn_layer: int | None = None):
    """(answer loss, patch loss, attention + probe losses or 0, correct per question)."""
    logits, aux_logits, extra = forward(model, heads, batch, attn_layer)
    attention = extra.get("attention")
    answer_loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())
    aux_loss = sum(F.cross_entropy(l.float().flatten(0, 1), batch.patch_labels[:, i].flatten())
                   for i, l in enumerate(aux_logits)) / len(aux_logits)
    attn_loss = torch.zeros(())
    if attention is not None:
        # Mean over heads of the attention mass on the asked object's patches (prefix = 2 text tokens,
        # then the visual tokens); questions without an object contribute nothing.
        has_target = batch.target_patches.any(1)
        for probs in attention:
            visual = probs[:, :, -batch.target_patches.shape[1]:]
            mass = (visual * batch.target_patches[:, None, :]).sum(-1).mean(1)
            if bool(has_target.any()):
                attn_loss = attn_loss - torch.log(mass[has_target] + 1e-6).mean() / len(attention)
        attn_loss = (attn_loss + _probe_loss(extra["visual_probe"], batch.patch_labels.transpose(1, 2))
                     + _probe_loss(extra["answer_probe"], batch.asked_labels))
    correct = (logits[:, 0].argmax(-1) == batch.targets[:, 0]) & (logits[:, 1].argmax(-1) == batch.targets[:, 1])
    return answer_loss, aux_loss, attn_loss, correct


@torch.no_grad()
def check_prefix_equivalence(model, processor, tokenizer, image_tokens: int):
    """The shared-prefix forward must give the logits of an ordinary full-prompt forward."""
    rng = random.Random(12345)
    items = sample_items(rng, 2, 3)
    batch = Batch(tokenizer, items, image_tokens)
    model.eval()
    logits, _, _ = forward(model, make_heads(model), batch)
    for k, question in enumerate(batch.questions[:4]):
        scene = items[k // batch.per_image][0]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.text}]}],
            add_generation_prompt=True)
        inputs = processor(images=scene.render(), text=prompt, return_tensors="pt")
        expected_ids = torch.cat([batch.prefix_ids[0], batch.suffix_ids[k][: batch.answer_at[k] + 1]])
        assert torch.equal(inputs["input_ids"][0], expected_ids), "tokenisation differs from the processor's"
        assert torch.allclose(inputs["pixel_values"][0], batch.pixel_values[k // batch.per_image], atol=1e-5)
        full = model(**inputs).logits[0, -1]
        diff = (full - logits[k, 0]).abs().max().item()
        assert diff < 1e-3, f"shared-prefix logits differ from the full forward by {diff}"
    model.train()


def make_eval_set(seed: int, n_images: int, per_image: int = 5):
    return sample_items(random.Random(seed), n_images, per_image)


@torch.no_grad()
def evaluate(model, heads, tokenizer, items, image_tokens: int, chunk: int = 10) -> dict:
    """Teacher-forced exact match (answer word and </s>) per question type."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for start in range(0, len(items), chunk):
        batch = Batch(tokenizer, items[start:start + chunk], image_tokens)
        *_, correct = losses(model, heads, batch)
        for qtype, ok in zip(batch.qtypes, correct.tolist()):
            hits.setdefault(qtype, []).append(int(ok))
    model.train()
    per_type = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return dict(accuracy=overall, per_type=per_type)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, model, heads, optimizer, step: int, history: list):
    tmp = path.with_suffix(".tmp")
    torch.save(dict(model=model.state_dict(), heads=heads.state_dict(), optimizer=optimizer.state_dict(),
                    step=step, history=history), tmp)
    tmp.replace(path)


def export(args, model, tokenizer, history: list, step: int):
    record = dict(trained_steps=step, seed=args.seed, images_per_step=args.images, questions_per_image=args.per_image,
                  lr=args.lr, arch=shapes_model.ARCH, last_eval=history[-1] if history else None,
                  command="python -m transprune.shapes.train " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
                      if k in ("seed", "steps", "images", "per_image", "lr", "aux_weight", "attn_weight",
                               "attn_layer", "attn_start")))
    shapes_model.save(model, tokenizer, Path(args.export_dir), record)
    print(f"exported step {step} to {args.export_dir}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/shapes", help="checkpoint and log folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--images", type=int, default=16, help="images per step")
    parser.add_argument("--per-image", type=int, default=8, help="independent questions per image")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--aux-weight", type=float, default=1.0)
    parser.add_argument("--attn-weight", type=float, default=1.0,
                        help="weight of the answer-attention loss (0 = off); see the module docstring")
    parser.add_argument("--attn-layer", type=int, default=9, help="1-indexed layer whose attention is supervised")
    parser.add_argument("--attn-start", type=int, default=0, help="first step with the attention loss")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bfloat16 autocast (faster only on CPUs with native bf16; 7x slower without)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--stop-at", default=None, help="UTC wall-clock HH:MM: checkpoint, export and stop")
    parser.add_argument("--export", action="store_true", help="only export the last checkpoint into the package")
    parser.add_argument("--export-dir", default=str(shapes_model.ASSET_DIR))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    # The tokenizer is saved with the run, so a resumed run (and the export) keeps the word ids the
    # first run trained with even if the project's base vocabulary changes in between.
    if (out / "tokenizer" / "tokenizer.json").exists():
        tokenizer = shapes_model.load_tokenizer(out / "tokenizer")
    else:
        tokenizer = shapes_model.build_tokenizer()
        tokenizer.save_pretrained(str(out / "tokenizer"))
    processor = shapes_model.build_processor(tokenizer)
    model = shapes_model.build_model(tokenizer, seed=args.seed).train()
    torch.manual_seed(args.seed + 1)
    heads = make_heads(model)
    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)],
                                  lr=args.lr, betas=(0.9, 0.98))
    image_tokens = model.config.image_seq_length
    step, history = 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        if "heads" in state:
            heads.load_state_dict(state["heads"])
            optimizer.load_state_dict(state["optimizer"])
        else:
            # A checkpoint from before the LM-side probes existed: only the patch head, and an
            # optimizer over fewer parameters, so its moments start afresh.
            heads["patch"].load_state_dict(state["aux_head"])
            print("old checkpoint format: patch head loaded, optimizer state reset", flush=True)
        step, history = state["step"], state["history"]
        print(f"resumed from {checkpoint} at step {step}", flush=True)
    if args.export:
        export(args, model, tokenizer, history, step)
        return
    check_prefix_equivalence(model, processor, tokenizer, image_tokens)
    eval_items = make_eval_set(seed=10_000 + args.seed, n_images=60)
    log = open(out / "log.jsonl", "a")
    stop_at = None
    if args.stop_at:
        hour, minute = map(int, args.stop_at.split(":"))
        now = time.gmtime()
        stop_at = time.time() + ((hour * 60 + minute) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    last_save, started, t0, window = time.time(), step, time.time(), []
    while step < args.steps:
        batch = step_batch(tokenizer, args.seed, step, args.images, args.per_image, image_tokens)
        attn_layer = args.attn_layer - 1 if args.attn_weight > 0 and step >= args.attn_start else None
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            answer_loss, aux_loss, attn_loss, correct = losses(model, heads, batch, attn_layer)
        loss = answer_loss + args.aux_weight * aux_loss + args.attn_weight * attn_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        window.append((answer_loss.item(), aux_loss.item(), attn_loss.item(), correct.float().mean().item()))
        if step % 25 == 0:
            a, x, t, c = (sum(v) / len(window) for v in zip(*window))
            elapsed = time.time() - t0
            print(f"step {step} answer_loss {a:.3f} aux_loss {x:.3f} attn_loss {t:.3f} train_acc {c:.3f} "
                  f"lr {lr_at(step, args):.2e} {elapsed / (step - started):.2f}s/step", flush=True)
            log.write(json.dumps(dict(step=step, answer_loss=a, aux_loss=x, attn_loss=t, train_acc=c,
                                      time=elapsed)) + "\n")
            log.flush()
            window = []
        if step % args.eval_every == 0 or step == args.steps:
            result = evaluate(model, heads, tokenizer, eval_items, image_tokens)
            history.append(dict(step=step, **result))
            print(f"eval step {step}: {json.dumps(result)}", flush=True)
            log.write(json.dumps(dict(step=step, eval=result)) + "\n")
            log.flush()
        timed_out = stop_at is not None and time.time() >= stop_at
        if step % args.checkpoint_every == 0 or step == args.steps or timed_out or time.time() - last_save > 300:
            save_checkpoint(checkpoint, model, heads, optimizer, step, history)
            last_save = time.time()
        if timed_out:
            print(f"stop time {args.stop_at} reached at step {step}", flush=True)
            break
    export(args, model, tokenizer, history, step)


if __name__ == "__main__":
    main()
