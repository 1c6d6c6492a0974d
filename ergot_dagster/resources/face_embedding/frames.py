"""Turning a stage's input (a portrait image or a video) into the pictures faces are looked for in.

Every picture is written as an RGB PNG in source pixels (`frames/`): an image with its EXIF
orientation applied, or a video frame at its display aspect ratio. Crops are cut from these. The
picture the engine analyses (`detect/`) is the same file, or a copy scaled down so that its longer
side is at most `max_side`; boxes found in it are scaled back to source pixels.

Video frames are cut the way the `sample_frames` FFmpeg recipe cuts them (the same helpers: input
seeking, a decode-from-start fallback, every ffmpeg bounded by the stage deadline and killed with
its process group on cancellation): n = floor(duration / interval_s) frames, at least 1 and at
most `max_frames`, frame i at duration * (i + 0.5) / n.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.face_embedding.model import FaceParams
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext
from ergot_dagster.resources.ffmpeg.stills import (
    FrameGrab,
    grab_frames,
    last_frame_time,
    require_video,
    video_duration,
    video_map,
)
from ergot_dagster.resources.runtime import StageFile

# PNG compression costs time and buys nothing for files that live only as long as the stage.
_PNG_LEVEL = 1
# A video frame at its display aspect ratio, with square pixels (no commas: it is one filter arg).
_DISPLAY_SCALE = "scale=trunc(iw*sar/2)*2:ih,setsar=1"


@dataclass(frozen=True)
class PreparedFrame:
    """One picture to analyse: where it came from, its source-size file, and the analysed copy."""

    index: int
    time_s: float | None
    source: Path
    detect: Path
    width: int
    height: int
    detect_width: int
    detect_height: int

    @property
    def scale(self) -> float:
        """Analysed size / source size (1.0 when analysed at full size)."""
        return self.detect_width / self.width


@dataclass(frozen=True)
class PreparedInput:
    """The stage input made ready: what it was, and its pictures in order."""

    name: str
    media_type: str
    kind: Literal["image", "video"]
    frames: list[PreparedFrame]
    duration_s: float | None = None


def prepare(
    stage_file: StageFile,
    params: FaceParams,
    workdir: Path,
    *,
    deadline: float,
    log: logging.Logger,
    ffmpeg_path: str,
) -> PreparedInput:
    """Write the pictures of `stage_file` under `workdir`; `PermanentRuntimeError` for media that
    is neither a decodable image nor a video with frames."""
    major = stage_file.media_type.split("/", 1)[0]
    source_dir, detect_dir = workdir / "frames", workdir / "detect"
    source_dir.mkdir(parents=True, exist_ok=True)
    detect_dir.mkdir(parents=True, exist_ok=True)
    ctx = RecipeContext(
        inputs={"media": stage_file},
        params={},
        workdir=workdir,
        deadline=deadline,
        log=log,
        ffmpeg_path=ffmpeg_path,
    )
    if major == "image":
        path = source_dir / "frame_0001.png"
        _write_image(ctx, stage_file.path, path)
        frame = _detect_copy(0, None, path, detect_dir, params.max_side)
        return PreparedInput(
            name=stage_file.path.name,
            media_type=stage_file.media_type,
            kind="image",
            frames=[frame],
        )
    if major == "video":
        return _sample_video(ctx, stage_file, params, source_dir, detect_dir)
    raise PermanentRuntimeError(
        f"{stage_file.path.name} is {stage_file.media_type}; faces are found in images and videos"
    )


def _write_image(ctx: RecipeContext, source: Path, target: Path) -> None:
    """`source` as an upright RGB PNG. Pillow first; what it cannot read goes through ffmpeg."""
    try:
        with Image.open(source) as image:
            upright = ImageOps.exif_transpose(image)
            upright.convert("RGB").save(target, compress_level=_PNG_LEVEL)
            return
    except Image.DecompressionBombError as exc:
        raise PermanentRuntimeError(f"{source.name} is too large to analyse: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        ctx.log.info("face_embedding: Pillow cannot read %s (%s); trying ffmpeg", source.name, exc)
    result = ctx.ffmpeg(
        ["-loglevel", "error", "-i", str(source), "-frames:v", "1", "-update", "1", str(target)],
        check=False,
    )
    if result.returncode != 0 or not target.is_file() or target.stat().st_size == 0:
        raise PermanentRuntimeError(f"{source.name} cannot be decoded as an image")


def _detect_copy(
    index: int, time_s: float | None, source: Path, detect_dir: Path, max_side: int
) -> PreparedFrame:
    """The frame record of `source`, with a scaled-down copy to analyse when it is too large."""
    with Image.open(source) as image:
        width, height = image.size
        longest = max(width, height)
        if longest <= max_side:
            detect, detect_w, detect_h = source, width, height
        else:
            factor = max_side / longest
            detect_w, detect_h = max(1, round(width * factor)), max(1, round(height * factor))
            detect = detect_dir / source.name
            image.convert("RGB").resize((detect_w, detect_h), Image.Resampling.LANCZOS).save(
                detect, compress_level=_PNG_LEVEL
            )
    return PreparedFrame(
        index=index,
        time_s=time_s,
        source=source,
        detect=detect,
        width=width,
        height=height,
        detect_width=detect_w,
        detect_height=detect_h,
    )


def sample_times(duration: float, latest: float, params: FaceParams) -> list[float]:
    """When to sample: n = floor(duration / interval_s) in 1..max_frames, mid-slice each."""
    count = max(1, min(params.max_frames, math.floor(duration / params.interval_s)))
    return [min(duration * (i + 0.5) / count, latest) for i in range(count)]


def _sample_video(
    ctx: RecipeContext,
    stage_file: StageFile,
    params: FaceParams,
    source_dir: Path,
    detect_dir: Path,
) -> PreparedInput:
    summary = require_video(ctx, "media")
    duration, latest = video_duration(summary), last_frame_time(summary)
    if duration is None or latest is None:
        raise PermanentRuntimeError(
            f"{stage_file.path.name} does not say how long it is, so frames cannot be sampled"
        )
    times = sample_times(duration, latest, params)
    grabs = [
        FrameGrab(t, _DISPLAY_SCALE, source_dir / f"frame_{i + 1:04d}.png", ("-update", "1"))
        for i, t in enumerate(times)
    ]
    written = grab_frames(ctx, stage_file.path, video_map(summary), grabs)
    missing = [f"{g.timestamp_s:.3f}" for g, ok in zip(grabs, written, strict=True) if not ok]
    if missing:
        raise PermanentRuntimeError(
            f"no frame could be decoded from {stage_file.path.name} at {', '.join(missing)} s"
        )
    frames = [
        _detect_copy(i, round(g.timestamp_s, 3), g.output, detect_dir, params.max_side)
        for i, g in enumerate(grabs)
    ]
    return PreparedInput(
        name=stage_file.path.name,
        media_type=stage_file.media_type,
        kind="video",
        frames=frames,
        duration_s=round(duration, 3),
    )
