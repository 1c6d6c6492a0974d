"""Source refs, the partition keys made from them, and artifact refs.

A source ref is a file's path relative to the ingest root, in POSIX form
(`camA/2026-11-24/take 01.mov`). It is the identity of a piece of Ergot-managed media and, through
one reversible rule, the partition key of `ergot/source`.

Dagster accepts any string as a dynamic partition key, but its UI reads `,` as a list separator,
`...` as a range and `[`/`]` as range brackets, and `|` is the multi-partition delimiter. Those
characters (and `%` itself, to keep the rule reversible) are percent-encoded; every other character
stays as it is, so ordinary refs are their own keys.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path, PurePosixPath

MAX_REF_LENGTH = 1024

# Percent-encoded in partition keys. `%` must come first so that decoding is unambiguous.
_KEY_ESCAPES = {"%": "%25", ",": "%2C", "[": "%5B", "]": "%5D", "|": "%7C"}
_DOT_RUN = re.compile(r"\.{3,}")
# Only the escapes `ref_to_partition_key` writes are decoded, so the rule is a true inverse.
_ESCAPED = re.compile(r"%(25|2C|5B|5D|7C|2E)")

ARTIFACT_REF_PREFIX = "artifact:"
_ARTIFACT_REF = re.compile(
    r"^artifact:(?P<run_id>[0-9a-f][0-9a-f-]{7,63})/(?P<name>[a-z][a-z0-9_]{0,63})$"
)


class InvalidRefError(ValueError):
    """A source ref, partition key or artifact ref that cannot be accepted; the message says why."""


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc"


def validate_source_ref(ref: str) -> str:
    """Return `ref` if it is an acceptable source ref, else raise `InvalidRefError` saying why.

    Acceptable: a relative POSIX path with no empty, `.` or `..` segments, no NUL or other control
    character, at most 1024 characters. Whether it resolves inside a root is checked separately by
    `resolve_under_root`, which also follows symlinks.
    """
    if not isinstance(ref, str) or ref == "":
        raise InvalidRefError("source ref is empty")
    if len(ref) > MAX_REF_LENGTH:
        raise InvalidRefError(
            f"source ref is {len(ref)} characters long; the limit is {MAX_REF_LENGTH}"
        )
    for ch in ref:
        if _is_control(ch):
            raise InvalidRefError(
                f"source ref {ref!r} contains the control character U+{ord(ch):04X}"
            )
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise InvalidRefError(f"source ref {ref!r} is not valid UTF-8")
    if ref.startswith("/"):
        raise InvalidRefError(
            f"source ref {ref!r} is absolute; refs are relative to the ingest root"
        )
    if "\\" in ref and re.match(r"^[A-Za-z]:\\", ref):
        raise InvalidRefError(f"source ref {ref!r} is an absolute Windows path")
    parts = ref.split("/")
    for part in parts:
        if part == "":
            raise InvalidRefError(f"source ref {ref!r} has an empty path segment")
        if part in (".", ".."):
            raise InvalidRefError(f"source ref {ref!r} contains a {part!r} segment")
    return ref


def resolve_under_root(root: Path, ref: str, *, must_exist: bool = True) -> Path:
    """Return the real path of `ref` under `root`, refusing anything that escapes it.

    Symlinks are followed before the check, so a link inside the root that points outside it is
    refused just like `../x` would be.
    """
    validate_source_ref(ref)
    real_root = root.resolve(strict=True)
    candidate = real_root.joinpath(*PurePosixPath(ref).parts)
    try:
        resolved = candidate.resolve(strict=must_exist)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"source ref {ref!r} does not exist under {root}") from exc
    if not resolved.is_relative_to(real_root):
        raise InvalidRefError(f"source ref {ref!r} resolves outside the ingest root {root}")
    return resolved


def ref_for_path(root: Path, path: Path) -> str:
    """The source ref of `path`, which must lie under `root`.

    Directories on the way are resolved (the root may itself be reached through a symlink) but the
    file's own name is kept, so a symlink inside the root keeps its name as its ref;
    `resolve_under_root` then checks where it points.
    """
    real_root = root.resolve(strict=True)
    absolute = Path(os.path.normpath(Path(path).absolute()))
    base = absolute.parent.resolve() / absolute.name
    if base == real_root or not base.is_relative_to(real_root):
        raise InvalidRefError(f"{path} is not inside the ingest root {root}")
    return validate_source_ref(base.relative_to(real_root).as_posix())


def ref_to_partition_key(ref: str) -> str:
    """Map a source ref to its partition key (identity for ordinary refs)."""
    validate_source_ref(ref)
    key = "".join(_KEY_ESCAPES.get(ch, ch) for ch in ref)
    return _DOT_RUN.sub(lambda m: "%2E" * len(m.group(0)), key)


def partition_key_to_ref(key: str) -> str:
    """Inverse of `ref_to_partition_key`."""
    ref = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), key)
    validate_source_ref(ref)
    return ref


def artifact_ref(run_id: str, name: str) -> str:
    """The stable ref of the artifact `name` produced by run `run_id`."""
    ref = f"{ARTIFACT_REF_PREFIX}{run_id}/{name}"
    parse_artifact_ref(ref)
    return ref


def parse_artifact_ref(ref: str) -> tuple[str, str]:
    """Split an artifact ref into (run_id, artifact name), refusing anything malformed."""
    match = _ARTIFACT_REF.match(ref or "")
    if not match:
        raise InvalidRefError(
            f"{ref!r} is not an artifact ref; artifact refs look like 'artifact:<run id>/<name>'"
        )
    return match.group("run_id"), match.group("name")


def is_artifact_ref(ref: str) -> bool:
    return ref.startswith(ARTIFACT_REF_PREFIX)


LIBRARY_REF_PREFIX = "library:"
_LIBRARY_REF = re.compile(
    r"^library:(?P<library>[a-z][a-z0-9_-]{0,63})/(?P<name>[a-z0-9][a-z0-9._-]{0,127})$"
)


def library_ref(library: str, name: str) -> str:
    """The ref of entry `name` in `library`, e.g. `library:voices/narrator-01`."""
    ref = f"{LIBRARY_REF_PREFIX}{library}/{name}"
    parse_library_ref(ref)
    return ref


def parse_library_ref(ref: str) -> tuple[str, str]:
    """Split a library ref into (library, entry name), refusing anything malformed."""
    match = _LIBRARY_REF.match(ref or "")
    if not match or ".." in match.group("name"):
        raise InvalidRefError(
            f"{ref!r} is not a library ref; library refs look like 'library:<library>/<name>' "
            "(lowercase letters, digits, '-', '_' and '.')"
        )
    return match.group("library"), match.group("name")


def is_library_ref(ref: str) -> bool:
    return ref.startswith(LIBRARY_REF_PREFIX)


def ref_kind(ref: str) -> str:
    """`artifact`, `library` or `source`: what a ref given as an input names."""
    if is_artifact_ref(ref):
        return "artifact"
    if is_library_ref(ref):
        return "library"
    return "source"


def validate_input_ref(ref: str) -> str:
    """Return `ref` if it is a well-formed source, artifact or library ref, else raise."""
    kind = ref_kind(ref)
    if kind == "artifact":
        parse_artifact_ref(ref)
    elif kind == "library":
        parse_library_ref(ref)
    else:
        validate_source_ref(ref)
    return ref


def expand_library_shorthand(ref: str, library: str | None) -> str:
    """`voices/narrator-01` for an input that takes the `voices` library means its entry."""
    if library and ref.startswith(f"{library}/") and ref.count("/") == 1:
        return f"{LIBRARY_REF_PREFIX}{ref}"
    return ref
