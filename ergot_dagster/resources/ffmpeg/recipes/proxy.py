"""The `proxy` recipe: an H.264/AAC MP4 for review and a PCM WAV of the sound, in one pass."""

from __future__ import annotations

from pathlib import Path

from ergot_dagster.resources.ffmpeg.params import choice_param, float_param, int_param
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext, RecipeOutput, recipe
from ergot_dagster.resources.ffmpeg.stills import require_video, video_map

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)


@recipe("proxy")
def proxy(ctx: RecipeContext) -> RecipeOutput:
    """A browser-playable proxy of input `media`, and its first audio stream as 16-bit WAV.

    One ffmpeg invocation decodes the source once and writes both files: `proxy`, H.264 (yuv420p,
    `+faststart` so playback starts before the download ends) with AAC sound in MP4, scaled down to
    at most `height` lines (never up); and `audio`, PCM s16le at the source's sample rate. A source
    with no sound gives a silent proxy and no `audio` output.

    Params: `height` (720), `crf` (23), `preset` (veryfast), `audio_bitrate_k` (128).
    """
    height = int_param(ctx, "height", 720, low=16, high=4320)
    crf = float_param(ctx, "crf", 23, low=0, high=51)
    preset = choice_param(ctx, "preset", "veryfast", X264_PRESETS)
    audio_bitrate_k = int_param(ctx, "audio_bitrate_k", 128, low=16, high=512)

    source = ctx.input("media").path
    summary = require_video(ctx, "media")
    source_height = summary.video_streams[0].height
    target = min(height, source_height) if source_height else height
    # 4:2:0 chroma needs even dimensions; -2 keeps the width even, this keeps the height even.
    target -= target % 2

    proxy_path = ctx.workdir / "proxy.mp4"
    audio_path = ctx.workdir / "audio.wav"
    audio_stream = summary.audio_streams[0].index if summary.audio_streams else None

    args = ["-i", str(source), "-map", f"0:{video_map(summary)}"]
    if audio_stream is not None:
        args += ["-map", f"0:{audio_stream}"]
    args += [
        "-vf",
        f"scale=-2:{target},format=yuv420p",
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-crf",
        f"{crf:g}",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
    ]
    if audio_stream is not None:
        args += ["-c:a", "aac", "-b:a", f"{audio_bitrate_k}k"]
    args.append(str(proxy_path))
    if audio_stream is not None:
        # -rf64 auto: a WAV over 4 GiB needs RF64 headers; smaller ones stay plain RIFF.
        args += ["-map", f"0:{audio_stream}", "-c:a", "pcm_s16le", "-rf64", "auto", str(audio_path)]
    ctx.ffmpeg(["-loglevel", "error", *args], progress_of_s=summary.duration_s)

    outputs: dict[str, Path | list[Path]] = {"proxy": proxy_path}
    if audio_stream is not None:
        outputs["audio"] = audio_path
    return RecipeOutput(
        outputs=outputs,
        metadata={
            "height": target,
            "crf": crf,
            "preset": preset,
            "has_audio": audio_stream is not None,
        },
    )
