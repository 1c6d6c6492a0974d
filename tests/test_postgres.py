"""The instance on the machine's real PostgreSQL: ingest, a workflow run and lineage.

Uses the repository's `deploy/dagster.postgres.yaml` unchanged, pointed at a fresh database
through `ERGOT_PG_URL`; the database is dropped afterwards. Skipped only when no PostgreSQL server
answers on 127.0.0.1:5432 (set ERGOT_TEST_PG_ADMIN_URL to use another server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from dagster import DagsterInstance

from ergot_dagster.media.synth import make_audio, make_clip
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import (
    SOURCE_KEY,
    SourceRecordLookup,
    latest_source_record,
    latest_source_records,
    record_sources,
)
from tests.conftest import subprocess_env
from tests.support import fresh_database

pytestmark = pytest.mark.postgres

ADMIN_URL = os.environ.get(
    "ERGOT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ERGOT = str(Path(sys.executable).parent / "ergot")


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database("ergot_test") as url:
        yield url


def test_ingest_and_run_on_postgres(
    plane_settings: ErgotSettings, ingest_root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (plane_settings.dagster_home / "dagster.yaml").write_text(
        (PROJECT_ROOT / "deploy" / "dagster.postgres.yaml").read_text()
    )
    monkeypatch.setenv("ERGOT_PG_URL", pg_url)
    env = {**subprocess_env(plane_settings), "ERGOT_PG_URL": pg_url}
    make_clip(ingest_root / "pg" / "take 1.mov", duration=2.0)

    def ergot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ERGOT, *args], env=env, capture_output=True, text=True, timeout=300)

    assert ergot("ingest", str(ingest_root / "pg")).returncode == 0
    ran = ergot("run", "media_qc", "pg/take 1.mov", "--json")
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["run_id"]

    with DagsterInstance.from_config(str(plane_settings.dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status.value == "SUCCESS"
        assert latest_source_record(instance, "pg/take 1.mov") is not None

    # The records are really in that database.
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = "
            "'ASSET_MATERIALIZATION'",
            (run_id,),
        )
        assert cur.fetchone() == (1,)
    lineage = ergot("lineage", f"artifact:{run_id}/report")
    assert lineage.returncode == 0 and "[current]" in lineage.stdout


def test_a_folder_is_recorded_in_one_batch_on_postgres(
    plane_settings: ErgotSettings, ingest_root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL's event storage writes a batch in one statement, unlike SQLite's: each file
    # still gets its own materialization, with its own record, as its partition's latest.
    (plane_settings.dagster_home / "dagster.yaml").write_text(
        (PROJECT_ROOT / "deploy" / "dagster.postgres.yaml").read_text()
    )
    monkeypatch.setenv("ERGOT_PG_URL", pg_url)
    for index in range(5):
        make_audio(ingest_root / "pg" / f"tone {index}.wav", duration=0.2, tone_hz=500.0 + index)
    refs = [f"pg/tone {index}.wav" for index in range(5)]
    with DagsterInstance.from_config(str(plane_settings.dagster_home)) as instance:
        outcomes = ingest_refs(
            ingest_root,
            refs,
            SourceRecordLookup(instance, refs),
            record=lambda records: record_sources(instance, records),
        )
        assert [o.status for o in outcomes] == ["new"] * 5
        assert set(instance.get_materialized_partitions(SOURCE_KEY)) == set(refs)
        latest = latest_source_records(instance, refs)
        for outcome in outcomes:
            assert latest[outcome.ref] == outcome.record
            assert latest_source_record(instance, outcome.ref) == outcome.record
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
        )
        assert cur.fetchone() == (5,)
