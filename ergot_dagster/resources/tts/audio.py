"""Audio helpers the speech runtimes share: ffmpeg conversions, WAV reading, typed params.

Every ffmpeg call goes through `media.process.run_process`, so it is bounded and its process group
is killed when the run is cancelled.
"""

from __future__ import annotations

import shutil
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.media.process import ProcessResult, run_process
from ergot_dagster.resources.runtime import StageFile, StageRequest


@dataclass(frozen=True)
class AudioFormat:
    """An output format the speech runtimes write: its media type, extension and codec."""

    name: str
    media_type: str
    extension: str
    codec_args: tuple[str, ...]


AUDIO_FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("wav", "audio/wav", ".wav", ("-c:a", "pcm_s16le")),
    "flac": AudioFormat("flac", "audio/flac", ".flac", ("-c:a", "flac")),
    "mp3": AudioFormat("mp3", "audio/mpeg", ".mp3", ("-c:a", "libmp3lame", "-q:a", "2")),
}
FORMAT_OF_MEDIA_TYPE = {f.media_type: f.name for f in AUDIO_FORMATS.values()}

Model = TypeVar("Model", bound=BaseModel)


def parse_params(model: type[Model], params: dict[str, Any], what: str) -> Model:
    """`params` as `model`, or a permanent error naming every bad or unknown parameter."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "params"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "is not a parameter of this operation"
            problems.append(f"parameter {where!r} {message}")
        raise PermanentRuntimeError(f"{what}: {'; '.join(problems)}") from None


def single_input(request: StageRequest, name: str, *, required: bool) -> StageFile | None:
    """The one file bound to stage input `name`; permanent if it is missing or a set."""
    bound = request.inputs.get(name)
    if bound is None:
        if required:
            given = ", ".join(sorted(request.inputs)) or "none"
            raise PermanentRuntimeError(
                f"stage {request.stage.id!r} needs input {name!r} (given: {given})"
            )
        return None
    if isinstance(bound, list):
        if len(bound) != 1:
            raise PermanentRuntimeError(
                f"input {name!r} must be one file, not a set of {len(bound)}"
            )
        return bound[0]
    return bound


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise PermanentRuntimeError("ffmpeg is not installed on this machine")
    return found


def convert_audio(
    source: Path,
    dest: Path,
    *,
    sample_rate: int,
    audio_format: AudioFormat,
    timeout_s: float,
    start_s: float | None = None,
    duration_s: float | None = None,
    filters: str | None = None,
    what: str = "ffmpeg",
) -> ProcessResult:
    """The first audio stream of `source` as mono `audio_format` at `sample_rate` in `dest`.

    Video streams are dropped, so a video works as well as a recording. `start_s`/`duration_s`
    cut a span (input seeking, which is sample-accurate for audio).
    """
    args = [ffmpeg_binary(), "-hide_banner", "-nostdin", "-y", "-loglevel", "error"]
    if start_s is not None:
        args += ["-ss", f"{start_s:.3f}"]
    if duration_s is not None:
        args += ["-t", f"{duration_s:.3f}"]
    args += ["-i", str(source), "-vn", "-sn", "-dn", "-map", "0:a:0"]
    if filters:
        args += ["-af", filters]
    args += ["-ac", "1", "-ar", str(sample_rate), *audio_format.codec_args, str(dest)]
    try:
        return run_process(args, timeout_s=timeout_s, tool=what)
    except PermanentRuntimeError as exc:
        if "matches no streams" in str(exc):
            raise PermanentRuntimeError(
                f"{source.name} has no audio stream", job_id=exc.job_id
            ) from None
        raise


def wav_seconds(path: Path) -> float:
    """The duration of a PCM WAV file, from its header."""
    try:
        with wave.open(str(path), "rb") as handle:
            return handle.getnframes() / float(handle.getframerate())
    except (wave.Error, EOFError, OSError) as exc:
        raise PermanentRuntimeError(f"{path.name} is not a readable WAV file: {exc}") from exc


def read_wav_mono16(path: Path) -> tuple[bytes, int]:
    """The frames and sample rate of a mono 16-bit WAV (as ffmpeg writes it for analysis)."""
    try:
        with wave.open(str(path), "rb") as handle:
            if handle.getnchannels() != 1 or handle.getsampwidth() != 2:
                raise PermanentRuntimeError(f"{path.name} is not mono 16-bit PCM")
            return handle.readframes(handle.getnframes()), handle.getframerate()
    except (wave.Error, EOFError, OSError) as exc:
        raise PermanentRuntimeError(f"{path.name} is not a readable WAV file: {exc}") from exc
