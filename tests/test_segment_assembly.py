"""The `assemble_segments` FFmpeg recipe, run through the adapter on clips made with lavfi.

Each result is checked the way an operator would look at it: ffprobe for streams and lengths,
the copied packets' hashes against the segments', an independent ebur128 meter for loudness,
silencedetect for where the sound sits, and the JSON report.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.probe import probe
from ergot_dagster.media.synth import make_audio, make_clip
from ergot_dagster.resources.ffmpeg.adapter import FFmpegRuntime
from ergot_dagster.resources.runtime import StageFile, StageRequest
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.workflows.model import StageSpec
from tests.test_ffmpeg_recipes import FFMPEG_LOCAL, LOG, media, run_recipe, single, strict_json

FRAME_S = 1 / 25


def wav(path: Path) -> StageFile:
    return StageFile(path=path, media_type="audio/wav")


def assemble(
    segments: list[Path], workdir: Path, speech: Path | None = None, **params: Any
) -> tuple[Path, dict[str, Any]]:
    inputs: dict[str, StageFile | list[StageFile]] = {"segments": [media(s) for s in segments]}
    if speech is not None:
        inputs["speech"] = wav(speech)
    result = run_recipe("assemble_segments", inputs, workdir, params, timeout_s=120)
    return single(result.outputs, "video"), strict_json(single(result.outputs, "report"))


def ffmpeg_log(*args: str) -> str:
    done = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-nostats", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def video_packet_hashes(path: Path) -> list[str]:
    """The MD5 of every packet of the first video stream, read without decoding."""
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
         "-f", "framemd5", "-"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [line.rsplit(",", 1)[1].strip() for line in done.stdout.splitlines() if line[:1] != "#"]


def integrated_lufs(path: Path) -> float:
    """Integrated loudness by ffmpeg's ebur128 meter (not the loudnorm the recipe uses)."""
    log = ffmpeg_log("-i", str(path), "-map", "0:a:0", "-af", "ebur128=framelog=verbose",
                     "-f", "null", "-")  # fmt: skip
    summary = log[log.rindex("Summary:") :]
    match = re.search(r"I:\s*(-?[\d.]+) LUFS", summary)
    assert match, summary
    return float(match.group(1))


def silences(path: Path) -> list[tuple[float, float]]:
    log = ffmpeg_log("-i", str(path), "-map", "0:a:0", "-af", "silencedetect=n=-60dB:d=0.3",
                     "-f", "null", "-")  # fmt: skip
    starts = [float(x) for x in re.findall(r"silence_start: (-?[\d.]+)", log)]
    ends = [float(x) for x in re.findall(r"silence_end: (-?[\d.]+)", log)]
    return list(zip(starts, ends, strict=True))


# -- stream copy ----------------------------------------------------------------------------------


def test_matching_segments_are_stream_copied_under_normalised_speech(tmp_path: Path) -> None:
    segments = [
        make_clip(tmp_path / f"shot_{i}.mp4", duration=d, tone_hz=300 + 100 * i)
        for i, d in enumerate([1.0, 1.6, 2.0])
    ]
    speech = make_audio(tmp_path / "speech.wav", duration=3.0, tone_hz=1000)

    video, report = assemble(segments, tmp_path / "work", speech, target_lufs=-16)

    # The picture is the segments' own packets, byte for byte, one after another.
    expected = [h for segment in segments for h in video_packet_hashes(segment)]
    assert video_packet_hashes(video) == expected
    assert report["format"] == "ergot.assembly/1"
    assert report["video"]["path"] == "copy"
    assert "all 3 segments are h264 320x180" in report["video"]["reason"]
    assert report["video"]["difference"] is None

    summary = probe(video)
    assert summary.format.startswith("mov,mp4")
    total = sum(probe(s).video_streams[0].duration_s or 0 for s in segments)
    assert summary.duration_s == pytest.approx(total, abs=FRAME_S)
    [audio] = summary.audio_streams
    assert (audio.codec, audio.sample_rate, audio.channels) == ("aac", 48000, 2)
    assert audio.duration_s == pytest.approx(total, abs=FRAME_S)
    data = video.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart

    assert integrated_lufs(video) == pytest.approx(-16, abs=1.0)
    assert report["loudness"]["integrated_lufs"] == pytest.approx(-16, abs=1.0)
    assert report["audio"]["loudnorm"]["mode"] == "two-pass"
    assert report["audio"]["speech"]["padded_s"] == pytest.approx(total - 3.0, abs=FRAME_S)
    assert [s["file"] for s in report["segments"]] == ["shot_0.mp4", "shot_1.mp4", "shot_2.mp4"]
    offsets = [s["offset_s"] for s in report["segments"]]
    assert offsets == pytest.approx([0.0, 1.0, 2.6], abs=FRAME_S)
    assert report["durations"]["output_s"] == pytest.approx(total, abs=FRAME_S)
    assert report["warnings"] == []


