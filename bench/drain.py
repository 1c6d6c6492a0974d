"""Queue drain: N queued requests with mixed priorities over two runtime targets with concurrency
limits, drained by the daemon.

The plane runs on PostgreSQL (SQLite when no server answers) with a targets file of two ffmpeg
targets, `bench-a` (4 runs at a time) and `bench-b` (2). With only the webserver up, N
`poster_extraction` requests on tiny clips are submitted through the client (four threads), each
naming one of the targets and a priority from -10 to 50; 2 % are submitted twice (the same
request id). Then the daemon starts and drains the queue. The checks read the event log and the
runs: each target's limit and `max_concurrent_runs` never exceeded (runs counted from
RUN_STARTING to their end, as the queue counts them), no run started while a run of higher
priority for the same target had been waiting longer, every request has exactly one run, and
every run succeeded.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    BenchError,
    RssSampler,
    Section,
    daemon,
    load_average,
    make_clips,
    make_plane,
    now_utc,
    postgres_available,
    postgres_database,
    webserver,
)

TARGETS = {"bench-a": 4, "bench-b": 2}
PRIORITIES = (-10, 0, 0, 5, 10, 50)
MAX_CONCURRENT_RUNS = 8
CAPABILITIES = [
    "video.decode",
    "video.encode.h264",
    "audio.decode",
    "audio.encode",
    "audio.loudness",
    "image.encode",
]
SEED = 8
# Runs launched this close together came from the same pass of the queue.
SAME_PASS_S = 1.0
CLIENT_THREADS = 4


def _targets_file(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": name,
                        "runtime": "ffmpeg",
                        "capabilities": CAPABILITIES,
                        "locality": {"kind": "local"},
                        "concurrency": limit,
                    }
                    for name, limit in TARGETS.items()
                ]
            }
        )
    )
    return path


def _requests(count: int, refs: list[str]) -> list[dict[str, Any]]:
    chooser = random.Random(SEED)
    return [
        {
            "request_id": f"drain-{index:05d}-{uuid.uuid4().hex[:6]}",
            "workflow": "poster_extraction",
            "sources": {"primary": refs[index % len(refs)]},
            "priority": chooser.choice(PRIORITIES),
            "execution_target": chooser.choice(list(TARGETS)),
        }
        for index in range(count)
    ]


def _submit_all(url: str, requests: list[dict[str, Any]]) -> tuple[float, dict[str, str]]:
    """Submit every request (and 2 % of them again); (seconds, run id by request id)."""
    from ergot_dagster.client import ErgotClient

    local = threading.local()
    again = requests[::50]  # 2 %, submitted a second time

    def submit(request: dict[str, Any]) -> tuple[str, str, bool]:
        if not hasattr(local, "client"):
            local.client = ErgotClient(url, timeout_s=120)
        handle = local.client.submit(request)
        return request["request_id"], handle.run_id, handle.existing

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        answers = list(pool.map(submit, requests))
        repeats = list(pool.map(submit, again))
    elapsed = time.monotonic() - started
    runs = {rid: run for rid, run, _ in answers}
    for rid, run, existing in repeats:
        if not existing or runs[rid] != run:
            raise BenchError(f"resubmitting {rid} did not return its run {runs[rid]} ({run})")
    return elapsed, runs


def _event_times(instance: Any, kinds: list[Any]) -> dict[str, float]:
    """The first timestamp of any of `kinds` for each run (from the event log)."""
    found: dict[str, float] = {}
    for kind in kinds:
        cursor = None
        while True:
            result = instance.fetch_run_status_changes(kind, limit=1000, cursor=cursor)
            for record in result.records:
                stamp = record.timestamp
                run_id = record.run_id
                if run_id not in found or stamp < found[run_id]:
                    found[run_id] = stamp
            if not result.has_more:
                break
            cursor = result.cursor
    return found


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at once; one ending at the moment another starts is not open."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def _priority_inversions(runs: list[dict[str, Any]]) -> int:
    """Runs that started while a run of higher priority for the same target had been queued
    before them and was still waiting. Runs started within `SAME_PASS_S` of each other count as
    started together: with `dequeue_use_threads` the runs one pass of the queue picked (in
    priority order) are launched side by side, in no particular order."""
    inversions = 0
    by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_target[run["target"]].append(run)
    for group in by_target.values():
        for started in group:
            for other in group:
                if (
                    other["priority"] > started["priority"]
                    and other["enqueued"] < started["start"]
                    and other["start"] > started["start"] + SAME_PASS_S
                ):
                    inversions += 1
                    break
    return inversions


def _analyse(instance: Any, runs_by_request: dict[str, str], requests: list[dict[str, Any]]):
    from dagster import DagsterEventType, RunsFilter

    records = instance.get_runs(RunsFilter(tags={"ergot/workflow_name": "poster_extraction"}))
    per_request: dict[str, list[Any]] = defaultdict(list)
    for run in records:
        per_request[run.tags.get("ergot/request_id", "")].append(run)
    lost = [r["request_id"] for r in requests if not per_request.get(r["request_id"])]
    duplicated = [rid for rid, runs in per_request.items() if len(runs) > 1]
    failed = [run.run_id for run in records if run.status.value != "SUCCESS"]
    enqueued = _event_times(instance, [DagsterEventType.RUN_ENQUEUED])
    starting = _event_times(instance, [DagsterEventType.RUN_STARTING])
    ended = _event_times(
        instance,
        [DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED],
    )
    wanted = {r["request_id"]: r for r in requests}
    rows = []
    for run in records:
        rid = run.tags.get("ergot/request_id", "")
        if rid not in wanted or run.run_id not in starting or run.run_id not in ended:
            continue
        targets = [k.split(".", 1)[1] for k in run.tags if k.startswith("ergot/target.")]
        rows.append(
            {
                "run_id": run.run_id,
                "target": targets[0] if targets else "?",
                "priority": int(run.tags.get("dagster/priority", "0")),
                "enqueued": enqueued.get(run.run_id, 0.0),
                "start": starting[run.run_id],
                "end": ended[run.run_id],
            }
        )
    overlap = {
        name: _max_overlap([(r["start"], r["end"]) for r in rows if r["target"] == name])
        for name in TARGETS
    }
    overall = _max_overlap([(r["start"], r["end"]) for r in rows])
    return {
        "runs": len(records),
        "lost": lost,
        "duplicated": duplicated,
        "failed": failed,
        "rows": rows,
        "overlap": overlap,
        "overall": overall,
        "inversions": _priority_inversions(rows),
        "mismatched": [
            rid
            for rid, run in runs_by_request.items()
            if per_request.get(rid) and per_request[rid][0].run_id != run
        ],
    }


def run(queued: int = 1000, workdir: Path | None = None) -> Section:
    """Run the queue drain benchmark and return its section of the document."""
    started, load = now_utc(), load_average()
    root = Path(tempfile.mkdtemp(prefix="bench-queue-", dir=workdir))
    backend = "PostgreSQL" if postgres_available() else "SQLite"
    try:
        with ExitStack() as stack:
            pg_url = stack.enter_context(postgres_database()) if backend == "PostgreSQL" else None
            targets = _targets_file(root / "targets.yaml")
            plane = make_plane(
                root,
                postgres_url=pg_url,
                targets_file=targets,
                extra_env={"ERGOT_STEP_RETRY_DELAY_S": "0.2"},
            )
            clips = make_clips(plane.ingest / "q", 4, 1.0, "160x90")
            plane.ergot("ingest", "q")
            requests = _requests(queued, [f"q/{c.name}" for c in clips])
            sampler = stack.enter_context(RssSampler())
            with webserver(plane, sampler) as url:
                submit_s, runs_by_request = _submit_all(url, requests)
                print(f"  queue: {queued} requests submitted in {submit_s:.0f} s", flush=True)
                from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

                with plane.environment():
                    instance = stack.enter_context(
                        DagsterInstance.from_config(str(plane.dagster_home))
                    )
                queued_now = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
                daemon_started = time.time()
                with daemon(plane, sampler):
                    done_statuses = [
                        DagsterRunStatus.SUCCESS,
                        DagsterRunStatus.FAILURE,
                        DagsterRunStatus.CANCELED,
                    ]
                    deadline = time.monotonic() + max(600.0, queued * 6.0)
                    last_print = 0.0
                    while True:
                        done = instance.get_runs_count(RunsFilter(statuses=done_statuses))
                        if done >= queued:
                            break
                        if time.monotonic() > deadline:
                            raise BenchError(f"only {done} of {queued} runs ended in time")
                        if time.monotonic() - last_print > 60:
                            print(f"  queue: {done}/{queued} runs done", flush=True)
                            last_print = time.monotonic()
                        time.sleep(1.0)
                    drained_at = time.time()
                result = _analyse(instance, runs_by_request, requests)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = result["rows"]
    first_start = min(r["start"] for r in rows)
    last_end = max(r["end"] for r in rows)
    total_s = drained_at - daemon_started
    drain_s = last_end - first_start
    # How many runs were in progress on average, and how long one took from dequeue to end.
    mean_running = sum(r["end"] - r["start"] for r in rows) / drain_s
    run_median_s = sorted(r["end"] - r["start"] for r in rows)[len(rows) // 2]
    limits_ok = all(result["overlap"][n] <= TARGETS[n] for n in TARGETS) and (
        result["overall"] <= MAX_CONCURRENT_RUNS
    )
    clean = not (result["lost"] or result["duplicated"] or result["failed"] or result["mismatched"])
    by_priority: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        by_priority[r["priority"]].append(r["start"] - daemon_started)
    wait_rows = "\n".join(
        f"| {p} | {len(v)} | {sorted(v)[len(v) // 2]:.0f} s |"
        for p, v in sorted(by_priority.items(), reverse=True)
    )
    limit_text = ", ".join(
        f"{n}: at most {result['overlap'][n]} at once (limit {TARGETS[n]})" for n in TARGETS
    )
    body = f"""
{queued:,} `poster_extraction` requests on 1 s 160x90 clips, {backend} instance, targets
{", ".join(f"`{n}` (concurrency {c})" for n, c in TARGETS.items())}, `max_concurrent_runs`
{MAX_CONCURRENT_RUNS}, priorities drawn from {sorted(set(PRIORITIES))}. Submitted through the client
({CLIENT_THREADS} threads) in {submit_s:.0f} s ({queued / submit_s:.1f} requests/s) with no daemon
running ({queued_now:,} runs QUEUED); {len(requests[::50])} of them were submitted a second time
and got their first run back.

