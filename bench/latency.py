"""Single-request latency: a consumer submits through `ErgotClient`, waits for SUCCESS and reads
the artifacts' manifests, on `dagster dev` (webserver, daemon with the queued run coordinator,
code server), with the instance on SQLite and on PostgreSQL.

The workflow is `poster_extraction` on a 2 s 320x180 clip, whose ffmpeg work takes a fraction of
a second. Its bare time is the same ffmpeg/ffprobe commands (recorded from an in-process run)
replayed by bash; the overhead of a request is its total time minus the bare median. Each
request's event log splits the total into phases (submission, queue, worker start, code
loading, the step, reporting back).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.batch import bare_script
from bench.common import (
    ERGOT,
    PROJECT_ROOT,
    BenchError,
    Plane,
    RssSampler,
    Section,
    dagster_dev,
    load_average,
    make_clips,
    make_plane,
    median,
    now_utc,
    percentile,
    postgres_available,
    postgres_database,
    recorded_calls,
    recorded_tools,
)

WORKFLOW = "poster_extraction"
TARGET_P50_S = 2.0
POLL_S = 0.1
PROFILE_HOOK = Path(__file__).resolve().parent / "profile_hook"

# Phases between consecutive moments of a request; each ends at the moment named on its right.
PHASES = [
    ("submit", "client submit() returned"),
    ("queued", "RUN_STARTING (dequeued by the daemon)"),
    ("worker start", "worker process up (python + dagster imports)"),
    ("code load", "RUN_START (code location loaded in the worker)"),
    ("run setup", "STEP_START"),
    ("step", "STEP_SUCCESS (includes the ffmpeg work)"),
    ("run end", "RUN_SUCCESS"),
    ("seen", "the client saw SUCCESS and read the manifests"),
]


def _moments(events: list[Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    for event in events:
        stamp = event.timestamp.timestamp()
        kind = event.type
        if kind == "RUN_STARTING":
            found.setdefault("queued", stamp)
        elif kind == "ENGINE_EVENT" and event.message.startswith("Started process for run"):
            found.setdefault("worker start", stamp)
        elif kind == "RUN_START":
            found.setdefault("code load", stamp)
        elif kind == "STEP_START":
            found.setdefault("run setup", stamp)
        elif kind == "STEP_SUCCESS":
            found["step"] = stamp
        elif kind == "RUN_SUCCESS":
            found["run end"] = stamp
    return found


def _bare_median(plane: Plane, clip: Path, root: Path, times: int) -> tuple[float, int]:
    """Record the workflow's commands with an in-process `ergot run`, replay them `times`."""
    with recorded_tools(root) as log:
        env = dict(plane.env, PATH=os.environ["PATH"])
        subprocess.run(
            [ERGOT, "run", WORKFLOW, f"lat/{clip.name}"], env=env, check=True, capture_output=True
        )
    calls = recorded_calls(log)
    script = root / "bare-latency.sh"
    script.write_text(bare_script(calls, clip, plane.home, root / "scratch"))
    samples = []
    for _ in range(times):
        started = time.monotonic()
        subprocess.run(["bash", str(script), str(clip)], check=True, capture_output=True)
        samples.append(time.monotonic() - started)
    return median(samples), len(calls)


def _one_request(client: Any, source_ref: str) -> tuple[float, dict[str, float]]:
    started_wall = time.time()
    started = time.monotonic()
    handle = client.submit(
        {
            "request_id": f"lat-{uuid.uuid4()}",
            "workflow": WORKFLOW,
            "sources": {"primary": source_ref},
        }
    )
    submitted = time.time()
    status = client.wait(handle.run_id, timeout_s=300, poll_s=POLL_S)
    if status.status != "SUCCESS":
        raise BenchError(f"run {handle.run_id} ended {status.status}: {status.error}")
    manifests = client.artifacts(handle.run_id)
    if {m.name for m in manifests} != {"poster", "poster_info"}:
        raise BenchError(f"run {handle.run_id} stored {[m.name for m in manifests]}")
    total = time.monotonic() - started
    moments = {"submit": submitted, **_moments(client.events(handle.run_id).events)}
    moments["seen"] = started_wall + total
    phases: dict[str, float] = {}
    previous = started_wall
    for name, _ in PHASES:
        if name in moments:
            phases[name] = moments[name] - previous
            previous = moments[name]
    return total, phases


