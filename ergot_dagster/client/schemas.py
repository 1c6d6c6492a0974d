"""The contract's JSON Schemas and GraphQL documents, exported to `docs/contract/` and locked.

The schemas go to `docs/contract/schemas/`, the GraphQL documents the client sends to
`docs/contract/queries/` (a consumer in another language sends the same text). The lock,
`docs/contract/schemas.lock`, maps each contract version to the sha256 of both. A version's entry
is written once: changing a model or a query without changing `CONTRACT_VERSION` makes the digest
disagree with the lock, and the tests (and `--write`) say so.

    python -m ergot_dagster.client.schemas --check   # exit 1 if docs/contract is stale
    python -m ergot_dagster.client.schemas --write   # after bumping CONTRACT_VERSION
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.lineage import LineageNode
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.client import queries as Q
from ergot_dagster.client.models import (
    CONTRACT_VERSION,
    EventPage,
    InboxOutcome,
    RunEvent,
    RunHandle,
    RunPage,
    RunStatus,
)
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.settings import PROJECT_ROOT

CONTRACT_DIR = PROJECT_ROOT / "docs" / "contract"
SCHEMA_DIR = CONTRACT_DIR / "schemas"
QUERY_DIR = CONTRACT_DIR / "queries"
LOCK_FILE = CONTRACT_DIR / "schemas.lock"

CONTRACT_MODELS: dict[str, type[BaseModel]] = {
    "ProcessingRequest": ProcessingRequest,
    "RunHandle": RunHandle,
    "RunStatus": RunStatus,
    "RunPage": RunPage,
    "RunEvent": RunEvent,
    "EventPage": EventPage,
    "ArtifactManifest": ArtifactManifest,
    "LineageNode": LineageNode,
    "LibraryEntry": LibraryEntry,
    "InboxOutcome": InboxOutcome,
}

QUERY_NAMES = [
    "LAUNCH",
    "RUN",
    "RUN_STATE",
    "RUNS",
    "RUN_EVENTS",
    "REEXECUTE",
    "TERMINATE",
    "ASSET_KEYS",
    "ASSET_METADATA",
    "SOURCE_RECORD",
    "ASSET_MATERIALIZATIONS",
    "RUNTIME_TARGETS",
    "ADD_PARTITION",
]


def schema_texts() -> dict[str, str]:
    """File name -> schema text, exactly as exported."""
    texts = {}
    for name, model in CONTRACT_MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://ergot.local/contract/{CONTRACT_VERSION}/{name}.json"
        schema["x-contract-version"] = CONTRACT_VERSION
        texts[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return texts


def query_texts() -> dict[str, str]:
    """File name -> GraphQL document, for every document the client sends."""
    texts = {}
    for name in QUERY_NAMES:
        document = getattr(Q, name).strip()
        operation = document.split("(")[0].split("{")[0].split()[-1]
        texts[f"{operation}.graphql"] = document + "\n"
    return texts


def digest(texts: dict[str, str], queries: dict[str, str]) -> str:
    """One sha256 over every schema and query, independent of the version stamped into them."""
    hasher = hashlib.sha256()
    for name in sorted(texts):
        body = json.loads(texts[name])
        body.pop("$id", None)
        body.pop("x-contract-version", None)
        hasher.update(name.encode() + b"\0")
        hasher.update(json.dumps(body, sort_keys=True).encode() + b"\0")
    for name in sorted(queries):
        hasher.update(name.encode() + b"\0" + queries[name].encode() + b"\0")
    return hasher.hexdigest()


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    return json.loads(path.read_text()) if path.exists() else {}


def problems(
    schema_dir: Path = SCHEMA_DIR, lock_file: Path = LOCK_FILE, query_dir: Path = QUERY_DIR
) -> list[str]:
    """What is out of date: the lock against the models, and the exported files against both."""
    texts = schema_texts()
    queries = query_texts()
    found: list[str] = []
    locked = read_lock(lock_file).get(CONTRACT_VERSION)
    current = digest(texts, queries)
    if locked is None:
        found.append(f"contract version {CONTRACT_VERSION} is not in {lock_file.name}; run --write")
    elif locked != current:
        found.append(
            f"the contract's schemas changed but CONTRACT_VERSION is still {CONTRACT_VERSION}: "
            "bump it in ergot_dagster/client/models.py, then run --write"
        )
    for folder, exported in ((schema_dir, texts), (query_dir, queries)):
        for name, text in exported.items():
            path = folder / name
            if not path.exists() or path.read_text() != text:
                found.append(f"{path} is not what the contract exports; run --write")
        for path in sorted(folder.glob("*.*")) if folder.exists() else []:
            if path.name not in exported:
                found.append(f"{path} is not part of the contract any more; delete it")
    return found


def write(
    schema_dir: Path = SCHEMA_DIR, lock_file: Path = LOCK_FILE, query_dir: Path = QUERY_DIR
) -> None:
    """Export schemas and queries and lock the current version; refuse to re-lock a version."""
    texts = schema_texts()
    queries = query_texts()
    lock = read_lock(lock_file)
    current = digest(texts, queries)
    if lock.get(CONTRACT_VERSION, current) != current:
        raise SystemExit(
            f"contract version {CONTRACT_VERSION} is locked with other schemas; bump "
            "CONTRACT_VERSION in ergot_dagster/client/models.py first"
        )
    schema_dir.mkdir(parents=True, exist_ok=True)
    query_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (schema_dir / name).write_text(text)
    for name, text in queries.items():
        (query_dir / name).write_text(text)
    lock[CONTRACT_VERSION] = current
    lock_file.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true")
    group.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.write:
        write()
        print(f"contract {CONTRACT_VERSION}: {len(CONTRACT_MODELS)} schemas in {SCHEMA_DIR}")
        return 0
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
