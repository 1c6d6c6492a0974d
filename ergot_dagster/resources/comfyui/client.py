"""Talking to one ComfyUI server: bounded HTTP calls and the `/ws` event stream.

ComfyUI is an untrusted sidecar. Every call here is bounded in time (the per-call timeout and the
stage's deadline, checked between chunks so that a server dribbling bytes still stops at the
deadline) and in size (JSON answers, websocket messages and downloaded files each have a cap).
Errors from httpx and websockets are reported by type only: their text can quote the URL, and a
URL can carry credentials. Text the server sends is scrubbed of the credential before it is quoted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeFailure,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.hashing import CHUNK
from ergot_dagster.resources.http import MAX_QUOTED_CHARS, MIN_SECRET_CHARS, DeadlineFile, scrub
from ergot_dagster.targets.model import RuntimeTarget

_BLIP_STATUSES = frozenset({408, 425, 429})


class _NoDebug(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs the handshake's headers, the credential included, at DEBUG: never."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level > logging.DEBUG:
            super().log(level, msg, *args, **kwargs)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        return None


_WS_LOG = _NoDebug(logging.getLogger("websockets.client"), {})


class DeadlineReached(Exception):
    """The stage's deadline passed during a call; the caller knows what was going on."""


class WebsocketLost(Exception):
    """The `/ws` connection closed or broke; follow the prompt by polling instead."""


def public_endpoint(endpoint: str) -> str:
    """The endpoint as it may be shown: no user name or password, no query, no fragment."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def connection(endpoint: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(base URL, headers) to talk to `endpoint`: a user name and password in the URL become a
    basic `Authorization` header (unless the target's credential already fills it), so that no
    URL a library logs ever carries them."""
    parts = urlsplit(endpoint)
    headers = dict(headers)
    if parts.username is not None and "authorization" not in {k.lower() for k in headers}:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return public_endpoint(endpoint), headers


def endpoint_secrets(endpoint: str, headers: dict[str, str]) -> tuple[str, ...]:
    """Every form in which a credential could appear in text: header values, bare tokens, and a
    password in the endpoint's URL."""
    found: set[str] = set()
    for value in headers.values():
        for candidate in (value, value.split(" ", 1)[-1]):
            if len(candidate) >= MIN_SECRET_CHARS:
                found.add(candidate)
    parts = urlsplit(endpoint)
    for candidate in (parts.password, unquote(parts.password or "")):
        if candidate and len(candidate) >= MIN_SECRET_CHARS:
            found.add(candidate)
    _, with_basic = connection(endpoint, {})
    basic = with_basic.get("Authorization")
    if basic and parts.password:
        found.update({basic, basic.split(" ", 1)[-1]})
    # Longest first, so that "Bearer xyz" is replaced whole before "xyz" is.
    return tuple(sorted(found, key=len, reverse=True))


@dataclass(frozen=True)
class Answer:
    """An HTTP answer read in full, within its size cap."""

    status: int
    headers: httpx.Headers
    body: bytes
    truncated: bool = False

    def json(self) -> Any:
        """The body as JSON; None if it is not JSON (or was cut at the size cap)."""
        if self.truncated:
            return None
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
            return None


class _DeadlineFile(DeadlineFile):
    """A file for httpx's multipart encoder that stops the upload at the stage deadline."""

    expired = DeadlineReached


