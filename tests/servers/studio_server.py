"""A loopback Studio server: the Studio protocol over real HTTP on 127.0.0.1, doing real work.

A Studio server (a GPU box doing TTS, voice-prompt extraction, ...) cannot run here, so tests talk
to this one instead. It speaks the protocol of docs/studio-protocol.md, with real multipart uploads,
real background jobs and real files made by ffmpeg. There is no speech engine: `tts` renders a sine
tone whose length grows with the text, standing in for speech.

Use it in-process (unit tests):

    with StudioLoopbackServer(token="t0k3n") as server:
        server.url                       # http://127.0.0.1:<port>
        server.configure({"hang": True})
        server.state()["cancels"]

or as a separate process (end-to-end tests, where Dagster run workers in other processes call it):

    python -m tests.servers.studio_server --port 0 [--token T | --token-env VAR] [--job-seconds S]

which prints its URL on stdout once it is listening and serves until SIGTERM or SIGINT.

Operations
----------
- `tts`: params `text` (required, non-empty), `voice` (optional), `sample_rate` (default 24000).
  Output `audio` (audio/wav): a tone of 0.05 s per character of text, at least 0.5 s.
- `voice_prompt`: one input `recording` (audio), param `max_s` (default 5). Outputs `clip`
  (audio/wav, the first `max_s` seconds as 16 kHz mono) and `transcript` (application/json).

Each job runs in a worker thread (`workers`, default 1, so later jobs really queue): its progress
goes 0 -> 1 in five steps spread over `job_seconds`, then the real work runs.

Test-only control surface (NOT part of the Studio protocol; no token needed)
----------------------------------------------------------------------------
`POST /_loopback/config` with a JSON object merges these settings and answers the new settings
(`server.configure(dict)` in-process does the same):

- `reset: true` -- back to the defaults first.
- `submit_errors: [{"status": 503, "times": 2, "code": "...", "message": "...",
  "retry_after": "7"}]` -- the next `times` `POST /v1/jobs` answer this error, before the request
  is looked at (its body is read and dropped). `times` defaults to 1.
- `poll_errors: [...]` -- the same, for `GET /v1/jobs/{id}`.
- `hang: true` -- jobs never finish: they stay `running` (and `GET /v1/jobs/{id}` says so) until
  they are cancelled or `hang` is turned off.
- `stall_http: true` -- every `/v1/*` request is accepted and then never answered, until the
  setting is turned off (the connection is then closed without an answer) or the server stops.
- `job_seconds: 3.0` -- the simulated processing time of each job, before its real work.
- `fail_jobs: {"code": "oom", "message": "...", "retryable": true, "times": 1}` -- the next
  `times` jobs fail with this error after their progress steps (`times: null`: every job).
- `max_upload_bytes: N` -- larger submissions are answered 413.

`GET /_loopback/state` (`server.state()`) answers what the server saw: `submits` (POST /v1/jobs
received, answered or not), `accepted` (job ids, in order), `cancels` (the job id of every cancel
call received, in order), `jobs` (count by status), `job_status` (id -> status), `client_refs`
(id -> client_ref), `requests` (count), `request_log` (the last 500 "METHOD /path"),
`auth_failures`, and `config`.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import itertools
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import wave
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

LOG = logging.getLogger("studio_loopback")

OPERATIONS = ("tts", "voice_prompt")
DEVICE = "cpu (loopback)"
PROGRESS_STEPS = 5
FFMPEG_TIMEOUT_S = 60.0
_CONTROL_BODY_LIMIT = 1 << 20
_COPY_CHUNK = 64 * 1024
_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)$")
_OUTPUT_PATH = re.compile(r"^/v1/jobs/([^/]+)/outputs/([^/]+)$")
_CANCEL_PATH = re.compile(r"^/v1/jobs/([^/]+)/cancel$")
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


class Rejected(Exception):
    """An HTTP error answer in the protocol's shape: `{"error": {code, message, field}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


