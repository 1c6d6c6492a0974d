"""The `assemble_segments` recipe: one MP4 from video segments in order, with speech over them.

The picture is the segments one after another: stream-copied (no re-encode) when they all share
one H.264 format, else re-encoded to a common one. The sound is the segments' own audio (silence
for a segment without any), mixed with the speech and an optional music bed, normalised to a
loudness target in two passes, and cut or padded so that it lasts exactly as long as the picture.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ergot_dagster.errors import PermanentRuntimeError, SourceError
from ergot_dagster.media.probe import ffprobe_binary
from ergot_dagster.media.process import run_process
from ergot_dagster.resources.ffmpeg.params import choice_param, float_param, int_param
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext, RecipeOutput, recipe, write_json
from ergot_dagster.resources.ffmpeg.recipes.proxy import X264_PRESETS
from ergot_dagster.resources.runtime import StageFile

REPORT_FORMAT = "ergot.assembly/1"
MAX_SEGMENTS = 64
# Stream copy writes the segments' packets as they are, so they must already be what the output
# promises: H.264 in MP4.
COPY_CODEC = "h264"
# Speech running past the picture by less than this is container rounding, not speech to cut.
_SPEECH_SLACK_S = 0.05
# A mix quieter than this has nothing to normalise (loudnorm's own floor is -70 LUFS).
_SILENT_LUFS = -70.0
# ffmpeg prints loudnorm's print_format=json block after a line naming the filter instance.
_LOUDNORM_BLOCK = re.compile(r"\[Parsed_loudnorm_\d+ @ [^\]]*\]\s*(\{.*?\})", re.DOTALL)


# -- what the inputs are --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    """One video segment as ffprobe saw it: what stream copy needs to agree on, and its timing."""

    index: int
    path: Path
    duration_s: float
    video_stream: int
    codec: str
    profile: str | None
    width: int
    height: int
    pix_fmt: str
    frame_rate: Fraction
    time_base: str
    sar: str
    extradata: str | None
    audio_stream: int | None
    audio: dict[str, Any] | None

    @property
    def label(self) -> str:
        return f"segment {self.index} ({self.path.name})"

    def summary(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "profile": self.profile,
            "width": self.width,
            "height": self.height,
            "pix_fmt": self.pix_fmt,
            "frame_rate": _rate_text(self.frame_rate),
            "time_base": self.time_base,
            "sar": self.sar,
        }


@dataclass(frozen=True)
class _Track:
    """A sound input (the speech, the music bed): its first audio stream and how long it is."""

    role: str
    path: Path
    stream: int
    duration_s: float | None
    gain_db: float


def _ffprobe(ctx: RecipeContext, path: Path, what: str) -> dict[str, Any]:
    """ffprobe's streams and format for `path`, with a hash of each stream's codec extradata.

    The shared probe summary leaves out the time base, the SAR and the extradata (H.264's SPS and
    PPS), which decide whether packets can be stream-copied side by side.
    """
    try:
        binary = ffprobe_binary()
    except SourceError as exc:
        raise PermanentRuntimeError(str(exc)) from exc
    args = [
        binary, "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
        "-show_data_hash", "sha256", "--", str(path),
    ]  # fmt: skip
    result = run_process(args, timeout_s=min(ctx.remaining(), 60.0), tool="ffprobe", check=False)
    ctx.pids.append(result.pid)
    try:
        raw = json.loads(result.stdout or b"{}")
    except json.JSONDecodeError:
        raw = {}
    if result.returncode != 0 or not raw.get("streams"):
        raise PermanentRuntimeError(f"{what} is not readable media")
    return raw


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _fraction(value: Any) -> Fraction | None:
    try:
        rate = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return rate if rate > 0 else None


def _rate_text(rate: Fraction) -> str:
    return f"{rate.numerator}/{rate.denominator}"


def _first(raw: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for stream in raw.get("streams") or []:
        if stream.get("codec_type") != kind:
            continue
        if kind == "video" and (stream.get("disposition") or {}).get("attached_pic"):
            continue  # cover art is not a picture to play
        return stream
    return None


def _read_segment(ctx: RecipeContext, index: int, stage_file: StageFile) -> _Segment:
    label = f"segment {index} ({stage_file.path.name})"
    raw = _ffprobe(ctx, stage_file.path, label)
    video = _first(raw, "video")
    if video is None:
        raise PermanentRuntimeError(f"{label} has no video stream")
    width, height = video.get("width"), video.get("height")
    if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        raise PermanentRuntimeError(f"{label} does not say its frame size")
    rate = _fraction(video.get("r_frame_rate")) or _fraction(video.get("avg_frame_rate"))
    if rate is None:
        raise PermanentRuntimeError(f"{label} does not say its frame rate")
    duration = _number(video.get("duration")) or _number((raw.get("format") or {}).get("duration"))
    if duration is None:
        raise PermanentRuntimeError(f"{label} does not say how long it is")
    audio = _first(raw, "audio")
    sar = video.get("sample_aspect_ratio")
    return _Segment(
        index=index,
        path=stage_file.path,
        duration_s=duration,
        video_stream=int(video["index"]),
        codec=str(video.get("codec_name") or "unknown"),
        profile=video.get("profile"),
        width=width,
        height=height,
        pix_fmt=str(video.get("pix_fmt") or "unknown"),
        frame_rate=rate,
        time_base=str(video.get("time_base") or "unknown"),
        # 0:1 is ffprobe's "unknown", which players take as square pixels.
        sar="1:1" if sar in (None, "0:1", "N/A") else str(sar),
        extradata=video.get("extradata_hash"),
        audio_stream=int(audio["index"]) if audio is not None else None,
        audio=None
        if audio is None
        else {
            "codec": audio.get("codec_name"),
            "sample_rate": int(audio["sample_rate"]) if audio.get("sample_rate") else None,
            "channels": audio.get("channels"),
        },
    )


def _read_track(ctx: RecipeContext, role: str, gain_db: float) -> _Track | None:
    if role not in ctx.inputs:
        return None  # an optional input the request did not give
    stage_file = ctx.input(role)
    label = f"input {role!r} ({stage_file.path.name})"
    raw = _ffprobe(ctx, stage_file.path, label)
    audio = _first(raw, "audio")
    if audio is None:
        raise PermanentRuntimeError(f"{label} has no audio stream")
    duration = _number(audio.get("duration")) or _number((raw.get("format") or {}).get("duration"))
    return _Track(role, stage_file.path, int(audio["index"]), duration, gain_db)


# -- the picture: stream copy or re-encode --------------------------------------------------------


@dataclass(frozen=True)
class _VideoPlan:
    """How the picture is made, and why."""

    mode: str  # "copy" or "re-encode"
    reason: str
    difference: dict[str, Any] | None
    width: int
    height: int
    frame_rate: Fraction
    # Each segment's length in the output: its own when copied, whole frames when re-encoded.
    durations: list[float]
    frames: list[int] | None = None


# The properties stream copy needs to agree on, in the order a difference is reported.
_COPY_PROPERTIES: list[tuple[str, Any]] = [
    ("codec", lambda s: s.codec),
    ("frame size", lambda s: f"{s.width}x{s.height}"),
    ("pixel format", lambda s: s.pix_fmt),
    ("frame rate", lambda s: _rate_text(s.frame_rate)),
    ("time base", lambda s: s.time_base),
    ("sample aspect ratio", lambda s: s.sar),
    ("codec parameters (H.264 SPS/PPS)", lambda s: s.extradata),
]


def _asked_format(
    first: _Segment, width: int, height: int, fps: float
) -> tuple[int, int, Fraction]:
    """The output frame size and rate: as asked, with 0 meaning the first segment's."""
    display_w = first.width * (_fraction(first.sar.replace(":", "/")) or Fraction(1))
    aspect = display_w / first.height
    if width and not height:
        height = max(2, round(width / aspect / 2) * 2)
    elif height and not width:
        width = max(2, round(height * aspect / 2) * 2)
    elif not width and not height:
        width, height = first.width - first.width % 2, first.height - first.height % 2
    rate = _fps_fraction(fps) if fps else first.frame_rate
    return width, height, rate


