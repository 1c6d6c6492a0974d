"""Where a batch run's time goes: `python -m bench.breakdown [CLIPS]`.

Runs the batch benchmark's plane path (`bench.batch.PlaneBatch`: one in-process Dagster run per
clip with `poster_extraction` and `media_qc`) on CLIPS generated 10 s 720p clips (3 by default)
under pyinstrument, and sums the profile into the tool processes, Dagster's event log writes,
run creation, storage reads and the rest. The profiler slows every Python call, so read the
shares rather than the seconds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.batch import PlaneBatch
from bench.common import make_clips, make_plane

# Frames whose whole time counts towards one part (the first one met on the way down wins).
PARTS: list[tuple[str, set[str]]] = [
    ("ffmpeg / ffprobe processes", {"communicate", "_wait"}),
    ("event log writes", {"store_event", "store_event_batch", "store_asset_check_event"}),
    ("run creation", {"create_run_for_job", "create_run"}),
    (
        "event log / run storage reads",
        {
            "_get_event_records",
            "fetch_materializations",
            "fetch_observations",
            "get_run_by_id",
            "get_runs",
            "fetch_run_status_changes",
        },
    ),
]


def _part_of(frame: Any) -> str | None:
    for name, functions in PARTS:
        if frame.function in functions:
            if name.startswith("ffmpeg") and not (
                "subprocess" in (frame.file_path or "") or "process.py" in (frame.file_path or "")
            ):
                continue
            return name
    return None


def _walk(frame: Any, totals: dict[str, float]) -> None:
    part = _part_of(frame)
    if part is not None:
        totals[part] = totals.get(part, 0.0) + frame.time
        return
    for child in frame.children:
        _walk(child, totals)


def main(argv: list[str]) -> None:
    from pyinstrument import Profiler

    count = int(argv[0]) if argv else 3
    root = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    try:
        plane = make_plane(root)
        clips = make_clips(plane.ingest / "clips", count + 1, 10.0, "1280x720")
        plane.ergot("ingest", "clips")
        with plane.environment():
            batch = PlaneBatch(plane)
            try:
                batch.run(f"clips/{clips[0].name}")  # warm-up: imports, first snapshots
                profiler = Profiler(interval=0.001)
                profiler.start()
                started = time.monotonic()
                run_ids = [batch.run(f"clips/{c.name}") for c in clips[1:]]
                total = time.monotonic() - started
                profiler.stop()
                events = sum(len(batch.instance.all_logs(run_id)) for run_id in run_ids)
            finally:
                batch.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    totals: dict[str, float] = {}
    session = profiler.last_session
    if session is not None:
        _walk(session.root_frame(), totals)
    print(f"{count} runs, {total / count:.2f} s a run, {events / count:.0f} events a run")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {seconds / count:.3f} s a run")
    rest = (total - sum(totals.values())) / count
    print(f"  everything else (Dagster's step machinery, planning, recipes, store): {rest:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
