"""The face embedding runtime on real faces: the local dlib engine, and the remote protocol
against the loopback service (which answers with the same engine, over real HTTP).

The face is scikit-image's `astronaut` portrait (it ships inside the wheel); other inputs are made
here with ffmpeg: a scaled and cropped copy of it, a video zooming into it, lavfi's test pattern.
Waits poll with deadlines; nothing sleeps and hopes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, materialize
from PIL import Image

from ergot_dagster.artifacts.store import open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.sniff import verify_media_type
from ergot_dagster.media.synth import make_corrupt, make_image
from ergot_dagster.orchestration.tags import EXECUTION_TARGET
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.adapters import BUILTIN_ADAPTERS
from ergot_dagster.resources.face_embedding.adapter import FaceEmbeddingRuntime
from ergot_dagster.resources.face_embedding.engine import DIMS, EMBEDDING_MODEL
from ergot_dagster.resources.runtime import (
    ProgressReporter,
    StageFile,
    StageRequest,
    StageResult,
    adapter_class,
    no_progress,
)
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.config import load_targets
from ergot_dagster.targets.model import RuntimeTarget, TargetAuth
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.model import StageSpec
from ergot_dagster.workflows.run_config import run_config_for
from tests.servers.face_embedding_server import FaceEmbeddingLoopbackServer
from tests.support import until

LOG = logging.getLogger("test.face")
TOKEN_ENV = "ERGOT_TEST_FACE_TOKEN"
SERVER_TOKEN = "right-face-token-3b9d71"
WRONG_TOKEN = "wrong-face-token-a04e5c"
BEARER = TargetAuth(kind="bearer", token_env=TOKEN_ENV)
OUTPUT_TYPES = {
    "faces": "application/json",
    "crops": "image/jpeg",
    "embeddings": "application/x-npy",
}
# Unit embeddings of one person stay well inside this distance (dlib's own "same person" bound
# is 0.6 on its raw vectors, whose length is about 1.45: about 0.41 on unit ones).
SAME_FACE_DISTANCE = 0.3


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-loglevel", "error", *args],
        check=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The portrait and what is made from it, once for the module."""
    from skimage import data  # the dev extra; its astronaut.png ships inside the wheel

    root = tmp_path_factory.mktemp("faces")
    portrait = root / "astronaut.png"
    Image.fromarray(data.astronaut()).save(portrait)
    scaled = root / "astronaut_scaled.jpg"
    _ffmpeg("-i", str(portrait), "-vf", "crop=400:400:60:20,scale=300:300", str(scaled))
    zoom = root / "zoom.mp4"
    # Three seconds zooming in on the portrait, 10 frames a second.
    _ffmpeg(
        "-loop", "1", "-i", str(portrait),
        "-vf", "zoompan=z='1+0.01*on':d=1:s=512x512:fps=10",
        "-t", "3", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(zoom),
    )  # fmt: skip
    pattern = make_image(root / "testsrc.png", size="640x480")
    return {"portrait": portrait, "scaled": scaled, "zoom": zoom, "pattern": pattern}


def local_target(**options: Any) -> RuntimeTarget:
    return RuntimeTarget(name="face-test", runtime="face_embedding", options=options)


def remote_target(url: str, auth: TargetAuth | None = BEARER, **options: Any) -> RuntimeTarget:
    return RuntimeTarget(
        name="face-api-test",
        runtime="face_embedding",
        endpoint=url,
        auth=auth or TargetAuth(),
        options=options,
    )


def stage_request(
    workdir: Path,
    source: Path,
    target: RuntimeTarget,
    *,
    media_type: str | None = None,
    params: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
    progress: ProgressReporter = no_progress,
) -> StageRequest:
    if media_type is None:
        media_type = {".png": "image/png", ".jpg": "image/jpeg", ".mp4": "video/mp4"}[source.suffix]
    return StageRequest(
        workflow="histrio/face_embedding@1",
        stage=StageSpec(
            id="embed",
            runtime="face_embedding",
            operation="embed_faces",
            inputs={"media": "${inputs.source}"},
        ),
        run_id="r1",
        inputs={"media": StageFile(path=source, media_type=media_type)},
        params=params or {},
        output_types=OUTPUT_TYPES,
        workdir=workdir,
        timeout_s=timeout_s,
        target=target,
        progress=progress,
    )


