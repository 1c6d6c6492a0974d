"""The episode-segment chain, tried as Histrio would: a separate process with only the client.

One plane for the module: `dagster dev` on a free loopback port with the repository's workflow
definitions and targets, the ComfyUI target pointed at the loopback ComfyUI (its wire protocol,
real files, no model), and the demo's own recording and portrait ingested. The consumer is
`examples/histrio_consumer.py`, run as its own process; this test then checks every artifact it
names as a consumer would (sha256 of the downloaded bytes, ffprobe, the image opens, the
embeddings' shape, the transcripts' words), walks the lineage down to the ingested files, and
promotes and reuses a voice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ergot_dagster.client import (
    ErgotClient,
    LibraryConflictError,
    LineageNode,
    PromotionError,
    UnknownLibraryEntryError,
)
from ergot_dagster.demo import DEMO_SCRIPT, make_portrait, make_speech
from ergot_dagster.media.probe import probe
from ergot_dagster.settings import PROJECT_ROOT
from tests.support import dagster_dev, stop, until

pytestmark = pytest.mark.slow

ERGOT = str(Path(sys.executable).parent / "ergot")
EXAMPLE = PROJECT_ROOT / "examples" / "histrio_consumer.py"
RECORDING = "demo/voice/narrator take 1.wav"
PORTRAIT = "demo/people/astronaut.png"


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


class Plane:
    def __init__(self, url: str, home: Path, env: dict[str, str]) -> None:
        self.url = url
        self.home = home
        self.env = env
        self.client = ErgotClient(url)

    def ergot(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ERGOT, *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def consumer(self, *args: str) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, str(EXAMPLE), "--url", self.url, "--json", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout)

    def read(self, ref: str) -> bytes:
        with self.client.open_artifact(ref) as handle:
            return handle.read()


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("comfyui")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.comfyui_server", "--step-seconds", "0.01"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115 - closed with the process
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    url = until("the loopback ComfyUI", proc.stdout.readline, timeout_s=60).strip()
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, comfyui: str) -> Iterator[Plane]:
    home = tmp_path_factory.mktemp("histrio") / "ergot"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    env = dict(os.environ)
    env.update(
        {
            "ERGOT_HOME": str(home),
            "DAGSTER_HOME": str(dagster_home),
            "ERGOT_STORAGE": str(home / "artifacts"),
            "ERGOT_INGEST_ROOT": str(home / "ingest"),
            "ERGOT_REQUEST_INBOX": str(home / "inbox"),
            "ERGOT_WORKFLOW_DEFS": str(PROJECT_ROOT / "workflow_defs"),
            "ERGOT_RUNTIME_TARGETS": str(PROJECT_ROOT / "runtime_targets.yaml"),
            "ERGOT_TARGET_COMFYUI_LOCAL_ENDPOINT": comfyui,
            "ERGOT_INGEST_INTERVAL_S": "3600",
        }
    )
    ingest = home / "ingest"
    for ref, make in ((RECORDING, make_speech), (PORTRAIT, make_portrait)):
        (ingest / ref).parent.mkdir(parents=True, exist_ok=True)
        make(ingest / ref)
    with dagster_dev(home, env, home.parent / "dagster-dev.log") as url:
        env["ERGOT_DAGSTER_URL"] = url
        plane = Plane(url, home, env)
        result = plane.ergot("ingest", "demo")
        assert result.returncode == 0, result.stderr
        yield plane
        plane.client.close()


@pytest.fixture(scope="module")
def chain(plane: Plane) -> dict[str, Any]:
    return plane.consumer()


def _sources(node: LineageNode) -> dict[str, str]:
    if node.kind == "source":
        return {node.ref: node.sha256}
    found: dict[str, str] = {}
    for parent in node.parents:
        found.update(_sources(parent))
    return found


def _kinds(node: LineageNode) -> list[tuple[str, str | None]]:
    found = [(node.kind, node.workflow)]
    for parent in node.parents:
        found += _kinds(parent)
    return found


def test_every_artifact_of_the_chain_is_what_it_says(plane: Plane, chain: dict[str, Any]) -> None:
    client = plane.client
    refs = [ref for step in chain["artifacts"].values() for ref in step.values()]
    assert len(refs) >= 14
    for ref in refs:
        manifest = client.manifest(ref)
        if manifest.kind == "set":
            continue
        body = plane.read(ref)
        assert hashlib.sha256(body).hexdigest() == manifest.sha256, ref
        assert len(body) == manifest.size

    artifacts = chain["artifacts"]
    out = plane.home.parent / "downloads"
    out.mkdir(exist_ok=True)

    # The voice prompt's transcript says what the narrator said; the synthesised speech says
    # the script (heard back by the transcription engine).
    prompt_text = json.loads(plane.read(artifacts["voice_prompt"]["transcript"]))["text"]
    assert len(words(prompt_text) & words(DEMO_SCRIPT)) >= 5, prompt_text
    heard = json.loads(plane.read(artifacts["speech_transcript"]["transcript"]))["text"]
    assert {"river", "village", "sea"} & words(heard), heard

    # Faces: one face in the portrait, a 128-d unit embedding, a crop that opens.
    faces = json.loads(plane.read(artifacts["faces"]["faces"]))
    assert len(faces["faces"]) == 1
    embeddings = np.load(io.BytesIO(plane.read(artifacts["faces"]["embeddings"])))
    assert embeddings.shape == (1, 128) and embeddings.dtype == np.float32
    assert abs(float(np.linalg.norm(embeddings[0])) - 1.0) < 1e-3
    crops = client.manifest(artifacts["faces"]["crops"])
    assert len(crops.members) == 1

    # The seed image and the poster open as images of their declared types.
    seed = Image.open(io.BytesIO(plane.read(artifacts["seed"]["seed"])))
    assert seed.format == "PNG" and seed.size[0] > 0
    poster = Image.open(io.BytesIO(plane.read(artifacts["poster"]["poster"])))
    assert poster.format == "JPEG"

    # The assembled segment: H.264 with AAC, as long as its motion segment.
    video = client.download(artifacts["assembly"]["video"], out / "segment.mp4")
    summary = probe(video)
    assert [s.codec for s in summary.video_streams] == ["h264"]
    assert [s.codec for s in summary.audio_streams] == ["aac"]
    motion = probe(client.download(artifacts["motion"]["clip"], out / "motion.mp4"))
    assert abs((summary.duration_s or 0) - (motion.duration_s or 0)) < 0.25
    qc = json.loads(plane.read(artifacts["qc"]["report"]))
    assert qc  # media_qc ran on the assembled segment itself
    assert client.manifest(artifacts["qc"]["report"]).source_ref == artifacts["assembly"]["video"]


def test_the_final_segment_walks_back_to_the_ingested_recording_and_portrait(
    plane: Plane, chain: dict[str, Any]
) -> None:
    client = plane.client
    tree = client.lineage(chain["artifacts"]["assembly"]["video"])
    recording = (plane.home / "ingest" / RECORDING).read_bytes()
    portrait = (plane.home / "ingest" / PORTRAIT).read_bytes()
    assert _sources(tree) == {
        RECORDING: hashlib.sha256(recording).hexdigest(),
        PORTRAIT: hashlib.sha256(portrait).hexdigest(),
    }
    steps = {workflow for kind, workflow in _kinds(tree) if workflow}
    for name in (
        "segment_assembly",
        "motion_generation",
        "seed_scene_prep",
        "tts_synthesis",
        "voice_prompt_extraction",
    ):
        assert any(f"/{name}@" in s for s in steps), (name, steps)
    # The promotion is a node of its own between the speech and the voice prompt's clip.
    assert ("library", "histrio/voice_prompt_extraction@1") in _kinds(tree)
    assert chain["voice"] == "library:voices/narrator-01"
    # The poster names the exact segment it was taken from.
    poster = client.manifest(chain["artifacts"]["poster"]["poster"])
    assert [(p.kind, p.ref) for p in poster.parents] == [
        ("artifact", chain["artifacts"]["assembly"]["video"])
    ]


def test_a_promoted_voice_is_immutable_listed_and_reused(
    plane: Plane, chain: dict[str, Any]
) -> None:
    client = plane.client
    clip = chain["artifacts"]["voice_prompt"]["clip"]
    entry = client.library_entry("voices/narrator-01")
    assert entry.artifact == clip and entry.media_type == "audio/wav"
    assert entry.sha256 == client.manifest(clip).sha256
    # Promoting the same artifact again changes nothing; another artifact cannot take the name.
    assert client.promote(clip, library="voices", name="narrator-01") == entry
    other = chain["artifacts"]["speech"]["speech"]
    with pytest.raises(LibraryConflictError, match="immutable"):
        client.promote(other, library="voices", name="narrator-01")
    with pytest.raises(PromotionError, match="library ref"):
        client.promote(other, library="Voices!", name="x")
    with pytest.raises(UnknownLibraryEntryError):
        client.library_entry("voices/nobody")
    assert [e.ref for e in client.libraries("voices")] == ["library:voices/narrator-01"]
    listed = plane.ergot("libraries", "voices")
    assert listed.returncode == 0 and "library:voices/narrator-01" in listed.stdout

    # A request names the voice by its short name; the speech records the entry as its parent.
    handle = client.submit(
        {
            "request_id": "histrio-test-reuse-voice",
            "workflow": "tts_synthesis",
            "sources": {"primary": "voices/narrator-01"},
            "settings": {"text": "The tide turns at midnight."},
        }
    )
    status = client.wait(handle.run_id, timeout_s=300)
    assert status.status == "SUCCESS", status.error
    assert status.source_ref == "library:voices/narrator-01"
    speech = client.manifest(next(a.ref for a in status.artifacts if a.name == "speech"))
    assert [(p.kind, p.ref, p.input) for p in speech.parents] == [
        ("library", "library:voices/narrator-01", "voice")
    ]

    # Running the whole chain again returns the same runs: every request id was seen before.
    again = plane.consumer()
    assert again["runs"] == chain["runs"]


def test_nothing_of_histrio_leaked_into_the_core_package() -> None:
    package = PROJECT_ROOT / "ergot_dagster"
    leaks = [
        f"{path.relative_to(PROJECT_ROOT)}:{number}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "histrio" in line.lower()
    ]
    assert leaks == []
