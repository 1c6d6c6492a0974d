"""A loopback face embedding service: the protocol of docs/face-embedding-protocol.md over real
HTTP on 127.0.0.1, answering with real faces found by the local dlib engine.

A face embedding service (CompreFace, an InsightFace REST box, ...) cannot run here, so tests talk
to this one. It parses real multipart uploads, decodes the image with Pillow, and runs dlib's HOG
detector, shape predictor and ResNet descriptor on it (`ergot_dagster.resources.face_embedding.
engine`), one analysis at a time like a service with one worker.

Use it in-process (unit tests):

    with FaceEmbeddingLoopbackServer(token="t0k3n") as server:
        server.url                       # http://127.0.0.1:<port>
        server.configure({"fail_next": [{"status": 503}]})
        server.state()["embeds"]

or as a separate process (end-to-end tests, where Dagster run workers in other processes call it):

    python -m tests.servers.face_embedding_server --port 0 [--token T | --token-env VAR]
        [--landmarks large|small]

which prints its URL on stdout once it is listening and serves until SIGTERM or SIGINT.

Test-only control surface (NOT part of the protocol; no token needed)
---------------------------------------------------------------------
`POST /_loopback/config` with a JSON object merges these settings and answers the new settings
(`server.configure(dict)` in-process does the same):

- `reset: true` -- back to the defaults first.
- `fail_next: [{"status": 503, "times": 1, "code": "...", "message": "...", "retry_after": "7"}]`
  -- the next `times` `POST /v1/faces:embed` answer this error (after authentication, before
  the body is looked at; the body is read and dropped). `times` defaults to 1.
- `delay_s: 2.0` -- every embed answer is held back this long after the work, to make clients
  time out. A `reset` releases the requests held back and drops them unanswered.
- `tamper: "not_json" | "wrong_dims" | "short_embedding" | "nan" | "wrong_model" | "wrong_size" |
  "no_faces"` with `tamper_times: N` (default 1) -- the answers to the next N valid embed
  requests (counted as they arrive) are corrupted that way: a body that is not JSON; `dims` off
  by one; one face's embedding one value short; a NaN in an embedding (sent as the bare token
  NaN); another model's name; another image size; the `faces` key missing.

`GET /_loopback/state` (`server.state()`) answers what the server saw: `embeds` (answered 200),
`requests` (count), `request_log` (the last 500 "METHOD /path"), `request_ids` (the X-Request-Id
of every embed request, in order), `last_options` (the options of the last embed request),
`auth_failures`, and `config`.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import io
import json
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from ergot_dagster.resources.face_embedding.engine import DlibEngine
from tests.servers.studio_server import parse_multipart

LOG = logging.getLogger("face_loopback")

EMBED_PATH = "/v1/faces:embed"
DEVICE = "cpu (loopback)"
DEFAULT_MIN_SCORE = 0.5
DEFAULT_MAX_FACES = 100
MAX_FACES = 1000
TAMPERS = (
    "not_json",
    "wrong_dims",
    "short_embedding",
    "nan",
    "wrong_model",
    "wrong_size",
    "no_faces",
)
_CONTROL_BODY_LIMIT = 1 << 20
_COPY_CHUNK = 64 * 1024
_OPTION_KEYS = {"min_face_px", "max_faces", "min_score", "model", "landmarks"}


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


@dataclass
class LoopbackConfig:
    """The fault-injection settings, changed through `/_loopback/config`."""

    fail_next: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    tamper: str | None = None
    tamper_times: int = 0
    max_upload_bytes: int = 32 * 1024 * 1024


class FaceEmbeddingLoopbackServer:
    """The loopback embedding service, in threads of this process. `start()`, `url`, `stop()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        landmarks: str = "large",
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.landmarks = landmarks
        self.config = LoopbackConfig()
        self._lock = threading.RLock()
        # One analysis at a time, like a service with one worker; others wait (queue_depth).
        self._engine_lock = threading.Lock()
        self._engine: DlibEngine | None = None
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._waiting = 0
        self._running = 0
        self._embeds = 0
        self._requests = 0
        self._request_log: deque[str] = deque(maxlen=500)
        self._request_ids: list[str] = []
        self._last_options: dict[str, Any] | None = None
        self._auth_failures = 0
        # A reset starts a new generation and releases the requests held by `delay_s`.
        self._generation = 0
        self._released = threading.Event()

    # lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the loopback face embedding server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    @property
    def engine(self) -> DlibEngine:
        if self._engine is None:
            raise RuntimeError("the loopback face embedding server is not started")
        return self._engine

    def start(self) -> FaceEmbeddingLoopbackServer:
        # Loaded before listening, so that a client never meets a server still loading.
        self._engine = DlibEngine(landmarks=self.landmarks)
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.loopback = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="face-loopback-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaceEmbeddingLoopbackServer:
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
        known = set(asdict(LoopbackConfig())) | {"reset"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        with self._lock:
            if changes.get("reset"):
                config = LoopbackConfig()
                self._generation += 1
                self._released.set()
                self._released = threading.Event()
            else:
                config = LoopbackConfig(**asdict(self.config))
            if "fail_next" in changes:
                entries = changes["fail_next"]
                if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("status"), int) for e in entries
                ):
                    raise ValueError("fail_next must be a list of objects with an int status")
                config.fail_next = [{"times": 1, **entry} for entry in entries]
            if "delay_s" in changes:
                config.delay_s = max(0.0, float(changes["delay_s"]))
            if "tamper" in changes:
                tamper = changes["tamper"]
                if tamper is not None and tamper not in TAMPERS:
                    raise ValueError(f"tamper must be one of {', '.join(TAMPERS)} or null")
                config.tamper = tamper
                config.tamper_times = int(changes.get("tamper_times", 1)) if tamper else 0
            if "max_upload_bytes" in changes:
                config.max_upload_bytes = int(changes["max_upload_bytes"])
            self.config = config
            return asdict(config)

    def state(self) -> dict[str, Any]:
        """What the server has seen (see the module docstring)."""
        with self._lock:
            return {
                "embeds": self._embeds,
                "requests": self._requests,
                "request_log": list(self._request_log),
                "request_ids": list(self._request_ids),
                "last_options": self._last_options,
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

    def take_failure(self) -> dict[str, Any] | None:
        """Consume one use of the first injected failure, if any."""
        with self._lock:
            entries = self.config.fail_next
            if not entries:
                return None
            entry = entries[0]
            entry["times"] -= 1
            if entry["times"] <= 0:
                entries.pop(0)
            return dict(entry)

    def take_tamper(self) -> str | None:
        with self._lock:
            if self.config.tamper is None or self.config.tamper_times <= 0:
                return None
            tamper = self.config.tamper
            self.config.tamper_times -= 1
            if self.config.tamper_times <= 0:
                self.config.tamper = None
            return tamper

    def health(self) -> dict[str, Any]:
        info = self.engine.info
        with self._lock:
            return {
                "status": "ok",
                "model": info["model"],
                "dims": info["dims"],
                "detector": info["detector"],
                "landmarks": info["landmarks"],
                "device": DEVICE,
                "queue_depth": self._waiting,
                "running": self._running,
            }

    def embed(self, image: np.ndarray, options: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Analyse one decoded image (one at a time) and record the request."""
        with self._lock:
            self._waiting += 1
            self._request_ids.append(request_id)
            self._last_options = options
        started = time.monotonic()
        with self._engine_lock:
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                answer = self.engine.analyze(
                    image,
                    upsample=1,
                    min_score=float(options.get("min_score", DEFAULT_MIN_SCORE)),
                    min_face_px=float(options.get("min_face_px", 1)),
                    max_faces=int(options.get("max_faces", DEFAULT_MAX_FACES)),
                )
            finally:
                with self._lock:
                    self._running -= 1
        if options.get("landmarks") is False:
            for face in answer["faces"]:
                face["landmarks"] = {}
        answer["request_id"] = request_id
        answer["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
        return answer

    def arrival(self) -> tuple[int, float, threading.Event]:
        """What an embed request keeps from the moment it arrived: the settings generation, the
        delay in force, and the event a reset sets to release it."""
        with self._lock:
            return self._generation, self.config.delay_s, self._released

    def hold(self, delay: float, released: threading.Event) -> None:
        """Wait `delay` before answering, cut short by a reset or the server stopping."""
        deadline = time.monotonic() + delay
        while not self._stopping.is_set() and not released.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            released.wait(min(remaining, 0.05))

    def current(self, generation: int) -> bool:
        """Whether no reset happened since `generation`: a request from before one is dropped,
        so that what it would do (count, take a tamper) never leaks into a later test."""
        with self._lock:
            return generation == self._generation

    def count_embed(self) -> None:
        with self._lock:
            self._embeds += 1


def _validate_options(raw: bytes | None, served_model: str) -> dict[str, Any]:
    """The `options` part as the protocol defines it; `Rejected` (400) naming the bad field."""
    if raw is None:
        return {}
    try:
        options = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Rejected(400, "invalid_options", "the options part is not JSON", "options") from exc
    if not isinstance(options, dict):
        raise Rejected(400, "invalid_options", "the options must be a JSON object", "options")
    unknown = sorted(set(options) - _OPTION_KEYS)
    if unknown:
        raise Rejected(
            400, "invalid_options", f"unknown option(s) {', '.join(unknown)}", unknown[0]
        )

    def number(key: str, low: float, high: float) -> None:
        value = options.get(key)
        if value is None:
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise Rejected(
                400, "invalid_options", f"{key} must be a number in {low:g}..{high:g}", key
            )

    number("min_face_px", 1, 100000)
    number("min_score", -10, 10)
    number("max_faces", 1, MAX_FACES)
    if "max_faces" in options and not isinstance(options["max_faces"], int):
        raise Rejected(400, "invalid_options", "max_faces must be an integer", "max_faces")
    if "landmarks" in options and not isinstance(options["landmarks"], bool):
        raise Rejected(400, "invalid_options", "landmarks must be true or false", "landmarks")
    model = options.get("model")
    if model is not None and model != served_model:
        raise Rejected(
            400, "unknown_model", f"this service embeds with {served_model}, not {model!r}", "model"
        )
    return options


def _decode(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Rejected(400, "invalid_image", "the image cannot be decoded", "image") from exc


def _tampered(answer: dict[str, Any], tamper: str) -> bytes:
    """The answer corrupted as `tamper` says (see the module docstring)."""
    if tamper == "not_json":
        return b"<html><body>502 Bad Gateway</body></html>"
    if tamper == "wrong_dims":
        answer["dims"] += 1
    elif tamper == "short_embedding" and answer["faces"]:
        answer["faces"][0]["embedding"].pop()
    elif tamper == "nan" and answer["faces"]:
        answer["faces"][0]["embedding"][0] = float("nan")
    elif tamper == "wrong_model":
        answer["model"] = "some_other_model_v2"
    elif tamper == "wrong_size":
        answer["image"]["width"] += 10
    elif tamper == "no_faces":
        del answer["faces"]
    # json.dumps writes NaN as the bare token NaN, which strict JSON does not allow.
    return json.dumps(answer).encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    loopback: FaceEmbeddingLoopbackServer


class _Handler(BaseHTTPRequestHandler):
    """One connection. Keep-alive HTTP/1.1, every answer with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # plumbing

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, json.dumps(doc).encode())

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
                if method == "GET" and path == "/health":
                    self._send_json(200, loop.health())
                elif method == "POST" and path == EMBED_PATH:
                    self._embed()
                else:
                    raise Rejected(404, "not_found", f"no route {method} {path}")
                return
            raise Rejected(404, "not_found", f"no route {method} {path}")
        except Rejected as rejected:
            self._answer_rejected(rejected)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            # The client gave up mid-request (its deadline): nobody to answer.
            self.close_connection = True
        except Exception as exc:
            LOG.exception("loopback request %s %s failed", method, path)
            self._answer_rejected(Rejected(500, "internal", type(exc).__name__))

    def _answer_rejected(self, rejected: Rejected) -> None:
        error = {"code": rejected.code, "message": rejected.message, "field": rejected.field}
        try:
            self._send(rejected.status, json.dumps({"error": error}).encode(), rejected.headers)
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

    def _embed(self) -> None:
        loop = self.server.loopback
        injected = loop.take_failure()
        if injected is not None:
            self._drain()
            raise _injected_rejection(injected)
        content_type = self.headers.get("Content-Type", "")
        match = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.lower().startswith("multipart/form-data") or match is None:
            self._drain()
            raise Rejected(415, "unsupported_media_type", f"{EMBED_PATH} takes multipart/form-data")
        body = self._body(loop.config.max_upload_bytes)
        try:
            parts = parse_multipart(body, match.group(1).encode())
        except ValueError as exc:
            raise Rejected(400, "bad_multipart", str(exc)) from exc
        images = [part for part in parts if part.name == "image"]
        if len(images) != 1:
            raise Rejected(400, "missing_image", "exactly one `image` part is required", "image")
        option_parts = [part for part in parts if part.name == "options"]
        if len(option_parts) > 1:
            raise Rejected(400, "invalid_options", "at most one `options` part", "options")
        options = _validate_options(
            option_parts[0].data if option_parts else None, loop.engine.info["model"]
        )
        image = _decode(images[0].data)
        request_id = self.headers.get("X-Request-Id", "")[:200]
        generation, delay, released = loop.arrival()
        # Decided on arrival: a request held back must not take what a later one was meant for.
        tamper = loop.take_tamper()
        answer = loop.embed(image, options, request_id)
        loop.hold(delay, released)
        if not loop.current(generation):
            self.close_connection = True
            return
        body_out = _tampered(answer, tamper) if tamper else json.dumps(answer).encode()
        loop.count_embed()
        self._send(200, body_out)


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
    parser = argparse.ArgumentParser(description="A loopback face embedding service for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", help="require this bearer token on /health and /v1/*")
    parser.add_argument("--token-env", help="read the bearer token from this variable instead")
    parser.add_argument("--landmarks", choices=("large", "small"), default="large")
    args = parser.parse_args(argv)
    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env: {args.token_env} is not set")
    server = FaceEmbeddingLoopbackServer(
        host=args.host, port=args.port, token=token, landmarks=args.landmarks
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