class _ClientGone(Exception):
    """The client closed the connection before sending the whole request."""


class JobError(Exception):
    """A job failed; `retryable` says whether the same job could succeed another time."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class LoopbackConfig:
    """The fault-injection and pacing settings, changed through `/_loopback/config`."""

    submit_errors: list[dict[str, Any]] = field(default_factory=list)
    poll_errors: list[dict[str, Any]] = field(default_factory=list)
    hang: bool = False
    stall_http: bool = False
    job_seconds: float = 0.2
    fail_jobs: dict[str, Any] | None = None
    max_upload_bytes: int = 64 * 1024 * 1024


@dataclass
class Upload:
    """One uploaded input file."""

    filename: str
    media_type: str
    path: Path


@dataclass
class Job:
    """One job and everything the protocol reports about it."""

    id: str
    operation: str
    params: dict[str, Any]
    client_ref: str
    inputs: dict[str, list[Upload]]
    directory: Path
    status: str = "queued"
    progress: float | None = None
    message: str = "queued"
    error: dict[str, Any] | None = None
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "job_id": self.id,
            "operation": self.operation,
            "client_ref": self.client_ref,
            "status": self.status,
            "progress": self.progress,
            "message": self.message,
            "error": self.error,
            "outputs": [
                {"name": name, "media_type": media_type, "size": path.stat().st_size}
                for name, (path, media_type) in self.files.items()
            ]
            if self.status == "succeeded"
            else [],
        }
        if self.started is not None and self.finished is not None:
            doc["elapsed_s"] = round(self.finished - self.started, 3)
        return doc


# -- multipart ---------------------------------------------------------------------------------


@dataclass
class Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _header_params(value: str) -> dict[str, str]:
    """`form-data; name="a"; filename="b"` -> {"name": "a", "filename": "b"}."""
    params: dict[str, str] = {}
    for match in re.finditer(r';\s*([A-Za-z*]+)=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', value):
        key = match.group(1).lower()
        raw = match.group(2) if match.group(2) is not None else match.group(3)
        params[key] = re.sub(r"\\(.)", r"\1", raw)
    return params


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """Split a multipart/form-data body (held in memory: uploads here are small test media)."""
    delimiter = b"\r\n--" + boundary
    # Prefixing CRLF makes the first delimiter look like every other one.
    segments = (b"\r\n" + body).split(delimiter)
    if len(segments) < 3 or segments[0].strip():
        raise ValueError("the body is not multipart/form-data with the announced boundary")
    parts = []
    for segment in segments[1:]:
        if segment.startswith(b"--"):
            return parts
        if not segment.startswith(b"\r\n"):
            raise ValueError("a multipart delimiter is not followed by a line break")
        head, separator, data = segment[2:].partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a multipart part has no header block")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = _header_params(headers.get("content-disposition", ""))
        if "name" not in disposition:
            raise ValueError("a multipart part has no name")
        parts.append(
            Part(
                name=disposition["name"],
                filename=disposition.get("filename"),
                content_type=headers.get("content-type"),
                data=data,
            )
        )
    raise ValueError("the multipart body has no closing delimiter")


# -- the operations ----------------------------------------------------------------------------


def _ffmpeg(args: list[str]) -> None:
    binary = shutil.which("ffmpeg")
    if binary is None:
        raise JobError("no_ffmpeg", "ffmpeg is not installed on the server", retryable=False)
    result = subprocess.run(
        [binary, "-hide_banner", "-nostdin", "-y", "-loglevel", "error", *args],
        capture_output=True,
        text=True,
        timeout=FFMPEG_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise JobError("bad_media", f"ffmpeg failed: {tail}", retryable=False)


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as handle:
        return handle.getnframes() / float(handle.getframerate())


def _validate_tts(params: dict[str, Any], inputs: dict[str, list[Upload]]) -> dict[str, Any]:
    if inputs:
        name = sorted(inputs)[0]
        raise Rejected(400, "bad_input", "tts takes no input files", f"input.{name}")
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Rejected(400, "bad_param", "text must be a non-empty string", "text")
    voice = params.get("voice")
    if voice is not None and (not isinstance(voice, str) or len(voice) > 64):
        raise Rejected(400, "bad_param", "voice must be a name of at most 64 characters", "voice")
    sample_rate = params.get("sample_rate", 24000)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise Rejected(400, "bad_param", "sample_rate must be an integer", "sample_rate")
    if not 8000 <= sample_rate <= 192000:
        raise Rejected(400, "bad_param", "sample_rate must be 8000..192000", "sample_rate")
    return {"text": text, "voice": voice, "sample_rate": sample_rate}


def _run_tts(job: Job) -> dict[str, tuple[Path, str]]:
    text: str = job.params["text"]
    # No TTS engine here: a tone as long as the speech would roughly be stands in for it.
    duration = min(max(0.5, 0.05 * len(text)), 600.0)
    frequency = 200 + zlib.crc32((job.params["voice"] or "default").encode()) % 400
    out = job.directory / "audio.wav"
    source = (
        f"sine=frequency={frequency}:sample_rate={job.params['sample_rate']}:duration={duration}"
    )
    _ffmpeg(["-f", "lavfi", "-i", source, "-ac", "1", "-c:a", "pcm_s16le", str(out)])
    return {"audio": (out, "audio/wav")}


def _validate_voice_prompt(
    params: dict[str, Any], inputs: dict[str, list[Upload]]
) -> dict[str, Any]:
    extra = sorted(set(inputs) - {"recording"})
    if extra:
        raise Rejected(400, "bad_input", "voice_prompt takes only `recording`", f"input.{extra[0]}")
    if len(inputs.get("recording", [])) != 1:
        raise Rejected(
            400, "bad_input", "voice_prompt needs exactly one recording", "input.recording"
        )
    max_s = params.get("max_s", 5)
    if isinstance(max_s, bool) or not isinstance(max_s, int | float) or not 0 < max_s <= 60:
        raise Rejected(400, "bad_param", "max_s must be a number of seconds in (0, 60]", "max_s")
    return {"max_s": float(max_s)}


def _run_voice_prompt(job: Job) -> dict[str, tuple[Path, str]]:
    recording = job.inputs["recording"][0]
    clip = job.directory / "clip.wav"
    _ffmpeg(
        [
            "-i",
            str(recording.path),
            "-t",
            f"{job.params['max_s']:g}",
            "-vn",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-c:a",
            "pcm_s16le",
            str(clip),
        ]
    )
    seconds = _wav_seconds(clip)
    if seconds <= 0:
        raise JobError("no_audio", "the recording holds no audio", retryable=False)
    transcript = job.directory / "transcript.json"
    transcript.write_text(
        json.dumps(
            {
                "engine": "loopback",
                "note": "the loopback server has no speech recognizer",
                "source": recording.filename,
                "duration_s": round(seconds, 3),
                "language": None,
                "segments": [{"start_s": 0.0, "end_s": round(seconds, 3), "text": ""}],
            },
            indent=2,
        )
    )
    return {"clip": (clip, "audio/wav"), "transcript": (transcript, "application/json")}


_VALIDATORS = {"tts": _validate_tts, "voice_prompt": _validate_voice_prompt}
_RUNNERS = {"tts": _run_tts, "voice_prompt": _run_voice_prompt}


# -- the server --------------------------------------------------------------------------------


def _error_entries(value: object, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list of {{status, times}}")
    entries = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), int):
            raise ValueError(f"each {key} entry needs an integer status")
        if not 400 <= entry["status"] <= 599:
            raise ValueError(f"{key} status must be 400..599")
        times = entry.get("times", 1)
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"{key} times must be a positive integer")
        entries.append({**entry, "times": times})
    return entries


class StudioLoopbackServer:
    """The loopback Studio server, in a thread of this process. `start()`, `url`, `stop()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        job_seconds: float = 0.2,
        workers: int = 1,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.workers = workers
        self.config = LoopbackConfig(job_seconds=job_seconds)
        self._defaults = LoopbackConfig(job_seconds=job_seconds)
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._httpd: _HTTPServer | None = None
        self._root: Path | None = None
        self._submits = 0
        self._accepted: list[str] = []
        self._cancels: list[str] = []
        self._requests = 0
        self._request_log: deque[str] = deque(maxlen=500)
        self._auth_failures = 0

    # lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the loopback Studio server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> StudioLoopbackServer:
        self._root = Path(tempfile.mkdtemp(prefix="studio-loopback-"))
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.loopback = self
        serve = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="studio-loopback-http",
            daemon=True,
        )
        serve.start()
        self._threads.append(serve)
        for index in range(self.workers):
            worker = threading.Thread(
                target=self._work, name=f"studio-loopback-worker-{index}", daemon=True
            )
            worker.start()
            self._threads.append(worker)
        return self

    def stop(self) -> None:
        """Stop serving, end every job and stalled request, remove the server's files."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for _ in range(self.workers):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> StudioLoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # test control

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the settings (see the module docstring); the new settings."""
        known = set(asdict(self._defaults)) | {"reset"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        with self._lock:
            config = LoopbackConfig(**asdict(self._defaults)) if changes.get("reset") else None
            config = config or LoopbackConfig(**asdict(self.config))
            for key in ("submit_errors", "poll_errors"):
                if key in changes:
                    setattr(config, key, _error_entries(changes[key], key))
            for key in ("hang", "stall_http"):
                if key in changes:
                    setattr(config, key, bool(changes[key]))
            if "job_seconds" in changes:
                config.job_seconds = max(0.0, float(changes["job_seconds"]))
            if "max_upload_bytes" in changes:
                config.max_upload_bytes = int(changes["max_upload_bytes"])
            if "fail_jobs" in changes:
                fail = changes["fail_jobs"]
                if fail is not None and not isinstance(fail, dict):
                    raise ValueError("fail_jobs must be an object or null")
                config.fail_jobs = None if fail is None else {"times": 1, **fail}
            self.config = config
            return asdict(config)

    def state(self) -> dict[str, Any]:
        """What the server has seen (see the module docstring)."""
        with self._lock:
            return {
                "submits": self._submits,
                "accepted": list(self._accepted),
                "cancels": list(self._cancels),
                "jobs": dict(Counter(job.status for job in self._jobs.values())),
                "job_status": {job_id: job.status for job_id, job in self._jobs.items()},
                "client_refs": {job_id: job.client_ref for job_id, job in self._jobs.items()},
                "requests": self._requests,
                "request_log": list(self._request_log),
                "auth_failures": self._auth_failures,
                "config": asdict(self.config),
            }

    # used by the handler

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests += 1
            self._request_log.append(f"{method} {path}")

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode()
        if header is not None and hmac.compare_digest(header.encode(), expected):
            return True
        with self._lock:
            self._auth_failures += 1
        return False

    def stalled(self) -> bool:
        return self.config.stall_http and not self._stopping.is_set()

    def stall(self) -> None:
        """Hold a request unanswered while `stall_http` is on and the server runs."""
        while self.stalled():
            self._stopping.wait(0.05)

    def take_injected(self, key: str) -> dict[str, Any] | None:
        """Consume one use of the first injected error of `key`, if any."""
        with self._lock:
            entries: list[dict[str, Any]] = getattr(self.config, key)
            if not entries:
                return None
            entry = entries[0]
            entry["times"] -= 1
            if entry["times"] <= 0:
                entries.pop(0)
            return dict(entry)

    def count_submit(self) -> None:
        with self._lock:
            self._submits += 1

    def create_job(
        self,
        operation: str,
        params: dict[str, Any],
        client_ref: str,
        uploads: dict[str, list[Part]],
    ) -> Job:
        validate = _VALIDATORS[operation]
        job_id = uuid.uuid4().hex
        assert self._root is not None
        directory = self._root / job_id
        (directory / "inputs").mkdir(parents=True)
        inputs: dict[str, list[Upload]] = {}
        counter = itertools.count()
        for name, parts in uploads.items():
            for part in parts:
                safe = _SAFE_FILENAME.sub("_", Path(part.filename or "upload").name)[:80]
                path = directory / "inputs" / f"{next(counter)}-{safe}"
                path.write_bytes(part.data)
                inputs.setdefault(name, []).append(
                    Upload(part.filename or "", part.content_type or "", path)
                )
        try:
            params = validate(params, inputs)
        except Rejected:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        job = Job(job_id, operation, params, client_ref, inputs, directory)
        with self._lock:
            self._jobs[job_id] = job
            self._accepted.append(job_id)
        self._queue.put(job)
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise Rejected(404, "unknown_job", f"no job {job_id}", "job_id")
        return job

    def job_document(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        with self._lock:
            return job.document()

    def cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self._cancels.append(job_id)
            job = self._jobs.get(job_id)
            if job is None:
                raise Rejected(404, "unknown_job", f"no job {job_id}", "job_id")
            if job.status == "queued":
                self._finish(job, "canceled", "canceled while queued")
                return 202, {"status": "canceled"}
            if job.status == "running":
                job.cancel.set()
                return 202, {"status": "canceling"}
            if job.status == "canceled":
                return 202, {"status": "canceled"}
            raise Rejected(409, "finished", f"job {job_id} already {job.status}")

    def health(self) -> dict[str, Any]:
        with self._lock:
            counts = Counter(job.status for job in self._jobs.values())
        return {
            "status": "ok",
            "queue_depth": counts.get("queued", 0),
            "running": counts.get("running", 0),
            "device": DEVICE,
            "operations": list(OPERATIONS),
        }

    # the workers

    def _finish(self, job: Job, status: str, message: str, **changes: Any) -> None:
        with self._lock:
            job.status = status
            job.message = message
            job.finished = time.monotonic()
            for key, value in changes.items():
                setattr(job, key, value)

    def _pause(self, job: Job, seconds: float) -> bool:
        """Wait `seconds`; True (and the job marked canceled) if it was cancelled meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            if job.cancel.is_set() or self._stopping.is_set():
                reason = "canceled" if job.cancel.is_set() else "canceled: the server stopped"
                self._finish(job, "canceled", reason)
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            job.cancel.wait(min(remaining, 0.05))

    def _take_job_failure(self) -> dict[str, Any] | None:
        with self._lock:
            fail = self.config.fail_jobs
            if fail is None:
                return None
            if fail.get("times") is not None:
                fail["times"] -= 1
                if fail["times"] <= 0:
                    self.config.fail_jobs = None
            return dict(fail)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as exc:  # a bug here must fail the job, not kill the worker
                LOG.exception("loopback job %s crashed", job.id)
                error = {"code": "internal", "message": type(exc).__name__, "retryable": True}
                self._finish(job, "failed", "internal error", error=error)

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.status != "queued":  # cancelled while it waited
                return
            job.status = "running"
            job.started = time.monotonic()
            job.progress = 0.0
            job.message = f"{job.operation}: started"
        step_s = self.config.job_seconds / PROGRESS_STEPS
        for step in range(1, PROGRESS_STEPS):
            if self._pause(job, step_s):
                return
            with self._lock:
                job.progress = round(step / PROGRESS_STEPS, 3)
                job.message = f"{job.operation}: step {step} of {PROGRESS_STEPS}"
        if self._pause(job, step_s):
            return
        while self.config.hang:
            if self._pause(job, 0.05):
                return
        fail = self._take_job_failure()
        if fail is not None:
            error = {
                "code": str(fail.get("code", "injected")),
                "message": str(fail.get("message", "injected failure")),
                "retryable": bool(fail.get("retryable", False)),
            }
            self._finish(job, "failed", "failed", error=error)
            return
        try:
            files = _RUNNERS[job.operation](job)
        except JobError as exc:
            error = {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
            self._finish(job, "failed", "failed", error=error)
            return
        except subprocess.TimeoutExpired:
            error = {"code": "timeout", "message": "ffmpeg took too long", "retryable": True}
            self._finish(job, "failed", "failed", error=error)
            return
        if job.cancel.is_set():
            self._finish(job, "canceled", "canceled")
            return
        self._finish(job, "succeeded", "done", progress=1.0, files=files)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    loopback: StudioLoopbackServer


class _Handler(BaseHTTPRequestHandler):
    """One connection. Keep-alive HTTP/1.1, every answer with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    # An idle keep-alive connection holds a thread; let it go after a while.
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # plumbing

    def _send_json(
        self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_rejected(self, rejected: Rejected) -> None:
        error = {"code": rejected.code, "message": rejected.message, "field": rejected.field}
        self._send_json(rejected.status, {"error": error}, rejected.headers)

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise Rejected(411, "length_required", "send a Content-Length")
        try:
            return max(0, int(self.headers.get("Content-Length", "0")))
        except ValueError as exc:
            self.close_connection = True
            raise Rejected(400, "bad_request", "Content-Length is not a number") from exc

    def _drain(self) -> None:
        """Read and drop the body, so that an early answer reaches a client still sending."""
        remaining = self._content_length()
        while remaining > 0:
            chunk = self.rfile.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)

    def _body(self, limit: int) -> bytes:
        length = self._content_length()
        if length > limit:
            self._drain()
            raise Rejected(413, "too_large", f"the body is larger than {limit} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            raise _ClientGone
        return body

    def _dispatch(self, method: str) -> None:
        loop = self.server.loopback
        path = urlsplit(self.path).path
        loop.record(method, path)
        try:
            if path.startswith("/_loopback/"):
                self._control(method, path)
                return
            if path.startswith("/v1/") and loop.stalled():
                loop.stall()
                # Never answer a stalled request, even once the stall is lifted.
                self.close_connection = True
                return
            if path == "/health" or path.startswith("/v1/"):
                if not loop.authorized(self.headers.get("Authorization")):
                    if method == "POST":
                        self._drain()
                    raise Rejected(
                        401,
                        "unauthorized",
                        "a valid bearer token is required",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                self._protocol(method, path)
                return
            raise Rejected(404, "not_found", f"no route {method} {path}")
        except Rejected as rejected:
            self._answer_rejected(rejected)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            # The client gave up mid-request (a deadline on its side): nobody to answer.
            self.close_connection = True
        except Exception as exc:
            LOG.exception("loopback request %s %s failed", method, path)
            self._answer_rejected(Rejected(500, "internal", type(exc).__name__))

    def _answer_rejected(self, rejected: Rejected) -> None:
        try:
            self._send_rejected(rejected)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _control(self, method: str, path: str) -> None:
        loop = self.server.loopback
        if method == "GET" and path == "/_loopback/state":
            self._send_json(200, loop.state())
            return
        if method == "POST" and path == "/_loopback/config":
            try:
                changes = json.loads(self._body(_CONTROL_BODY_LIMIT) or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the settings must be a JSON object")
                self._send_json(200, loop.configure(changes))
            except (ValueError, TypeError) as exc:
                raise Rejected(400, "bad_config", str(exc)) from exc
            return
        raise Rejected(404, "not_found", f"no route {method} {path}")

    def _protocol(self, method: str, path: str) -> None:
        loop = self.server.loopback
        if method == "GET" and path == "/health":
            self._send_json(200, loop.health())
        elif method == "POST" and path == "/v1/jobs":
            self._submit()
        elif method == "GET" and (match := _JOB_PATH.match(path)):
            injected = loop.take_injected("poll_errors")
            if injected is not None:
                raise _injected_rejection(injected)
            self._send_json(200, loop.job_document(unquote(match.group(1))))
        elif method == "GET" and (match := _OUTPUT_PATH.match(path)):
            self._send_output(unquote(match.group(1)), unquote(match.group(2)))
        elif method == "POST" and (match := _CANCEL_PATH.match(path)):
            self._drain()
            status, doc = loop.cancel(unquote(match.group(1)))
            self._send_json(status, doc)
        else:
            raise Rejected(404, "not_found", f"no route {method} {path}")

    def _submit(self) -> None:
        loop = self.server.loopback
        loop.count_submit()
        injected = loop.take_injected("submit_errors")
        if injected is not None:
            self._drain()
            raise _injected_rejection(injected)
        content_type = self.headers.get("Content-Type", "")
        match = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.lower().startswith("multipart/form-data") or match is None:
            self._drain()
            raise Rejected(415, "bad_content_type", "POST /v1/jobs takes multipart/form-data")
        body = self._body(loop.config.max_upload_bytes)
        try:
            parts = parse_multipart(body, match.group(1).encode())
        except ValueError as exc:
            raise Rejected(400, "bad_multipart", str(exc)) from exc
        specs = [part for part in parts if part.name == "spec"]
        if len(specs) != 1:
            raise Rejected(400, "bad_spec", "exactly one `spec` part is required", "spec")
        try:
            spec = json.loads(specs[0].data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Rejected(400, "bad_spec", "the spec is not JSON", "spec") from exc
        if not isinstance(spec, dict):
            raise Rejected(400, "bad_spec", "the spec must be a JSON object", "spec")
        operation = spec.get("operation")
        if not isinstance(operation, str) or not operation:
            raise Rejected(400, "bad_spec", "the spec names no operation", "operation")
        if operation not in OPERATIONS:
            raise Rejected(
                404,
                "unknown_operation",
                f"no operation {operation!r} (known: {', '.join(OPERATIONS)})",
                "operation",
            )
        params = spec.get("params", {})
        if not isinstance(params, dict):
            raise Rejected(400, "bad_spec", "params must be a JSON object", "params")
        client_ref = spec.get("client_ref")
        uploads: dict[str, list[Part]] = {}
        for part in parts:
            if part.name == "spec":
                continue
            if not part.name.startswith("input.") or len(part.name) == len("input."):
                raise Rejected(400, "bad_part", f"unexpected part {part.name!r}", part.name)
            uploads.setdefault(part.name[len("input.") :], []).append(part)
        job = loop.create_job(operation, params, str(client_ref or ""), uploads)
        self._send_json(202, {"job_id": job.id, "status": "queued"})

    def _send_output(self, job_id: str, name: str) -> None:
        job = self.server.loopback.job(job_id)
        if job.status != "succeeded" or name not in job.files:
            raise Rejected(404, "unknown_output", f"job {job_id} has no output {name!r}", "name")
        path, media_type = job.files[name]
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as handle:
            shutil.copyfileobj(handle, self.wfile, _COPY_CHUNK)


def _injected_rejection(entry: dict[str, Any]) -> Rejected:
    status = int(entry["status"])
    headers = {}
    if entry.get("retry_after") is not None:
        headers["Retry-After"] = str(entry["retry_after"])
    return Rejected(
        status,
        str(entry.get("code") or ("busy" if status == 429 else "injected")),
        str(entry.get("message") or f"injected {status}"),
        entry.get("field"),
        headers,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the URL on stdout once listening."""
    parser = argparse.ArgumentParser(description="A loopback Studio server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", help="require this bearer token on /health and /v1/*")
    parser.add_argument("--token-env", help="read the bearer token from this variable instead")
    parser.add_argument("--job-seconds", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env: {args.token_env} is not set")
    server = StudioLoopbackServer(
        host=args.host,
        port=args.port,
        token=token,
        job_seconds=args.job_seconds,
        workers=args.workers,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: done.set())
    server.start()
    try:
        print(server.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not done.wait(0.5):
                pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
