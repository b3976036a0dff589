"""Procedural shape scenes and one-word questions about them (the shapes-llava training data).

A scene is a 168x168 image with 1-4 objects on a light, plain or lightly noisy background.
Every object has a distinct shape (circle, square, triangle, star) and a distinct colour (red,
green, blue, yellow), so "the square" or "the red one" always names exactly one object.

The "where" rule: the image is cut into a 3x3 grid of equal cells and objects are placed only in
the five cells of a plus sign -- top, left, center, right, bottom -- one object per cell, with the
object wholly inside its cell. The answer to "Where is the {color} {shape}?" is the name of the
cell that contains the object; no object ever straddles two cells, so the rule is unambiguous.

Everything is drawn from a `random.Random`, so a seed fixes scenes, noise and questions.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 168
GRID = 3                                   # 3x3 cells of 56 px
CELL = IMAGE_SIZE // GRID

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 195, 25)}
# Cell name -> (row, column) in the 3x3 grid.
CELLS = {"top": (0, 1), "left": (1, 0), "center": (1, 1), "right": (1, 2), "bottom": (2, 1)}
NUMBERS = ("one", "two", "three", "four")
MAX_OBJECTS = 4

TEMPLATES = {
    "color": "What color is the {shape}?",
    "exists": "Is there a {color} {shape}?",
    "count": "How many shapes are there?",
    "where": "Where is the {color} {shape}?",
    "shape": "What shape is {color}?",
}
QUESTION_TYPES = tuple(TEMPLATES)
ANSWERS = {
    "color": tuple(COLORS),
    "exists": ("yes", "no"),
    "count": NUMBERS,
    "where": tuple(CELLS),
    "shape": SHAPES,
}


def vocabulary() -> list[str]:
    """Every word the templates and answers use, lower case, "?" as its own word, sorted."""
    words = set()
    for template in TEMPLATES.values():
        words.update(re.sub(r"\{\w+\}", " ", template).replace("?", " ? ").lower().split())
    for answers in ANSWERS.values():
        words.update(answers)
    words.update(SHAPES)
    words.update(COLORS)
    return sorted(words)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: str
    cx: float          # centre, pixels
    cy: float
    radius: float      # circumradius, pixels


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int]
    noise: float                     # standard deviation of the Gaussian pixel noise (0 = plain)
    noise_seed: int
    size: int = IMAGE_SIZE
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def find(self, shape: str | None = None, color: str | None = None) -> Obj | None:
        for obj in self.objects:
            if (shape is None or obj.shape == shape) and (color is None or obj.color == color):
                return obj
        return None

    def render(self) -> Image.Image:
        """The RGB image (deterministic: the noise comes from `noise_seed`)."""
        if "image" not in self._cache:
            image = Image.new("RGB", (self.size, self.size), self.background)
            draw = ImageDraw.Draw(image)
            for obj in self.objects:
                draw_shape(draw, obj.shape, obj.cx, obj.cy, obj.radius, COLORS[obj.color])
            if self.noise > 0:
                pixels = np.asarray(image, dtype=np.float32)
                noise = np.random.default_rng(self.noise_seed).normal(0.0, self.noise, pixels.shape)
                image = Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))
            self._cache["image"] = image
        return self._cache["image"].copy()

    def object_map(self) -> np.ndarray:
        """(size, size) uint8: 0 background, i+1 where object i is drawn."""
        image = Image.new("L", (self.size, self.size), 0)
        draw = ImageDraw.Draw(image)
        for i, obj in enumerate(self.objects):
            draw_shape(draw, obj.shape, obj.cx, obj.cy, obj.radius, i + 1)
        return np.asarray(image)

    def patch_objects(self, patch: int) -> np.ndarray:
        """(side*side,) int: per patch (row-major) the object index covering it most, -1 = background.

        A patch belongs to an object if the object covers at least a fifth of it.
        """
        side = self.size // patch
        labels = self.object_map()[: side * patch, : side * patch].reshape(side, patch, side, patch)
        labels = labels.transpose(0, 2, 1, 3).reshape(side * side, patch * patch)
        counts = np.stack([(labels == i + 1).sum(1) for i in range(len(self.objects))], 1)
        best = counts.argmax(1)
        covered = counts.max(1) * 5 >= patch * patch
        return np.where(covered, best, -1)


def _polygon(cx: float, cy: float, radius: float, points: int, inner: float | None, rotation: float = -90.0):
    vertices = []
    count = points * 2 if inner else points
    for k in range(count):
        vertex_radius = radius * (inner if inner and k % 2 else 1.0)
        angle = math.radians(rotation + 360.0 * k / count)
        vertices.append((cx + vertex_radius * math.cos(angle), cy + vertex_radius * math.sin(angle)))
    return vertices


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill):
    """Draw one `shape` of circumradius `radius` centred at (cx, cy), in pixels of `draw`'s image.

    The one geometry of every shape scene: the training data's and the app's example scenes
    (components/examples.py), so what the model was trained on is what the examples show.
    """
    r = radius
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = r * 0.8
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        # Centred on its bounding box rather than its centroid so it fills the cell evenly.
        vertices = [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
        draw.polygon(vertices, fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, inner=0.45), fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def sample_scene(rng: random.Random, num_objects: int | None = None) -> Scene:
    """1-4 objects with distinct shapes, colours and cells, on a light background."""
    n = num_objects or rng.randint(1, MAX_OBJECTS)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    cells = rng.sample(list(CELLS), n)
    objects = []
    for shape, color, cell in zip(shapes, colors, cells):
        radius = rng.uniform(18.0, 25.0)
        row, col = CELLS[cell]
        margin = radius + 1.0
        cx = rng.uniform(col * CELL + margin, (col + 1) * CELL - margin)
        cy = rng.uniform(row * CELL + margin, (row + 1) * CELL - margin)
        objects.append(Obj(shape, color, cell, cx, cy, radius))
    grey = rng.randint(200, 250)
    background = tuple(min(255, grey + rng.randint(-8, 8)) for _ in range(3))
    noise = 0.0 if rng.random() < 0.5 else rng.uniform(2.0, 10.0)
    return Scene(objects=objects, background=background, noise=noise, noise_seed=rng.getrandbits(32))


@dataclass(frozen=True)
class Question:
    qtype: str
    text: str
    answer: str


def sample_question(scene: Scene, rng: random.Random, qtype: str | None = None) -> Question:
    """A question of type `qtype` (random if None) about `scene`, with its one-word answer."""
    qtype = qtype or rng.choice(QUESTION_TYPES)
    if qtype not in TEMPLATES:
        raise ValueError(f"Unknown question type {qtype!r}; choose one of {QUESTION_TYPES}.")
    template = TEMPLATES[qtype]
    obj = rng.choice(scene.objects)
    if qtype == "color":
        return Question(qtype, template.format(shape=obj.shape), obj.color)
    if qtype == "shape":
        return Question(qtype, template.format(color=obj.color), obj.shape)
    if qtype == "where":
        return Question(qtype, template.format(color=obj.color, shape=obj.shape), obj.cell)
    if qtype == "count":
        return Question(qtype, template, NUMBERS[len(scene.objects) - 1])
    # exists: half yes; the no's prefer "hard" pairs whose colour and shape are both in the scene.
    if rng.random() < 0.5:
        return Question(qtype, template.format(color=obj.color, shape=obj.shape), "yes")
    present = {(o.color, o.shape) for o in scene.objects}
    colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    hard = [(c, s) for c in sorted(colors) for s in sorted(shapes) if (c, s) not in present]
    pool = hard if hard and rng.random() < 0.7 else [(c, s) for c in COLORS for s in SHAPES
                                                     if (c, s) not in present]
    color, shape = rng.choice(pool)
    return Question(qtype, template.format(color=color, shape=shape), "no")


def answer(scene: Scene, question: str) -> str:
    """Recompute the answer of a template question from the scene (an independent check)."""
    words = question.lower().rstrip("?").split()
    if words[:3] == ["how", "many", "shapes"]:
        return NUMBERS[len(scene.objects) - 1]
    if words[:4] == ["what", "color", "is", "the"]:
        return scene.find(shape=words[4]).color
    if words[:3] == ["what", "shape", "is"]:
        return scene.find(color=words[3]).shape
    if words[:3] == ["is", "there", "a"]:
        return "yes" if scene.find(color=words[3], shape=words[4]) else "no"
    if words[:3] == ["where", "is", "the"]:
        return scene.find(color=words[3], shape=words[4]).cell
    raise ValueError(f"Not a template question: {question!r}")


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: Question

    @property
    def image(self) -> Image.Image:
        return self.scene.render()


def dataset(seed: int, n: int, per_scene: int = 1) -> list[Example]:
    """n examples drawn with `seed`; question types cycle so each type gets n/5 (+-1) questions."""
    rng = random.Random(seed)
    examples, scene = [], None
    for i in range(n):
        if i % per_scene == 0:
            scene = sample_scene(rng)
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        examples.append(Example(scene, sample_question(scene, rng, qtype)))
    return examples


def example_images(seed: int = 7, n: int = 4) -> list[tuple[Image.Image, str, str]]:
    """(image, question, answer) triples for the app's bundled examples."""
    return [(e.image, e.question.text, e.question.answer) for e in dataset(seed, n)]
