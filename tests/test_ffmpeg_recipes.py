"""The FFmpeg recipes, run through the runtime adapter on media generated for each test.

Everything here runs real ffmpeg on small lavfi-made clips and checks the results with ffprobe,
the way an operator would look at them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.probe import ProbeSummary, probe
from ergot_dagster.media.synth import make_audio, make_clip, make_corrupt, make_image
from ergot_dagster.resources.ffmpeg.adapter import FFmpegRuntime
from ergot_dagster.resources.runtime import StageFile, StageRequest, StageResult
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

LOG = logging.getLogger("test")
FFMPEG_LOCAL = RuntimeTarget(name="ffmpeg-local", runtime="ffmpeg")


def run_recipe(
    operation: str,
    inputs: dict[str, StageFile | list[StageFile]],
    workdir: Path,
    params: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> StageResult:
    request = StageRequest(
        workflow="test/recipes@1",
        stage=StageSpec(id="stage", runtime="ffmpeg", operation=operation),
        run_id="run-1",
        inputs=inputs,
        params=params or {},
        workdir=workdir,
        timeout_s=timeout_s,
        target=FFMPEG_LOCAL,
    )
    return FFmpegRuntime().run_stage(request, LOG)


def media(path: Path, media_type: str = "video/mp4") -> StageFile:
    return StageFile(path=path, media_type=media_type)


def strict_json(path: Path) -> Any:
    """Parse JSON, refusing the Infinity and NaN tokens Python would otherwise write and accept."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"{path.name} holds the non-JSON number {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def single(outputs: dict[str, Path | list[Path]], name: str) -> Path:
    value = outputs[name]
    assert isinstance(value, Path)
    return value


def only_video(summary: ProbeSummary) -> Any:
    assert len(summary.video_streams) == 1
    return summary.video_streams[0]


# -- shared clips ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The clips several tests read; generated once, never written to by a recipe."""
    root = tmp_path_factory.mktemp("clips")
    return {
        # 1.5 s of black, then the moving pattern; a 440 Hz tone throughout.
        "black_lead": make_clip(root / "black_lead.mp4", duration=5.0, black_lead_s=1.5),
        # The picture holds still from 2 s to 5 s; the sound is digital silence.
        "frozen": make_clip(
            root / "frozen.mp4", duration=6.0, freeze_at=2.0, freeze_s=3.0, silence=True
        ),
        "no_audio": make_clip(root / "no_audio.mp4", duration=3.0, audio=False),
        "audio_only": make_audio(root / "audio_only.m4a", duration=3.0),
        "corrupt": make_corrupt(root / "corrupt.mp4"),
    }


# -- poster ---------------------------------------------------------------------------------------


def test_poster_is_a_jpeg_at_the_asked_width_past_the_black_lead_in(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    result = run_recipe("poster", {"video": media(clips["black_lead"])}, tmp_path, {"width": 480})

    poster = single(result.outputs, "poster")
    picture = probe(poster)
    assert poster.suffix == ".jpg"
    assert only_video(picture).codec == "mjpeg"
    assert (picture.width, picture.height) == (480, 270)

    info = strict_json(single(result.outputs, "info"))
    assert info["timestamp_s"] > 1.5
    assert info["timestamp_s"] < info["source_duration_s"]
    assert (info["width"], info["height"]) == (480, 270)
    assert info["source_duration_s"] == pytest.approx(5.0, abs=0.05)
    assert "contrast" in info["reason"]
    verdicts = [c["verdict"] for c in info["candidates"]]
    assert len(verdicts) == 7
    assert "black" in verdicts
    assert "ok" in verdicts
    chosen = [c for c in info["candidates"] if c["timestamp_s"] == info["timestamp_s"]]
    assert chosen and chosen[0]["verdict"] == "ok"
    assert result.metadata["timestamp_s"] == info["timestamp_s"]
    assert result.metadata["reason"] == info["reason"]


def test_poster_avoids_a_frozen_stretch(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe("poster", {"video": media(clips["frozen"])}, tmp_path)

    info = strict_json(single(result.outputs, "info"))
    assert not 2.0 <= info["timestamp_s"] <= 5.0
    assert "frozen" in [c["verdict"] for c in info["candidates"]]
    assert probe(single(result.outputs, "poster")).width == 640


def test_poster_of_a_clip_shorter_than_the_skip(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "short.mp4", duration=0.8)

    result = run_recipe("poster", {"video": media(clip)}, tmp_path / "work", {"skip_start_s": 2.0})

    info = strict_json(single(result.outputs, "info"))
    assert 0.0 <= info["timestamp_s"] < 0.8
    assert probe(single(result.outputs, "poster")).width == 640


def test_poster_of_a_still_image(tmp_path: Path) -> None:
    image = make_image(tmp_path / "still.png", size="640x480")

    result = run_recipe(
        "poster", {"video": media(image, "image/png")}, tmp_path / "work", {"width": 320}
    )

    assert (probe(single(result.outputs, "poster")).height) == 240
    assert strict_json(single(result.outputs, "info"))["timestamp_s"] == 0.0


def test_poster_of_a_file_with_no_video_fails(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PermanentRuntimeError, match="has no video stream"):
        run_recipe("poster", {"video": media(clips["audio_only"], "audio/mp4")}, tmp_path)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"quality": 1}, "quality"),
        ({"quality": 40}, "quality"),
        ({"width": "wide"}, "width"),
        ({"width": True}, "width"),
        ({"candidates": 0}, "candidates"),
        ({"min_luma": 1.5}, "min_luma"),
        ({"skip_start_s": -1}, "skip_start_s"),
    ],
)
def test_poster_rejects_bad_params_by_name(
    clips: dict[str, Path], tmp_path: Path, params: dict[str, Any], named: str
) -> None:
    with pytest.raises(PermanentRuntimeError, match=named):
        run_recipe("poster", {"video": media(clips["black_lead"])}, tmp_path, params)


