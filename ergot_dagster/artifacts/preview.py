"""Previews of stored artifacts, as extra materialization metadata for the Dagster UI.

Dagster has no image metadata type, but its UI renders markdown metadata with `data:` image URIs
(rehype-sanitize is configured to allow them since dagster PR 13443), so an image artifact gets a
small JPEG thumbnail embedded in a markdown entry. JSON artifacts get a JSON entry the UI shows as
a tree, markdown and plain-text artifacts a markdown entry. Everything is bounded, in bytes and in
time, because it lands in the event log of every materialization.

A preview is a convenience for operators: failing to make one never fails a materialization.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dagster import MetadataValue

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.media.process import run_process

PREVIEW_KEY = "preview"
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})
JSON_TYPES = frozenset({"application/json"})
MARKDOWN_TYPES = frozenset({"text/markdown"})
# Shown as a fenced block in a markdown entry: subtitles and transcripts read fine that way.
PLAIN_TEXT_TYPES = frozenset({"text/plain", "text/vtt", "application/x-subrip"})

THUMBNAIL_MAX_PX = 320
THUMBNAIL_MAX_BYTES = 48 * 1024
# Tried in order until the thumbnail fits; ffmpeg's mjpeg quantiser, lower is better.
THUMBNAIL_QUALITIES = (4, 8, 16, 31)
THUMBNAIL_TIMEOUT_S = 15.0
TEXT_MAX_BYTES = 64 * 1024

_logger = logging.getLogger(__name__)


class PreviewLog(Protocol):
    """The one method a preview needs from a logger (`logging.Logger`, Dagster's `context.log`)."""

    def warning(self, msg: str) -> Any: ...


class PreviewUnavailable(Exception):
    """Why no preview could be made for an artifact that should have one."""


def artifact_preview(
    manifest: ArtifactManifest,
    local_path: Callable[[str], Path],
    *,
    log: PreviewLog | None = None,
) -> dict[str, Any]:
    """Extra metadata showing what `manifest`'s bytes are: `{"preview": ...}`, or `{}`.

    `local_path` turns a stored uri into a readable local file (`ArtifactStore.local_path`). A set
    is previewed by its first member. Media types without a preview give `{}`; so does any failure,
    which is logged to `log` (a warning) rather than raised.
    """
    try:
        return _preview(manifest, local_path)
    except Exception as exc:
        # Best effort by design: an operator's thumbnail is never worth a failed artifact.
        (log or _logger).warning(f"no preview for {manifest.ref}: {exc}")
        return {}


def _preview(manifest: ArtifactManifest, local_path: Callable[[str], Path]) -> dict[str, Any]:
    if manifest.kind == "set":
        if not manifest.members:
            return {}
        first = manifest.members[0]
        media_type, uri, label = first.media_type, first.uri, f"{manifest.name}/{first.name}"
    else:
        media_type, uri, label = manifest.media_type, manifest.uri, manifest.name
    if media_type in IMAGE_TYPES:
        thumbnail = image_thumbnail(local_path(uri))
        alt = _alt_text(label)
        encoded = base64.b64encode(thumbnail).decode("ascii")
        caption = f"{label} ({media_type}), at most {THUMBNAIL_MAX_PX} px"
        if manifest.kind == "set":
            caption += f"; first of {len(manifest.members)} files"
        image = f"![{alt}](data:image/jpeg;base64,{encoded})"
        return {PREVIEW_KEY: MetadataValue.md(f"{image}\n\n{caption}")}
    if media_type in JSON_TYPES:
        value = json.loads(_read_text(local_path(uri)))
        if not isinstance(value, dict | list):
            # Dagster's JSON entry holds an object or an array; a bare scalar says little anyway.
            return {}
        return {PREVIEW_KEY: MetadataValue.json(value)}
    if media_type in MARKDOWN_TYPES:
        return {PREVIEW_KEY: MetadataValue.md(_read_text(local_path(uri)))}
    if media_type in PLAIN_TEXT_TYPES:
        text = _read_text(local_path(uri))
        fence = "`" * max(3, _longest_backtick_run(text) + 1)
        return {PREVIEW_KEY: MetadataValue.md(f"{fence}text\n{text}\n{fence}")}
    return {}


def image_thumbnail(path: Path, *, timeout_s: float = THUMBNAIL_TIMEOUT_S) -> bytes:
    """A JPEG of the image at `path` that fits in a 320 px square and in 48 KB.

    Never enlarges a small image. Raises `PreviewUnavailable` when ffmpeg is missing or the result
    cannot be made small enough, and the plane's runtime errors when ffmpeg fails or times out.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise PreviewUnavailable("ffmpeg is not installed")
    box = f"'min({THUMBNAIL_MAX_PX},iw)':'min({THUMBNAIL_MAX_PX},ih)'"
    smallest = 0
    for quality in THUMBNAIL_QUALITIES:
        result = run_process(
            [
                ffmpeg,
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                # The input is a store file; nothing in it may make ffmpeg open anything else.
                "-protocol_whitelist",
                "file",
                "-i",
                str(path),
                "-frames:v",
                "1",
                "-vf",
                f"scale={box}:force_original_aspect_ratio=decrease",
                "-c:v",
                "mjpeg",
                "-q:v",
                str(quality),
                "-f",
                "image2pipe",
                "pipe:1",
            ],
            timeout_s=timeout_s,
            tool="ffmpeg (preview)",
        )
        if not result.stdout:
            raise PreviewUnavailable("ffmpeg wrote no thumbnail")
        if len(result.stdout) <= THUMBNAIL_MAX_BYTES:
            return result.stdout
        smallest = len(result.stdout)
    raise PreviewUnavailable(
        f"the thumbnail is {smallest} bytes even at the lowest quality "
        f"(limit {THUMBNAIL_MAX_BYTES})"
    )


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > TEXT_MAX_BYTES:
        raise PreviewUnavailable(f"{size} bytes is over the {TEXT_MAX_BYTES}-byte preview limit")
    return path.read_bytes().decode("utf-8")


def _alt_text(label: str) -> str:
    # Markdown alt text ends at `]`; artifact names are tame, but a set member's file name is not
    # ours to trust.
    return re.sub(r"[^\w .\-/]", "_", label)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)
