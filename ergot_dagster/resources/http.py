"""What every HTTP runtime adapter needs around httpx: bounded answers, uploads that stop at the
stage deadline, and messages that never quote a credential."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import httpx

MAX_QUOTED_CHARS = 300
# Secrets shorter than this are not scrubbed from messages: replacing a two-letter "token"
# everywhere would garble the message and protect nothing.
MIN_SECRET_CHARS = 4


def secrets_of(headers: dict[str, str]) -> tuple[str, ...]:
    """Every form in which a credential header could be quoted back: the whole value and its
    bare token, longest first (so "Bearer xyz" is replaced whole before "xyz" is)."""
    found: set[str] = set()
    for value in headers.values():
        for candidate in (value, value.split(" ", 1)[-1]):
            if len(candidate) >= MIN_SECRET_CHARS:
                found.add(candidate)
    return tuple(sorted(found, key=len, reverse=True))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` without any credential in it, on one line, short enough to quote in a message."""
    for secret in secrets:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


@dataclass(frozen=True)
class Answer:
    """An HTTP answer read in full (bounded in size and time by whoever read it)."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json_object(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None


class DeadlineFile:
    """A file for httpx's multipart encoder that stops the upload at the stage deadline.

    httpx bounds each socket write, not the whole upload: a server reading slowly enough could
    otherwise keep a large upload going past the deadline. Subclasses name the exception their
    adapter raises there (`expired`).
    """

    expired: ClassVar[type[Exception]] = TimeoutError

    def __init__(self, handle: BinaryIO, deadline: float) -> None:
        self._handle = handle
        self._deadline = deadline

    def fileno(self) -> int:
        # httpx sizes the part from the descriptor, so the request carries a Content-Length.
        return self._handle.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise self.expired
        return self._handle.read(size)
