"""ffprobe summaries and the media type of a file.

The summary keeps what workflows and operators need (duration, streams, codecs, frame size, frame
rate, sample rate) rather than ffprobe's whole output, so that it fits in asset metadata.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

from pydantic import BaseModel

from ergot_dagster.errors import PermanentRuntimeError, SourceError
from ergot_dagster.media.process import run_process

PROBE_TIMEOUT_S = 60.0

# Formats ffprobe reports for still images.
_IMAGE_FORMATS = {
    "image2",
    "png_pipe",
    "jpeg_pipe",
    "webp_pipe",
    "bmp_pipe",
    "tiff_pipe",
    "gif",
    "gif_pipe",
    "ppm_pipe",
    "pgm_pipe",
    "qoi_pipe",
    "dpx_pipe",
    "exr_pipe",
    "j2k_pipe",
}

# A fixed table rather than the `mimetypes` module: the result must not depend on the machine's
# /etc/mime.types.
_EXTENSION_TYPES = {
    ".mov": "video/quicktime",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
    ".mxf": "application/mxf",
    ".mts": "video/mp2t",
    ".m2ts": "video/mp2t",
    ".ts": "video/mp2t",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".ogv": "video/ogg",
    ".flv": "video/x-flv",
    ".wmv": "video/x-ms-wmv",
    ".wav": "audio/wav",
    ".wave": "audio/wav",
    ".mp3": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/opus",
    ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
    ".wma": "audio/x-ms-wma",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".exr": "image/x-exr",
    ".dpx": "image/x-dpx",
}

# When the extension says nothing useful, the container format does.
_FORMAT_TYPES = {
    "mov": "video/quicktime",
    "mp4": "video/mp4",
    "matroska": "video/x-matroska",
    "webm": "video/webm",
    "avi": "video/x-msvideo",
    "mpegts": "video/mp2t",
    "mxf": "application/mxf",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "aiff": "audio/aiff",
    "png_pipe": "image/png",
    "jpeg_pipe": "image/jpeg",
    "webp_pipe": "image/webp",
    "tiff_pipe": "image/tiff",
    "bmp_pipe": "image/bmp",
    "gif": "image/gif",
}


class StreamSummary(BaseModel):
    """One stream of a media file as ffprobe saw it."""

    index: int
    type: str
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    frame_rate: float | None = None
    pix_fmt: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    duration_s: float | None = None
    attached_pic: bool = False


class ProbeSummary(BaseModel):
    """The parts of ffprobe's report that workflows and operators use."""

    format: str
    duration_s: float | None = None
    bit_rate: int | None = None
    streams: list[StreamSummary]

    @property
    def video_streams(self) -> list[StreamSummary]:
        return [s for s in self.streams if s.type == "video" and not s.attached_pic]

    @property
    def audio_streams(self) -> list[StreamSummary]:
        return [s for s in self.streams if s.type == "audio"]

    @property
    def is_image(self) -> bool:
        return self.format.split(",")[0] in _IMAGE_FORMATS and not self.audio_streams

    @property
    def width(self) -> int | None:
        return self.video_streams[0].width if self.video_streams else None

    @property
    def height(self) -> int | None:
        return self.video_streams[0].height if self.video_streams else None


def _float(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if result == result and result >= 0 else None  # drop NaN and negatives


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _rate(value: object) -> float | None:
    try:
        rate = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return round(float(rate), 3) if rate > 0 else None


def summarize(raw: dict) -> ProbeSummary:
    """Condense ffprobe's `-show_format -show_streams` JSON into a `ProbeSummary`."""
    fmt = raw.get("format") or {}
    streams = []
    for s in raw.get("streams") or []:
        kind = s.get("codec_type") or "data"
        streams.append(
            StreamSummary(
                index=_int(s.get("index")) or 0,
                type=kind,
                codec=s.get("codec_name"),
                width=_int(s.get("width")) if kind == "video" else None,
                height=_int(s.get("height")) if kind == "video" else None,
                frame_rate=_rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
                if kind == "video"
                else None,
                pix_fmt=s.get("pix_fmt") if kind == "video" else None,
                sample_rate=_int(s.get("sample_rate")) if kind == "audio" else None,
                channels=_int(s.get("channels")) if kind == "audio" else None,
                duration_s=_float(s.get("duration")),
                attached_pic=bool((s.get("disposition") or {}).get("attached_pic")),
            )
        )
    return ProbeSummary(
        format=fmt.get("format_name") or "unknown",
        duration_s=_float(fmt.get("duration")),
        bit_rate=_int(fmt.get("bit_rate")),
        streams=streams,
    )


def ffprobe_binary() -> str:
    found = shutil.which("ffprobe")
    if not found:
        raise SourceError("ffprobe is not installed (run `make setup`, which installs ffmpeg)")
    return found


def probe(path: Path, *, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeSummary:
    """Probe `path` with ffprobe. Raises `SourceError` when it is not readable media."""
    args = [
        ffprobe_binary(),
        "-v",
        "error",
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
        "--",
        str(path),
    ]
    try:
        result = run_process(args, timeout_s=timeout_s, tool="ffprobe")
    except PermanentRuntimeError as exc:
        raise SourceError(f"{path.name}: not readable media ({exc})") from exc
    try:
        summary = summarize(json.loads(result.stdout or b"{}"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path.name}: ffprobe returned unreadable output") from exc
    if not summary.streams:
        raise SourceError(f"{path.name}: ffprobe found no audio, video or image streams")
    return summary


def media_type_for(path: Path, summary: ProbeSummary) -> str:
    """The media type of a probed file: its class from the streams, its subtype from the name."""
    if summary.is_image:
        major = "image"
    elif summary.video_streams:
        major = "video"
    elif summary.audio_streams:
        major = "audio"
    else:
        raise SourceError(f"{path.name}: has no audio, video or image stream")
    by_extension = _EXTENSION_TYPES.get(path.suffix.lower())
    if by_extension and by_extension.split("/")[0] == major:
        return by_extension
    by_format = _FORMAT_TYPES.get(summary.format.split(",")[0])
    if by_format and by_format.split("/")[0] == major:
        return by_format
    if by_extension and major == "audio" and by_extension.startswith("video/"):
        # An .mp4 or .mov holding only sound.
        return "audio/" + by_extension.split("/")[1]
    return f"{major}/x-{summary.format.split(',')[0]}"


def media_type_matches(media_type: str, accepted: list[str]) -> bool:
    """Whether `media_type` matches any of `accepted` (`video/*`, `*/*` and exact types)."""
    major = media_type.split("/")[0]
    for pattern in accepted:
        if pattern in ("*/*", "*") or pattern == media_type:
            return True
        if pattern.endswith("/*") and pattern[:-2] == major:
            return True
    return False
