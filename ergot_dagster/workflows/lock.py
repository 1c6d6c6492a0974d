"""The version lock: the content hash of every published workflow version.

A published version is immutable. The lock, kept in the repository beside the definitions, records
a sha256 of each published file's content (its parsed YAML in canonical JSON, so re-indenting or
editing a comment does not count as a change, but any change to the definition does).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

LOCK_FILENAME = "workflows.lock"


class LockEntry(BaseModel):
    """One published version."""

    family: str
    path: str = Field(description="the definition file, relative to the definitions directory")
    sha256: str


class WorkflowLock(BaseModel):
    """Every published version, keyed `name@version`."""

    lock_version: int = 1
    published: dict[str, LockEntry] = Field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> WorkflowLock:
        if not path.exists():
            return cls()
        return cls.model_validate_json(path.read_text())

    def write(self, path: Path) -> None:
        body = (
            json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False)
            + "\n"
        )
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lock-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def content_hash(data: Any) -> str:
    """sha256 of a parsed definition in canonical JSON."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