def test_a_segment_without_audio_is_silence_at_its_place(tmp_path: Path) -> None:
    segments = [
        make_clip(tmp_path / "a.mp4", duration=1.0),
        make_clip(tmp_path / "quiet.mp4", duration=1.2, audio=False),
        make_clip(tmp_path / "b.mp4", duration=1.0),
    ]

    video, report = assemble(segments, tmp_path / "work")

    assert report["video"]["path"] == "copy"
    assert [s["sound"] for s in report["segments"]] == ["own audio", "silence", "own audio"]
    [(start, end)] = silences(video)
    assert start == pytest.approx(1.0, abs=0.05)
    assert end == pytest.approx(2.2, abs=0.05)
    assert report["audio"]["speech"] is None


# -- re-encode ------------------------------------------------------------------------------------


def test_segments_of_different_sizes_and_rates_are_re_encoded_as_asked(tmp_path: Path) -> None:
    segments = [
        make_clip(tmp_path / "wide.mp4", duration=1.0, size="320x180", rate=25),
        make_clip(tmp_path / "tall.mp4", duration=1.0, size="240x320", rate=30),
    ]
    speech = make_audio(tmp_path / "speech.wav", duration=1.5, tone_hz=800)

    video, report = assemble(
        segments, tmp_path / "work", speech, width=480, height=270, fps=30, preset="ultrafast"
    )

    assert report["video"]["path"] == "re-encode"
    assert report["video"]["difference"]["property"] == "frame size"
    assert report["video"]["difference"]["segment"] == 1
    assert "segment 1 (tall.mp4)" in report["video"]["reason"]
    assert "240x320" in report["video"]["reason"]
    summary = probe(video)
    stream = summary.video_streams[0]
    assert (stream.codec, stream.pix_fmt) == ("h264", "yuv420p")
    assert (stream.width, stream.height) == (480, 270)
    assert stream.frame_rate == pytest.approx(30.0)
    assert summary.duration_s == pytest.approx(2.0, abs=1 / 30)
    assert report["video"]["encoder"]["preset"] == "ultrafast"
    assert integrated_lufs(video) == pytest.approx(-16, abs=1.0)


def test_re_encoding_takes_the_first_segments_format_by_default(tmp_path: Path) -> None:
    segments = [
        make_clip(tmp_path / "first.mp4", duration=1.0, size="320x180", rate=25),
        make_clip(tmp_path / "faster.mp4", duration=1.0, size="320x180", rate=30),
    ]

    video, report = assemble(segments, tmp_path / "work", preset="ultrafast")

    assert report["video"]["path"] == "re-encode"
    assert report["video"]["difference"] == {
        "property": "frame rate",
        "segment": 1,
        "file": "faster.mp4",
        "value": "30/1",
        "expected": "25/1",
    }
    stream = probe(video).video_streams[0]
    assert (stream.width, stream.height, stream.frame_rate) == (320, 180, 25.0)