def _measure(backend: str, root: Path, requests: int, profile: bool) -> dict[str, Any]:
    with ExitStack() as stack:
        pg_url = stack.enter_context(postgres_database()) if backend == "postgres" else None
        extra = {}
        if profile:
            extra = {
                "ERGOT_BENCH_PROFILE_DIR": str(root / f"profiles-{backend}"),
                "PYTHONPATH": f"{PROFILE_HOOK}:{PROJECT_ROOT}",
            }
        plane = make_plane(root, postgres_url=pg_url, extra_env=extra)
        clip = make_clips(plane.ingest / "lat", 1, 2.0, "320x180")[0]
        plane.ergot("ingest", "lat")
        bare, commands = _bare_median(plane, clip, root, times=max(5, requests // 2))
        sampler = stack.enter_context(RssSampler())
        url = stack.enter_context(dagster_dev(plane, sampler))
        from ergot_dagster.client import ErgotClient

        client = stack.enter_context(ErgotClient(url))
        source_ref = f"lat/{clip.name}"
        for _ in range(2):  # warm-up: first loads of the catalog and of the workers' code
            _one_request(client, source_ref)
        totals: list[float] = []
        phase_samples: dict[str, list[float]] = {name: [] for name, _ in PHASES}
        for index in range(requests):
            total, phases = _one_request(client, source_ref)
            totals.append(total)
            for name, value in phases.items():
                phase_samples[name].append(value)
            print(f"  latency {backend} {index + 1}/{requests}: {total:.2f} s", flush=True)
        overheads = [t - bare for t in totals]
        return {
            "backend": backend,
            "bare": bare,
            "commands": commands,
            "totals": totals,
            "overheads": overheads,
            "phases": {k: median(v) for k, v in phase_samples.items() if v},
            "rss": sampler.table(),
            "peaks": dict(sampler.peaks),
            "profiles": str(root / f"profiles-{backend}") if profile else None,
        }


def run(
    requests: int = 20, postgres: bool = True, profile: bool = False, workdir: Path | None = None
) -> Section:
    """Measure both backends (PostgreSQL when a server answers) and return the section."""
    started, load = now_utc(), load_average()
    backends = ["sqlite"] + (["postgres"] if postgres and postgres_available() else [])
    root = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=workdir))
    results = []
    try:
        for backend in backends:
            results.append(_measure(backend, root, requests, profile))
            if profile:
                kept = Path(tempfile.gettempdir()) / f"ergot-bench-profiles-{backend}"
                shutil.rmtree(kept, ignore_errors=True)
                if Path(results[-1]["profiles"]).exists():
                    shutil.copytree(results[-1]["profiles"], kept)
                    print(f"  run worker profiles: {kept}")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    figures: dict[str, float] = {"requests": requests, "target_p50_s": TARGET_P50_S}
    for r in results:
        p50, p95 = percentile(r["overheads"], 50), percentile(r["overheads"], 95)
        verdict = "met" if p50 <= TARGET_P50_S else "missed"
        rows.append(
            f"| {r['backend']} | {percentile(r['totals'], 50):.2f} s | "
            f"{percentile(r['totals'], 95):.2f} s | {r['bare']:.2f} s | **{p50:.2f} s** | "
            f"{p95:.2f} s | {verdict} |"
        )
        b = r["backend"]
        figures.update(
            {
                f"{b}_total_p50_s": round(percentile(r["totals"], 50), 3),
                f"{b}_total_p95_s": round(percentile(r["totals"], 95), 3),
                f"{b}_bare_s": round(r["bare"], 3),
                f"{b}_overhead_p50_s": round(p50, 3),
                f"{b}_overhead_p95_s": round(p95, 3),
            }
        )
        for role in ("daemon", "webserver", "run worker"):
            if role in r["peaks"]:
                figures[f"{b}_{role.replace(' ', '_')}_rss_mib"] = round(
                    r["peaks"][role] / 2**20, 1
                )
    phase_rows = []
    for name, meaning in PHASES:
        cells = [f"{r['phases'][name]:.2f} s" if name in r["phases"] else "-" for r in results]
        phase_rows.append(f"| {name} | {meaning} | {' | '.join(cells)} |")
    memory = "\n".join(f"- {r['backend']}: {r['rss']}" for r in results)
    header = " | ".join(r["backend"] for r in results)
    body = f"""
{requests} requests one after another (after 2 warm-up requests) on each instance backend. The
consumer polls every {POLL_S:g} s (`ErgotClient.wait(poll_s={POLL_S:g})`). Bare runtime: the
{results[0]["commands"]} ffmpeg/ffprobe commands of the run, replayed by bash.

| instance | total p50 | total p95 | bare | overhead p50 | overhead p95 | target p50 ≤ {TARGET_P50_S:g} s |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Where the time goes (median of each phase; a phase ends at the moment named):

| phase | ends at | {header} |
| --- | --- | {" | ".join("---" for _ in results)} |
{chr(10).join(phase_rows)}

Peak RSS:

{memory}
"""  # noqa: E501
    if len(backends) == 1:
        body += "\nPostgreSQL was left out (no server answered, or `--no-postgres`).\n"
    return Section(
        name="latency",
        title="2. Single-request latency",
        body=body,
        started=started,
        load=load,
        figures=figures,
    )
