"""Source refs, partition keys and artifact refs: what is accepted, and nothing escapes the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ergot_dagster.refs import (
    InvalidRefError,
    artifact_ref,
    parse_artifact_ref,
    partition_key_to_ref,
    ref_for_path,
    ref_to_partition_key,
    resolve_under_root,
    validate_source_ref,
)

ODD_REFS = [
    "camA/2026-11-24/take 01.mov",
    "camB/interview, prise 3 — café.mov",
    "x/a...b.mov",
    "x/50%/[draft] take|2.mov",
    "日本/撮影 ①.mp4",
    "x/%2C literally.mov",
    "x/a..b.mov",
]


@pytest.mark.parametrize("ref", ODD_REFS)
def test_partition_key_round_trips_and_avoids_ui_syntax(ref: str) -> None:
    key = ref_to_partition_key(ref)
    assert partition_key_to_ref(key) == ref
    assert "," not in key and "..." not in key and "[" not in key and "|" not in key


def test_only_the_rules_own_escapes_are_decoded() -> None:
    assert partition_key_to_ref("a%20b.mov") == "a%20b.mov"
    assert partition_key_to_ref("a%2Cb.mov") == "a,b.mov"


def test_ordinary_refs_are_their_own_keys() -> None:
    for ref in ["camA/2026-11-24/take 01.mov", "日本/撮影 ①.mp4", "a/b-c_d.e.wav"]:
        assert ref_to_partition_key(ref) == ref


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("/etc/passwd", "absolute"),
        ("../outside.mov", "'..'"),
        ("a/../../outside.mov", "'..'"),
        ("a/./b.mov", "'.'"),
        ("a//b.mov", "empty path segment"),
        ("a/b\x00.mov", "U+0000"),
        ("a/b\n.mov", "U+000A"),
        ("a/b\x1b.mov", "U+001B"),
        ("", "empty"),
        ("x" * 1025, "1024"),
    ],
)
def test_unsafe_refs_are_refused_with_the_reason(ref: str, reason: str) -> None:
    with pytest.raises(InvalidRefError, match=reason.replace("+", r"\+").replace(".", r"\.")):
        validate_source_ref(ref)


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    outside = tmp_path / "secret.mov"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "inside" / "link.mov")
    os.symlink(tmp_path, root / "dirlink")
    with pytest.raises(InvalidRefError, match="outside the ingest root"):
        resolve_under_root(root, "inside/link.mov")
    with pytest.raises(InvalidRefError, match="outside the ingest root"):
        resolve_under_root(root, "dirlink/secret.mov")


def test_symlink_inside_the_root_resolves(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "real.mov").write_bytes(b"x")
    os.symlink(root / "real.mov", root / "alias.mov")
    assert resolve_under_root(root, "alias.mov") == (root / "real.mov").resolve()


def test_ref_for_path_is_relative_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a b").mkdir(parents=True)
    assert ref_for_path(root, root / "a b" / "c.mov") == "a b/c.mov"
    with pytest.raises(InvalidRefError, match="not inside the ingest root"):
        ref_for_path(root, tmp_path / "elsewhere.mov")
    with pytest.raises(InvalidRefError, match="not inside the ingest root"):
        ref_for_path(root, root / ".." / "elsewhere.mov")


def test_artifact_refs() -> None:
    ref = artifact_ref("3f0c2a1e-1234-4abc-9def-0123456789ab", "poster")
    assert ref == "artifact:3f0c2a1e-1234-4abc-9def-0123456789ab/poster"
    assert parse_artifact_ref(ref) == ("3f0c2a1e-1234-4abc-9def-0123456789ab", "poster")
    for bad in ["artifact:../x/poster", "artifact:abc/../../etc", "poster", "artifact:run/Po/ster"]:
        with pytest.raises(InvalidRefError):
            parse_artifact_ref(bad)
