"""Scale of the catalog: N source assets registered on PostgreSQL, then what consumers and
operators do against it.

Registration is ingest's own recording step (`record_sources`: the dynamic partitions, then the
runless materializations of `ergot/source`, one per file carrying its record, written to the event
storage 1,000 at a time), in calls of 1,000.
The records are built from one real clip probed once and given distinct refs and sha256s: the
hashing and probing of 100,000 real files is what the ingest benchmark measures per file, and
would only make this one take hours. One more real clip is ingested with `ergot ingest` and gets
two real runs (`poster_extraction`, `media_qc`) through the queue, so that listing has something
to find among the 100,000.

Then, against `dagster dev` on that instance: the client's `list_runs(source_ref=...)` plus
`artifacts()` of each run; GraphQL for one partition's latest materialization and for the
partition status of a whole asset (`ergot/source`, and `core/poster_extraction/poster` which has
one materialized partition of N); and the Dagster UI's asset pages in headless Chromium.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchError,
    RssSampler,
    Section,
    dagster_dev,
    load_average,
    make_clips,
    make_plane,
    median,
    now_utc,
    postgres_database,
)

BATCH = 1000
# Sources recorded through ingest's own path before the rest go in batches.
INGEST_PATH_SAMPLE = 2000
CHROMIUM = Path("/usr/bin/chromium")
UI_TIMEOUT_S = 180
REPEATS = 5

ONE_PARTITION = """
query OnePartition($path: [String!]!, $key: String!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode { assetMaterializations(partitions: [$key], limit: 1) { runId timestamp } }
  }
}
"""

PARTITION_STATUS = """
query PartitionStatus($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode {
      partitionStats { numMaterialized numPartitions numFailed numMaterializing }
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions }
      }
    }
  }
}
"""


def _records(template: Any, first: int, last: int) -> list[Any]:
    from ergot_dagster.refs import ref_to_partition_key

    records = []
    for index in range(first, last):
        ref = f"scale/cam{index % 100:02d}/take_{index:06d}.mov"
        records.append(
            template.model_copy(
                update={
                    "ref": ref,
                    "partition_key": ref_to_partition_key(ref),
                    "sha256": hashlib.sha256(ref.encode()).hexdigest(),
                }
            )
        )
    return records


def _record_in_batches(instance: Any, records: list[Any]) -> None:
    """The same partitions and materializations as `record_sources`, written by Dagster's event
    batching (`DAGSTER_EVENT_BATCH_SIZE`: one INSERT per batch instead of one per event)."""
    from dagster._core.events import (
        DagsterEvent,
        DagsterEventBatchMetadata,
        DagsterEventType,
        StepMaterializationData,
    )
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    from ergot_dagster.sources.record import SOURCE_PARTITIONS_NAME

    instance.add_dynamic_partitions(SOURCE_PARTITIONS_NAME, [r.partition_key for r in records])
    batch_id = uuid.uuid4().hex
    for index, record in enumerate(records):
        instance.report_dagster_event(
            DagsterEvent(
                event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
                event_specific_data=StepMaterializationData(record.materialization()),
                job_name=RUNLESS_JOB_NAME,
            ),
            run_id=RUNLESS_RUN_ID,
            batch_metadata=DagsterEventBatchMetadata(batch_id, index == len(records) - 1),
        )


def _register(instance: Any, template: Any, count: int, sample: int) -> dict[str, Any]:
    """Record `count` synthetic sources: the first `sample` through ingest's own path
    (`record_sources`), the rest through Dagster's batched writes (`DAGSTER_EVENT_BATCH_SIZE`)."""
    from ergot_dagster.sources.record import record_sources

    sample = min(sample, count)
    started = time.monotonic()
    for first in range(0, sample, BATCH):
        record_sources(instance, _records(template, first, min(first + BATCH, sample)))
    ingest_path_s = time.monotonic() - started
    print(f"  catalog: {sample} sources by ingest's path in {ingest_path_s:.0f} s", flush=True)
    os.environ["DAGSTER_EVENT_BATCH_SIZE"] = str(BATCH)
    try:
        batched = time.monotonic()
        for first in range(sample, count, BATCH):
            _record_in_batches(instance, _records(template, first, min(first + BATCH, count)))
            done = min(first + BATCH, count)
            if (done // BATCH) % 10 == 0:
                print(f"  catalog: {done} sources registered", flush=True)
        batched_s = time.monotonic() - batched
    finally:
        del os.environ["DAGSTER_EVENT_BATCH_SIZE"]
    last = _records(template, count - 1, count)[0]
    return {
        "total_s": time.monotonic() - started,
        "sample": sample,
        "ingest_path_s": ingest_path_s,
        "batched": count - sample,
        "batched_s": batched_s,
        "last_ref": last.ref,
        "last_sha": last.sha256,
    }


def _gql(url: str, query: str, variables: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    answer = httpx.post(
        f"{url}/graphql", json={"query": query, "variables": variables}, timeout=600
    ).json()
    elapsed = time.monotonic() - started
    if answer.get("errors"):
        raise BenchError(f"GraphQL error: {answer['errors'][0].get('message')}")
    return elapsed, answer["data"]["assetNodeOrError"]


def _ui(url: str, last_sha: str, partitions: int) -> dict[str, float | str]:
    """Seconds until the asset page shows the latest record, and until its partitions view
    shows the count of materialized partitions."""
    if not CHROMIUM.exists():
        return {"ui": f"not measured: {CHROMIUM} is missing"}
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    found: dict[str, float | str] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            context.add_init_script("window.localStorage.setItem('communityNux', '1')")
            page = context.new_page()
            # A first visit loads the UI's JavaScript; the timed visits below find it cached.
            page.goto(f"{url}/asset-groups", timeout=UI_TIMEOUT_S * 1000)
            page.get_by_text("ergot", exact=True).first.wait_for(timeout=UI_TIMEOUT_S * 1000)
            checks = [
                ("ui_asset_page_s", f"{url}/assets/ergot/source", last_sha),
                (
                    "ui_partitions_view_s",
                    f"{url}/assets/ergot/source?view=partitions",
                    re.compile(rf"^Materialized \(({partitions:,}|{partitions})\)$"),
                ),
            ]
            for name, address, text in checks:
                started = time.monotonic()
                try:
                    page.goto(address, timeout=UI_TIMEOUT_S * 1000)
                    page.get_by_text(text).first.wait_for(timeout=UI_TIMEOUT_S * 1000)
                    found[name] = round(time.monotonic() - started, 2)
                except PlaywrightError as exc:
                    found[name] = f"did not render within {UI_TIMEOUT_S} s ({type(exc).__name__})"
        finally:
            browser.close()
    return found


def run(sources: int = 100_000, workdir: Path | None = None) -> Section:
    """Run the catalog benchmark (needs PostgreSQL) and return its section of the document."""
    started, load = now_utc(), load_average()
    root = Path(tempfile.mkdtemp(prefix="bench-catalog-", dir=workdir))
    try:
        with ExitStack() as stack:
            pg_url = stack.enter_context(postgres_database())
            plane = make_plane(root, postgres_url=pg_url)
            clips = make_clips(plane.ingest / "real", 1, 4.0, "640x360")
            plane.ergot("ingest", "real")
            real_ref = f"real/{clips[0].name}"
            with plane.environment():
                from dagster import DagsterInstance

                from ergot_dagster.sources.record import latest_source_record

                instance = stack.enter_context(DagsterInstance.from_config(str(plane.dagster_home)))
                template = latest_source_record(instance, real_ref)
                if template is None:
                    raise BenchError("the real clip was not recorded by ergot ingest")
                reg = _register(instance, template, sources, INGEST_PATH_SAMPLE)
            sampler = stack.enter_context(RssSampler())
            t0 = time.monotonic()
            url = stack.enter_context(dagster_dev(plane, sampler))
            startup_s = time.monotonic() - t0
            from ergot_dagster.client import ErgotClient

            client = stack.enter_context(ErgotClient(url, timeout_s=600))
            for workflow in ("poster_extraction", "media_qc"):
                handle = client.submit(
                    {
                        "request_id": f"cat-{uuid.uuid4()}",
                        "workflow": workflow,
                        "sources": {"primary": real_ref},
                    }
                )
                status = client.wait(handle.run_id, timeout_s=600)
                if status.status != "SUCCESS":
                    raise BenchError(f"{workflow} on {real_ref} ended {status.status}")

            list_times, counts = [], (0, 0)
            for _ in range(REPEATS):
                t0 = time.monotonic()
                page = client.list_runs(source_ref=real_ref, limit=100)
                manifests = [m for r in page.runs for m in client.artifacts(r.run_id)]
                list_times.append(time.monotonic() - t0)
                counts = (len(page.runs), len(manifests))
            if counts != (2, 3):
                raise BenchError(f"listing found {counts[0]} runs and {counts[1]} artifacts")

            one_times = []
            for _ in range(REPEATS):
                elapsed, node = _gql(
                    url, ONE_PARTITION, {"path": ["ergot", "source"], "key": reg["last_ref"]}
                )
                one_times.append(elapsed)
            if not node["assetMaterializations"]:
                raise BenchError(f"no materialization found for {reg['last_ref']}")
            status_times: dict[str, list[float]] = {"source": [], "poster": []}
            stats: dict[str, Any] = {}
            for name, path in (
                ("source", ["ergot", "source"]),
                ("poster", ["core", "poster_extraction", "poster"]),
            ):
                for _ in range(REPEATS):
                    elapsed, node = _gql(url, PARTITION_STATUS, {"path": path})
                    status_times[name].append(elapsed)
                stats[name] = node["partitionStats"]
            ui = _ui(url, reg["last_sha"], sources + 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    total = sources + 1
    src, poster = stats["source"], stats["poster"]
    ui_rows = "\n".join(
        f"| UI: {label} | {ui[key]} s |"
        if isinstance(ui.get(key), float)
        else f"| UI: {label} | {ui.get(key, ui.get('ui'))} |"
        for key, label in (
            ("ui_asset_page_s", "`/assets/ergot/source` until the latest record's sha256 shows"),
            ("ui_partitions_view_s", "its partitions view until the materialized count shows"),
        )
    )
    body = f"""
{sources:,} synthetic sources plus one real clip ({total:,} partitions of `source_assets`) on
PostgreSQL. Medians of {REPEATS} tries each.

| what | time |
| --- | --- |
| register the first {reg["sample"]:,} through ingest's path (`record_sources`, batched writes of its own) | {reg["ingest_path_s"]:.0f} s ({reg["sample"] / reg["ingest_path_s"]:.0f} sources/s; {sources:,} this way would take {sources / (reg["sample"] / reg["ingest_path_s"]) / 60:.0f} min) |
| register the other {reg["batched"]:,} with Dagster's batched event writes ({BATCH:,} per INSERT) | {reg["batched_s"]:.0f} s ({reg["batched"] / max(reg["batched_s"], 1e-9):.0f} sources/s) |
| `dagster dev` start until the code location is loaded | {startup_s:.1f} s |
| client: `list_runs(source_ref=...)` + `artifacts()` of its 2 runs (3 manifests) | {median(list_times):.2f} s |
| GraphQL: one partition's latest materialization of `ergot/source` | {median(one_times):.2f} s |
| GraphQL: partition status of `ergot/source` ({src["numMaterialized"]:,} of {src["numPartitions"]:,} materialized) | {median(status_times["source"]):.2f} s |
| GraphQL: partition status of `core/poster_extraction/poster` ({poster["numMaterialized"]} of {poster["numPartitions"]:,}) | {median(status_times["poster"]):.2f} s |
{ui_rows}

Peak RSS: {sampler.table()}.
"""  # noqa: E501
    figures: dict[str, Any] = {
        "sources": sources,
        "register_s": round(reg["total_s"], 1),
        "ingest_path_per_s": round(reg["sample"] / reg["ingest_path_s"], 1),
        "batched_per_s": round(reg["batched"] / reg["batched_s"], 1) if reg["batched"] else 0.0,
        "dev_startup_s": round(startup_s, 2),
        "client_list_s": round(median(list_times), 3),
        "graphql_one_partition_s": round(median(one_times), 3),
        "graphql_source_status_s": round(median(status_times["source"]), 3),
        "graphql_poster_status_s": round(median(status_times["poster"]), 3),
        **{k: v for k, v in ui.items() if isinstance(v, float)},
    }
    for role in ("daemon", "webserver", "run worker"):
        if role in sampler.peaks:
            figures[f"{role.replace(' ', '_')}_rss_mib"] = round(sampler.peaks[role] / 2**20, 1)
    return Section(
        name="catalog",
        title="4. Scale of the catalog",
        body=body,
        started=started,
        load=load,
        figures=figures,
    )