def _fps_fraction(fps: float) -> Fraction:
    """29.97 means NTSC's 30000/1001 (23.976, 59.94 likewise); other rates are as given."""
    for base in (24, 30, 48, 60, 120):
        ntsc = Fraction(base * 1000, 1001)
        if abs(fps - float(ntsc)) < 0.01 and fps != base:
            return ntsc
    return Fraction(str(fps)).limit_denominator(1001)


def _plan_video(segments: list[_Segment], width: int, height: int, fps: float) -> _VideoPlan:
    first = segments[0]
    out_w, out_h, rate = _asked_format(first, width, height, fps)
    difference: dict[str, Any] | None = None
    if first.codec != COPY_CODEC:
        difference = {
            "property": "codec",
            "segment": 0,
            "file": first.path.name,
            "value": first.codec,
            "expected": COPY_CODEC,
        }
        reason = f"{first.label} is {first.codec}, and only {COPY_CODEC} is stream-copied"
    else:
        for segment in segments[1:]:
            for name, read in _COPY_PROPERTIES:
                if read(segment) != read(first):
                    difference = {
                        "property": name,
                        "segment": segment.index,
                        "file": segment.path.name,
                        "value": read(segment),
                        "expected": read(first),
                    }
                    reason = (
                        f"{segment.label} differs from segment 0 in {name}: "
                        f"{read(segment)} against {read(first)}"
                    )
                    break
            if difference:
                break
    if difference is None and (
        (width and out_w != first.width)
        or (height and out_h != first.height)
        or (fps and rate != first.frame_rate)
    ):
        asked = f"{out_w}x{out_h} at {_rate_text(rate)} fps"
        have = f"{first.width}x{first.height} at {_rate_text(first.frame_rate)} fps"
        difference = {"property": "asked format", "segment": None, "value": asked, "expected": have}
        reason = f"the settings ask for {asked}; the segments are {have}"
    if difference is None:
        return _VideoPlan(
            mode="copy",
            reason=(
                f"all {len(segments)} segments are {first.codec} {first.width}x{first.height} "
                f"{first.pix_fmt} at {_rate_text(first.frame_rate)} fps, time base "
                f"{first.time_base}, SAR {first.sar}, with the same codec parameters"
            ),
            difference=None,
            width=first.width,
            height=first.height,
            frame_rate=first.frame_rate,
            durations=[s.duration_s for s in segments],
        )
    # Whole frames per segment, so that the sound's joins fall exactly on the picture's.
    frames = [max(1, round(s.duration_s * rate)) for s in segments]
    return _VideoPlan(
        mode="re-encode",
        reason=reason,
        difference=difference,
        width=out_w,
        height=out_h,
        frame_rate=rate,
        durations=[float(n / rate) for n in frames],
        frames=frames,
    )