def test_asking_for_another_size_re_encodes_matching_segments(tmp_path: Path) -> None:
    segments = [make_clip(tmp_path / f"s{i}.mp4", duration=0.6) for i in range(2)]

    video, report = assemble(segments, tmp_path / "work", width=160, preset="ultrafast")

    assert report["video"]["path"] == "re-encode"
    assert report["video"]["difference"]["property"] == "asked format"
    assert (probe(video).width, probe(video).height) == (160, 90)


# -- the sound follows the picture ----------------------------------------------------------------


def test_speech_longer_than_the_video_is_cut_with_a_warning(tmp_path: Path) -> None:
    segments = [
        make_clip(tmp_path / "mute.mp4", duration=1.0, audio=False),
        make_clip(tmp_path / "sound.mp4", duration=1.0),
    ]
    speech = make_audio(tmp_path / "speech.wav", duration=4.0, tone_hz=900)

    video, report = assemble(segments, tmp_path / "work", speech)

    summary = probe(video)
    assert summary.duration_s == pytest.approx(2.0, abs=FRAME_S)
    assert summary.audio_streams[0].duration_s == pytest.approx(2.0, abs=FRAME_S)
    [warning] = report["warnings"]
    assert "speech" in warning and "cut" in warning
    assert report["audio"]["speech"]["cut_s"] == pytest.approx(2.0, abs=FRAME_S)
    assert report["segments"][0]["sound"] == "silence"
    assert report["durations"]["speech_s"] == pytest.approx(4.0, abs=0.01)


def test_a_music_bed_is_mixed_in(tmp_path: Path) -> None:
    segments = [make_clip(tmp_path / "shot.mp4", duration=1.0)]
    music = make_audio(tmp_path / "music.wav", duration=0.5, tone_hz=200)
    inputs: dict[str, StageFile | list[StageFile]] = {
        "segments": [media(segments[0])],
        "music": wav(music),
    }

    result = run_recipe("assemble_segments", inputs, tmp_path / "work", {"music_gain_db": -6})

    report = strict_json(single(result.outputs, "report"))
    assert report["audio"]["music"]["gain_db"] == -6
    assert report["audio"]["music"]["padded_s"] == pytest.approx(0.5, abs=FRAME_S)
    assert "music" in " ".join(report["audio"]["chain"])


# -- bad input ------------------------------------------------------------------------------------


def test_an_audio_only_segment_is_refused_by_index_and_name(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "shot.mp4", duration=0.5)
    sound = make_audio(tmp_path / "voice_over.m4a", duration=0.5)
    inputs: dict[str, StageFile | list[StageFile]] = {
        "segments": [media(clip), StageFile(path=sound, media_type="audio/mp4")]
    }

    with pytest.raises(PermanentRuntimeError, match=r"segment 1 \(voice_over\.m4a\) has no video"):
        run_recipe("assemble_segments", inputs, tmp_path / "work")
    assert not (tmp_path / "work" / "assembly.mp4").exists()


def test_no_segments_or_too_many_are_refused(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "shot.mp4", duration=0.5)

    with pytest.raises(PermanentRuntimeError, match="'segments' holds no files"):
        run_recipe("assemble_segments", {"segments": []}, tmp_path / "none")
    with pytest.raises(PermanentRuntimeError, match=r"holds 65 files; at most 64"):
        run_recipe("assemble_segments", {"segments": [media(clip)] * 65}, tmp_path / "many")
    with pytest.raises(PermanentRuntimeError, match="no input named 'segments'"):
        run_recipe("assemble_segments", {"video": media(clip)}, tmp_path / "unnamed")


