"""The Studio runtime adapter against the loopback Studio server, over real HTTP on 127.0.0.1.

The server does real work (ffmpeg-made WAVs, real multipart uploads, background jobs) and injects
faults on request, so each test checks one behaviour the plane relies on: how an error is
classified, that every wait is bounded, and that a job left behind is cancelled on the server.
Waits poll with deadlines; nothing here sleeps and hopes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.probe import probe
from ergot_dagster.media.sniff import verify_media_type
from ergot_dagster.media.synth import make_audio
from ergot_dagster.resources.adapters import BUILTIN_ADAPTERS
from ergot_dagster.resources.runtime import (
    ProgressReporter,
    StageFile,
    StageRequest,
    adapter_class,
    no_progress,
)
from ergot_dagster.resources.studio.adapter import StudioRuntime
from ergot_dagster.settings import PROJECT_ROOT
from ergot_dagster.targets.model import RuntimeTarget, TargetAuth
from ergot_dagster.workflows.model import StageSpec
from tests.servers.studio_server import StudioLoopbackServer
from tests.support import until

LOG = logging.getLogger("test.studio")
TOKEN_ENV = "ERGOT_TEST_STUDIO_TOKEN"
SERVER_TOKEN = "right-studio-token-4f1c9e"
WRONG_TOKEN = "wrong-studio-token-77ab02"
TEXT = "hello from the loopback studio"  # 30 characters: a 1.5 s tone


@pytest.fixture
def server() -> Iterator[StudioLoopbackServer]:
    with StudioLoopbackServer(job_seconds=0.2) as running:
        yield running


@pytest.fixture
def adapter() -> StudioRuntime:
    # Short bounds so the failure paths take a second or two, not the production 30 s.
    return StudioRuntime(poll_interval_s=0.05, request_timeout_s=2.0, cancel_timeout_s=1.0)


def target_for(url: str, auth: TargetAuth | None = None) -> RuntimeTarget:
    return RuntimeTarget(
        name="studio-test", runtime="studio", endpoint=url, auth=auth or TargetAuth()
    )


def stage_request(
    workdir: Path,
    url: str,
    *,
    operation: str = "tts",
    params: dict[str, Any] | None = None,
    inputs: dict[str, StageFile | list[StageFile]] | None = None,
    output_types: dict[str, str] | None = None,
    timeout_s: float = 10.0,
    progress: ProgressReporter = no_progress,
    auth: TargetAuth | None = None,
) -> StageRequest:
    return StageRequest(
        workflow="test/x@1",
        stage=StageSpec(id="speak", runtime="studio", operation=operation),
        run_id="r1",
        inputs=inputs or {},
        params={"text": TEXT} if params is None else params,
        output_types={"audio": "audio/wav"} if output_types is None else output_types,
        workdir=workdir,
        timeout_s=timeout_s,
        target=target_for(url, auth),
        progress=progress,
    )


def job_status(server: StudioLoopbackServer, job_id: str) -> str | None:
    return server.state()["job_status"].get(job_id)


# -- success ------------------------------------------------------------------------------------


def test_tts_job_produces_a_wav_with_the_servers_job_id(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    workdir = tmp_path / "w"
    result = adapter.run_stage(stage_request(workdir, server.url), LOG)

    state = server.state()
    assert state["accepted"] == [result.job_id]
    assert state["client_refs"][result.job_id] == "r1/speak"
    assert result.target == "studio-test"
    assert result.metadata["studio_job_id"] == result.job_id
    assert result.metadata["operation"] == "tts"
    assert result.metadata["server_elapsed_s"] > 0
    audio = result.outputs["audio"]
    assert isinstance(audio, Path)
    assert audio.parent == workdir and audio.suffix == ".wav"
    verify_media_type(audio, "audio/wav", "audio")
    summary = probe(audio)
    assert summary.audio_streams[0].sample_rate == 24000
    assert summary.duration_s == pytest.approx(0.05 * len(TEXT), abs=0.05)
    # Downloads go through a temporary name: nothing else may be left in the workdir.
    assert sorted(p.name for p in workdir.iterdir()) == ["audio.wav"]


def test_voice_prompt_uploads_its_input_and_fetches_every_output(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    recording = make_audio(tmp_path / "take 01.wav", duration=8.0, sample_rate=48000)
    request = stage_request(
        tmp_path / "w",
        server.url,
        operation="voice_prompt",
        params={"max_s": 3},
        inputs={"recording": StageFile(path=recording, media_type="audio/wav")},
        output_types={"clip": "audio/wav", "transcript": "application/json"},
    )
    result = adapter.run_stage(request, LOG)

    clip, transcript = result.outputs["clip"], result.outputs["transcript"]
    assert isinstance(clip, Path) and isinstance(transcript, Path)
    stream = probe(clip).audio_streams[0]
    assert (stream.sample_rate, stream.channels) == (16000, 1)
    assert probe(clip).duration_s == pytest.approx(3.0, abs=0.05)
    doc = json.loads(transcript.read_text())
    assert doc["source"] == "take 01.wav"
    assert doc["duration_s"] == pytest.approx(3.0, abs=0.05)
    assert result.metadata["studio_outputs"]["transcript"]["media_type"] == "application/json"


def test_progress_is_reported_with_increasing_fractions(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"job_seconds": 1.0})
    calls: list[tuple[float | None, str]] = []
    request = stage_request(tmp_path / "w", server.url, progress=lambda f, m: calls.append((f, m)))
    adapter.run_stage(request, LOG)

    fractions = [f for f, _ in calls if f is not None]
    assert len(set(fractions)) >= 3, calls
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert all(message for _, message in calls)


# -- errors from the submit -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "params", "expected"),
    [
        ("tts", {"text": "  "}, ["400", "bad_param", "'text'"]),
        ("tts", {"text": "hi", "sample_rate": "fast"}, ["400", "'sample_rate'"]),
        ("mumble", {}, ["404", "unknown_operation", "mumble"]),
    ],
)
def test_a_rejected_job_is_permanent_and_names_the_field(
    server: StudioLoopbackServer,
    adapter: StudioRuntime,
    tmp_path: Path,
    operation: str,
    params: dict[str, Any],
    expected: list[str],
) -> None:
    request = stage_request(tmp_path / "w", server.url, operation=operation, params=params)
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    for text in expected:
        assert text in str(caught.value)
    assert server.state()["accepted"] == []


def test_a_too_large_upload_is_permanent(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"max_upload_bytes": 1024})
    recording = make_audio(tmp_path / "rec.wav", duration=1.0)
    request = stage_request(
        tmp_path / "w",
        server.url,
        operation="voice_prompt",
        params={},
        inputs={"recording": StageFile(path=recording, media_type="audio/wav")},
    )
    with pytest.raises(PermanentRuntimeError, match="413 too_large"):
        adapter.run_stage(request, LOG)


def test_503_is_transient_and_the_adapter_does_not_retry(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"submit_errors": [{"status": 503, "times": 2, "message": "warming up"}]})
    request = stage_request(tmp_path / "w", server.url)

    for attempt in (1, 2):
        with pytest.raises(TransientRuntimeError) as caught:
            adapter.run_stage(request, LOG)
        assert not isinstance(caught.value, RuntimeTimeoutError)
        assert "503" in str(caught.value) and "warming up" in str(caught.value)
        # One submit per call: trying again is Dagster's retry policy, not the adapter's.
        assert server.state()["submits"] == attempt

    result = adapter.run_stage(request, LOG)
    assert server.state()["submits"] == 3
    assert server.state()["accepted"] == [result.job_id]


def test_429_is_transient_and_quotes_retry_after(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"submit_errors": [{"status": 429, "retry_after": "7"}]})
    with pytest.raises(TransientRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url), LOG)
    assert "429" in str(caught.value)
    assert "Retry-After: 7 s" in str(caught.value)
    assert server.state()["submits"] == 1


def test_connection_refused_is_transient(adapter: StudioRuntime, tmp_path: Path) -> None:
    # A bound socket that does not listen: connecting to it is refused, deterministically.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TransientRuntimeError) as caught:
            adapter.run_stage(stage_request(tmp_path / "w", url), LOG)
    assert "ConnectError" in str(caught.value)
    assert "studio-test" in str(caught.value)
    assert time.monotonic() - started < 2.0


def test_a_missing_endpoint_is_permanent(adapter: StudioRuntime, tmp_path: Path) -> None:
    request = stage_request(tmp_path / "w", "http://127.0.0.1:9")
    request.target = RuntimeTarget(name="studio-test", runtime="studio")
    with pytest.raises(PermanentRuntimeError, match="no endpoint"):
        adapter.run_stage(request, LOG)


# -- bounded waits and cancellation -------------------------------------------------------------


def test_a_hanging_job_times_out_and_is_cancelled_on_the_server(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"hang": True})
    started = time.monotonic()
    with pytest.raises(RuntimeTimeoutError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url, timeout_s=1.5), LOG)
    elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 1.5 + adapter.cancel_timeout_s + 0.5
    job_id = server.state()["accepted"][0]
    assert caught.value.job_id == job_id
    assert f"cancelled job {job_id} on studio-test" in str(caught.value)
    assert "did not finish within 1.5 s" in str(caught.value)
    assert server.state()["cancels"] == [job_id]
    until("the job to be cancelled", lambda: job_status(server, job_id) == "canceled", 5.0)


def test_a_stalled_server_on_submit_is_bounded_by_the_stage_timeout(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"stall_http": True})
    started = time.monotonic()
    with pytest.raises(RuntimeTimeoutError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url, timeout_s=1.0), LOG)
    assert time.monotonic() - started < 2.0
    assert "did not accept" in str(caught.value)
    assert server.state()["accepted"] == []


def test_a_server_that_stalls_while_polled_loses_the_job_after_a_few_blips(
    server: StudioLoopbackServer, tmp_path: Path
) -> None:
    adapter = StudioRuntime(poll_interval_s=0.05, request_timeout_s=0.3, cancel_timeout_s=0.5)
    server.configure({"job_seconds": 5.0})

    def stall_now(fraction: float | None, message: str) -> None:
        server.configure({"stall_http": True})

    started = time.monotonic()
    request = stage_request(tmp_path / "w", server.url, timeout_s=10, progress=stall_now)
    with pytest.raises(TransientRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    elapsed = time.monotonic() - started

    job_id = server.state()["accepted"][0]
    assert caught.value.job_id == job_id
    assert f"after {adapter.poll_error_tolerance + 1} failed polls" in str(caught.value)
    # (tolerance + 1) poll timeouts, the pauses between them, and the bounded cancel call.
    assert elapsed < 4 * 0.3 + 3 * 0.05 + 0.5 + 1.0
    # The cancel was sent (the stalled server never answered it).
    assert f"POST /v1/jobs/{job_id}/cancel" in server.state()["request_log"]


def test_poll_blips_within_the_tolerance_do_not_fail_the_stage(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"poll_errors": [{"status": 502, "times": adapter.poll_error_tolerance}]})
    result = adapter.run_stage(stage_request(tmp_path / "w", server.url), LOG)
    assert isinstance(result.outputs["audio"], Path)
    assert server.state()["config"]["poll_errors"] == []


def test_an_interrupt_during_the_wait_cancels_the_job_and_propagates(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"job_seconds": 5.0})

    def interrupt(fraction: float | None, message: str) -> None:
        # Dagster's run termination arrives the same way: a BaseException while waiting.
        raise KeyboardInterrupt

    request = stage_request(tmp_path / "w", server.url, progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(request, LOG)

    job_id = server.state()["accepted"][0]
    assert server.state()["cancels"] == [job_id]
    until("the job to be cancelled", lambda: job_status(server, job_id) == "canceled", 5.0)


def test_a_job_cancelled_by_someone_else_is_transient(
    server: StudioLoopbackServer, adapter: StudioRuntime, tmp_path: Path
) -> None:
    server.configure({"job_seconds": 5.0})

    def cancel_from_outside(fraction: float | None, message: str) -> None:
        job_id = server.state()["accepted"][0]
        httpx.post(f"{server.url}/v1/jobs/{job_id}/cancel", timeout=2).raise_for_status()

    request = stage_request(tmp_path / "w", server.url, progress=cancel_from_outside)
    with pytest.raises(TransientRuntimeError, match="job was cancelled on the runtime"):
        adapter.run_stage(request, LOG)


@pytest.mark.parametrize(
    ("retryable", "expected"), [(False, PermanentRuntimeError), (True, TransientRuntimeError)]
)
def test_a_failed_job_is_classified_by_its_retryable_flag(
    server: StudioLoopbackServer,
    adapter: StudioRuntime,
    tmp_path: Path,
    retryable: bool,
    expected: type[Exception],
) -> None:
    server.configure(
        {"fail_jobs": {"code": "oom", "message": "out of GPU memory", "retryable": retryable}}
    )
    with pytest.raises(expected) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url), LOG)
    assert type(caught.value) is expected
    assert "(oom): out of GPU memory" in str(caught.value)
    assert caught.value.job_id == server.state()["accepted"][0]  # type: ignore[attr-defined]
    assert server.state()["cancels"] == []  # a finished job needs no cancel


# -- credentials ------------------------------------------------------------------------------


BEARER = TargetAuth(kind="bearer", token_env=TOKEN_ENV)


def test_a_missing_credential_variable_is_permanent_and_named(
    server: StudioLoopbackServer,
    adapter: StudioRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    request = stage_request(tmp_path / "w", server.url, auth=BEARER)
    with pytest.raises(PermanentRuntimeError, match=TOKEN_ENV):
        adapter.run_stage(request, LOG)
    assert server.state()["requests"] == 0


def test_a_wrong_token_is_permanent_and_never_shown(
    adapter: StudioRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with StudioLoopbackServer(token=SERVER_TOKEN) as server:
        monkeypatch.setenv(TOKEN_ENV, WRONG_TOKEN)
        request = stage_request(tmp_path / "w", server.url, auth=BEARER)
        with pytest.raises(PermanentRuntimeError) as caught:
            adapter.run_stage(request, LOG)
        message = str(caught.value)
        assert "401" in message and TOKEN_ENV in message
        assert server.state()["auth_failures"] == 1

        monkeypatch.setenv(TOKEN_ENV, SERVER_TOKEN)
        result = adapter.run_stage(stage_request(tmp_path / "w2", server.url, auth=BEARER), LOG)
        assert server.state()["accepted"] == [result.job_id]
        report = adapter.health(target_for(server.url, BEARER))
        assert report.healthy

    for secret in (WRONG_TOKEN, SERVER_TOKEN):
        assert secret not in message
        assert secret not in caplog.text
        assert secret not in json.dumps(result.metadata)
        assert secret not in report.model_dump_json()


# -- health -----------------------------------------------------------------------------------


def test_health_of_a_running_server(server: StudioLoopbackServer, adapter: StudioRuntime) -> None:
    report = adapter.health(target_for(server.url))
    assert report.healthy
    assert report.latency_ms is not None and report.latency_ms >= 0
    assert report.info["operations"] == ["tts", "voice_prompt"]
    assert report.info["queue_depth"] == 0 and report.info["running"] == 0
    assert report.info["device"] == "cpu (loopback)"


def test_health_of_an_unreachable_or_refusing_server(
    adapter: StudioRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        report = adapter.health(target_for(f"http://127.0.0.1:{sock.getsockname()[1]}"))
    assert not report.healthy
    assert "ConnectError" in report.detail

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    report = adapter.health(target_for("http://127.0.0.1:9", BEARER))
    assert not report.healthy and TOKEN_ENV in report.detail

    monkeypatch.setenv(TOKEN_ENV, WRONG_TOKEN)
    with StudioLoopbackServer(token=SERVER_TOKEN) as server:
        report = adapter.health(target_for(server.url, BEARER))
    assert not report.healthy
    assert "401" in report.detail
    assert WRONG_TOKEN not in report.model_dump_json()


# -- registration and definitions ---------------------------------------------------------------


def test_the_adapter_is_registered_and_checks_stage_shape() -> None:
    assert adapter_class("studio") is StudioRuntime
    assert StudioRuntime in BUILTIN_ADAPTERS
    StudioRuntime.validate_stage(StageSpec(id="speak", runtime="studio", operation="tts"))
    with pytest.raises(ValueError, match="operation"):
        StudioRuntime.validate_stage(StageSpec(id="speak", runtime="studio", template={"1": {}}))


# -- the server as a separate process ------------------------------------------------------------


def test_the_loopback_server_runs_as_a_process(
    adapter: StudioRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, TOKEN_ENV: SERVER_TOKEN}
    command = [sys.executable, "-m", "tests.servers.studio_server", "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--token-env", TOKEN_ENV],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "the server printed no URL within 20 s"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")

        monkeypatch.setenv(TOKEN_ENV, SERVER_TOKEN)
        assert adapter.health(target_for(url, BEARER)).healthy
        result = adapter.run_stage(stage_request(tmp_path / "w", url, auth=BEARER), LOG)
        verify_media_type(result.outputs["audio"], "audio/wav", "audio")  # type: ignore[arg-type]
        state = httpx.get(f"{url}/_loopback/state", timeout=5).json()
        assert state["accepted"] == [result.job_id]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
