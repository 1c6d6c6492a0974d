"""The `poster` recipe: one representative still of a video, neither black nor frozen."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.ffmpeg.params import float_param, int_param
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext, RecipeOutput, recipe, write_json
from ergot_dagster.resources.ffmpeg.stills import (
    FrameGrab,
    grab_frames,
    jpeg_args,
    last_frame_time,
    require_video,
    video_duration,
    video_map,
)

# -- poster ---------------------------------------------------------------------------------------

# Frames are judged as tiny grayscale thumbnails: enough to tell black, flat and still apart,
# small enough that a dozen of them cost nothing.
_THUMB_W, _THUMB_H = 96, 54
# A frame whose luma barely varies (a title card background, a fade) makes a poor poster.
_MIN_CONTRAST = 0.03
# Mean absolute luma change between two moments, as a fraction of full scale, below which the
# picture is taken to be frozen; encoder noise on a still picture stays well under it.
_MIN_MOTION = 0.004
# How far before and after a candidate the looks for motion are taken.
_MOTION_GAP_S = 0.5


@dataclass
class _Candidate:
    timestamp_s: float
    mean_luma: float | None = None
    contrast: float | None = None
    motion: float | None = None
    verdict: str = "unreadable"

    def as_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "timestamp_s": round(self.timestamp_s, 3),
            "mean_luma": rounded(self.mean_luma),
            "contrast": rounded(self.contrast),
            "motion": rounded(self.motion),
            "verdict": self.verdict,
        }


def _luma_stats(pixels: bytes) -> tuple[float, float]:
    """Mean and standard deviation of 8-bit full-range luma, as fractions of full scale."""
    count = len(pixels)
    mean = sum(pixels) / count
    variance = sum((p - mean) ** 2 for p in pixels) / count
    return mean / 255.0, math.sqrt(variance) / 255.0


def _read_thumb(path: Path) -> bytes | None:
    """A grabbed thumbnail's pixels, or None when the grab found no frame there."""
    if not path.is_file():
        return None
    pixels = path.read_bytes()
    size = _THUMB_W * _THUMB_H
    return pixels[:size] if len(pixels) >= size else None


def _mean_abs_diff(first: bytes, second: bytes) -> float:
    return sum(abs(a - b) for a, b in zip(first, second, strict=True)) / (len(first) * 255.0)


def _candidate_times(duration: float, count: int, skip_start_s: float, gap_s: float) -> list[float]:
    """`count` timestamps at the middles of equal slices of the usable part of the clip.

    The usable part leaves out the opening `skip_start_s` (slates, fades from black) and the
    closing stretch (fades out, end cards, and room for the motion look). On a clip too short
    for that, the skip shrinks to a tenth of the clip rather than leaving nothing.
    """
    end_margin = min(1.0, duration * 0.1) + gap_s
    high = max(0.0, duration - end_margin)
    low = skip_start_s if skip_start_s <= high / 2 else duration * 0.1
    high = max(high, low)
    step = (high - low) / count
    return [low + step * (index + 0.5) for index in range(count)]


def _judge(candidates: list[_Candidate], min_luma: float, motion_required: bool) -> None:
    for candidate in candidates:
        if candidate.mean_luma is None or candidate.contrast is None:
            candidate.verdict = "unreadable"
        elif candidate.mean_luma < min_luma:
            candidate.verdict = "black"
        elif candidate.contrast < _MIN_CONTRAST:
            candidate.verdict = "flat"
        elif motion_required and (candidate.motion is None or candidate.motion < _MIN_MOTION):
            candidate.verdict = "frozen"
        else:
            candidate.verdict = "ok"


def _choose(candidates: list[_Candidate], motion_required: bool) -> tuple[_Candidate, str]:
    """The best candidate and a sentence saying why it was chosen."""
    readable = [c for c in candidates if c.verdict != "unreadable"]
    total = len(candidates)
    good = [c for c in readable if c.verdict == "ok"]
    if good:
        # Contrast first (detail and exposure show in it); motion only breaks ties.
        best = max(good, key=lambda c: (c.contrast or 0.0, c.motion or 0.0))
        qualifier = (
            "neither black, flat nor frozen"
            if motion_required
            else "neither black nor flat (the clip is too short to judge motion)"
        )
        return best, (
            f"Frame at {best.timestamp_s:.2f} s has the highest contrast ({best.contrast:.3f}) of "
            f"the {len(good)} of {total} candidate frames that were {qualifier}."
        )
    frozen = [c for c in readable if c.verdict == "frozen"]
    if frozen:
        best = max(frozen, key=lambda c: c.contrast or 0.0)
        return best, (
            f"No candidate frame showed motion, so the frame at {best.timestamp_s:.2f} s was "
            f"chosen as the highest-contrast ({best.contrast:.3f}) still picture that is not black."
        )
    if readable:
        best = max(readable, key=lambda c: ((c.mean_luma or 0.0), (c.contrast or 0.0)))
        return best, (
            f"Every candidate frame was black or flat, so the brightest one (mean luma "
            f"{best.mean_luma:.3f}, at {best.timestamp_s:.2f} s) was chosen as a fallback."
        )
    raise PermanentRuntimeError("no frame could be decoded at any of the candidate timestamps")


