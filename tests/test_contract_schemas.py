"""The contract is versioned: its exported schemas and queries match the code, and a change to
either without a new `CONTRACT_VERSION` fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from ergot_dagster.client import schemas
from ergot_dagster.client.models import CONTRACT_VERSION, RunStatus


def test_docs_contract_holds_the_current_schemas_and_queries() -> None:
    assert schemas.problems() == []
    lock = json.loads(schemas.LOCK_FILE.read_text())
    assert CONTRACT_VERSION in lock
    for path in schemas.SCHEMA_DIR.glob("*.json"):
        assert json.loads(path.read_text())["x-contract-version"] == CONTRACT_VERSION


class _RunStatusWithMore(RunStatus):
    """RunStatus as someone might change it: one field more."""

    cost_eur: float | None = Field(default=None)


def test_a_model_change_without_a_new_version_is_caught(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(schemas.CONTRACT_MODELS, "RunStatus", _RunStatusWithMore)
    found = schemas.problems()
    assert any("changed but CONTRACT_VERSION is still" in p for p in found)
    assert any("RunStatus.json is not what the contract exports" in p for p in found)
    # Writing refuses to re-lock the same version with other schemas...
    lock = tmp_path / "schemas.lock"
    lock.write_text(schemas.LOCK_FILE.read_text())
    with pytest.raises(SystemExit, match="bump"):
        schemas.write(tmp_path / "schemas", lock, tmp_path / "queries")
    # ...and accepts them under a new version, keeping the old version's entry.
    monkeypatch.setattr(schemas, "CONTRACT_VERSION", "99.0.0")
    schemas.write(tmp_path / "schemas", lock, tmp_path / "queries")
    written = json.loads(lock.read_text())
    assert written[CONTRACT_VERSION] == json.loads(schemas.LOCK_FILE.read_text())[CONTRACT_VERSION]
    assert written["99.0.0"] != written[CONTRACT_VERSION]


def test_a_query_change_without_a_new_version_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemas.Q, "RUN_STATE", schemas.Q.RUN_STATE.replace("status", "status\n"))
    assert any("changed but CONTRACT_VERSION is still" in p for p in schemas.problems())