def _reencode_graph(
    segments: list[_Segment], plan: _VideoPlan, inputs: list[int]
) -> tuple[list[str], str]:
    """Filter chains that fit every segment into the output format and join them: `[vout]`."""
    assert plan.frames is not None
    w, h, rate = plan.width, plan.height, _rate_text(plan.frame_rate)
    chains = []
    for segment, source, frames in zip(segments, inputs, plan.frames, strict=True):
        steps = ["setpts=PTS-STARTPTS"]
        if segment.sar != "1:1":
            # Square the pixels first: the fit below reads the frame size, not the display shape.
            steps.append("scale=trunc(iw*sar/2)*2:ih,setsar=1")
        steps += [
            f"scale={w}:{h}:force_original_aspect_ratio=decrease:force_divisible_by=2",
            f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:color=black",
            "setsar=1",
            f"fps={rate}",
            "format=yuv420p",
            # The fps filter may leave a frame short of the count; clone the last, then cut.
            "tpad=stop_mode=clone:stop=4",
            f"trim=end_frame={frames}",
            "setpts=PTS-STARTPTS",
        ]
        chains.append(f"[{source}:{segment.video_stream}]{','.join(steps)}[v{segment.index}]")
    joined = "".join(f"[v{s.index}]" for s in segments)
    chains.append(f"{joined}concat=n={len(segments)}:v=1:a=0[vout]")
    return chains, "vout"


def _copy_list(
    ctx: RecipeContext, scratch: Path, segments: list[_Segment], plan: _VideoPlan
) -> Path:
    """A concat-demuxer list of each segment's video stream alone, remuxed without re-encoding.

    The demuxer pairs streams by position and places each file after the previous one's
    container duration; a video-only copy of each segment makes both the video stream's own.
    """
    args: list[str] = ["-loglevel", "error"]
    for segment in segments:
        args += ["-i", str(segment.path)]
    lines = ["ffconcat version 1.0"]
    for segment, duration in zip(segments, plan.durations, strict=True):
        name = f"video_{segment.index:03d}.mp4"
        args += [
            "-map",
            f"{segment.index}:{segment.video_stream}",
            "-c",
            "copy",
            str(scratch / name),
        ]
        lines += [f"file '{name}'", f"duration {duration:.6f}"]
    ctx.ffmpeg(args)
    listing = scratch / "segments.ffconcat"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return listing