def test_speech_without_sound_is_refused(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "shot.mp4", duration=0.5, audio=False)
    inputs: dict[str, StageFile | list[StageFile]] = {
        "segments": [media(clip)],
        "speech": media(clip),
    }

    with pytest.raises(PermanentRuntimeError, match=r"input 'speech' \(shot\.mp4\) has no audio"):
        run_recipe("assemble_segments", inputs, tmp_path / "work")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"width": 641}, "width"),
        ({"fps": -1}, "fps"),
        ({"target_lufs": 0}, "target_lufs"),
        ({"true_peak": 3}, "true_peak"),
        ({"preset": "warp"}, "preset"),
        ({"sample_rate": 22050}, "sample_rate"),
    ],
)
def test_bad_params_are_refused_by_name(tmp_path: Path, params: dict[str, Any], named: str) -> None:
    with pytest.raises(PermanentRuntimeError, match=named):
        run_recipe("assemble_segments", {"segments": []}, tmp_path, params)


def test_progress_only_grows_and_the_deadline_holds(tmp_path: Path) -> None:
    segments = [make_clip(tmp_path / f"s{i}.mp4", duration=1.0) for i in range(2)]
    seen: list[float] = []
    request = StageRequest(
        workflow="test/recipes@1",
        stage=StageSpec(id="stage", runtime="ffmpeg", operation="assemble_segments"),
        run_id="run-1",
        inputs={"segments": [media(s) for s in segments]},
        params={},
        workdir=tmp_path / "work",
        timeout_s=120,
        target=FFMPEG_LOCAL,
        progress=lambda fraction, _message: seen.append(fraction or 0.0),
    )
    FFmpegRuntime().run_stage(request, LOG)
    assert seen == sorted(seen) and seen[-1] == 1.0

    with pytest.raises(RuntimeTimeoutError):
        run_recipe(
            "assemble_segments",
            {"segments": [media(s) for s in segments]},
            tmp_path / "late",
            timeout_s=0.001,
        )


# -- the workflow ---------------------------------------------------------------------------------


def test_segment_assembly_workflow_on_ingested_sources(
    plane_settings: ErgotSettings, instance: DagsterInstance, ingest_root: Path
) -> None:
    shots = [f"histrio/shots/shot_{i}.mp4" for i in (2, 0, 1)]  # the order given, not the names'
    for i, ref in enumerate(shots):
        make_clip(ingest_root / ref, duration=1.0, tone_hz=300 + 100 * i)
    make_audio(ingest_root / "histrio/speech.wav", duration=2.0, tone_hz=900)
    outcomes = ingest_refs(
        ingest_root, [*shots, "histrio/speech.wav"], lambda k: latest_source_record(instance, k)
    )
    assert all(o.record for o in outcomes), [o.error for o in outcomes]
    record_sources(instance, [o.record for o in outcomes if o.record])
    # Imported here: it builds the plane's definitions on import, which the recipe tests above
    # do not need.
    from tests.test_workflows import Plane

    plane = Plane(plane_settings, instance)

    result = plane.run(
        "segment_assembly", "histrio/speech.wav", {"target_lufs": -18}, inputs={"segments": shots}
    )

    assert result.success, plane.failure(result)
    manifests = plane.manifests(result)
    video, report = manifests["video"], manifests["report"]
    assert (video.media_type, report.media_type) == ("video/mp4", "application/json")
    assert video.workflow == "histrio/segment_assembly@1"
    # Lineage names every segment in the order it plays, and the speech.
    segment_parents = [(p.kind, p.ref) for p in video.parents if p.input == "segments"]
    assert segment_parents == [("source", ref) for ref in shots]
    assert [(p.kind, p.ref) for p in video.parents if p.input == "speech"] == [
        ("source", "histrio/speech.wav")
    ]
    assert [p.ref for p in report.parents] == [p.ref for p in video.parents]
    document = json.loads(plane.path(report).read_text())
    assert [s["file"] for s in document["segments"]] == ["shot_2.mp4", "shot_0.mp4", "shot_1.mp4"]
    assert document["video"]["path"] == "copy"
    assert probe(plane.path(video)).duration_s == pytest.approx(3.0, abs=FRAME_S)
    assert integrated_lufs(plane.path(video)) == pytest.approx(-18, abs=1.0)
