"""Shared fixtures: a private plane (instance, store, ingest root) per test, on real parts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings

SQLITE_INSTANCE = "telemetry:\n  enabled: false\n"


@pytest.fixture
def plane_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ErgotSettings:
    """Environment for one isolated plane: SQLite instance, local store, empty ingest root."""
    home = tmp_path / "ergot"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text(SQLITE_INSTANCE)
    (home / "ingest").mkdir()
    monkeypatch.setenv("ERGOT_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("ERGOT_STORAGE", str(home / "artifacts"))
    monkeypatch.setenv("ERGOT_INGEST_ROOT", str(home / "ingest"))
    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(PROJECT_ROOT / "workflow_defs"))
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(PROJECT_ROOT / "runtime_targets.yaml"))
    # Transient failures are still retried, but tests need not wait seconds between attempts.
    monkeypatch.setenv("ERGOT_STEP_RETRY_DELAY_S", "0.2")
    return ErgotSettings.from_env()


@pytest.fixture
def instance(plane_settings: ErgotSettings) -> Iterator[DagsterInstance]:
    with DagsterInstance.from_config(str(plane_settings.dagster_home)) as inst:
        yield inst


@pytest.fixture
def ingest_root(plane_settings: ErgotSettings) -> Path:
    return Path(plane_settings.ingest_root)


def subprocess_env(plane: ErgotSettings) -> dict[str, str]:
    """The environment a child process (the `ergot` command, dagster) needs for this plane."""
    env = dict(os.environ)
    env.update(
        {
            "ERGOT_HOME": str(plane.home),
            "DAGSTER_HOME": str(plane.dagster_home),
            "ERGOT_STORAGE": plane.storage,
            "ERGOT_INGEST_ROOT": plane.ingest_root,
            "ERGOT_WORKFLOW_DEFS": str(plane.workflow_defs),
            "ERGOT_RUNTIME_TARGETS": str(plane.runtime_targets),
            "ERGOT_STEP_RETRY_DELAY_S": os.environ.get("ERGOT_STEP_RETRY_DELAY_S", "0.2"),
        }
    )
    return env