# -- the sound ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AudioFormat:
    sample_rate: int
    channels: int
    bitrate_k: int

    @property
    def layout(self) -> str:
        return "mono" if self.channels == 1 else "stereo"

    def normalise(self) -> str:
        # async resampling pads a late start with silence, so each source begins at its offset.
        return (
            f"aresample={self.sample_rate}:async=1:first_pts=0,"
            f"aformat=sample_fmts=fltp:sample_rates={self.sample_rate}:"
            f"channel_layouts={self.layout}"
        )


def _audio_graph(
    segments: list[_Segment],
    durations: list[float],
    segment_inputs: dict[int, int],
    tracks: list[tuple[_Track, int]],
    segment_gain_db: float,
    fmt: _AudioFormat,
) -> tuple[list[str], list[str]]:
    """Filter chains ending in `[mix]`, exactly as long as the picture; and the chain in words."""
    total = sum(durations)
    chains = []
    words = []
    for segment, duration in zip(segments, durations, strict=True):
        label = f"[a{segment.index}]"
        if segment.audio_stream is None:
            chains.append(
                f"anullsrc=r={fmt.sample_rate}:cl={fmt.layout}:d={duration:.6f},"
                f"aformat=sample_fmts=fltp{label}"
            )
        else:
            source = segment_inputs[segment.index]
            # Padded then trimmed: each segment's sound lasts exactly as long as its picture.
            chains.append(
                f"[{source}:{segment.audio_stream}]{fmt.normalise()},"
                f"apad=whole_dur={duration:.6f},atrim=end={duration:.6f}{label}"
            )
    joined = "".join(f"[a{s.index}]" for s in segments)
    chains.append(
        f"{joined}concat=n={len(segments)}:v=0:a=1,volume={segment_gain_db:g}dB[segments]"
    )
    silent = sum(1 for s in segments if s.audio_stream is None)
    words.append(
        f"segment audio in order ({silent} of {len(segments)} without audio, silence at their "
        f"length), each cut or padded to its picture, at {segment_gain_db:+g} dB"
    )
    mixed = ["[segments]"]
    for track, source in tracks:
        chains.append(
            f"[{source}:{track.stream}]{fmt.normalise()},volume={track.gain_db:g}dB,"
            f"apad=whole_dur={total:.6f},atrim=end={total:.6f}[{track.role}]"
        )
        mixed.append(f"[{track.role}]")
        words.append(f"{track.role} at {track.gain_db:+g} dB, cut or padded to the picture")
    if len(mixed) > 1:
        # normalize=0: the gains above are the mix; amix would otherwise divide by the inputs.
        chains.append(
            f"{''.join(mixed)}amix=inputs={len(mixed)}:duration=first:normalize=0:"
            "dropout_transition=0[mix]"
        )
        words.append(f"mixed by summing ({' + '.join(m.strip('[]') for m in mixed)})")
    else:
        chains.append("[segments]anull[mix]")
    words.append(f"resampled to {fmt.sample_rate} Hz {fmt.layout}")
    return chains, words


def _loudnorm_stats(stderr: str) -> dict[str, Any]:
    """The last loudnorm print_format=json block in ffmpeg's log."""
    blocks = _LOUDNORM_BLOCK.findall(stderr)
    if not blocks:
        raise PermanentRuntimeError("ffmpeg printed no loudness measurement")
    try:
        stats = json.loads(blocks[-1])
    except json.JSONDecodeError as exc:
        raise PermanentRuntimeError("ffmpeg printed an unreadable loudness measurement") from exc
    return stats if isinstance(stats, dict) else {}