# -- qc -------------------------------------------------------------------------------------------


def test_qc_finds_the_black_lead_in_and_measures_loudness(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    result = run_recipe("qc", {"media": media(clips["black_lead"])}, tmp_path)

    report = strict_json(single(result.outputs, "report"))
    assert report["duration_s"] == pytest.approx(5.0, abs=0.1)
    assert report["video"]["codec"] == "h264"
    assert (report["video"]["width"], report["video"]["height"]) == (320, 180)
    assert report["audio"] == {"codec": "aac", "sample_rate": 48000, "channels": 1}

    [black] = report["black_segments"]
    assert black["start_s"] == pytest.approx(0.0, abs=0.05)
    assert black["end_s"] == pytest.approx(1.5, abs=0.1)
    assert report["totals"]["black_s"] == pytest.approx(black["duration_s"])
    assert report["silent_segments"] == []
    assert report["frozen_segments"] == []

    loudness = report["loudness"]
    # A full-scale-ish sine from lavfi's `sine` source: about -21 LUFS, peaking near -16 dBFS.
    assert -30.0 < loudness["integrated_lufs"] < -10.0
    assert -25.0 < loudness["true_peak_dbtp"] < 0.0
    assert loudness["lra_lu"] is not None
    assert report["detection"]["black_min_s"] == 0.5


def test_qc_finds_silence_and_a_freeze(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe("qc", {"media": media(clips["frozen"])}, tmp_path)

    report = strict_json(single(result.outputs, "report"))
    [silent] = report["silent_segments"]
    assert silent["start_s"] == pytest.approx(0.0, abs=0.05)
    assert silent["end_s"] == pytest.approx(report["duration_s"], abs=0.05)
    # freezedetect needs a few frames to settle on a held picture before it calls it frozen.
    [frozen] = report["frozen_segments"]
    assert 2.0 <= frozen["start_s"] <= 2.5
    assert frozen["end_s"] == pytest.approx(5.0, abs=0.1)
    assert report["totals"]["frozen_s"] == pytest.approx(frozen["duration_s"])
    # Digital silence has no peak; the report says null rather than writing -inf.
    assert report["loudness"]["true_peak_dbtp"] is None


def test_qc_closes_a_freeze_that_runs_to_the_end(tmp_path: Path) -> None:
    # The freeze is asked to outlast the clip, so the held picture really is the last frame and
    # freezedetect never prints a freeze_end.
    clip = make_clip(tmp_path / "ends_frozen.mp4", duration=5.0, freeze_at=2.5, freeze_s=5.0)

    report = strict_json(
        single(run_recipe("qc", {"media": media(clip)}, tmp_path / "work").outputs, "report")
    )

    [frozen] = report["frozen_segments"]
    assert frozen["end_s"] == pytest.approx(report["duration_s"])
    assert frozen["duration_s"] == pytest.approx(frozen["end_s"] - frozen["start_s"], abs=0.002)


def test_qc_of_a_clip_with_no_audio(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe(
        "qc",
        {"media": media(clips["no_audio"])},
        tmp_path,
        {"freeze_min_s": 1.0, "silence_min_s": 0.5},
    )

    report = strict_json(single(result.outputs, "report"))
    assert report["audio"] is None
    assert report["loudness"] is None
    assert report["silent_segments"] == []
    assert report["frozen_segments"] == []
    assert report["detection"]["freeze_min_s"] == 1.0


def test_qc_of_a_sound_file(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe("qc", {"media": media(clips["audio_only"], "audio/mp4")}, tmp_path)

    report = strict_json(single(result.outputs, "report"))
    assert report["video"] is None
    assert report["black_segments"] == [] and report["frozen_segments"] == []
    assert report["loudness"]["integrated_lufs"] is not None


def test_qc_times_out(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "long.mp4", duration=10.0)

    with pytest.raises(RuntimeTimeoutError):
        run_recipe("qc", {"media": media(clip)}, tmp_path / "work", timeout_s=0.001)


# -- proxy ----------------------------------------------------------------------------------------


def test_proxy_is_h264_aac_mp4_at_the_asked_height_with_a_wav(tmp_path: Path) -> None:
    source = make_clip(
        tmp_path / "source.mov", duration=2.0, size="640x360", sample_rate=44100, channels=2
    )

    result = run_recipe(
        "proxy", {"media": media(source, "video/quicktime")}, tmp_path / "work", {"height": 240}
    )

    proxy = single(result.outputs, "proxy")
    summary = probe(proxy)
    assert summary.format.startswith("mov,mp4")
    assert proxy.suffix == ".mp4"
    video = only_video(summary)
    assert (video.codec, video.pix_fmt) == ("h264", "yuv420p")
    assert (video.width, video.height) == (426, 240)
    [audio] = summary.audio_streams
    assert audio.codec == "aac"
    # +faststart: the index (moov) comes before the media data, so playback starts at once.
    data = proxy.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")

    wav = probe(single(result.outputs, "audio"))
    [pcm] = wav.audio_streams
    assert wav.format == "wav"
    assert (pcm.codec, pcm.sample_rate, pcm.channels) == ("pcm_s16le", 44100, 2)
    assert wav.duration_s == pytest.approx(2.0, abs=0.1)


def test_proxy_never_upscales(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe("proxy", {"media": media(clips["black_lead"])}, tmp_path, {"height": 1080})

    assert probe(single(result.outputs, "proxy")).height == 180


def test_proxy_of_a_clip_with_no_audio(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe("proxy", {"media": media(clips["no_audio"])}, tmp_path)

    assert "audio" not in result.outputs
    summary = probe(single(result.outputs, "proxy"))
    assert summary.audio_streams == []
    assert only_video(summary).height == 180
    assert not (tmp_path / "audio.wav").exists()


def test_proxy_of_a_file_with_no_video_fails(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PermanentRuntimeError, match="no video stream"):
        run_recipe("proxy", {"media": media(clips["audio_only"], "audio/mp4")}, tmp_path)


def test_proxy_rejects_an_unknown_preset(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PermanentRuntimeError, match="preset"):
        run_recipe("proxy", {"media": media(clips["no_audio"])}, tmp_path, {"preset": "warp"})


# -- frames ---------------------------------------------------------------------------------------


def test_sample_frames_gives_n_jpegs_in_time_order(clips: dict[str, Path], tmp_path: Path) -> None:
    result = run_recipe(
        "sample_frames", {"video": media(clips["black_lead"])}, tmp_path, {"count": 5, "width": 160}
    )

    frames = result.outputs["frames"]
    assert isinstance(frames, list)
    assert [f.name for f in frames] == [f"frame_{i:04d}.jpg" for i in range(1, 6)]
    for frame in frames:
        picture = probe(frame)
        assert only_video(picture).codec == "mjpeg"
        assert (picture.width, picture.height) == (160, 90)
    assert result.metadata["timestamps_s"] == pytest.approx([0.5, 1.5, 2.5, 3.5, 4.5])


def test_sample_frames_rejects_a_count_out_of_range(clips: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PermanentRuntimeError, match="count"):
        run_recipe("sample_frames", {"video": media(clips["black_lead"])}, tmp_path, {"count": 501})


def test_contact_sheet_is_a_grid_of_the_frames(clips: dict[str, Path], tmp_path: Path) -> None:
    sampled = run_recipe(
        "sample_frames",
        {"video": media(clips["black_lead"])},
        tmp_path / "frames",
        {"count": 5, "width": 160},
    )
    frames = sampled.outputs["frames"]
    assert isinstance(frames, list)

    result = run_recipe(
        "contact_sheet",
        {"frames": [media(f, "image/jpeg") for f in frames]},
        tmp_path / "sheet",
        {"columns": 3, "tile_width": 200},
    )

    sheet = single(result.outputs, "sheet")
    picture = probe(sheet)
    assert only_video(picture).codec == "mjpeg"
    # Five 16:9 frames, three to a row: two rows of 200x112 tiles (height kept even).
    assert (result.metadata["columns"], result.metadata["rows"]) == (3, 2)
    assert (picture.width, picture.height) == (3 * 200, 2 * 112)


def test_contact_sheet_letterboxes_odd_shapes(tmp_path: Path) -> None:
    wide = make_image(tmp_path / "wide.png", size="320x180")
    square = make_image(tmp_path / "square.png", size="200x200")

    result = run_recipe(
        "contact_sheet",
        {"frames": [media(wide, "image/png"), media(square, "image/png")]},
        tmp_path / "sheet",
        {"columns": 4, "tile_width": 160},
    )

    # Fewer frames than columns: the sheet is as wide as the frames it holds.
    assert (
        probe(single(result.outputs, "sheet")).width,
        probe(single(result.outputs, "sheet")).height,
    ) == (320, 90)


# -- awkward containers ---------------------------------------------------------------------------


def test_stills_from_a_transport_stream_that_cannot_be_seeked(tmp_path: Path) -> None:
    # x264 at ultrafast puts one keyframe in this whole clip, and an MPEG-TS has no index: input
    # seeking finds no picture, and the recipes must still deliver.
    clip = make_clip(tmp_path / "one_gop.ts", duration=4.0, black_lead_s=1.5)

    poster = run_recipe("poster", {"video": media(clip, "video/mp2t")}, tmp_path / "poster")
    sampled = run_recipe(
        "sample_frames",
        {"video": media(clip, "video/mp2t")},
        tmp_path / "frames",
        {"count": 3, "width": 160},
    )
    report = strict_json(
        single(
            run_recipe("qc", {"media": media(clip, "video/mp2t")}, tmp_path / "qc").outputs,
            "report",
        )
    )

    assert strict_json(single(poster.outputs, "info"))["timestamp_s"] > 1.5
    frames = sampled.outputs["frames"]
    assert isinstance(frames, list) and len(frames) == 3
    assert all(probe(frame).width == 160 for frame in frames)
    # The stream starts at 1.4 s on the TS clock; the report counts from the start of the file.
    [black] = report["black_segments"]
    assert black["start_s"] == pytest.approx(0.0, abs=0.05)
    assert black["end_s"] == pytest.approx(1.5, abs=0.1)


# -- failures common to every recipe --------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "input_name"),
    [("poster", "video"), ("qc", "media"), ("proxy", "media"), ("sample_frames", "video")],
)
def test_a_corrupt_file_fails_permanently(
    clips: dict[str, Path], tmp_path: Path, operation: str, input_name: str
) -> None:
    with pytest.raises(PermanentRuntimeError):
        run_recipe(operation, {input_name: media(clips["corrupt"])}, tmp_path)


def test_long_recipes_report_progress(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "long.mp4", duration=12.0, size="640x360")
    for operation in ("qc", "proxy"):
        seen: list[float] = []
        request = StageRequest(
            workflow="test/recipes@1",
            stage=StageSpec(id="stage", runtime="ffmpeg", operation=operation),
            run_id="run-1",
            inputs={"media": media(clip)},
            params={"preset": "medium"} if operation == "proxy" else {},
            workdir=tmp_path / operation,
            timeout_s=120,
            target=FFMPEG_LOCAL,
            progress=lambda fraction, _message, seen=seen: seen.append(fraction or 0.0),
        )
        FFmpegRuntime().run_stage(request, LOG)
        assert seen, f"{operation} reported no progress"
        assert seen == sorted(seen) and seen[-1] == 1.0
