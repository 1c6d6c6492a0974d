"""The `qc` recipe: black, frozen and silent stretches and loudness, from one decoding pass."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.media.probe import ProbeSummary
from ergot_dagster.resources.ffmpeg.params import float_param
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext, RecipeOutput, recipe, write_json

# What ffmpeg 5.1 prints at -loglevel info, one line per event:
#   [blackdetect @ 0x..] black_start:0 black_end:1.52 black_duration:1.52
#   [freezedetect @ 0x..] lavfi.freezedetect.freeze_start: 2.2   (then _duration and _end lines)
#   [silencedetect @ 0x..] silence_start: 0
#   [silencedetect @ 0x..] silence_end: 6.016 | silence_duration: 6.016
# blackdetect reports a stretch still black at the end of the file when the input ends;
# freezedetect does not, and silencedetect does, possibly a little past the container duration.
_NUMBER = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|-?inf|nan)"
_BLACK = re.compile(rf"black_start:\s*{_NUMBER}\s+black_end:\s*{_NUMBER}", re.IGNORECASE)
_FREEZE_START = re.compile(rf"lavfi\.freezedetect\.freeze_start:\s*{_NUMBER}", re.IGNORECASE)
_FREEZE_END = re.compile(rf"lavfi\.freezedetect\.freeze_end:\s*{_NUMBER}", re.IGNORECASE)
_SILENCE_START = re.compile(rf"silence_start:\s*{_NUMBER}", re.IGNORECASE)
_SILENCE_END = re.compile(rf"silence_end:\s*{_NUMBER}", re.IGNORECASE)
# The closing progress line ("size=N/A time=00:00:06.01 bitrate=N/A speed=...") is printed even
# with -nostats; it stands in for the duration when the container does not state one.
_TIME = re.compile(r"\btime=(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
# ebur128's closing report (framelog=verbose keeps its per-frame lines out of -loglevel info):
#   [Parsed_ebur128_0 @ 0x..] Summary:
#     Integrated loudness:
#       I:         -21.8 LUFS
#       Threshold: -31.8 LUFS
#     Loudness range:
#       LRA:         0.0 LU
#       ...
#     True peak:
#       Peak:      -16.1 dBFS
# Digital silence reads "I: -70.0 LUFS" (the meter's floor) and "Peak: -inf dBFS".
_SUMMARY = re.compile(r"Parsed_ebur128_\d+ @ [^\]]*\] Summary:")
_INTEGRATED = re.compile(rf"^\s*I:\s*{_NUMBER}\s*LUFS", re.MULTILINE | re.IGNORECASE)
_LRA = re.compile(rf"^\s*LRA:\s*{_NUMBER}\s*LU\b", re.MULTILINE | re.IGNORECASE)
_PEAK = re.compile(rf"^\s*Peak:\s*{_NUMBER}\s*dBFS", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class _Detection:
    black_min_s: float
    black_pixel_threshold: float
    silence_noise_db: float
    silence_min_s: float
    freeze_noise_db: float
    freeze_min_s: float

    def as_json(self) -> dict[str, float]:
        return asdict(self)


def _finite(text: str | None) -> float | None:
    """A number from the log, or None for a missing, infinite or NaN one (JSON has no inf)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _segments(
    starts: list[float | None], ends: list[float | None], duration: float | None
) -> list[dict[str, float]]:
    """Pair start and end events into segments, in seconds from the start of the file.

    The ffmpeg command line already shifts timestamps so that the file starts at zero (an MPEG-TS
    starting at 1.4 s still reports its opening black at 0), so the times need no offset. A start
    with no end ran to the end of the file and is closed at the duration.
    """
    segments = []
    for index, start in enumerate(starts):
        if start is None:
            continue
        end = ends[index] if index < len(ends) else None
        end = end if end is not None else duration
        if end is None:
            continue
        begin = max(0.0, start)
        finish = end
        if duration is not None:
            finish = min(finish, duration)
        finish = max(finish, begin)
        segments.append(
            {
                "start_s": round(begin, 3),
                "end_s": round(finish, 3),
                "duration_s": round(finish - begin, 3),
            }
        )
    return segments


def _decoded_duration(stderr: str) -> float | None:
    times = _TIME.findall(stderr)
    if not times:
        return None
    hours, minutes, seconds = times[-1]
    total = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return total if total > 0 else None


def _loudness(stderr: str) -> dict[str, float | None] | None:
    found = list(_SUMMARY.finditer(stderr))
    if not found:
        return None
    # The summary block is the last thing ebur128 prints; other filters' lines may follow it.
    block = stderr[found[-1].end() :]

    def first(pattern: re.Pattern[str]) -> float | None:
        match = pattern.search(block)
        return _finite(match.group(1)) if match else None

    return {
        "integrated_lufs": first(_INTEGRATED),
        "true_peak_dbtp": first(_PEAK),
        "lra_lu": first(_LRA),
    }


