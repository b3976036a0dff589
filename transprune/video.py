"""Video input: decode a file with PyAV, sample frames uniformly, build each family's video inputs.

    video = read_video("clip.mp4", num_frames=DEFAULT_FRAMES["video_llava"])   # Video: frames + metadata
    inputs = video_inputs(processor, "video_llava", prompt, videos=[video])

Decoding is ours (PyAV, `av`), never torchcodec or torchvision. Sampling rule: of the T decodable
frames of the first video stream, frame i of n is round(i * (T - 1) / (n - 1)) -- evenly spaced,
first and last frame included (n = 1 takes the middle frame); a clip shorter than n frames repeats
frames so the model still gets n.

Which families take video, how many frames they sample and how many tokens a video becomes are
adapter facts (`transprune.adapters`: `video_frames`, `required_frames`, `video_token_count`).

transformers' video processors need torchvision. When the processor has one (a real checkpoint on
a machine with torchvision) it is used as is. Otherwise `FramesVideoProcessor` stands in: it does
what the family's video processor does, with the image processor's parameters, in PIL/numpy, in
the family's adapter method `video_pixel_values` (each video family writes its own, with the shared
pieces of `transprune.frames`):

- Video-LLaVA: each frame through the image processor (shortest-edge resize, centre crop, CLIP
  normalisation, exactly like VideoLlavaVideoProcessor); the CLS token of every frame is kept.
- LLaVA-OneVision: each frame squashed to the base tile (size height x width, no crop, no AnyRes),
  normalised; the model pools each frame's patch grid 2x2 and appends one newline token.
- Qwen2.5-VL: frames resized with smart_resize (multiples of 28 px, pixel count within the image
  processor's min_pixels and min(max_pixels, 768*28*28), the video processor's cap), an odd frame
  count padded by repeating the last frame, patchified into (T/2 * h/14 * w/14, 3*2*14*14) with
  video_grid_thw = (T/2, h/14, w/14); second_per_grid_ts = 2 / sampled fps.

The processor then expands the prompt's video placeholder itself (its own replace_video_token),
so the number of video tokens always agrees with what the model computes.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import adapters
from .frames import setting
from .measure import available_memory_bytes
from .adapters.qwen2_5_vl import qwen_frame_size  # noqa: F401  (re-exported: where a Qwen frame is resized to)

# Frames sampled from a file when the caller does not say, per video family (adapter facts).
DEFAULT_FRAMES = {name: adapter.video_frames for name, adapter in adapters.FAMILIES.items() if adapter.video_frames}
# Families whose checkpoints only work with one frame count.
REQUIRED_FRAMES = {name: adapter.required_frames for name, adapter in adapters.FAMILIES.items()
                   if adapter.required_frames}
# The most frames a file may be sampled to. The paper's largest setting is 32 (OneVision); 64 leaves
# room, and keeps a mistyped count (10000) from decoding gigabytes of frames.
MAX_FRAMES = 64
# The sampled frames are held decoded (RGB, 3 bytes a pixel) before the processor sees them; a
# request needing more than this (or than half the memory the system reports available) is refused
# before decoding.
MAX_DECODED_BYTES = 2 * 2**30


class VideoError(ValueError):
    """A video could not be used; the message says what was wrong and what to pass instead.

    `summary` is the message without the decoder's own text (`detail`), for showing to end users.
    """

    def __init__(self, summary: str, detail: str | None = None):
        super().__init__(summary + (f" (decoder: {detail})" if detail else ""))
        self.summary = summary
        self.detail = detail


def check_num_frames(num_frames) -> int:
    """`num_frames` as an int in [1, MAX_FRAMES]; anything else is a VideoError saying what to pass."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise VideoError(f"num_frames must be a whole number from 1 to {MAX_FRAMES}, got {num_frames!r}.")
    if not 1 <= num_frames <= MAX_FRAMES:
        raise VideoError(f"num_frames must be from 1 to {MAX_FRAMES}, got {num_frames}.")
    return int(num_frames)


