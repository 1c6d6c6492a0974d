"""Demo media for `make dev`: a few generated clips under the ingest root, ingested.

Generated with ffmpeg's test sources rather than shipped, so the repository stays small. Existing
files are left alone, so running it again only ingests what changed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ergot_dagster.media.synth import make_audio, make_clip, make_image
from ergot_dagster.settings import ErgotSettings, ensure_dagster_home
from ergot_dagster.sources.ingest import ingest_refs, scan_root
from ergot_dagster.sources.record import latest_source_record, record_sources

DEMO_SCRIPT = (
    "Good evening. This is the narrator of episode twelve. Tonight we follow the river from the "
    "mountains to the sea, and we listen to the people who live along its banks."
)


def make_speech(path: Path, text: str = DEMO_SCRIPT) -> Path:
    """A spoken recording, as a capture node would bring one in: piper's packaged voice reading
    `text`, with a second of quiet before and after, at 48 kHz."""
    from ergot_dagster.media.process import run_process
    from ergot_dagster.resources.tts.engines import piper_voice, run_piper
    from ergot_dagster.targets.model import RuntimeTarget

    voice = piper_voice(RuntimeTarget(name="demo", runtime="tts"))
    with tempfile.TemporaryDirectory() as scratch:
        script, raw = Path(scratch) / "script.txt", Path(scratch) / "speech.wav"
        script.write_text(text + "\n", encoding="utf-8")
        run_piper(voice, script, raw, speed=1.0, timeout_s=120)
        run_process(
            [
                "ffmpeg",
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(raw),
                "-af",
                "adelay=1000:all=1,apad=pad_dur=1",
                "-ar",
                "48000",
                "-ac",
                "1",
                str(path),
            ],
            timeout_s=60,
            tool="ffmpeg",
        )
    return path


def make_portrait(path: Path) -> Path | None:
    """A real face for the face workflows: scikit-image's astronaut portrait (public domain,
    shipped inside the package), if scikit-image is installed (`make setup` installs it)."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return None
    Image.fromarray(data.astronaut()).save(path)
    return path


def make_demo_media(root: Path) -> list[Path]:
    """Create the demo files under `root/demo` if missing; return their paths."""
    demo = root / "demo"
    wanted = {
        # The first second and a half is black: the poster must not be taken from it.
        demo / "camA" / "2026-11-24" / "take 01.mov": lambda p: make_clip(
            p, duration=8.0, size="640x360", black_lead_s=1.5
        ),
        demo / "camA" / "2026-11-24" / "take 02 (no audio).mp4": lambda p: make_clip(
            p, duration=6.0, size="640x360", audio=False
        ),
        # A comma and non-ASCII letters: a ref that needs the partition-key escaping rule.
        demo / "camB" / "interview, prise 3 — café.mov": lambda p: make_clip(
            p, duration=10.0, size="640x360", freeze_at=4.0, freeze_s=3.0
        ),
        demo / "audio" / "room tone.wav": lambda p: make_audio(p, duration=5.0),
        demo / "stills" / "portrait.jpg": lambda p: make_image(p, size="640x480"),
        # Real speech and a real face, for the speech and face workflows.
        demo / "voice" / "narrator take 1.wav": make_speech,
        demo / "people" / "astronaut.png": make_portrait,
    }
    made = []
    for path, make in wanted.items():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
        if path.exists():
            made.append(path)
    return made


def main() -> None:
    settings = ErgotSettings.from_env()
    ensure_dagster_home(settings)
    root = Path(settings.ingest_root)
    root.mkdir(parents=True, exist_ok=True)
    Path(settings.storage).mkdir(parents=True, exist_ok=True)
    settings.request_inbox.mkdir(parents=True, exist_ok=True)
    make_demo_media(root)

    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    outcomes = ingest_refs(
        root, list(scan_root(root)), lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.recorded and o.record])
    for outcome in outcomes:
        detail = outcome.record.sha256[:12] if outcome.record else outcome.error
        print(f"{outcome.status:9}  {outcome.ref}  {detail}")
    print(
        f"ingest root {root}; artifacts in {settings.storage}; DAGSTER_HOME {settings.dagster_home}"
    )


if __name__ == "__main__":
    main()