| | |
| --- | --- |
| total, daemon start → last run ended | **{total_s:.0f} s** ({queued / total_s:.2f} runs/s) |
| first run started → last run ended | {drain_s:.0f} s; {mean_running:.1f} runs in progress on average, each {run_median_s:.1f} s from RUN_STARTING to its end (median) |
| limits (event log: RUN_STARTING → end) | {limit_text}; all targets {result["overall"]} (limit {MAX_CONCURRENT_RUNS}): **{"never exceeded" if limits_ok else "EXCEEDED"}** |
| priority order | **{result["inversions"]}** runs started while a higher-priority run for their target had waited longer (and started over {SAME_PASS_S:g} s later) |
| lost / duplicated / failed | {len(result["lost"])} / {len(result["duplicated"])} / {len(result["failed"])} of {result["runs"]:,} runs: **{"nothing lost or duplicated" if clean else "PROBLEMS"}** |

Median start after the daemon started, by priority:

| priority | runs | median start |
| --- | --- | --- |
{wait_rows}

Peak RSS: {sampler.table()}.
"""  # noqa: E501
    figures: dict[str, Any] = {
        "queued": queued,
        "submit_s": round(submit_s, 1),
        "total_s": round(total_s, 1),
        "drain_s": round(drain_s, 1),
        "runs_per_s": round(queued / total_s, 3),
        "mean_running": round(mean_running, 2),
        "run_median_s": round(run_median_s, 2),
        "limits_ok": 1 if limits_ok else 0,
        "priority_inversions": result["inversions"],
        "lost": len(result["lost"]),
        "duplicated": len(result["duplicated"]),
        "failed": len(result["failed"]),
        **{f"max_running_{n.replace('-', '_')}": v for n, v in result["overlap"].items()},
    }
    for role in ("daemon", "webserver", "run worker"):
        if role in sampler.peaks:
            figures[f"{role.replace(' ', '_')}_rss_mib"] = round(sampler.peaks[role] / 2**20, 1)
    return Section(
        name="queue",
        title="5. Queue drain",
        body=body,
        started=started,
        load=load,
        figures=figures,
    )
