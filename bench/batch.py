"""Batch overhead: N clips through `poster_extraction` + `media_qc` by the plane, against the same
ffmpeg commands in a plain shell loop.

The plane's side is its fastest path that still records everything: one Dagster run per clip,
executed in this process (`execute_job` on the code location's asset job, as `ergot run` does,
in-process executor), selecting both workflows' artifacts for the clip's partition. Each run
plans both requests against the instance, re-hashes the source, runs the recipes, stores the
artifacts with manifests (lineage to the source), records per-partition materializations and
evaluates `media_qc`'s checks.

The bare side is the very ffmpeg/ffprobe commands the plane ran, recorded on a clip outside the
batch through shims on PATH, replayed for every clip by one bash loop with output to /dev/null.
Both sides alternate (bare, plane, plane, bare, ...) so that load from elsewhere falls on both.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Plane,
    RssSampler,
    Section,
    load_average,
    make_clips,
    make_plane,
    median,
    now_utc,
    recorded_calls,
    recorded_tools,
    shell_quote,
)

WORKFLOWS = ("poster_extraction", "media_qc")
TARGET_RATIO = 1.10


@dataclass
class BatchSizes:
    clips: int = 100
    duration_s: float = 10.0
    size: str = "1280x720"
    repeats: int = 3


class PlaneBatch:
    """Runs one clip's two workflows as one Dagster run in this process."""

    def __init__(self, plane: Plane) -> None:
        from dagster import DagsterInstance
        from dagster._core.definitions.reconstruct import ReconstructableRepository

        from ergot_dagster.artifacts.store import open_store
        from ergot_dagster.requests.catalog import LocalCatalog
        from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
        from ergot_dagster.targets.config import load_targets
        from ergot_dagster.workflows.loader import load_registry

        self.settings = ErgotSettings.from_env()
        self.instance = DagsterInstance.from_config(str(self.settings.dagster_home))
        registry = load_registry(self.settings.workflow_defs)
        self.catalog = LocalCatalog(
            registry,
            self.instance,
            open_store(self.settings.storage),
            load_targets(self.settings.runtime_targets),
        )
        self.repo = ReconstructableRepository.for_module(
            "ergot_dagster.definitions", "defs", working_directory=str(PROJECT_ROOT)
        )
        self.job_name = "__ASSET_JOB"

    def run(self, source_ref: str) -> str:
        """Plan and run both workflows on `source_ref`; the run id. `BenchError` if it fails."""
        from dagster import AssetKey, execute_job

        from ergot_dagster.requests.model import ProcessingRequest
        from ergot_dagster.requests.planning import plan_run

        keys: list[AssetKey] = []
        ops: dict[str, Any] = {}
        tags: dict[str, str] = {"ergot/bench": "batch"}
        for workflow in WORKFLOWS:
            request = ProcessingRequest(
                request_id=f"bench-{uuid.uuid4()}",
                workflow=workflow,
                sources={"primary": source_ref},
            )
            plan = plan_run(request, self.catalog)
            keys += [AssetKey(k) for k in plan.asset_keys]
            ops.update(plan.run_config["ops"])
            tags.update(
                {k: v for k, v in plan.tags.items() if k.startswith("ergot/target.")}
                | {"dagster/partition": plan.partition_key}
            )
        run_config = {"ops": ops, "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
        result = execute_job(
            self.repo.get_reconstructable_job(self.job_name),
            instance=self.instance,
            asset_selection=keys,
            run_config=run_config,
            tags=tags,
        )
        if not result.success:
            raise BenchError(f"the plane's run {result.run_id} on {source_ref} failed")
        return result.run_id

    def close(self) -> None:
        self.instance.dispose()


def bare_script(calls: list[list[str]], clip: Path, home: Path, scratch: Path) -> str:
    """A bash loop running the recorded `calls` for every clip given as an argument.

    The recorded clip becomes `$clip`; other paths under the plane's home are moved under
    `scratch` (inputs that still exist, such as a stored poster a preview is made from, are
    copied there first).
    """
    if not calls:
        raise BenchError("no ffmpeg or ffprobe command was recorded")
    body = []
    for argv in calls:
        tool = shutil.which(argv[0])
        if tool is None:
            raise BenchError(f"{argv[0]} is not installed")
        words = [shell_quote(tool)]
        for arg in argv[1:]:
            if arg == str(clip):
                words.append('"$clip"')
                continue
            if arg.startswith(str(home) + "/"):
                moved = scratch / Path(arg).relative_to(home)
                moved.parent.mkdir(parents=True, exist_ok=True)
                original = Path(arg)
                if original.is_file() and not moved.exists():
                    shutil.copyfile(original, moved)
                arg = str(moved)
            words.append(shell_quote(arg))
        body.append("  " + " ".join(words) + " >/dev/null 2>&1")
    return '#!/bin/bash\nset -e\nfor clip in "$@"; do\n' + "\n".join(body) + "\ndone\n"


def _time_bare(script: Path, clips: list[Path]) -> float:
    started = time.monotonic()
    result = subprocess.run(["bash", str(script), *map(str, clips)], capture_output=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise BenchError(f"the bare loop failed: {result.stderr.decode()[-2000:]}")
    return elapsed


def _time_plane(batch: PlaneBatch, refs: list[str], per_run: list[float]) -> float:
    started = time.monotonic()
    for ref in refs:
        t0 = time.monotonic()
        batch.run(ref)
        per_run.append(time.monotonic() - t0)
    return time.monotonic() - started


def run(sizes: BatchSizes, workdir: Path | None = None) -> Section:
    """Run the batch benchmark and return its section of the document."""
    started, load = now_utc(), load_average()
    root = Path(tempfile.mkdtemp(prefix="bench-batch-", dir=workdir))
    try:
        plane = make_plane(root)
        t0 = time.monotonic()
        # One clip more than the batch: the commands are recorded on it, and it warms up.
        clips = make_clips(plane.ingest / "clips", sizes.clips + 1, sizes.duration_s, sizes.size)
        generate_s = time.monotonic() - t0
        plane.ergot("ingest", "clips")
        extra, clips = clips[-1], clips[:-1]
        refs = [f"clips/{c.name}" for c in clips]
        megabytes = sum(c.stat().st_size for c in clips) / 1e6

        with plane.environment():
            batch = PlaneBatch(plane)
            try:
                with recorded_tools(root) as log:
                    batch.run(f"clips/{extra.name}")
                calls = recorded_calls(log)
                script = root / "bare.sh"
                script.write_text(bare_script(calls, extra, plane.home, root / "scratch"))
                bare_times: list[float] = []
                plane_times: list[float] = []
                per_run: list[float] = []
                with RssSampler(roots=[], own_role="run worker") as sampler:
                    for rep in range(sizes.repeats):
                        order = ("bare", "plane") if rep % 2 == 0 else ("plane", "bare")
                        for side in order:
                            if side == "bare":
                                bare_times.append(_time_bare(script, clips))
                            else:
                                plane_times.append(_time_plane(batch, refs, per_run))
                        print(
                            f"  batch rep {rep + 1}: bare {bare_times[-1]:.1f} s, "
                            f"plane {plane_times[-1]:.1f} s",
                            flush=True,
                        )
            finally:
                batch.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    bare, plane_s = median(bare_times), median(plane_times)
    ratio = plane_s / bare
    per_clip_overhead = (plane_s - bare) / sizes.clips
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    tools = sorted({Path(c[0]).name for c in calls})
    body = f"""
{sizes.clips} clips of {sizes.duration_s:g} s at {sizes.size} ({megabytes:.0f} MB in all, generated in
{generate_s:.0f} s), {sizes.repeats} repetitions of each side, alternating.

| | median total | per clip | all repetitions |
| --- | --- | --- | --- |
| bare: {len(calls)} recorded {"/".join(tools)} commands per clip in a bash loop | {bare:.1f} s | {bare / sizes.clips:.2f} s | {", ".join(f"{t:.1f}" for t in bare_times)} s |
| plane: one Dagster run per clip (both workflows, in-process) | {plane_s:.1f} s | {plane_s / sizes.clips:.2f} s | {", ".join(f"{t:.1f}" for t in plane_times)} s |

**Ratio plane / bare: {ratio:.3f}** (target ≤ {TARGET_RATIO:.2f}: **{verdict}**). The plane adds
{per_clip_overhead:.2f} s per clip; a single run took {median(per_run):.2f} s at the median
(p95 {sorted(per_run)[int(0.95 * (len(per_run) - 1))]:.2f} s).

Peak RSS: {sampler.table()} (the run worker is this benchmark's own process, which runs the
plane's runs in-process; the daemon and webserver take no part in this path).
"""  # noqa: E501
    return Section(
        name="batch",
        title="1. Batch overhead",
        body=body,
        started=started,
        load=load,
        figures={
            "clips": sizes.clips,
            "repeats": sizes.repeats,
            "bare_median_s": round(bare, 3),
            "plane_median_s": round(plane_s, 3),
            "ratio": round(ratio, 4),
            "target_ratio": TARGET_RATIO,
            "overhead_per_clip_s": round(per_clip_overhead, 3),
            "run_median_s": round(median(per_run), 3),
            "worker_peak_rss_mib": round(sampler.peaks.get("run worker", 0) / 2**20, 1),
        },
    )
