"""A bounded client for OpenAI-style audio APIs: `/v1/audio/speech`, `/v1/audio/transcriptions`.

Both calls are synchronous: one HTTP request, whose answer is the result (audio bytes, or a
transcript as JSON). There is no job id and no cancel call, so "cancelling" one is closing its
connection; servers such as speaches stop the work when their client goes away.

The TTS and transcription adapters share this module. It holds what the Studio adapter does for
its own protocol, for this API: every call is bounded by a per-call timeout *and* the stage's
deadline (also while the answer streams in), no redirects are followed (they could carry the
credential elsewhere), errors are classified by status code (408, 429 and 5xx transient, other 4xx
permanent), and the credential never reaches a message: httpx errors are reported by type only,
and the server's text is scrubbed before it is quoted.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeFailure,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.hashing import CHUNK
from ergot_dagster.resources import http
from ergot_dagster.resources.http import MAX_QUOTED_CHARS, Answer, scrub, secrets_of
from ergot_dagster.resources.runtime import HealthReport
from ergot_dagster.targets.model import RuntimeTarget

SPEECH_PATH = "/v1/audio/speech"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
# Voice cloning by upload, as the Chatterbox TTS API and several OpenAI-style servers built on
# other cloning models (Qwen3-TTS, F5) serve it; docs/speech-runtimes.md has the request shape.
CLONING_PATH = "/v1/audio/speech/upload"
HEALTH_PATHS = ("/health", "/v1/models")

_BLIP_STATUSES = frozenset({408, 429})
_MAX_ERROR_BYTES = 64 * 1024


def api_base(endpoint: str) -> str:
    """The server's root: OpenAI-style base URLs are often given with their `/v1`, and the
    paths here carry it already."""
    return endpoint.rstrip("/").removesuffix("/v1")


class DeadlineReached(Exception):
    """The stage's deadline passed during a call; the caller decides what that means."""


class DeadlineFile(http.DeadlineFile):
    """A file to upload that stops the upload at the stage deadline."""

    expired = DeadlineReached


def auth_headers(target: RuntimeTarget) -> dict[str, str]:
    """The target's credential headers, read from its variable now; permanent if it is unset."""
    try:
        return target.auth.headers()
    except LookupError:
        raise PermanentRuntimeError(
            f"target {target.name}: the credential variable {target.auth.token_env} is not set"
        ) from None


def describe(answer: Answer, secrets: tuple[str, ...]) -> str:
    """`400 invalid_request_error: voice is unknown (param 'voice')`, from the error shapes in use.

    OpenAI and its imitators answer `{"error": {"message", "type", "code", "param"}}`; FastAPI
    servers (speaches) answer `{"detail": "..."}` or a list of validation errors.
    """
    doc = answer.json_object()
    detail = str(answer.status)
    error = doc.get("error") if doc else None
    if isinstance(error, dict):
        kind = error.get("code") or error.get("type")
        if kind:
            detail += f" {scrub(str(kind), secrets)}"
        if error.get("message"):
            detail += f": {scrub(str(error['message']), secrets)}"
        if error.get("param"):
            detail += f" (param {scrub(str(error['param']), secrets)!r})"
        return detail
    if isinstance(error, str) and error:
        return f"{detail}: {scrub(error, secrets)}"
    if doc is not None and "detail" in doc:
        item = doc["detail"]
        if isinstance(item, list) and item and isinstance(item[0], dict):
            where = ".".join(str(p) for p in item[0].get("loc", []))
            item = f"{item[0].get('msg', '')} ({where})" if where else item[0].get("msg", "")
        return f"{detail}: {scrub(str(item), secrets)}"
    snippet = scrub(answer.body[:MAX_QUOTED_CHARS].decode("utf-8", "replace"), secrets)
    return f"{detail}: {snippet}" if snippet else detail


