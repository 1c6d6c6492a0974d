"""The client side of the face embedding protocol (docs/face-embedding-protocol.md).

One `EmbedSession` per stage: an httpx client for one service, the stage deadline, and the
credential's forms to scrub from anything quoted. Every call is bounded by `request_timeout_s` and
by what remains of the stage; answers are read in full but bounded in size; redirects are never
followed (they could carry the credential to another host). Errors become the plane's: 4xx
permanent (except 408 and 429), 5xx, 408, 429, timeouts and unreachable services transient.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeFailure,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.resources import http
from ergot_dagster.resources.face_embedding.model import EmbedAnswer, RemoteOptions, problems
from ergot_dagster.resources.http import MAX_QUOTED_CHARS, scrub, secrets_of
from ergot_dagster.targets.model import RuntimeTarget

EMBED_PATH = "/v1/faces:embed"
HEALTH_PATH = "/health"
# A thousand faces of 8192 floats is about 100 MiB of JSON; a real answer is far smaller, and
# anything larger is not a face embedding answer.
MAX_ANSWER_BYTES = 32 << 20
_BLIP_STATUSES = frozenset({408, 429})


class SessionDeadline(Exception):
    """The stage's deadline passed during a call; the caller knows what it was waiting for."""


class _DeadlineReader:
    """An upload body for httpx's multipart encoder that stops at the stage deadline.

    httpx bounds each socket write, not the whole upload: a service reading slowly enough could
    otherwise hold an upload past the deadline.
    """

    def __init__(self, data: bytes, deadline: float) -> None:
        self._data = io.BytesIO(data)
        self._deadline = deadline
        self._size = len(data)

    def __len__(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise SessionDeadline
        return self._data.read(size)


@dataclass(frozen=True)
class Answer(http.Answer):
    """An HTTP answer read in full (bounded), described in the embedding service's terms."""

    def describe(self, secrets: tuple[str, ...]) -> str:
        """`400 invalid_image: cannot decode (field 'image')`, or the start of a foreign body."""
        doc = self.json_object()
        error = doc.get("error") if doc else None
        detail = str(self.status)
        if isinstance(error, dict):
            for key, form in (("code", " {}"), ("message", ": {}"), ("field", " (field {!r})")):
                value = error.get(key)
                if value not in (None, ""):
                    detail += form.format(scrub(str(value), secrets))
        elif self.body:
            snippet = scrub(self.body[:MAX_QUOTED_CHARS].decode("utf-8", "replace"), secrets)
            if snippet:
                detail += f": {snippet}"
        return detail


def auth_headers(target: RuntimeTarget) -> dict[str, str]:
    """The credential headers of `target`; `PermanentRuntimeError` naming the unset variable."""
    try:
        return target.auth.headers()
    except LookupError:
        raise PermanentRuntimeError(
            f"target {target.name}: the credential variable {target.auth.token_env} is not set"
        ) from None


def remote_options(target: RuntimeTarget) -> RemoteOptions:
    try:
        return RemoteOptions.model_validate(target.options)
    except ValidationError as exc:
        raise PermanentRuntimeError(
            f"target {target.name}: invalid options for a face embedding service: {problems(exc)}"
        ) from None


class EmbedSession:
    """One stage's conversation with one embedding service."""

    def __init__(
        self,
        target: RuntimeTarget,
        headers: dict[str, str],
        *,
        deadline: float,
        request_timeout_s: float,
    ) -> None:
        if not target.endpoint:
            raise PermanentRuntimeError(f"target {target.name} has no endpoint")
        self.target = target
        self.deadline = deadline
        self.request_timeout_s = request_timeout_s
        self.secrets = secrets_of(headers)
        try:
            self.client = httpx.Client(
                base_url=target.endpoint,
                headers=headers,
                timeout=request_timeout_s,
                follow_redirects=False,
            )
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {target.name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc

    def close(self) -> None:
        self.client.close()

    def call_timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise SessionDeadline
        return min(self.request_timeout_s, remaining)

    @contextlib.contextmanager
    def _translated(self, what: str, timeout_s: float) -> Iterator[None]:
        """httpx's exceptions as the plane's; only their type is quoted (messages hold URLs)."""
        name = self.target.name
        try:
            yield
        except httpx.TimeoutException as exc:
            if self.deadline - time.monotonic() <= 0:
                raise SessionDeadline from exc
            raise RuntimeTimeoutError(
                f"{name} did not answer {what} within {timeout_s:.3g} s ({type(exc).__name__})"
            ) from exc
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc
        except (httpx.RequestError, httpx.StreamError) as exc:
            raise TransientRuntimeError(
                f"{name} is unreachable during {what} ({type(exc).__name__})"
            ) from exc

    def exchange(self, method: str, path: str, what: str, **kwargs: Any) -> Answer:
        """One call, its answer read in full within the size bound and the stage deadline."""
        timeout = self.call_timeout()
        with (
            self._translated(what, timeout),
            self.client.stream(method, path, timeout=timeout, **kwargs) as response,
        ):
            body = bytearray()
            for chunk in response.iter_bytes():
                # httpx bounds each read; this bounds a service that dribbles bytes.
                if time.monotonic() > self.deadline:
                    raise SessionDeadline
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise PermanentRuntimeError(
                        f"{self.target.name} answered {what} with more than "
                        f"{MAX_ANSWER_BYTES >> 20} MiB; that is not a face embedding answer"
                    )
            return Answer(response.status_code, response.headers, bytes(body))

    def failure(self, answer: Answer, what: str) -> RuntimeFailure:
        """The plane's error for a non-200 answer, classified by its status."""
        name = self.target.name
        detail = answer.describe(self.secrets)
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
            env = self.target.auth.token_env
            hint = (
                f"; the credential is read from {env}"
                if env and self.target.auth.kind != "none"
                else ""
            )
            return PermanentRuntimeError(
                f"{name} refused the credentials for {what} ({detail}){hint}"
            )
        if status < 400:
            return PermanentRuntimeError(
                f"{name} answered {what} with {detail}, which the face embedding protocol does "
                "not use"
            )
        return PermanentRuntimeError(f"{name} rejected {what} ({detail})")

    def embed(
        self,
        image: bytes,
        filename: str,
        options: dict[str, Any],
        *,
        request_id: str,
        what: str,
        expect: RemoteOptions,
    ) -> EmbedAnswer:
        """POST one image; the validated answer, or the classified error."""
        parts = [
            ("image", (filename, _DeadlineReader(image, self.deadline), "image/png")),
            ("options", (None, json.dumps(options).encode(), "application/json")),
        ]
        answer = self.exchange(
            "POST", EMBED_PATH, what, files=parts, headers={"X-Request-Id": request_id}
        )
        if answer.status != 200:
            raise self.failure(answer, what)
        return self.parse(answer, what, expect)

    def parse(self, answer: Answer, what: str, expect: RemoteOptions) -> EmbedAnswer:
        """A 200 answer as an `EmbedAnswer` meeting the target's expectations, or permanent:
        a service that answers malformed JSON will answer it again."""
        name = self.target.name
        doc = answer.json_object()
        if doc is None:
            raise PermanentRuntimeError(
                f"{name} answered {what} with something that is not a JSON object; is the "
                "endpoint a face embedding service?"
            )
        try:
            parsed = EmbedAnswer.model_validate(doc)
        except ValidationError as exc:
            raise PermanentRuntimeError(
                f"{name} answered {what} with a malformed answer: "
                f"{scrub(problems(exc), self.secrets)}"
            ) from None
        if expect.model is not None and parsed.model != expect.model:
            raise PermanentRuntimeError(
                f"{name} embedded with model {scrub(parsed.model, self.secrets)!r}, but the "
                f"target expects {expect.model!r}"
            )
        if expect.dims is not None and parsed.dims != expect.dims:
            raise PermanentRuntimeError(
                f"{name} answered {parsed.dims}-d embeddings, but the target expects "
                f"{expect.dims}-d"
            )
        return parsed
