"""Bundled example scenes, drawn from code (no downloads), and the Examples block that offers them.

The scenes follow the shapes-llava training distribution (transprune/shapes/scenes.py): flat
red/green/blue/yellow circles, squares, triangles and stars on a light grey background, one per
cell of a plus sign (top, left, center, right, bottom) of the square the model sees, asked with
the same question templates, so the trained offline model can answer them. They are drawn with the
training scenes' own colours, 3x3 cell grid and `draw_shape`, at 3x
its 168 px input (crisper on a projector). Two have a wide or tall frame: LLaVA's center crop
never sees the shapes outside the middle square, which the overlays show hatched.

The PNGs live in assets/examples/; `python -m components.examples` redraws them, and the app
redraws any that are missing. One video example (a red circle crossing the scene, 24 frames) is
drawn the same way and written with PyAV as WebM; clicking it switches to a video-capable model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# The training scenes' colours, cells and shape geometry, so answers transfer.
from transprune.shapes.scenes import CELLS, COLORS as COLOURS, GRID, draw_shape

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"

VIEW = 504                 # side of the square the model sees (3 x 168)
RADIUS = 21 / 168          # circumradius as a share of VIEW, mid-range of the training scenes
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    kind: str                        # circle, square, triangle, star
    colour: str                      # a key of COLOURS
    where: str | tuple[float, float]  # a cell of the central view, or (x, y) in pixels of the frame


@dataclass(frozen=True)
class Scene:
    name: str
    size: tuple[int, int]
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    question: str


SCENES: tuple[Scene, ...] = (
    Scene("circle_and_square", (VIEW, VIEW), (236, 236, 238),
          (Shape("circle", "red", "left"), Shape("square", "blue", "right")), "What color is the circle?"),
    Scene("four_shapes", (VIEW, VIEW), (228, 231, 226),
          (Shape("star", "yellow", "top"), Shape("triangle", "green", "left"), Shape("circle", "blue", "right"),
           Shape("square", "red", "bottom")), "How many shapes are there?"),
    Scene("where_is_the_star", (VIEW, VIEW), (242, 240, 236),
          (Shape("star", "red", "bottom"), Shape("triangle", "blue", "center")), "Where is the red star?"),
    Scene("wide_frame", (2 * VIEW, VIEW), (230, 234, 240),
          (Shape("star", "yellow", "center"), Shape("circle", "blue", "top"), Shape("triangle", "green", (110, 280)),
           Shape("square", "red", (900, 240))), "What shape is yellow?"),
    Scene("tall_frame", (VIEW, 3 * VIEW // 2), (238, 236, 230),
          (Shape("square", "green", "center"), Shape("triangle", "blue", (252, 70)),
           Shape("circle", "red", (252, 690))), "Is there a green square?"),
)


@dataclass(frozen=True)
class Example:
    """One row of the Examples block: a scene with the settings it runs under and a label."""
    scene: Scene
    label: str
    method: str = "TransPrune"
    budget: str = "High"
    control: bool = False            # True: shown to change the answer (the honest counter-example)


# At the default settings every example but the control gives the same answer pruned and unpruned
# (tests/test_app.py checks this on shapes-llava); the control prunes the same scene at random, with
# High's budget, and loses the colour.
EXAMPLES: tuple[Example, ...] = (
    Example(SCENES[0], "Colour: red circle, blue square"),
    Example(SCENES[1], "Count: four shapes"),
    Example(SCENES[2], "Where: red star at the bottom"),
    Example(SCENES[3], "Wide frame: the crop hides two shapes"),
    Example(SCENES[4], "Tall frame: is there a green square?"),
    Example(SCENES[0], "Control: Random pruning, same budget, loses the colour", method="Random", control=True),
)


def _centre(scene: Scene, shape: Shape) -> tuple[float, float]:
    """(x, y) in pixels of the frame: as given, or the centre of a cell of the central square."""
    if isinstance(shape.where, tuple):
        return shape.where
    width, height = scene.size
    left, top = (width - VIEW) / 2, (height - VIEW) / 2   # the central square a center crop keeps
    row, col = CELLS[shape.where]
    return left + (col + 0.5) / GRID * VIEW, top + (row + 0.5) / GRID * VIEW


def draw_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.size` (drawn at 4x, then downsampled for smooth edges)."""
    width, height = scene.size
    big = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), scene.background)
    draw = ImageDraw.Draw(big)
    for shape in scene.shapes:
        cx, cy = _centre(scene, shape)
        draw_shape(draw, shape.kind, cx * SUPERSAMPLE, cy * SUPERSAMPLE, RADIUS * VIEW * SUPERSAMPLE,
                   COLOURS[shape.colour])
    return big.resize((width, height), Image.Resampling.LANCZOS)