@dataclass
class ApiSession:
    """One stage's conversation with one OpenAI-style server: client, deadline, secrets."""

    target: RuntimeTarget
    client: httpx.Client
    deadline: float
    request_timeout_s: float
    secrets: tuple[str, ...]
    calls: list[str] = field(default_factory=list)

    @classmethod
    def open(
        cls, target: RuntimeTarget, *, timeout_s: float, request_timeout_s: float
    ) -> ApiSession:
        """A session for `target`, ending `timeout_s` from now; permanent if it cannot work."""
        if not target.endpoint:
            raise PermanentRuntimeError(f"target {target.name} has no endpoint")
        headers = auth_headers(target)
        try:
            client = httpx.Client(
                base_url=api_base(target.endpoint),
                headers={**headers, "User-Agent": "ergot-dagster"},
                timeout=request_timeout_s,
                follow_redirects=False,
            )
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {target.name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc
        return cls(
            target=target,
            client=client,
            deadline=time.monotonic() + timeout_s,
            request_timeout_s=request_timeout_s,
            secrets=secrets_of(headers),
        )

    def close(self) -> None:
        self.client.close()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call_timeout(self) -> httpx.Timeout:
        """The next call's bounds: connect and write per call; reads until the stage deadline.

        A synthesis or a transcription is answered only when it is done, which may take most of
        the stage's time, so the read bound is what remains of it.
        """
        remaining = self.remaining()
        if remaining <= 0:
            raise DeadlineReached
        per_call = min(self.request_timeout_s, remaining)
        return httpx.Timeout(per_call, read=remaining, pool=per_call)

    @property
    def credential_hint(self) -> str:
        env = self.target.auth.token_env
        if env and self.target.auth.kind != "none":
            return f"; the credential is read from {env}"
        return ""

    def failure(self, answer: Answer, what: str) -> RuntimeFailure:
        """The plane's error for a non-success answer, classified by its status code."""
        name = self.target.name
        detail = describe(answer, self.secrets)
        status = answer.status
        if status == 429:
            retry_after = answer.headers.get("retry-after", "").strip()
            hint = f"; Retry-After: {scrub(retry_after, self.secrets)}" if retry_after else ""
            return TransientRuntimeError(
                f"{name} is overloaded and refused {what} ({detail}){hint}"
            )
        if status >= 500 or status in _BLIP_STATUSES:
            return TransientRuntimeError(f"{name} failed {what} ({detail})")
        if status in (401, 403):
            return PermanentRuntimeError(
                f"{name} refused the credentials for {what} ({detail}){self.credential_hint}"
            )
        if status == 404:
            return PermanentRuntimeError(
                f"{name} does not serve {what} ({detail}); is its endpoint an OpenAI-style "
                "audio API, and does it serve this model?"
            )
        if status < 400:
            return PermanentRuntimeError(
                f"{name} answered {what} with {detail}, which the API does not use "
                "(redirects are not followed)"
            )
        return PermanentRuntimeError(f"{name} rejected {what} ({detail})")

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """httpx's exceptions as the plane's; only their type is quoted (messages hold URLs)."""
        try:
            yield
        except httpx.TimeoutException as exc:
            if self.remaining() <= 0:
                raise DeadlineReached from exc
            raise RuntimeTimeoutError(
                f"{self.target.name} did not answer {what} in time ({type(exc).__name__})"
            ) from exc
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {self.target.name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc
        except (httpx.RequestError, httpx.StreamError) as exc:
            raise TransientRuntimeError(
                f"{self.target.name} is unreachable during {what} ({type(exc).__name__})"
            ) from exc

    def post(self, path: str, what: str, *, max_bytes: int, **kwargs: Any) -> Answer:
        """POST and read the whole answer, bounded by `max_bytes` and the stage deadline."""
        self.calls.append(f"POST {path}")
        timeout = self.call_timeout()
        with (
            self._translated(what),
            self.client.stream("POST", path, timeout=timeout, **kwargs) as response,
        ):
            body = bytearray()
            limit = max_bytes if response.status_code == 200 else _MAX_ERROR_BYTES
            for chunk in response.iter_bytes(CHUNK):
                if time.monotonic() > self.deadline:
                    raise DeadlineReached
                body += chunk
                if len(body) > limit:
                    if response.status_code == 200:
                        raise PermanentRuntimeError(
                            f"{self.target.name} answered {what} with more than {max_bytes} bytes"
                        )
                    break
            return Answer(response.status_code, response.headers, bytes(body))

    def post_to_file(
        self, path: str, what: str, dest: Path, max_bytes: int | None = None, **kwargs: Any
    ) -> tuple[str, int]:
        """POST and stream a 200 answer's body into `dest` (atomically): (content type, size).

        Any other answer is read (bounded) and raised as the classified failure; a body longer
        than `max_bytes` is refused (permanent) and nothing is kept.
        """
        self.calls.append(f"POST {path}")
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        timeout = self.call_timeout()
        written = 0
        try:
            with (
                self._translated(what),
                self.client.stream("POST", path, timeout=timeout, **kwargs) as response,
            ):
                if response.status_code != 200:
                    head = bytearray()
                    for chunk in response.iter_bytes():
                        head += chunk
                        if len(head) > _MAX_ERROR_BYTES or time.monotonic() > self.deadline:
                            break
                    raise self.failure(
                        Answer(response.status_code, response.headers, bytes(head)), what
                    )
                content_type = response.headers.get("content-type", "")
                with open(part, "wb") as handle:
                    for chunk in response.iter_bytes(CHUNK):
                        if time.monotonic() > self.deadline:
                            raise DeadlineReached
                        handle.write(chunk)
                        written += len(chunk)
                        if max_bytes is not None and written > max_bytes:
                            raise PermanentRuntimeError(
                                f"{self.target.name} answered {what} with more than "
                                f"{max_bytes} bytes"
                            )
            if written == 0:
                raise PermanentRuntimeError(f"{self.target.name} answered {what} with no bytes")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return content_type, written


def probe_health(target: RuntimeTarget, timeout_s: float) -> HealthReport:
    """Probe an OpenAI-style server without doing work: `GET /health`, else `GET /v1/models`.

    speaches and whisper.cpp's server answer `/health`; OpenAI itself (and some others) only
    `/v1/models`, which also lists what the server can run. Never raises.
    """
    if not target.endpoint:
        return HealthReport(healthy=False, detail=f"target {target.name} has no endpoint")
    try:
        headers = target.auth.headers()
    except LookupError:
        return HealthReport(
            healthy=False, detail=f"the credential variable {target.auth.token_env} is not set"
        )
    secrets = secrets_of(headers)
    started = time.monotonic()
    deadline = started + timeout_s
    answers: dict[str, Answer] = {}
    try:
        with httpx.Client(
            base_url=api_base(target.endpoint),
            headers=headers,
            timeout=timeout_s,
            follow_redirects=False,
        ) as client:
            for path in HEALTH_PATHS:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the health probe took too long")
                with client.stream("GET", path, timeout=remaining) as response:
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        if time.monotonic() > deadline:
                            raise TimeoutError("the health answer took too long")
                        body += chunk
                        if len(body) > _MAX_ERROR_BYTES:
                            break
                    answers[path] = Answer(response.status_code, response.headers, bytes(body))
                if answers[path].status != 404:
                    break
    except Exception as exc:
        # Any failure is an unhealthy target; the type alone, as messages may quote the URL.
        return HealthReport(
            healthy=False,
            detail=f"unreachable ({type(exc).__name__})",
            latency_ms=(time.monotonic() - started) * 1000,
        )
    latency_ms = (time.monotonic() - started) * 1000
    path, answer = list(answers.items())[-1]
    if answer.status != 200:
        return HealthReport(
            healthy=False,
            detail=f"{path} answered {describe(answer, secrets)}",
            latency_ms=latency_ms,
        )
    info: dict[str, Any] = {"probe": path, "endpoint_api": "openai-audio"}
    doc = answer.json_object()
    if doc is not None and isinstance(doc.get("data"), list):
        models = [str(m.get("id")) for m in doc["data"] if isinstance(m, dict) and m.get("id")]
        info["models"] = models[:20]
    if doc is not None and doc.get("status") not in (None, "ok", "OK", "healthy"):
        return HealthReport(
            healthy=False,
            detail=f"{path} says {scrub(str(doc.get('status')), secrets)}",
            latency_ms=latency_ms,
            info=info,
        )
    return HealthReport(healthy=True, detail=f"ok ({path})", latency_ms=latency_ms, info=info)
