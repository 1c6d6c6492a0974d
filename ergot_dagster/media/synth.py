"""Media made on the spot with ffmpeg's lavfi sources, for the tests, the demo and the benchmarks.

Plain functions, so any test can make the clip it needs in its own tmp_path.
Every source is given a duration (an endless lavfi source never lets ffmpeg finish), and every clip
is small and short so that generating one takes a fraction of a second.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

# Audio codec per container: MP4/MOV/MKV take AAC; WAV and AVI want plain PCM.
_AUDIO_CODECS = {
    ".wav": "pcm_s16le",
    ".avi": "pcm_s16le",
    ".flac": "flac",
    ".mp3": "libmp3lame",
    ".ogg": "libvorbis",
    ".opus": "libopus",
    ".webm": "libopus",
}
_DEFAULT_AUDIO_CODEC = "aac"
_GENERATE_TIMEOUT_S = 60.0


def _ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise RuntimeError("ffmpeg is not installed; the media tests need it")
    return found


def _run(args: list[str]) -> None:
    """Run ffmpeg with `args`, whose last item is the output path.

    ffmpeg writes to a hidden sibling that is renamed into place when complete: these files are
    often made inside a watched ingest root, and a watcher must never see half a file.
    """
    path = Path(args[-1])
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    result = subprocess.run(
        [
            _ffmpeg(),
            "-hide_banner",
            "-nostdin",
            "-y",
            "-loglevel",
            "error",
            *args[:-1],
            str(partial),
        ],
        capture_output=True,
        text=True,
        timeout=_GENERATE_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed to generate test media: {result.stderr.strip()}")
    partial.replace(path)


def _audio_source(
    duration: float, *, silence: bool, tone_hz: float, sample_rate: int, channels: int
) -> str:
    layout = "mono" if channels == 1 else "stereo"
    if silence:
        # anullsrc gives digital zero, the case where loudness meters answer -inf.
        return f"anullsrc=r={sample_rate}:cl={layout}:d={duration}"
    tone = f"sine=f={tone_hz}:r={sample_rate}:d={duration}"
    return tone if channels == 1 else f"{tone},aformat=channel_layouts={layout}"


def _audio_codec_args(path: Path) -> list[str]:
    codec = _AUDIO_CODECS.get(path.suffix.lower(), _DEFAULT_AUDIO_CODEC)
    return ["-c:a", codec]


def make_clip(
    path: Path,
    *,
    duration: float = 4.0,
    size: str = "320x180",
    rate: int = 25,
    black_lead_s: float = 0.0,
    audio: bool = True,
    freeze_at: float | None = None,
    freeze_s: float = 0.0,
    silence: bool = False,
    tone_hz: float = 440.0,
    sample_rate: int = 48000,
    channels: int = 1,
    codec: str = "libx264",
) -> Path:
    """A moving test pattern of `duration` seconds, with optional black lead-in and freeze.

    `duration` is the whole clip, lead-in included. The first `black_lead_s` seconds are pure
    black; from `freeze_at` (seconds from the start of the clip) the picture holds still for
    `freeze_s` seconds. Audio, when asked for, is a sine tone or digital silence for the whole
    clip. The container follows the file suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total_frames = round(duration * rate)
    lead_frames = min(round(black_lead_s * rate), total_frames)
    chain = f"testsrc2=s={size}:r={rate}:d={total_frames / rate}"
    if lead_frames:
        # Painting black over the pattern keeps one source and an exact frame count.
        chain += f",drawbox=x=0:y=0:w=iw:h=ih:c=black:t=fill:enable='lt(n,{lead_frames})'"
    graph = f"{chain}[pattern]"
    video_label = "pattern"
    if freeze_at is not None and freeze_s > 0:
        first = round(freeze_at * rate)
        last = min(first + round(freeze_s * rate) - 1, total_frames - 1)
        # freezeframes swaps frames first..last for a copy of frame `first` from its second input.
        graph = (
            f"{chain},split[pattern][still];"
            f"[pattern][still]freezeframes=first={first}:last={last}:replace={first}[frozen]"
        )
        video_label = "frozen"
    args = ["-filter_complex", graph]
    if audio:
        source = _audio_source(
            duration, silence=silence, tone_hz=tone_hz, sample_rate=sample_rate, channels=channels
        )
        args += ["-f", "lavfi", "-i", source]
    args += ["-map", f"[{video_label}]", "-c:v", codec, "-pix_fmt", "yuv420p"]
    if codec == "libx264":
        args += ["-preset", "ultrafast"]
    if audio:
        args += ["-map", "0:a:0", *_audio_codec_args(path)]
    # No -frames:v: hitting it ends every stream of the output, which would clip the audio.
    args.append(str(path))
    _run(args)
    return path


def make_image(path: Path, size: str = "640x480") -> Path:
    """One still frame of the test pattern, encoded by the file suffix (.png, .jpg, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=s={size}:r=1:d=1",
            "-frames:v",
            "1",
            "-update",
            "1",
            str(path),
        ]
    )
    return path


def make_audio(
    path: Path,
    duration: float = 3.0,
    silence: bool = False,
    *,
    tone_hz: float = 440.0,
    sample_rate: int = 48000,
    channels: int = 1,
) -> Path:
    """A sound-only file: a sine tone, or digital silence. The container follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = _audio_source(
        duration, silence=silence, tone_hz=tone_hz, sample_rate=sample_rate, channels=channels
    )
    _run(["-f", "lavfi", "-i", source, "-map", "0:a:0", *_audio_codec_args(path), str(path)])
    return path


def make_corrupt(path: Path, size: int = 64 * 1024, seed: int = 7) -> Path:
    """Random bytes under a media suffix: what a truncated upload or a wrong file looks like."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(random.Random(seed).randbytes(size))
    partial.replace(path)
    return path