@recipe("poster")
def poster(ctx: RecipeContext) -> RecipeOutput:
    """A JPEG poster frame of input `video`, with a JSON sidecar explaining the choice.

    Candidate moments spread over the clip are looked at as tiny grayscale thumbnails (each cut
    by input seeking, so the clip is never decoded end to end); black, flat and frozen moments are
    rejected and the highest-contrast survivor becomes the poster, cut at `width` pixels wide.

    Params: `width` (640), `quality` (JPEG -q:v 2..31, 3), `skip_start_s` (1.0), `candidates`
    (7), `min_luma` (fraction of full scale under which a frame is black, 0.08).
    Outputs: `poster` (.jpg) and `info` (.json).
    """
    width = int_param(ctx, "width", 640, low=16, high=8192)
    quality = int_param(ctx, "quality", 3, low=2, high=31)
    skip_start_s = float_param(ctx, "skip_start_s", 1.0, low=0.0, high=86400.0)
    count = int_param(ctx, "candidates", 7, low=1, high=64)
    min_luma = float_param(ctx, "min_luma", 0.08, low=0.0, high=1.0)

    source = ctx.input("video").path
    summary = require_video(ctx, "video")
    duration = video_duration(summary)
    latest = last_frame_time(summary)

    if duration is None or latest is None or latest <= 0:
        # A still image, or a stream that does not say how long it is: its first frame is all
        # there is to choose from.
        times = [0.0]
        gap = 0.0
    else:
        gap = _MOTION_GAP_S if duration >= 4 * _MOTION_GAP_S else 0.0
        times = [min(t, latest) for t in _candidate_times(duration, count, skip_start_s, gap)]
        # Clamping to the last frame can merge the last few candidates on very short clips.
        times = sorted(set(times))
    motion_required = gap > 0

    candidates = [_Candidate(timestamp_s=t) for t in times]
    thumb = f"scale={_THUMB_W}:{_THUMB_H}:flags=area,format=gray"
    raw = ("-f", "rawvideo")
    with tempfile.TemporaryDirectory(prefix=".poster-", dir=ctx.workdir) as scratch_dir:
        scratch = Path(scratch_dir)
        grabs: list[FrameGrab] = []
        for index, t in enumerate(times):
            grabs.append(FrameGrab(t, thumb, scratch / f"c{index}.gray", raw))
            if motion_required:
                # Looking both ways: a moment at either edge of a held picture still moves on
                # one side, and only the other side gives it away as frozen.
                if t - gap >= 0:
                    grabs.append(FrameGrab(t - gap, thumb, scratch / f"b{index}.gray", raw))
                after = min(t + gap, latest or t)
                if after > t:
                    grabs.append(FrameGrab(after, thumb, scratch / f"a{index}.gray", raw))
        grab_frames(ctx, source, video_map(summary), grabs)
        for index, candidate in enumerate(candidates):
            frame = _read_thumb(scratch / f"c{index}.gray")
            if frame is None:
                continue
            candidate.mean_luma, candidate.contrast = _luma_stats(frame)
            changes = [
                _mean_abs_diff(frame, neighbour)
                for neighbour in (_read_thumb(scratch / f"{side}{index}.gray") for side in "ba")
                if neighbour is not None
            ]
            candidate.motion = min(changes) if changes else None

    _judge(candidates, min_luma, motion_required)
    chosen, reason = _choose(candidates, motion_required)
    for candidate in candidates:
        ctx.log.debug("poster candidate %s", candidate.as_json())

    poster_path = ctx.workdir / "poster.jpg"
    # Scale through the display aspect ratio so that anamorphic sources come out undistorted.
    scale = f"scale={width}:trunc({width}/dar/2)*2,setsar=1"
    final = FrameGrab(chosen.timestamp_s, scale, poster_path, jpeg_args(quality))
    written = grab_frames(ctx, source, video_map(summary), [final])
    if not written[0]:
        raise PermanentRuntimeError(
            f"no frame could be extracted at {chosen.timestamp_s:.3f} s of {source.name}"
        )
    poster_probe = ctx.probe(poster_path)

    timestamp = round(chosen.timestamp_s, 3)
    info = {
        "timestamp_s": timestamp,
        "reason": reason,
        "width": poster_probe.width,
        "height": poster_probe.height,
        "source_duration_s": duration,
        "candidates": [c.as_json() for c in candidates],
    }
    info_path = write_json(ctx.workdir / "poster.json", info)
    ctx.log.info("poster of %s at %.3f s: %s", source.name, timestamp, reason)
    return RecipeOutput(
        outputs={"poster": poster_path, "info": info_path},
        metadata={"timestamp_s": timestamp, "reason": reason},
    )