def _stat(stats: dict[str, Any], key: str) -> float | None:
    """A loudnorm figure as a finite number, or None (silence reads -inf, which JSON lacks)."""
    try:
        value = float(stats.get(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class _Loudness:
    target_lufs: float
    true_peak: float
    lra: float

    def measure(self) -> str:
        return (
            f"loudnorm=I={self.target_lufs:g}:TP={self.true_peak:g}:LRA={self.lra:g}:"
            "print_format=json"
        )

    def apply(self, measured: dict[str, Any]) -> str:
        """The second pass: the first pass's figures, linear gain when the peak allows it."""
        return (
            f"loudnorm=I={self.target_lufs:g}:TP={self.true_peak:g}:LRA={self.lra:g}:"
            f"measured_I={measured['input_i']}:measured_TP={measured['input_tp']}:"
            f"measured_LRA={measured['input_lra']}:measured_thresh={measured['input_thresh']}:"
            f"offset={measured['target_offset']}:linear=true:print_format=json"
        )


def _measurable(stats: dict[str, Any]) -> bool:
    keys = ("input_i", "input_tp", "input_lra", "input_thresh", "target_offset")
    values = [_stat(stats, key) for key in keys]
    return all(v is not None for v in values) and (values[0] or 0) > _SILENT_LUFS


# -- progress -------------------------------------------------------------------------------------


@contextmanager
def _phase(ctx: RecipeContext, low: float, high: float, what: str) -> Iterator[None]:
    """Map the progress of one ffmpeg pass onto [low, high] of the stage, so it only grows."""
    report = ctx.progress

    def scaled(fraction: float | None, message: str) -> None:
        # Rounded: 0.3 + 0.6 * 1.0 must not come out above the next phase's 0.9.
        done = None if fraction is None else round(low + (high - low) * fraction, 6)
        report(done, f"{what}: {message}")

    ctx.progress = scaled
    try:
        report(low, what)
        yield
    finally:
        ctx.progress = report


# -- the recipe -----------------------------------------------------------------------------------


class _Inputs:
    """ffmpeg's input list, handing out each input's index as it is added."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self.count = 0

    def add(self, path: Path, *options: str) -> int:
        self.args += [*options, "-i", str(path)]
        self.count += 1
        return self.count - 1


@dataclass(frozen=True)
class _Settings:
    """The recipe's parameters, checked."""

    loudness: _Loudness
    speech_gain_db: float
    segment_gain_db: float
    music_gain_db: float
    width: int
    height: int
    fps: float
    crf: float
    preset: str
    audio: _AudioFormat


def _checked_size(ctx: RecipeContext, name: str) -> int:
    value = int_param(ctx, name, 0, low=0, high=7680)
    if value and (value < 16 or value % 2):
        raise PermanentRuntimeError(
            f"parameter {name!r} must be 0 (the first segment's) or an even number from 16, "
            f"not {value}"
        )
    return value


def _sample_rate(ctx: RecipeContext) -> int:
    rate = int_param(ctx, "sample_rate", 48000, low=8000, high=192000)
    if rate not in (44100, 48000):
        raise PermanentRuntimeError(f"parameter 'sample_rate' must be 48000 or 44100, not {rate}")
    return rate


def _settings(ctx: RecipeContext) -> _Settings:
    return _Settings(
        loudness=_Loudness(
            target_lufs=float_param(ctx, "target_lufs", -16.0, low=-70.0, high=-5.0),
            true_peak=float_param(ctx, "true_peak", -1.5, low=-9.0, high=0.0),
            lra=float_param(ctx, "lra", 11.0, low=1.0, high=50.0),
        ),
        speech_gain_db=float_param(ctx, "speech_gain_db", 0.0, low=-60.0, high=20.0),
        segment_gain_db=float_param(ctx, "segment_audio_gain_db", -12.0, low=-60.0, high=20.0),
        music_gain_db=float_param(ctx, "music_gain_db", -20.0, low=-60.0, high=20.0),
        width=_checked_size(ctx, "width"),
        height=_checked_size(ctx, "height"),
        fps=float_param(ctx, "fps", 0.0, low=0.0, high=240.0),
        crf=float_param(ctx, "crf", 20.0, low=0.0, high=51.0),
        preset=choice_param(ctx, "preset", "veryfast", X264_PRESETS),
        audio=_AudioFormat(
            sample_rate=_sample_rate(ctx),
            channels=int_param(ctx, "channels", 2, low=1, high=2),
            bitrate_k=int_param(ctx, "audio_bitrate_k", 192, low=32, high=512),
        ),
    )


def _segment_files(ctx: RecipeContext) -> list[StageFile]:
    files = ctx.files("segments")
    if not files:
        raise PermanentRuntimeError(
            f"input 'segments' holds no files; give 1 to {MAX_SEGMENTS} video segments"
        )
    if len(files) > MAX_SEGMENTS:
        raise PermanentRuntimeError(
            f"input 'segments' holds {len(files)} files; at most {MAX_SEGMENTS} can be assembled "
            f"(segment {MAX_SEGMENTS} is {files[MAX_SEGMENTS].path.name})"
        )
    return files


@dataclass
class _Assembly:
    """Everything decided before the sound is measured: the sources, the picture, the mix."""

    segments: list[_Segment]
    speech: _Track | None
    music: _Track | None
    plan: _VideoPlan
    inputs: _Inputs
    segment_inputs: dict[int, int]
    audio_chains: list[str]
    chain_words: list[str]
    warnings: list[str]

    @property
    def total_s(self) -> float:
        return sum(self.plan.durations)


def _prepare(ctx: RecipeContext, settings: _Settings) -> _Assembly:
    with _phase(ctx, 0.0, 0.05, "probing"):
        segments = [_read_segment(ctx, i, f) for i, f in enumerate(_segment_files(ctx))]
        speech = _read_track(ctx, "speech", settings.speech_gain_db)
        music = _read_track(ctx, "music", settings.music_gain_db)
    plan = _plan_video(segments, settings.width, settings.height, settings.fps)
    ctx.log.info("assemble_segments: %s (%s)", plan.mode, plan.reason)
    total = sum(plan.durations)
    tracks = [t for t in (speech, music) if t is not None]
    warnings = []
    if speech is not None and speech.duration_s and speech.duration_s > total + _SPEECH_SLACK_S:
        warnings.append(
            f"the speech ({speech.duration_s:.3f} s) is longer than the video ({total:.3f} s); "
            f"its last {speech.duration_s - total:.3f} s were cut"
        )
    if all(s.audio_stream is None for s in segments) and not tracks:
        warnings.append("no segment has audio and no speech was given: the sound is silence")

    # Inputs: the segments with audio (every segment, to re-encode), then speech and music.
    inputs = _Inputs()
    segment_inputs = {
        s.index: inputs.add(s.path)
        for s in segments
        if plan.mode == "re-encode" or s.audio_stream is not None
    }
    track_inputs = [(t, inputs.add(t.path)) for t in tracks]
    chains, words = _audio_graph(
        segments,
        plan.durations,
        segment_inputs,
        track_inputs,
        settings.segment_gain_db,
        settings.audio,
    )
    return _Assembly(segments, speech, music, plan, inputs, segment_inputs, chains, words, warnings)


def _measure_mix(
    ctx: RecipeContext, job: _Assembly, loudness: _Loudness, scratch: Path
) -> dict[str, Any]:
    """The first loudnorm pass: the mix's loudness, measured without writing anything."""
    graph = scratch / "measure.filtergraph"
    graph.write_text(";".join([*job.audio_chains, f"[mix]{loudness.measure()}[measured]"]))
    args = [
        "-nostats", "-loglevel", "info", *job.inputs.args,
        "-filter_complex_script", str(graph), "-map", "[measured]", "-f", "null", "-",
    ]  # fmt: skip
    with _phase(ctx, 0.05, 0.25, "measuring the mix"):
        return _loudnorm_stats(ctx.ffmpeg(args, progress_of_s=job.total_s).stderr)


def _encode(
    ctx: RecipeContext, job: _Assembly, settings: _Settings, level: str, scratch: Path
) -> tuple[Path, str]:
    """Write the MP4 (under a temporary name) in one ffmpeg pass; its path and ffmpeg's log."""
    fmt = settings.audio
    chains = [
        *job.audio_chains,
        f"[mix]{level},aresample={fmt.sample_rate},"
        f"aformat=sample_fmts=fltp:channel_layouts={fmt.layout}[aout]",
    ]
    if job.plan.mode == "re-encode":
        video_chains, label = _reencode_graph(
            job.segments, job.plan, [job.segment_inputs[s.index] for s in job.segments]
        )
        chains += video_chains
        video_map = f"[{label}]"
        video_args = [
            "-c:v", "libx264", "-preset", settings.preset, "-crf", f"{settings.crf:g}",
            "-pix_fmt", "yuv420p", "-r", _rate_text(job.plan.frame_rate),
        ]  # fmt: skip
    else:
        with _phase(ctx, 0.25, 0.3, "remuxing the segments' video"):
            listing = _copy_list(ctx, scratch, job.segments, job.plan)
        # auto_convert 0: the demuxer would otherwise rewrite H.264 to Annex B, changing the very
        # packets stream copy is meant to keep.
        concat = job.inputs.add(listing, "-f", "concat", "-auto_convert", "0")
        video_map = f"{concat}:v:0"
        video_args = ["-c:v", "copy"]
    graph = scratch / "assemble.filtergraph"
    graph.write_text(";".join(chains))
    # A failed pass leaves only this name behind, never a file that passes for the output.
    partial = ctx.workdir / "assembly.partial.mp4"
    args = [
        "-nostats", "-loglevel", "info", *job.inputs.args,
        "-filter_complex_script", str(graph), "-map", video_map, "-map", "[aout]", *video_args,
        "-c:a", "aac", "-b:a", f"{fmt.bitrate_k}k", "-ar", str(fmt.sample_rate),
        "-ac", str(fmt.channels), "-movflags", "+faststart", str(partial),
    ]  # fmt: skip
    with _phase(ctx, 0.3, 0.9, "assembling"):
        stderr = ctx.ffmpeg(args, progress_of_s=job.total_s).stderr
    return partial, stderr


@recipe("assemble_segments")
def assemble_segments(ctx: RecipeContext) -> RecipeOutput:
    """An MP4 of input `segments` in order, with input `speech` (and `music`) as its sound.

    Picture: when every segment is H.264 with the same frame size, pixel format, frame rate, time
    base, SAR and codec parameters (and the settings ask for nothing else), the segments are
    joined by the concat demuxer with stream copy; otherwise each is fitted (aspect kept, padded)
    into the asked size and rate and re-encoded with libx264. Sound: each segment's audio (silence
    for one without) cut or padded to its picture, mixed with the speech and the music bed (cut or
    padded to the picture), normalised by two-pass loudnorm, AAC. The output lasts as long as the
    segments' pictures together.

    Params: `target_lufs` (-16, -70..-5), `true_peak` (-1.5, -9..0), `lra` (11, 1..50),
    `speech_gain_db` (0), `segment_audio_gain_db` (-12), `music_gain_db` (-20) (each -60..20),
    `width`/`height` (0 = the first segment's; one alone keeps its aspect), `fps` (0 = the first
    segment's), `crf` (20, 0..51), `preset` (veryfast), `sample_rate` (48000 or 44100),
    `channels` (2, 1..2), `audio_bitrate_k` (192, 32..512).
    Outputs: `video` (.mp4, +faststart) and `report` (.json, `ergot.assembly/1`).
    """
    settings = _settings(ctx)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    job = _prepare(ctx, settings)
    loudness = settings.loudness
    with tempfile.TemporaryDirectory(prefix=".assembly-", dir=ctx.workdir) as scratch_dir:
        scratch = Path(scratch_dir)
        first_pass = _measure_mix(ctx, job, loudness, scratch)
        normalised = _measurable(first_pass)
        if normalised:
            level = loudness.apply(first_pass)
            job.chain_words.append(
                f"loudness-normalised in two passes (loudnorm, {loudness.target_lufs:g} LUFS, "
                f"true peak {loudness.true_peak:g} dBTP, LRA {loudness.lra:g} LU)"
            )
        else:
            level = "anull"
            job.warnings.append("the mix is silent, so it was not loudness-normalised")
        job.chain_words.append(f"AAC {settings.audio.bitrate_k} kbit/s")
        partial, stderr = _encode(ctx, job, settings, level, scratch)
    second_pass = _loudnorm_stats(stderr) if normalised else {}

    video_path = ctx.workdir / "assembly.mp4"
    partial.replace(video_path)
    with _phase(ctx, 0.9, 1.0, "measuring the result"):
        result = _measure_output(ctx, video_path, loudness, job.total_s)
    for warning in job.warnings:
        ctx.log.warning("assemble_segments: %s", warning)
    report = _report(job, settings, first_pass, second_pass, normalised, result)
    report_path = write_json(ctx.workdir / "assembly.json", report)
    return RecipeOutput(
        outputs={"video": video_path, "report": report_path},
        metadata={
            "video_path": job.plan.mode,
            "video_reason": job.plan.reason,
            "segments": len(job.segments),
            "duration_s": round(job.total_s, 3),
            "integrated_lufs": result["loudness"]["integrated_lufs"],
            "warnings": job.warnings,
        },
    )


# -- the report -----------------------------------------------------------------------------------


def _measure_output(
    ctx: RecipeContext, path: Path, loudness: _Loudness, total: float
) -> dict[str, Any]:
    """The finished file's length and its loudness, measured by reading it back."""
    args = [
        "-nostats", "-loglevel", "info", "-i", str(path), "-map", "0:a:0",
        "-af", loudness.measure(), "-f", "null", "-",
    ]  # fmt: skip
    stderr = ctx.ffmpeg(args, progress_of_s=total).stderr
    raw = _ffprobe(ctx, path, f"the assembled video ({path.name})")
    return {
        "loudness": {
            **_loudnorm_json(_loudnorm_stats(stderr)),
            "measured_with": "loudnorm print_format=json on the output",
        },
        "duration_s": _number((raw.get("format") or {}).get("duration")),
    }


def _track_json(track: _Track | None, total: float) -> dict[str, Any] | None:
    if track is None:
        return None
    duration = track.duration_s
    return {
        "file": track.path.name,
        "duration_s": duration,
        "gain_db": track.gain_db,
        "cut_s": round(max(0.0, duration - total), 6) if duration else None,
        "padded_s": round(max(0.0, total - duration), 6) if duration else None,
    }


def _loudnorm_json(stats: dict[str, Any]) -> dict[str, float | None]:
    return {
        "integrated_lufs": _stat(stats, "input_i"),
        "true_peak_dbtp": _stat(stats, "input_tp"),
        "lra_lu": _stat(stats, "input_lra"),
        "threshold_lufs": _stat(stats, "input_thresh"),
    }


def _report(
    job: _Assembly,
    settings: _Settings,
    first_pass: dict[str, Any],
    second_pass: dict[str, Any],
    normalised: bool,
    result: dict[str, Any],
) -> dict[str, Any]:
    """The `ergot.assembly/1` document."""
    plan, loudness, fmt = job.plan, settings.loudness, settings.audio
    offsets = [sum(plan.durations[:i]) for i in range(len(job.segments))]
    return {
        "format": REPORT_FORMAT,
        "segments": [
            {
                "index": s.index,
                "file": s.path.name,
                "offset_s": round(offset, 6),
                "duration_s": round(duration, 6),
                "source_duration_s": round(s.duration_s, 6),
                "video": s.summary(),
                "audio": s.audio,
                "sound": "own audio" if s.audio_stream is not None else "silence",
            }
            for s, offset, duration in zip(job.segments, offsets, plan.durations, strict=True)
        ],
        "video": {
            "path": plan.mode,
            "reason": plan.reason,
            "difference": plan.difference,
            "codec": "h264",
            "width": plan.width,
            "height": plan.height,
            "frame_rate": _rate_text(plan.frame_rate),
            "encoder": None
            if plan.mode == "copy"
            else {"name": "libx264", "crf": settings.crf, "preset": settings.preset},
        },
        "audio": {
            "chain": job.chain_words,
            "codec": "aac",
            "bitrate_k": fmt.bitrate_k,
            "sample_rate": fmt.sample_rate,
            "channels": fmt.channels,
            "segment_audio_gain_db": settings.segment_gain_db,
            "speech": _track_json(job.speech, job.total_s),
            "music": _track_json(job.music, job.total_s),
            "loudnorm": {
                "mode": "two-pass" if normalised else "skipped (silent mix)",
                "target": {
                    "integrated_lufs": loudness.target_lufs,
                    "true_peak_dbtp": loudness.true_peak,
                    "lra_lu": loudness.lra,
                },
                "first_pass": _loudnorm_json(first_pass),
                "normalization_type": second_pass.get("normalization_type"),
            },
        },
        "loudness": result["loudness"],
        "durations": {
            "video_s": round(job.total_s, 6),
            "output_s": result["duration_s"],
            "speech_s": job.speech.duration_s if job.speech else None,
            "music_s": job.music.duration_s if job.music else None,
        },
        "warnings": job.warnings,
    }
