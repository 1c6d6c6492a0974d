"""Cheap checks that a produced file is what its artifact map says it is.

A runtime that writes a PNG where a JPEG was promised, or an empty file, should fail its stage
rather than store a mislabelled artifact. Checking magic bytes costs microseconds, unlike a probe.
"""

from __future__ import annotations

import json
from pathlib import Path

from ergot_dagster.errors import PermanentRuntimeError


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def _is_mp4_family(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")


_MAGIC = {
    "image/jpeg": lambda h: h.startswith(b"\xff\xd8\xff"),
    "image/png": lambda h: h.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/webp": lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP",
    "audio/wav": lambda h: h[:4] in (b"RIFF", b"RF64") and h[8:12] == b"WAVE",
    "audio/flac": lambda h: h.startswith(b"fLaC"),
    "video/mp4": _is_mp4_family,
    "audio/mp4": _is_mp4_family,
    "video/quicktime": _is_mp4_family,
    "video/x-matroska": lambda h: h.startswith(b"\x1a\x45\xdf\xa3"),
    "video/webm": lambda h: h.startswith(b"\x1a\x45\xdf\xa3"),
    # NumPy's .npy format (numpy.save): a magic string, then a version.
    "application/x-npy": lambda h: h.startswith(b"\x93NUMPY"),
    # Point clouds (PLY, ASCII or binary) and zipped models (photogrammetry).
    "model/x-ply": lambda h: h.startswith((b"ply\n", b"ply\r\n")),
    "application/zip": lambda h: h.startswith(b"PK\x03\x04"),
}


def verify_media_type(path: Path, media_type: str, what: str) -> None:
    """Raise `PermanentRuntimeError` if `path` is empty or plainly not `media_type`."""
    if not path.is_file():
        raise PermanentRuntimeError(f"{what} was not written ({path.name} is missing)")
    if path.stat().st_size == 0:
        raise PermanentRuntimeError(f"{what} is an empty file")
    if media_type == "application/json":
        try:
            json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PermanentRuntimeError(
                f"{what} is declared application/json but is not JSON: {exc}"
            ) from exc
        return
    check = _MAGIC.get(media_type)
    if check is not None and not check(_head(path)):
        raise PermanentRuntimeError(f"{what} is declared {media_type} but its bytes are not")