def _stream_info(summary: ProbeSummary) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    video = audio = None
    if summary.video_streams:
        v = summary.video_streams[0]
        video = {
            "codec": v.codec,
            "width": v.width,
            "height": v.height,
            "frame_rate": v.frame_rate,
            "pix_fmt": v.pix_fmt,
        }
    if summary.audio_streams:
        a = summary.audio_streams[0]
        audio = {"codec": a.codec, "sample_rate": a.sample_rate, "channels": a.channels}
    return video, audio


@recipe("qc")
def qc(ctx: RecipeContext) -> RecipeOutput:
    """A JSON quality report of input `media`: black, frozen and silent stretches, and loudness.

    One ffmpeg pass decodes the first video and the first audio stream and runs blackdetect and
    freezedetect on the picture and ebur128 (integrated loudness, loudness range, true peak) and
    silencedetect on the sound; the report is parsed from ffmpeg's log.

    Params: `black_min_s` (0.5), `black_pixel_threshold` (0.10), `silence_noise_db` (-50),
    `silence_min_s` (1.0), `freeze_noise_db` (-60), `freeze_min_s` (2.0).
    Output: `report` (.json).
    """
    detection = _Detection(
        black_min_s=float_param(ctx, "black_min_s", 0.5, low=0.0, high=86400.0),
        black_pixel_threshold=float_param(ctx, "black_pixel_threshold", 0.10, low=0.0, high=1.0),
        silence_noise_db=float_param(ctx, "silence_noise_db", -50.0, low=-120.0, high=0.0),
        silence_min_s=float_param(ctx, "silence_min_s", 1.0, low=0.0, high=86400.0),
        freeze_noise_db=float_param(ctx, "freeze_noise_db", -60.0, low=-120.0, high=0.0),
        freeze_min_s=float_param(ctx, "freeze_min_s", 2.0, low=0.0, high=86400.0),
    )
    source = ctx.input("media").path
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    summary = ctx.probe_of("media")
    has_video = bool(summary.video_streams)
    has_audio = bool(summary.audio_streams)
    if not has_video and not has_audio:
        raise PermanentRuntimeError(f"{source.name} has neither a video nor an audio stream")

    # -loglevel info is where the detectors and ebur128's summary print; -nostats keeps the
    # progress line out of the log we parse.
    args = ["-nostats", "-loglevel", "info", "-i", str(source)]
    if has_video:
        args += [
            # By index: `0:v:0` could be cover art; the probe knows the first real picture.
            "-map",
            f"0:{summary.video_streams[0].index}",
            "-vf",
            f"blackdetect=d={detection.black_min_s}:pix_th={detection.black_pixel_threshold},"
            f"freezedetect=n={detection.freeze_noise_db}dB:d={detection.freeze_min_s}",
        ]
    if has_audio:
        args += [
            "-map",
            f"0:{summary.audio_streams[0].index}",
            # framelog=verbose sends ebur128's ten-lines-a-second meter log below info.
            "-af",
            f"ebur128=peak=true:framelog=verbose,"
            f"silencedetect=n={detection.silence_noise_db}dB:d={detection.silence_min_s}",
        ]
    args += ["-f", "null", "-"]
    stderr = ctx.ffmpeg(args, progress_of_s=summary.duration_s).stderr

    duration = summary.duration_s or _decoded_duration(stderr)

    black_starts: list[float | None] = []
    black_ends: list[float | None] = []
    for match in _BLACK.finditer(stderr):
        black_starts.append(_finite(match.group(1)))
        black_ends.append(_finite(match.group(2)))

    def events(pattern: re.Pattern[str]) -> list[float | None]:
        return [_finite(m.group(1)) for m in pattern.finditer(stderr)]

    black = _segments(black_starts, black_ends, duration) if has_video else []
    frozen = _segments(events(_FREEZE_START), events(_FREEZE_END), duration) if has_video else []
    silent = _segments(events(_SILENCE_START), events(_SILENCE_END), duration) if has_audio else []
    loudness = _loudness(stderr) if has_audio else None
    if has_audio and loudness is None:
        ctx.log.warning("ebur128 printed no summary for %s", source.name)

    video, audio = _stream_info(summary)
    report = {
        "duration_s": duration,
        "format": summary.format,
        "video": video,
        "audio": audio,
        "loudness": loudness,
        "black_segments": black,
        "silent_segments": silent,
        "frozen_segments": frozen,
        "totals": {
            "black_s": round(sum(s["duration_s"] for s in black), 3),
            "silent_s": round(sum(s["duration_s"] for s in silent), 3),
            "frozen_s": round(sum(s["duration_s"] for s in frozen), 3),
        },
        "detection": detection.as_json(),
    }
    report_path = write_json(ctx.workdir / "qc.json", report)
    return RecipeOutput(
        outputs={"report": report_path},
        metadata={
            "black_s": report["totals"]["black_s"],
            "silent_s": report["totals"]["silent_s"],
            "frozen_s": report["totals"]["frozen_s"],
            "integrated_lufs": loudness["integrated_lufs"] if loudness else None,
        },
    )