def faces_of(result: StageResult) -> dict[str, Any]:
    path = result.outputs["faces"]
    assert isinstance(path, Path)
    verify_media_type(path, "application/json", "faces")
    return json.loads(path.read_text())


def embeddings_of(result: StageResult) -> np.ndarray:
    path = result.outputs["embeddings"]
    assert isinstance(path, Path)
    return np.load(path, allow_pickle=False)


@pytest.fixture
def adapter() -> FaceEmbeddingRuntime:
    # Short bounds so that the failure paths take a second, not the production minute.
    return FaceEmbeddingRuntime(request_timeout_s=3.0, health_timeout_s=2.0, poll_interval_s=0.05)


@pytest.fixture(scope="module")
def portrait_run(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> StageResult:
    """The portrait through the local engine, once for the module."""
    workdir = tmp_path_factory.mktemp("portrait") / "w"
    request = stage_request(workdir, media["portrait"], local_target())
    return FaceEmbeddingRuntime().run_stage(request, LOG)


# -- the local engine -----------------------------------------------------------------------------


def test_the_portrait_has_one_face_with_box_landmarks_unit_embedding_and_crop(
    portrait_run: StageResult,
) -> None:
    doc = faces_of(portrait_run)
    assert portrait_run.job_id is not None and portrait_run.job_id.startswith("pid:")
    assert (doc["format"], doc["model"], doc["dims"]) == ("ergot.faces/1", EMBEDDING_MODEL, 128)
    assert doc["count"] == 1 and len(doc["faces"]) == 1
    assert doc["source"]["kind"] == "image"
    assert doc["frames"] == [
        {"index": 0, "time_s": None, "width": 512, "height": 512, "detect_scale": 1.0, "faces": 1}
    ]
    face = doc["faces"][0]
    # The astronaut's face is in the upper middle of the 512 x 512 portrait.
    box = face["box"]
    assert 150 <= box["x"] <= 200 and 50 <= box["y"] <= 100
    assert 70 <= box["w"] <= 120 and 70 <= box["h"] <= 120
    assert face["score"] > 0.5
    landmarks = face["landmarks"]
    assert sum(len(points) for points in landmarks.values()) == 68
    # Eyes inside the box, the image-left eye left of the other, both above the nose tip.
    left_eye, right_eye = np.mean(landmarks["left_eye"], 0), np.mean(landmarks["right_eye"], 0)
    for x, y in (left_eye, right_eye):
        assert box["x"] <= x <= box["x"] + box["w"] and box["y"] <= y <= box["y"] + box["h"]
    assert left_eye[0] < right_eye[0]
    assert max(left_eye[1], right_eye[1]) < np.mean(landmarks["nose_tip"], 0)[1]

    embedding = np.asarray(face["embedding"])
    assert embedding.shape == (DIMS,) and abs(np.linalg.norm(embedding) - 1.0) < 1e-5
    assert 0.5 < face["norm"] < 3.0  # dlib's own vectors are not unit length
    matrix = embeddings_of(portrait_run)
    assert matrix.shape == (1, DIMS) and matrix.dtype == np.float32
    assert np.allclose(matrix[0], embedding, atol=1e-6)

    crops = portrait_run.outputs["crops"]
    assert isinstance(crops, list) and [p.name for p in crops] == [face["crop"]]
    verify_media_type(crops[0], "image/jpeg", "crop")
    with Image.open(crops[0]) as crop:
        assert crop.size == (160, 160)
    assert portrait_run.metadata["faces"] == 1
    assert portrait_run.metadata["engine"]["landmarks"] == "shape_predictor_68_face_landmarks"


def test_the_same_face_in_two_images_embeds_close(
    portrait_run: StageResult, media: dict[str, Path], tmp_path: Path
) -> None:
    params = {"crop_size": 96, "crop_margin": 0.0}
    result = FaceEmbeddingRuntime().run_stage(
        stage_request(tmp_path / "w", media["scaled"], local_target(model="small"), params=params),
        LOG,
    )
    doc = faces_of(result)
    assert doc["count"] == 1
    face = doc["faces"][0]
    # The 5-point model: two corners of each eye and the nose.
    assert {k: len(v) for k, v in face["landmarks"].items()} == {
        "left_eye": 2,
        "right_eye": 2,
        "nose_tip": 1,
    }
    # The copy is the portrait cropped at (60, 20) and scaled by 0.75: so is the face.
    original = faces_of(portrait_run)["faces"][0]["box"]
    assert abs(face["box"]["x"] - (original["x"] - 60) * 0.75) < 12
    assert abs(face["box"]["w"] - original["w"] * 0.75) < 12
    distance = np.linalg.norm(embeddings_of(result)[0] - embeddings_of(portrait_run)[0])
    assert distance < SAME_FACE_DISTANCE
    crops = result.outputs["crops"]
    assert isinstance(crops, list)
    with Image.open(crops[0]) as crop:
        assert crop.size == (96, 96)


def test_a_picture_without_a_face_gives_zero_faces_and_no_crops(
    media: dict[str, Path], tmp_path: Path
) -> None:
    result = FaceEmbeddingRuntime().run_stage(
        stage_request(tmp_path / "w", media["pattern"], local_target()), LOG
    )
    doc = faces_of(result)
    assert doc["count"] == 0 and doc["faces"] == []
    assert doc["frames"][0]["faces"] == 0 and doc["frames"][0]["width"] == 640
    assert "crops" not in result.outputs
    assert embeddings_of(result).shape == (0, DIMS)


@pytest.mark.slow
def test_a_video_gives_faces_per_sampled_frame(media: dict[str, Path], tmp_path: Path) -> None:
    reports: list[tuple[float | None, str]] = []
    result = FaceEmbeddingRuntime().run_stage(
        stage_request(
            tmp_path / "w",
            media["zoom"],
            local_target(),
            params={"interval_s": 1.0, "max_frames": 10},
            progress=lambda fraction, message: reports.append((fraction, message)),
        ),
        LOG,
    )
    doc = faces_of(result)
    assert doc["source"]["kind"] == "video" and doc["source"]["duration_s"] == pytest.approx(3.0)
    # Three seconds at one frame a second: the middle of each second.
    assert [f["time_s"] for f in doc["frames"]] == [0.5, 1.5, 2.5]
    assert [f["faces"] for f in doc["frames"]] == [1, 1, 1]
    assert [(f["frame"], f["time_s"]) for f in doc["faces"]] == [(0, 0.5), (1, 1.5), (2, 2.5)]
    # The camera zooms in: the face grows.
    widths = [f["box"]["w"] for f in doc["faces"]]
    assert widths[0] < widths[2]
    crops = result.outputs["crops"]
    assert isinstance(crops, list) and [p.name for p in crops] == [
        "face_0001.jpg",
        "face_0002.jpg",
        "face_0003.jpg",
    ]
    matrix = embeddings_of(result)
    assert matrix.shape == (3, DIMS)
    # One person in every frame.
    assert np.linalg.norm(matrix[0] - matrix[2]) < SAME_FACE_DISTANCE
    assert [fraction for fraction, _ in reports] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_bad_params_and_bad_options_fail_permanently_naming_them(
    adapter: FaceEmbeddingRuntime, media: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(PermanentRuntimeError, match="crop_size"):
        adapter.run_stage(
            stage_request(
                tmp_path / "a", media["portrait"], local_target(), params={"crop_size": 8}
            ),
            LOG,
        )
    with pytest.raises(PermanentRuntimeError, match=r"face-test.*upsample"):
        adapter.run_stage(
            stage_request(tmp_path / "b", media["portrait"], local_target(upsample=9)), LOG
        )
    with pytest.raises(PermanentRuntimeError, match="engine: Input should be 'dlib'"):
        adapter.run_stage(
            stage_request(tmp_path / "c", media["portrait"], local_target(engine="cnn")), LOG
        )


def test_an_undecodable_image_fails_permanently(
    adapter: FaceEmbeddingRuntime, tmp_path: Path
) -> None:
    junk = make_corrupt(tmp_path / "junk.png", size=4096)
    with pytest.raises(PermanentRuntimeError, match=r"junk\.png cannot be decoded"):
        adapter.run_stage(
            stage_request(tmp_path / "w", junk, local_target(), media_type="image/png"), LOG
        )


# -- cancellation and deadlines of the local engine ------------------------------------------------


def _worker_pids(job_file: Path) -> list[int]:
    """The live processes whose command line names `job_file` (the stage's face worker)."""
    needle = str(job_file).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if needle in cmdline and "State:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


# Twelve frames, each analysed at eight times its size: about 20 s of dlib work.
BUSY = {"interval_s": 0.25, "max_frames": 12}
BUSY_ENGINE = {"upsample": 3}


@pytest.mark.slow
def test_a_cancelled_run_kills_the_local_worker_at_once(
    adapter: FaceEmbeddingRuntime, media: dict[str, Path], tmp_path: Path
) -> None:
    workdir = tmp_path / "w"
    seen: list[int] = []

    def interrupt(fraction: float | None, message: str) -> None:
        # The first picture is done and the worker is on the next: cancel the run now, the way
        # Dagster's run termination arrives (a BaseException in the waiting thread).
        seen.extend(_worker_pids(workdir / "worker_job.json"))
        raise KeyboardInterrupt

    request = stage_request(
        workdir, media["zoom"], local_target(**BUSY_ENGINE), params=BUSY, progress=interrupt
    )
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(request, LOG)
    assert seen, "the worker was running when the run was cancelled"
    assert _worker_pids(workdir / "worker_job.json") == []
    assert not (workdir / "worker_answers.json").exists()


@pytest.mark.slow
def test_a_stage_past_its_deadline_kills_the_worker_and_is_transient(
    adapter: FaceEmbeddingRuntime, media: dict[str, Path], tmp_path: Path
) -> None:
    workdir = tmp_path / "w"
    request = stage_request(
        workdir, media["zoom"], local_target(**BUSY_ENGINE), params=BUSY, timeout_s=6.0
    )
    with pytest.raises(RuntimeTimeoutError) as caught:
        adapter.run_stage(request, LOG)
    assert "did not finish within 6 s" in str(caught.value)
    assert "killed the face worker" in str(caught.value)
    assert caught.value.transient and (caught.value.job_id or "").startswith("pid:")
    assert _worker_pids(workdir / "worker_job.json") == []


# -- the remote protocol against the loopback service ----------------------------------------------


@pytest.fixture(scope="module")
def service() -> Iterator[FaceEmbeddingLoopbackServer]:
    with FaceEmbeddingLoopbackServer(token=SERVER_TOKEN) as running:
        yield running


@pytest.fixture
def server(
    service: FaceEmbeddingLoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> FaceEmbeddingLoopbackServer:
    service.configure({"reset": True})
    monkeypatch.setenv(TOKEN_ENV, SERVER_TOKEN)
    return service


def test_the_remote_service_gives_what_the_local_engine_gives(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    portrait_run: StageResult,
    media: dict[str, Path],
    tmp_path: Path,
) -> None:
    target = remote_target(server.url, model=EMBEDDING_MODEL, dims=128)
    result = adapter.run_stage(stage_request(tmp_path / "w", media["portrait"], target), LOG)
    doc = faces_of(result)
    local = faces_of(portrait_run)
    assert doc["count"] == 1 and doc["faces"][0]["box"] == local["faces"][0]["box"]
    assert doc["engine"]["kind"] == "remote" and doc["engine"]["target"] == "face-api-test"
    assert float(embeddings_of(result)[0] @ embeddings_of(portrait_run)[0]) > 0.9999
    crops = result.outputs["crops"]
    assert isinstance(crops, list) and len(crops) == 1
    state = server.state()
    assert state["request_ids"][-1] == f"{result.job_id}-1"
    assert state["last_options"] == {
        "min_face_px": 40,
        "max_faces": 20,
        "landmarks": True,
        "model": EMBEDDING_MODEL,
    }


@pytest.mark.slow
def test_the_remote_service_gets_every_sampled_frame(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
) -> None:
    request = stage_request(
        tmp_path / "w", media["zoom"], remote_target(server.url), params={"max_frames": 2}
    )
    result = adapter.run_stage(request, LOG)
    assert [f["faces"] for f in faces_of(result)["frames"]] == [1, 1]
    # The module's service has served other tests: this stage's calls are the last two.
    assert server.state()["request_ids"][-2:] == [f"{result.job_id}-1", f"{result.job_id}-2"]

    # A run cancelled after the first picture sends no other.
    def interrupt(fraction: float | None, message: str) -> None:
        raise KeyboardInterrupt

    before = server.state()["embeds"]
    request = stage_request(
        tmp_path / "w2",
        media["zoom"],
        remote_target(server.url),
        params={"max_frames": 2},
        progress=interrupt,
    )
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(request, LOG)
    assert server.state()["embeds"] == before + 1
    assert server.state()["request_ids"][-1].endswith("-1")


def test_a_wrong_token_is_permanent_and_never_shown(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(TOKEN_ENV, WRONG_TOKEN)
    request = stage_request(tmp_path / "w", media["portrait"], remote_target(server.url))
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    message = str(caught.value)
    assert "401" in message and TOKEN_ENV in message
    assert server.state()["auth_failures"] >= 1
    report = adapter.health(remote_target(server.url))
    assert not report.healthy and "401" in report.detail

    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(PermanentRuntimeError, match=f"{TOKEN_ENV} is not set"):
        adapter.run_stage(
            stage_request(tmp_path / "w2", media["portrait"], remote_target(server.url)), LOG
        )
    for text in (message, caplog.text, report.model_dump_json()):
        assert WRONG_TOKEN not in text and SERVER_TOKEN not in text


@pytest.mark.parametrize(
    ("status", "kind", "phrase"),
    [
        (400, PermanentRuntimeError, "rejected"),
        (413, PermanentRuntimeError, "rejected"),
        (500, TransientRuntimeError, "failed"),
        (503, TransientRuntimeError, "failed"),
        (429, TransientRuntimeError, "Retry-After: 7"),
    ],
)
def test_errors_are_classified_by_status_and_scrubbed(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
    status: int,
    kind: type[Exception],
    phrase: str,
) -> None:
    # A service that quotes the credential back in its error must not get it into ours.
    echo = f"bad request from Bearer {SERVER_TOKEN}"
    server.configure(
        {"fail_next": [{"status": status, "code": "nope", "message": echo, "retry_after": "7"}]}
    )
    request = stage_request(tmp_path / "w", media["portrait"], remote_target(server.url))
    with pytest.raises(kind) as caught:
        adapter.run_stage(request, LOG)
    message = str(caught.value)
    assert type(caught.value) is kind
    assert f"{status} nope" in message and phrase in message
    assert SERVER_TOKEN not in message and "***" in message


def test_a_slow_answer_times_out_transiently(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
) -> None:
    server.configure({"delay_s": 5.0})
    slow = FaceEmbeddingRuntime(request_timeout_s=0.5)
    request = stage_request(tmp_path / "w", media["portrait"], remote_target(server.url))
    with pytest.raises(RuntimeTimeoutError, match=r"within 0\.5 s"):
        slow.run_stage(request, LOG)

    # The stage's own deadline bounds the wait too, whatever the per-call bound.
    request = stage_request(
        tmp_path / "w2", media["portrait"], remote_target(server.url), timeout_s=1.0
    )
    with pytest.raises(RuntimeTimeoutError, match="did not finish within 1 s"):
        adapter.run_stage(request, LOG)


def test_an_unreachable_service_is_transient(
    adapter: FaceEmbeddingRuntime, media: dict[str, Path], tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        request = stage_request(tmp_path / "w", media["portrait"], remote_target(url, auth=None))
        with pytest.raises(TransientRuntimeError, match="unreachable"):
            adapter.run_stage(request, LOG)
        report = adapter.health(remote_target(url, auth=None))
    assert not report.healthy and "ConnectError" in report.detail


@pytest.mark.parametrize(
    ("tamper", "phrase"),
    [
        ("not_json", "not a JSON object"),
        ("nan", "finite number"),
        ("no_faces", "faces"),
        ("wrong_size", "was sent"),
        ("short_embedding", "embedding of 127 values, but the answer says dims 128"),
        ("wrong_dims", "embedding of 128 values, but the answer says dims 129"),
    ],
)
def test_malformed_answers_are_rejected(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
    tamper: str,
    phrase: str,
) -> None:
    server.configure({"tamper": tamper})
    request = stage_request(tmp_path / "w", media["portrait"], remote_target(server.url))
    with pytest.raises(PermanentRuntimeError, match=phrase):
        adapter.run_stage(request, LOG)
    assert not (tmp_path / "w" / "faces.json").exists()


def test_an_answer_from_another_model_or_size_is_rejected(
    server: FaceEmbeddingLoopbackServer,
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
) -> None:
    request = stage_request(tmp_path / "a", media["portrait"], remote_target(server.url, dims=512))
    with pytest.raises(PermanentRuntimeError, match="128-d embeddings, but the target expects 512"):
        adapter.run_stage(request, LOG)
    server.configure({"tamper": "wrong_model"})
    request = stage_request(
        tmp_path / "b", media["portrait"], remote_target(server.url, model=EMBEDDING_MODEL)
    )
    with pytest.raises(PermanentRuntimeError, match="some_other_model_v2"):
        adapter.run_stage(request, LOG)
    # A model the service does not have is refused by the service itself (400, permanent).
    request = stage_request(
        tmp_path / "c", media["portrait"], remote_target(server.url, model="arcface_r100")
    )
    with pytest.raises(PermanentRuntimeError, match="400 unknown_model"):
        adapter.run_stage(request, LOG)


# -- health ---------------------------------------------------------------------------------------


def test_health_of_the_local_engine(adapter: FaceEmbeddingRuntime) -> None:
    report = adapter.health(local_target())
    assert report.healthy, report.detail
    assert report.info["dims"] == DIMS and report.info["device"] == "cpu"
    assert report.info["landmarks"] == "shape_predictor_68_face_landmarks"
    report = adapter.health(local_target(model="huge"))
    assert not report.healthy and "model: Input should be" in report.detail
    report = FaceEmbeddingRuntime(ffmpeg_path="no-such-ffmpeg").health(local_target())
    assert not report.healthy and "no-such-ffmpeg" in report.detail


def test_health_of_the_service(
    server: FaceEmbeddingLoopbackServer, adapter: FaceEmbeddingRuntime
) -> None:
    report = adapter.health(remote_target(server.url, model=EMBEDDING_MODEL, dims=128))
    assert report.healthy, report.detail
    assert report.info["model"] == EMBEDDING_MODEL and report.info["dims"] == DIMS
    assert report.info["queue_depth"] == 0 and report.info["device"] == "cpu (loopback)"
    report = adapter.health(remote_target(server.url, model="arcface_r100"))
    assert not report.healthy and "expects arcface_r100" in report.detail


# -- registration, the published workflow and its targets -----------------------------------------


def test_the_adapter_is_registered_and_checks_stage_shape() -> None:
    assert adapter_class("face_embedding") is FaceEmbeddingRuntime
    assert FaceEmbeddingRuntime in BUILTIN_ADAPTERS
    FaceEmbeddingRuntime.validate_stage(
        StageSpec(id="e", operation="embed_faces", inputs={"media": "${inputs.source}"})
    )
    with pytest.raises(ValueError, match="embed_faces"):
        FaceEmbeddingRuntime.validate_stage(StageSpec(id="e", operation="detect"))
    with pytest.raises(ValueError, match="media"):
        FaceEmbeddingRuntime.validate_stage(
            StageSpec(id="e", operation="embed_faces", inputs={"image": "${inputs.source}"})
        )


def test_the_example_targets_route_locally_and_remotely() -> None:
    from ergot_dagster.targets.routing import route

    definition = load_registry(PROJECT_ROOT / "workflow_defs").get("face_embedding")
    assert definition.ref == "histrio/face_embedding@1"
    root = load_targets(PROJECT_ROOT / "runtime_targets.yaml")
    assert route(definition, root)["face_embedding"].name == "face-local"
    examples = load_targets(
        PROJECT_ROOT / "examples" / "vision" / "runtime_targets.yaml",
        {"ERGOT_TARGET_FACE_REMOTE_ENDPOINT": "http://127.0.0.1:9"},
    )
    remote = route(definition, examples, "remote")["face_embedding"]
    assert (remote.name, remote.endpoint) == ("face-remote", "http://127.0.0.1:9")
    assert route(definition, examples, "local")["face_embedding"].name == "face-local"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "remote"])
def test_the_workflow_materializes_faces_crops_and_embeddings_in_dagster(
    where: str,
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    ingest_root: Path,
    media: dict[str, Path],
    server: FaceEmbeddingLoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The published workflow as a Dagster run, routed to face-local or (with the example
    targets, their endpoint overridden to the loopback service) to face-remote."""
    settings = plane_settings
    if where == "remote":
        monkeypatch.setenv(
            "ERGOT_RUNTIME_TARGETS", str(PROJECT_ROOT / "examples/vision/runtime_targets.yaml")
        )
        monkeypatch.setenv("ERGOT_TARGET_FACE_REMOTE_ENDPOINT", server.url)
        monkeypatch.setenv("ERGOT_FACE_TOKEN", SERVER_TOKEN)
        settings = ErgotSettings.from_env()
    (ingest_root / "people").mkdir()
    portrait = ingest_root / "people" / "astronaut.png"
    portrait.write_bytes(media["portrait"].read_bytes())
    outcomes = ingest_refs(
        ingest_root, ["people/astronaut.png"], lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    registry = load_registry(settings.workflow_defs)
    definition = registry.get("face_embedding")
    defs = build_definitions(settings)
    result = materialize(
        build_assets(registry),
        selection=[AssetKey(["histrio", "face_embedding", n]) for n in definition.outputs],
        partition_key=ref_to_partition_key("people/astronaut.png"),
        instance=instance,
        resources=defs.resources,
        run_config=run_config_for(definition, {"crop_size": 128}, None),
        tags={EXECUTION_TARGET: where},
        raise_on_error=False,
    )
    assert result.success
    store = open_store(settings.storage)
    manifests = {m.name: m for m in store.list_run(result.run_id)}
    assert set(manifests) == {"faces", "crops", "embeddings"}
    crops, embeddings = manifests["crops"], manifests["embeddings"]
    assert crops.kind == "set" and [m.name for m in crops.members] == ["face_0001.jpg"]
    assert embeddings.media_type == "application/x-npy"
    assert np.load(store.local_path(embeddings.uri)).shape == (1, DIMS)
    doc = json.loads(store.local_path(manifests["faces"].uri).read_text())
    assert doc["count"] == 1 and doc["params"]["crop_size"] == 128
    assert doc["engine"]["kind"] == where
    with Image.open(store.local_path(crops.members[0].uri)) as crop:
        assert crop.size == (128, 128)
    record = latest_source_record(instance, "people/astronaut.png")
    assert record is not None
    for manifest in manifests.values():
        assert manifest.runtime.type == "face_embedding"
        assert manifest.runtime.target == f"face-{where}"
        assert (manifest.runtime.endpoint is None) == (where == "local")
        assert [(p.kind, p.ref, p.sha256) for p in manifest.parents] == [
            ("source", "people/astronaut.png", record.sha256)
        ]
    if where == "remote":
        assert server.state()["request_ids"][-1] == f"{manifests['faces'].runtime.job_id}-1"


# -- the loopback service as a separate process ----------------------------------------------------


@pytest.mark.slow
def test_the_loopback_service_runs_as_a_process(
    adapter: FaceEmbeddingRuntime,
    media: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**os.environ, TOKEN_ENV: SERVER_TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.servers.face_embedding_server",
            "--port",
            "0",
            "--token-env",
            TOKEN_ENV,
            "--landmarks",
            "small",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        assert ready, "the service printed no URL within 30 s"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        monkeypatch.setenv(TOKEN_ENV, SERVER_TOKEN)
        until("the service to be healthy", lambda: adapter.health(remote_target(url)).healthy, 10)
        result = adapter.run_stage(
            stage_request(tmp_path / "w", media["portrait"], remote_target(url)), LOG
        )
        face = faces_of(result)["faces"][0]
        assert set(face["landmarks"]) == {"left_eye", "right_eye", "nose_tip"}
        state = httpx.get(f"{url}/_loopback/state", timeout=5).json()
        assert state["request_ids"] == [f"{result.job_id}-1"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
