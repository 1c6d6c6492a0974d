"""The demo media `make dev` ingests: generated once, real where the workflows need real media."""

from __future__ import annotations

from pathlib import Path

from ergot_dagster.demo import make_demo_media
from ergot_dagster.media.probe import probe
from ergot_dagster.media.sniff import verify_media_type


def test_demo_media_is_made_once_with_real_speech_and_a_real_face(tmp_path: Path) -> None:
    made = make_demo_media(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in made}
    assert {"demo/voice/narrator take 1.wav", "demo/people/astronaut.png"} <= names
    voice = tmp_path / "demo" / "voice" / "narrator take 1.wav"
    verify_media_type(voice, "audio/wav", "the demo recording")
    summary = probe(voice)
    assert (summary.duration_s or 0) > 6 and summary.audio_streams[0].sample_rate == 48000
    portrait = tmp_path / "demo" / "people" / "astronaut.png"
    verify_media_type(portrait, "image/png", "the demo portrait")
    assert (probe(portrait).width, probe(portrait).height) == (512, 512)
    # Existing files are left alone: nothing is made twice.
    before = {p: p.stat().st_mtime_ns for p in made}
    assert make_demo_media(tmp_path) == made
    assert {p: p.stat().st_mtime_ns for p in made} == before