class ComfyClient:
    """One conversation with one ComfyUI server, bounded by a deadline.

    `headers` carries the target's credential for a proxy in front of ComfyUI (ComfyUI itself has
    no authentication); it is sent on every call, the websocket included, and never shown.
    """

    def __init__(
        self,
        target: RuntimeTarget,
        headers: dict[str, str],
        *,
        deadline: float,
        request_timeout_s: float,
        max_answer_bytes: int,
    ) -> None:
        if not target.endpoint:
            raise PermanentRuntimeError(
                f"target {target.name} has no endpoint; a comfyui target needs its server's URL"
            )
        self.target = target
        self.endpoint = target.endpoint
        self.base_url, self.headers = connection(target.endpoint, headers)
        self.deadline = deadline
        self.request_timeout_s = request_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.secrets = endpoint_secrets(target.endpoint, headers)
        try:
            self.http = httpx.Client(
                base_url=self.base_url,
                headers=self.headers,
                timeout=request_timeout_s,
                # A redirect is not part of the protocol, and following one could carry the
                # credential to another host.
                follow_redirects=False,
            )
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {target.name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def server(self) -> str:
        """The server as it may be recorded (no credentials)."""
        return public_endpoint(self.endpoint)

    def clean(self, text: str) -> str:
        return scrub(text, self.secrets)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call_timeout(self) -> float:
        """The next call's timeout: the per-call bound, or less if the stage ends sooner."""
        remaining = self.remaining()
        if remaining <= 0:
            raise DeadlineReached
        return min(self.request_timeout_s, remaining)

    def close(self) -> None:
        self.http.close()

    @contextlib.contextmanager
    def translated(self, what: str, timeout_s: float) -> Iterator[None]:
        """httpx's exceptions as the plane's (by type only: messages can quote the URL)."""
        try:
            yield
        except httpx.TimeoutException as exc:
            if self.remaining() <= 0:
                raise DeadlineReached from exc
            raise RuntimeTimeoutError(
                f"{self.name} did not answer {what} within {timeout_s:.3g} s ({type(exc).__name__})"
            ) from exc
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {self.name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc
        except (httpx.RequestError, httpx.StreamError) as exc:
            raise TransientRuntimeError(
                f"{self.name} is unreachable during {what} ({type(exc).__name__})"
            ) from exc

    def exchange(self, method: str, path: str, what: str, **kwargs: Any) -> Answer:
        """One call, its answer read up to `max_answer_bytes`, bounded by the deadline."""
        timeout = self.call_timeout()
        with (
            self.translated(what, timeout),
            self.http.stream(method, path, timeout=timeout, **kwargs) as response,
        ):
            body = bytearray()
            truncated = False
            for chunk in response.iter_bytes():
                if time.monotonic() > self.deadline:
                    raise DeadlineReached
                body += chunk
                if len(body) > self.max_answer_bytes:
                    truncated = True
                    break
            return Answer(response.status_code, response.headers, bytes(body), truncated)

    def json_of(self, answer: Answer, what: str, *, job_id: str | None = None) -> Any:
        """The JSON of a 200 answer; otherwise the classified failure."""
        if answer.status != 200:
            raise self.failure(answer, what, job_id=job_id)
        if answer.truncated:
            raise TransientRuntimeError(
                f"{self.name} answered {what} with more than {self.max_answer_bytes} bytes",
                job_id=job_id,
            )
        doc = answer.json()
        if doc is None:
            raise PermanentRuntimeError(
                f"{self.name} did not answer {what} with JSON; is {self.server} a ComfyUI server?",
                job_id=job_id,
            )
        return doc

    def describe(self, answer: Answer) -> str:
        """`404: the start of the body`, scrubbed."""
        detail = str(answer.status)
        snippet = answer.body[: MAX_QUOTED_CHARS * 2].decode("utf-8", "replace").strip()
        if snippet:
            detail += f": {self.clean(snippet)}"
        return detail

    def failure(self, answer: Answer, what: str, *, job_id: str | None = None) -> RuntimeFailure:
        """The plane's error for an unexpected answer, classified by its status code."""
        detail = self.describe(answer)
        status = answer.status
        if status >= 500 or status in _BLIP_STATUSES:
            return TransientRuntimeError(f"{self.name} failed {what} ({detail})", job_id=job_id)
        if status in (401, 403):
            env = self.target.auth.token_env
            hint = (
                f"; the credential is read from {env}"
                if env and self.target.auth.kind != "none"
                else "; ComfyUI has no authentication, so a proxy in front of it refused"
            )
            return PermanentRuntimeError(
                f"{self.name} refused the credentials for {what} ({detail}){hint}", job_id=job_id
            )
        if status < 400:
            return PermanentRuntimeError(
                f"{self.name} answered {what} with {detail}, which ComfyUI does not send",
                job_id=job_id,
            )
        if status in (404, 405):
            return PermanentRuntimeError(
                f"{self.name} has no route for {what} ({detail}); is {self.server} a ComfyUI "
                "server?",
                job_id=job_id,
            )
        return PermanentRuntimeError(f"{self.name} rejected {what} ({detail})", job_id=job_id)

    def upload(self, path: Path, name: str, subfolder: str, what: str) -> Answer:
        """`POST /upload/image` (multipart `image`, `type`, `subfolder`, `overwrite`)."""
        with open(path, "rb") as handle:
            reader = _DeadlineFile(handle, self.deadline)
            return self.exchange(
                "POST",
                "/upload/image",
                what,
                data={"type": "input", "subfolder": subfolder, "overwrite": "true"},
                files={"image": (name, reader, "application/octet-stream")},
            )

    def download(
        self, params: dict[str, str], final: Path, what: str, max_bytes: int, job_id: str
    ) -> int:
        """Stream `GET /view?...` to `final` through a temporary name; the bytes written."""
        part = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        written = 0
        try:
            timeout = self.call_timeout()
            with (
                self.translated(what, timeout),
                self.http.stream("GET", "/view", params=params, timeout=timeout) as response,
            ):
                if response.status_code != 200:
                    head = bytearray()
                    for chunk in response.iter_bytes():
                        head += chunk
                        if len(head) > MAX_QUOTED_CHARS * 4:
                            break
                    answer = Answer(response.status_code, response.headers, bytes(head))
                    if response.status_code == 404:
                        # Listed in the history but gone from disk: someone cleaned the output
                        # folder, and running the prompt again makes the file again.
                        raise TransientRuntimeError(
                            f"{self.name} listed {what.removeprefix('the download of ')} but "
                            f"does not serve it ({self.describe(answer)})",
                            job_id=job_id,
                        )
                    raise self.failure(answer, what, job_id=job_id)
                announced = response.headers.get("content-length", "")
                if announced.isdigit() and int(announced) > max_bytes:
                    raise PermanentRuntimeError(
                        f"{what} is {announced} bytes, over the {max_bytes}-byte limit",
                        job_id=job_id,
                    )
                with open(part, "wb") as handle:
                    for chunk in response.iter_bytes(CHUNK):
                        if time.monotonic() > self.deadline:
                            raise DeadlineReached
                        written += len(chunk)
                        if written > max_bytes:
                            raise PermanentRuntimeError(
                                f"{what} is over the {max_bytes}-byte limit", job_id=job_id
                            )
                        handle.write(chunk)
                if announced.isdigit() and written != int(announced):
                    raise TransientRuntimeError(
                        f"{self.name} sent {written} bytes for {what}, {announced} were announced",
                        job_id=job_id,
                    )
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)
        return written

    # -- the websocket ------------------------------------------------------------------------

    def websocket_url(self, client_id: str) -> str:
        """`ws(s)://host[:port][/prefix]/ws?clientId=...`, without credentials."""
        parts = urlsplit(self.endpoint)
        scheme = "wss" if parts.scheme == "https" else "ws"
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        path = parts.path.rstrip("/") + "/ws"
        return urlunsplit((scheme, netloc, path, f"clientId={client_id}", ""))

    def open_events(
        self, client_id: str, open_timeout_s: float, max_message_bytes: int
    ) -> PromptEvents:
        """Connect `/ws?clientId=...`; `WebsocketLost` (by type only) if it cannot be opened."""
        timeout = min(open_timeout_s, max(self.remaining(), 0.01))
        try:
            socket = connect(
                self.websocket_url(client_id),
                additional_headers=self.headers,
                # No Origin: ComfyUI refuses a loopback request whose Origin differs from Host.
                origin=None,
                open_timeout=timeout,
                close_timeout=1.0,
                max_size=max_message_bytes,
                compression=None,
                user_agent_header="ergot-dagster comfyui adapter",
                logger=_WS_LOG,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ValueError) as exc:
            raise WebsocketLost(type(exc).__name__) from exc
        return PromptEvents(socket)


class PromptEvents:
    """The `/ws` stream of one client id: JSON messages, binary previews skipped."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection
        self.messages = 0

    def receive(self, timeout_s: float) -> str | bytes | None:
        """The next frame within `timeout_s`, None if none came; `WebsocketLost` when it broke."""
        try:
            frame = self._connection.recv(timeout=max(timeout_s, 0.0))
        except TimeoutError:
            return None
        except (ConnectionClosed, OSError, RuntimeError) as exc:
            raise WebsocketLost(type(exc).__name__) from exc
        self.messages += 1
        return frame

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()
