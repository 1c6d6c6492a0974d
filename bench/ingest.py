"""Ingest throughput: files per second and MB/s of `ergot ingest` (hash, probe, partition,
materialization) against `sha256sum` + `ffprobe` alone on the same files.

Each repetition ingests the same generated clips into a fresh plane (a new instance, so every
file is new to it) with the `ergot` command, as an operator would, and runs the bare tools in one
bash script: `sha256sum` over the files, then ffprobe with the arguments ingest gives it, file by
file. Both read from the page cache (a first untimed pass warms it), and they alternate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (
    ERGOT,
    BenchError,
    RssSampler,
    Section,
    load_average,
    make_clips,
    make_plane,
    median,
    now_utc,
    shell_quote,
)

TARGET_FRACTION = 0.80


def _bare_script(files: list[Path]) -> str:
    sha = shutil.which("sha256sum")
    probe = shutil.which("ffprobe")
    if sha is None or probe is None:
        raise BenchError("sha256sum and ffprobe are needed")
    quoted = " ".join(shell_quote(str(f)) for f in files)
    return (
        "#!/bin/bash\nset -e\n"
        f"{sha} {quoted} >/dev/null\n"
        f"for f in {quoted}; do\n"
        f'  {probe} -v error -print_format json -show_format -show_streams -- "$f" >/dev/null\n'
        "done\n"
    )


def _ingest_once(root: Path, media: Path, sampler: RssSampler) -> float:
    """`ergot ingest` of every clip into a new plane whose ingest root holds them."""
    plane = make_plane(root, extra_env={"ERGOT_INGEST_ROOT": str(media)})
    started = time.monotonic()
    proc = subprocess.Popen(
        [ERGOT, "ingest", "--json", str(media)],
        env=plane.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sampler.add_root(proc.pid)
    out, err = proc.communicate(timeout=3600)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise BenchError(f"ergot ingest failed: {err.decode()[-2000:]}")
    new = [i for i in json.loads(out)["ingested"] if i["status"] == "new"]
    expected = len(list(media.iterdir()))
    if len(new) != expected:
        raise BenchError(f"ergot ingest recorded {len(new)} new files, not {expected}")
    shutil.rmtree(plane.home, ignore_errors=True)
    return elapsed


def run(
    files: int = 100,
    duration_s: float = 10.0,
    size: str = "1280x720",
    repeats: int = 3,
    workdir: Path | None = None,
) -> Section:
    """Run the ingest benchmark and return its section of the document."""
    started, load = now_utc(), load_average()
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=workdir))
    try:
        media = root / "media"
        clips = make_clips(media, files, duration_s, size)
        total_mb = sum(c.stat().st_size for c in clips) / 1e6
        script = root / "bare.sh"
        script.write_text(_bare_script(clips))
        subprocess.run(["bash", str(script)], check=True)  # warms the page cache
        bare_times: list[float] = []
        plane_times: list[float] = []
        with RssSampler() as sampler:
            for rep in range(repeats):
                for side in ("bare", "plane") if rep % 2 == 0 else ("plane", "bare"):
                    if side == "bare":
                        t0 = time.monotonic()
                        subprocess.run(["bash", str(script)], check=True)
                        bare_times.append(time.monotonic() - t0)
                    else:
                        plane_times.append(_ingest_once(root, media, sampler))
                print(
                    f"  ingest rep {rep + 1}: bare {bare_times[-1]:.2f} s, "
                    f"ergot ingest {plane_times[-1]:.2f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    bare, plane = median(bare_times), median(plane_times)
    fraction = bare / plane
    verdict = "met" if fraction >= TARGET_FRACTION else "missed"
    ingest_rss = sampler.peaks.get("other", 0) / 2**20
    # The plane can beat the bare script: it probes one file while it hashes the next.
    delta_ms = (plane - bare) / files * 1000
    per_file = f"adds {delta_ms:.0f} ms" if delta_ms >= 0 else f"takes {-delta_ms:.0f} ms less"
    body = f"""
{files} clips of {duration_s:g} s at {size} ({total_mb:.0f} MB), {repeats} repetitions of each
side, alternating, page cache warm. The plane's side is one `ergot ingest --json DIR` process into
a fresh instance (SQLite), its Python start-up included; the bare side is one bash script
(`sha256sum` over all files, then `ffprobe -show_format -show_streams` file by file).

| | median time | files/s | MB/s | all repetitions |
| --- | --- | --- | --- | --- |
| bare: sha256sum + ffprobe | {bare:.2f} s | {files / bare:.1f} | {total_mb / bare:.1f} | {", ".join(f"{t:.2f}" for t in bare_times)} s |
| plane: `ergot ingest` | {plane:.2f} s | {files / plane:.1f} | {total_mb / plane:.1f} | {", ".join(f"{t:.2f}" for t in plane_times)} s |

**The plane ingests at {100 * fraction:.0f} % of the bare tools' throughput** (target ≥
{100 * TARGET_FRACTION:.0f} %: **{verdict}**); it {per_file} per file.

Peak RSS: `ergot ingest` {ingest_rss:.0f} MiB (no daemon, webserver or run worker takes part).
"""  # noqa: E501
    return Section(
        name="ingest",
        title="3. Ingest throughput",
        body=body,
        started=started,
        load=load,
        figures={
            "files": files,
            "megabytes": round(total_mb, 1),
            "bare_median_s": round(bare, 3),
            "ingest_median_s": round(plane, 3),
            "bare_files_per_s": round(files / bare, 2),
            "ingest_files_per_s": round(files / plane, 2),
            "bare_mb_per_s": round(total_mb / bare, 1),
            "ingest_mb_per_s": round(total_mb / plane, 1),
            "fraction_of_bare": round(fraction, 4),
            "target_fraction": TARGET_FRACTION,
            "ingest_peak_rss_mib": round(ingest_rss, 1),
        },
    )