def example_path(scene: Scene, directory: Path = EXAMPLES_DIR) -> Path:
    return directory / f"{scene.name}.png"


def write_examples(directory: Path = EXAMPLES_DIR, overwrite: bool = True) -> list[Path]:
    """Draw every scene into `directory` (only missing ones unless `overwrite`); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for scene in SCENES:
        path = example_path(scene, directory)
        if overwrite or not path.exists():
            draw_scene(scene).save(path, optimize=True)
        paths.append(path)
    return paths


def example_paths(directory: Path = EXAMPLES_DIR) -> dict[str, str]:
    """Scene name -> PNG path, drawing any missing files first (into a temporary folder when the
    checkout is read-only)."""
    try:
        paths = write_examples(directory, overwrite=False)
    except OSError:
        import tempfile
        paths = write_examples(Path(tempfile.mkdtemp(prefix="transprune-examples-")), overwrite=False)
    return {scene.name: str(path) for scene, path in zip(SCENES, paths)}


VIDEO_NAME = "moving_circle.webm"
VIDEO_QUESTION = "What moves in the video?"
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE = 24, 8, (336, 252)


def video_frame(index: int) -> Image.Image:
    """Frame `index` of the video example: a red circle moving left to right over a blue square."""
    width, height = VIDEO_SIZE
    scale = width / VIEW
    big = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), (236, 236, 238))
    draw = ImageDraw.Draw(big)
    radius = RADIUS * VIEW * scale * SUPERSAMPLE
    draw_shape(draw, "square", width * 0.5 * SUPERSAMPLE, height * 0.72 * SUPERSAMPLE, radius, COLOURS["blue"])
    x = (0.12 + 0.76 * index / (VIDEO_FRAMES - 1)) * width
    draw_shape(draw, "circle", x * SUPERSAMPLE, height * 0.35 * SUPERSAMPLE, radius, COLOURS["red"])
    return big.resize((width, height), Image.Resampling.LANCZOS)


def write_video(path: Path) -> Path:
    """Encode the video example to `path` as WebM (VP8): browsers play it without proprietary codecs
    (Chromium refused an MPEG-4 Part 2 file as "Video not playable")."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = *VIDEO_SIZE, "yuv420p"
        for index in range(VIDEO_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.asarray(video_frame(index)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_example_path(directory: Path = EXAMPLES_DIR) -> str:
    """The video example's path, writing it first when missing (into a temporary folder when the
    checkout is read-only)."""
    path = directory / VIDEO_NAME
    if path.exists():
        return str(path)
    try:
        return str(write_video(path))
    except OSError:
        import tempfile
        return str(write_video(Path(tempfile.mkdtemp(prefix="transprune-examples-")) / VIDEO_NAME))


def build_video(image, video, question, model, video_model: str | None):
    """The video example: clicking it clears the image, loads the clip, asks about it and picks
    `video_model` (a video-capable model this app offers); None: no such model, no example."""
    import gradio as gr

    from transprune.models import REGISTRY

    if video_model is None:
        return None
    # The model's own label, so the page says what answers to expect ("… (random weights)": noise).
    spec = REGISTRY.get(video_model)
    return gr.Examples(examples=[[None, video_example_path(), VIDEO_QUESTION, video_model]],
                       inputs=[image, video, question, model], example_labels=["Video: a red circle moves"],
                       label=f"Video example (switches the model to {spec.label if spec else video_model})",
                       elem_id="video-examples")


def example_rows(directory: Path = EXAMPLES_DIR) -> list[list[str]]:
    """[[image path, question, method, budget], ...] for gr.Examples, one per EXAMPLES entry."""
    paths = example_paths(directory)
    return [[paths[example.scene.name], example.scene.question, example.method, example.budget]
            for example in EXAMPLES]


def build(image, question, method, budget, model=None, default_model: str | None = None):
    """The Examples block: clicking a row fills the image, the question, the method and the budget, and
    with `model`, picks `default_model` again (after the video example switched to a video model)."""
    import gradio as gr

    rows, inputs = example_rows(), [image, question, method, budget]
    if model is not None:
        rows, inputs = [row + [default_model] for row in rows], inputs + [model]
    return gr.Examples(examples=rows, inputs=inputs,
                       example_labels=[example.label for example in EXAMPLES],
                       label="Examples (drawn by the project; the last one is the control)",
                       examples_per_page=len(EXAMPLES), elem_id="examples")


if __name__ == "__main__":
    for written in write_examples():
        print(written)
    print(write_video(EXAMPLES_DIR / VIDEO_NAME))
