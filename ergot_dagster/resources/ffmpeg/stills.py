"""Single frames from a video: which stream, how far a seek can go, and cutting stills by input
seeking, with a decode-from-start fallback for files that cannot be seeked into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.media.probe import ProbeSummary
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext


def require_video(ctx: RecipeContext, name: str) -> ProbeSummary:
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    summary = ctx.probe_of(name)
    if not summary.video_streams:
        raise PermanentRuntimeError(
            f"input {name!r} ({ctx.input(name).path.name}) has no video stream"
        )
    return summary


def video_duration(summary: ProbeSummary) -> float | None:
    """How long the first video stream lasts (the container's duration when it does not say)."""
    stream = summary.video_streams[0] if summary.video_streams else None
    if stream is not None and stream.duration_s:
        return stream.duration_s
    return summary.duration_s or None


def last_frame_time(summary: ProbeSummary) -> float | None:
    """The latest timestamp an input seek can land on and still find a frame."""
    duration = video_duration(summary)
    if duration is None:
        return None
    rate = summary.video_streams[0].frame_rate or 25.0
    # An accurate seek drops frames that start before the target, so seeking into the last
    # frame's span (past its start) returns nothing.
    return max(0.0, duration - 1.0 / rate)


@dataclass(frozen=True)
class FrameGrab:
    """One still to cut from a source: where, through which filter, into which file."""

    timestamp_s: float
    filters: str
    output: Path
    extra_args: tuple[str, ...] = ()


# Each grab is its own input (opened and seeked separately); this many share one process, which
# saves process start-up without holding hundreds of decoders open at once.
GRABS_PER_PROCESS = 16


def video_map(summary: ProbeSummary) -> str:
    """The stream index of the first real video stream, for `-map 0:N`.

    `0:v:0` would pick an MP3's or M4A's cover art when it comes first; the probe knows better.
    """
    return str(summary.video_streams[0].index)


def grab_frames(
    ctx: RecipeContext, source: Path, stream: str, grabs: Sequence[FrameGrab]
) -> list[bool]:
    """Cut each still of stream `stream` with input seeking (`-ss` before `-i`).

    The clip is never decoded end to end: each seek lands on the keyframe before the moment and
    decodes only from there. Returns, per grab, whether a frame was written; a seek past the last
    decodable frame writes nothing, and that is for the caller to judge.
    """
    for grab in grabs:
        # A file left by an earlier attempt in the same workdir must not pass for a new frame.
        grab.output.unlink(missing_ok=True)
    for start in range(0, len(grabs), GRABS_PER_PROCESS):
        batch = grabs[start : start + GRABS_PER_PROCESS]
        args: list[str] = ["-loglevel", "error"]
        for grab in batch:
            args += ["-ss", f"{grab.timestamp_s:.3f}", "-i", str(source)]
        for index, grab in enumerate(batch):
            args += _still_output(f"{index}:{stream}", grab)
        ctx.ffmpeg(args)
    missing = [grab for grab in grabs if not _written(grab.output)]
    if missing:
        _grab_by_decoding(ctx, source, stream, missing)
    return [_written(grab.output) for grab in grabs]


def _written(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _grab_by_decoding(
    ctx: RecipeContext, source: Path, stream: str, grabs: Sequence[FrameGrab]
) -> None:
    """Second try for stills an input seek could not reach, decoding from the start.

    Some files cannot be seeked into: an MPEG-TS whose only keyframe is its first frame lands the
    seek where no picture can be decoded, and ffmpeg writes nothing. Output seeking (`-ss` after
    `-i`) decodes from the start and discards up to each moment; one input feeds every output, so
    the clip is decoded once, and only as far as the latest of these moments.
    """
    moments = sorted(g.timestamp_s for g in grabs)
    where = (
        ", ".join(f"{t:.3f}" for t in moments)
        if len(moments) <= 4
        else f"{len(moments)} moments from {moments[0]:.3f} to {moments[-1]:.3f}"
    )
    ctx.log.warning(
        "input seeking found no frame at %s s of %s; decoding from the start instead",
        where,
        source.name,
    )
    args: list[str] = ["-loglevel", "error", "-i", str(source)]
    for grab in grabs:
        # -ss after -i: output seeking, counted on the decoded timeline.
        args += _still_output(f"0:{stream}", grab, ["-ss", f"{grab.timestamp_s:.3f}"])
    ctx.ffmpeg(args)


def _still_output(stream: str, grab: FrameGrab, seek: list[str] | None = None) -> list[str]:
    """The output options that write one still of `stream` for `grab`."""
    return [
        "-map", stream, *(seek or []), "-frames:v", "1", "-vf", grab.filters,
        *grab.extra_args, str(grab.output),
    ]  # fmt: skip


def jpeg_args(quality: int) -> tuple[str, ...]:
    # -update 1 tells the image2 muxer that one fixed file name is intended, not a sequence.
    return ("-q:v", str(quality), "-update", "1")