def check_decoded_size(width: int, height: int, num_frames: int, available: int | None = None) -> None:
    """Refuse sampling `num_frames` frames of width x height when holding them decoded would need more
    than MAX_DECODED_BYTES or half the available memory."""
    needed = 3 * width * height * num_frames
    available = available_memory_bytes() if available is None else available
    budget = MAX_DECODED_BYTES if available is None else min(MAX_DECODED_BYTES, available // 2)
    if needed > budget:
        fit = max(1, budget // (3 * width * height))
        raise VideoError(f"Sampling {num_frames} frames of {width}x{height} needs about {needed / 2**30:.1f} GB of "
                         f"memory (the limit here is {budget / 2**30:.1f} GB): pass num_frames={fit} or fewer, "
                         "or a smaller video.")


@dataclass
class Video:
    """Sampled RGB frames of one video and where they came from.

    `indices` are the sampled frames' numbers among the `total_frames` decodable frames; `fps` is
    the stream's average frame rate (None if the container does not say).
    """
    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
    fps: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        return self.frames[0].size

    def metadata(self) -> dict:
        """transformers' VideoMetadata fields, so the processor knows the sampled frame rate."""
        width, height = self.size
        return dict(total_num_frames=self.total_frames, fps=self.fps, width=width, height=height,
                    duration=self.total_frames / self.fps if self.fps else None, video_backend="pyav",
                    frames_indices=list(self.indices))

    @classmethod
    def from_frames(cls, frames, fps: float | None = None) -> "Video":
        """A Video of already-sampled frames (PIL images or HxWx3 uint8 arrays)."""
        frames = _as_rgb_frames(frames)
        return cls(frames=frames, indices=list(range(len(frames))), total_frames=len(frames), fps=fps)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The module's uniform rule: n evenly spaced frame numbers in [0, total), ends included."""
    if total <= 0:
        raise VideoError("The video has no decodable frames.")
    if num_frames < 1:
        raise VideoError(f"num_frames must be at least 1, got {num_frames}.")
    if num_frames == 1:
        return [(total - 1) // 2]
    return [int(round(i * (total - 1) / (num_frames - 1))) for i in range(num_frames)]


def _describe(source) -> str:
    """How messages name the video: its path when the caller gave one (a file object or bytes, as the
    app passes them, are "the uploaded video": no server path reaches a visitor)."""
    if isinstance(source, (str, os.PathLike)):
        return f"the video {os.fspath(source)!r}"
    return "the uploaded video"


def _subject(source) -> str:
    """_describe(source) at the start of a sentence."""
    text = _describe(source)
    return text[0].upper() + text[1:]


def _open(source):
    import av

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise VideoError(f"{_subject(source)} does not exist.")
    try:
        return av.open(source if not isinstance(source, os.PathLike) else os.fspath(source), mode="r")
    except (av.error.FFmpegError, OSError, EOFError) as error:
        raise VideoError(f"Could not read {_describe(source)} as a video. The file is corrupt, truncated or not "
                         "a video: upload an MP4, WebM, AVI or MKV file.", detail=str(error)) from error


def _video_stream(container, source):
    if container.streams.video:
        return container.streams.video[0]
    if container.streams.audio:
        raise VideoError(f"{_subject(source)} contains only audio (no video stream). Upload a file with a "
                         "video track.")
    raise VideoError(f"{_subject(source)} has no video stream. Upload a video file (MP4, WebM, AVI, MKV).")


def _decode(source, keep: set[int] | None):
    """(frames kept, number of frames decoded, fps, (width, height) of the stream); frames are PIL
    RGB, `keep=None` keeps none."""
    import av

    kept: dict[int, Image.Image] = {}
    count = 0
    container = _open(source)
    try:
        stream = _video_stream(container, source)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if keep is not None and count in keep:
                    kept[count] = frame.to_image().convert("RGB")
                count += 1
        except (av.error.FFmpegError, EOFError) as error:
            if count == 0:
                raise VideoError(f"Could not decode any frame of {_describe(source)}. The video track is corrupt "
                                 "or uses an unsupported codec.", detail=str(error)) from error
            # A damaged tail: use the frames before it.
        fps = float(stream.average_rate) if stream.average_rate else None
        size = (stream.codec_context.width, stream.codec_context.height)
    finally:
        container.close()
    return kept, count, fps, size


def read_video(source, num_frames: int) -> Video:
    """Decode `source` (a path, bytes or a binary file object) and sample `num_frames` RGB frames.

    Counts the decodable frames in a first pass (container frame counts are often missing or
    wrong), then decodes again keeping the sampled ones. Raises VideoError for a corrupt or
    non-video file, an audio-only file, a video track with no decodable frame, a `num_frames`
    outside [1, MAX_FRAMES], and frames that would not fit in memory decoded (checked before the
    second pass, which is the one that holds frames).
    """
    num_frames = check_num_frames(num_frames)
    if hasattr(source, "seek"):
        source = source.read()  # two passes need the bytes twice
    _, total, _, (width, height) = _decode(source, None)
    if total == 0:
        raise VideoError(f"{_subject(source)} has a video stream but no decodable frames (an empty or "
                         "truncated recording). Upload a video with at least one frame.")
    check_decoded_size(width, height, num_frames)
    indices = sample_indices(total, num_frames)
    kept, _, fps, _ = _decode(source, set(indices))
    missing = [i for i in indices if i not in kept]
    if missing:
        raise VideoError(f"Frames {missing} of {_describe(source)} could not be decoded on the second pass; "
                         "the file is damaged. Re-encode it (e.g. ffmpeg -i in.mp4 out.mp4) and try again.")
    frames = [kept[i] for i in indices]
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size, Image.BICUBIC) for f in frames]  # mid-stream size change
    return Video(frames=frames, indices=indices, total_frames=total, fps=fps)


def _as_rgb_frames(frames) -> list[Image.Image]:
    if isinstance(frames, (torch.Tensor, np.ndarray)) and getattr(frames, "ndim", 0) == 4:
        frames = list(frames)
    if not isinstance(frames, (list, tuple)):
        raise VideoError(f"A video must be a file path or a list of frames, got {type(frames).__name__}.")
    if not frames:
        raise VideoError("The video has zero frames; pass at least one frame.")
    result = []
    for frame in frames:
        if isinstance(frame, torch.Tensor):
            frame = frame.numpy()
        if isinstance(frame, np.ndarray):
            frame = Image.fromarray(frame.astype(np.uint8))
        if not isinstance(frame, Image.Image):
            raise VideoError(f"Video frames must be PIL images or HxWx3 uint8 arrays, got {type(frame).__name__}.")
        result.append(frame.convert("RGB"))
    return result


def as_video(video, family: str, num_frames: int | None = None) -> Video:
    """A Video from a path / bytes (decoded and sampled), a list of frames or a Video.

    A path uses `num_frames` or the family's default count. Frames given directly are used as
    they are, except that a family needing an exact count (Video-LLaVA: 8) refuses others.
    """
    if num_frames is not None:
        check_num_frames(num_frames)
    if isinstance(video, Video):
        result = video
    elif isinstance(video, (str, os.PathLike, bytes, bytearray)) or hasattr(video, "read"):
        result = read_video(video, DEFAULT_FRAMES.get(family, 8) if num_frames is None else num_frames)
    else:
        result = Video.from_frames(video)
    required = REQUIRED_FRAMES.get(family)
    if required is not None and len(result.frames) != required:
        raise VideoError(f"{family} takes exactly {required} frames per video, got {len(result.frames)}. Pass a "
                         f"video file (it is sampled to {required} frames) or exactly {required} frames.")
    return result


# ---------------------------------------------------------------------------- per-family frames
class FramesVideoProcessor:
    """A torchvision-free stand-in for a family's video processor (see the module docstring).

    Called like a transformers video processor with a list of videos (T x H x W x 3 uint8 arrays)
    and returns `pixel_values_videos` (plus `video_grid_thw` for Qwen) and `video_metadata`.
    """

    stand_in = True   # not a transformers video processor (qwen_frame_size applies the video pixel cap)

    def __init__(self, family: str, image_processor):
        if family not in DEFAULT_FRAMES:
            raise VideoError(f"{family} models take no video; video families: {', '.join(DEFAULT_FRAMES)}.")
        self.family, self.image_processor = family, image_processor
        self.adapter = adapters.by_family(family)
        # Processors read these off their video processor (Qwen's expands a video placeholder with merge_size).
        self.patch_size = int(setting(image_processor, "patch_size", 14))
        self.merge_size = int(setting(image_processor, "merge_size", 2))
        self.temporal_patch_size = int(setting(image_processor, "temporal_patch_size", 2))

    def __call__(self, videos, video_metadata=None, return_tensors=None, **kwargs):
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        clips = [[Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in video] for video in videos]
        metadata = video_metadata or [Video.from_frames(clip).metadata() for clip in clips]
        data = dict(self.adapter.video_pixel_values(self.image_processor, clips))
        data["video_metadata"] = [m if isinstance(m, VideoMetadata) else VideoMetadata(**m) for m in metadata]
        return BatchFeature(data, skip_tensor_conversion=["video_metadata"])


def has_video_processor(processor) -> bool:
    return getattr(processor, "video_processor", None) is not None


def video_inputs(processor, family: str, text, videos: list[Video], images=None) -> dict:
    """Processor inputs (tensors) for a prompt with video placeholders (and optionally images).

    Uses the processor's own video processor when it has one, else a shallow copy of the
    processor carrying a FramesVideoProcessor; either way the processor expands the placeholders.
    """
    if not has_video_processor(processor):
        processor = copy.copy(processor)
        processor.video_processor = FramesVideoProcessor(family, processor.image_processor)
    clips = [np.stack([np.asarray(frame) for frame in video.frames]) for video in videos]
    kwargs = dict(text=text, videos=clips, video_metadata=[video.metadata() for video in videos],
                  return_tensors="pt")
    if not adapters.FAMILIES[family].video_metadata:
        kwargs.pop("video_metadata")  # only some processors (Qwen's) read the metadata (for the frame rate)
    if images:
        kwargs["images"] = images
    try:
        return dict(processor(**kwargs))
    except ValueError as error:
        raise VideoError(f"The processor refused the video: {error}") from error


# ---------------------------------------------------------------------------- overlay
def frame_token_groups(layout, num_frames: int) -> list[torch.Tensor]:
    """Per frame, the visual tokens drawn on it: those whose layout frame is the latest one at or
    before it (a Qwen2.5-VL token, labelled with the first frame of its pair, covers both)."""
    labels = layout.frame if layout.frame is not None else torch.zeros(len(layout.boxes), dtype=torch.long)
    placed = ~torch.isnan(layout.boxes).any(dim=1)
    present = sorted(set(labels[placed].tolist()))
    groups = []
    for f in range(num_frames):
        earlier = [v for v in present if v <= f]
        owner = earlier[-1] if earlier else None
        groups.append(((labels == owner) & placed).nonzero().flatten() if owner is not None
                      else torch.zeros(0, dtype=torch.long))
    return groups


def video_overlay(frames, layout, trace, height: int = 96, dim: float = 0.3) -> Image.Image:
    """One picture: a row of the sampled frames, then one row per pruning stage.

    In a stage's row the area of every token pruned by that stage (or earlier) is dimmed to
    `dim` of its brightness; kept tokens are shown as they are. Areas no token covers (outside
    Video-LLaVA's centre crop) are dimmed in the stage rows too. Frames are scaled to `height` px.
    """
    frames = _as_rgb_frames(frames)
    width = max(1, round(frames[0].width * height / frames[0].height))
    scale_x, scale_y = width / frames[0].width, height / frames[0].height
    groups = frame_token_groups(layout, len(frames))
    thumbs = [f.resize((width, height), Image.BICUBIC) for f in frames]
    stages = list(trace.stages) if trace is not None else []
    canvas = Image.new("RGB", (width * len(frames), height * (1 + len(stages))))
    for col, thumb in enumerate(thumbs):
        canvas.paste(thumb, (col * width, 0))
    for row, stage in enumerate(stages, start=1):
        kept = set(stage.kept.tolist())
        for col, (thumb, tokens) in enumerate(zip(thumbs, groups)):
            mask = np.zeros((height, width), dtype=bool)
            for token in tokens.tolist():
                if token in kept:
                    x0, y0, x1, y1 = layout.boxes[token].tolist()
                    mask[max(0, round(y0 * scale_y)):round(y1 * scale_y),
                         max(0, round(x0 * scale_x)):round(x1 * scale_x)] = True
            pixels = np.asarray(thumb, dtype=np.float32)
            pixels = np.where(mask[:, :, None], pixels, pixels * dim).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels), (col * width, row * height))
    return canvas
