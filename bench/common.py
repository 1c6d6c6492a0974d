"""What every benchmark shares: timing and statistics, the machine, memory of process trees,
private planes (instance, store, ingest root, `dagster dev`), and the figures document.

Benchmarks run the plane's real parts as a user would (the `ergot` command, the client against
a real webserver and daemon, Dagster's own execution path) and compare with the bare tools run
in the same process of the benchmark, so that both sides see the same machine at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from ergot_dagster.settings import PROJECT_ROOT

BIN = Path(sys.executable).parent
DAGSTER = str(BIN / "dagster")
ERGOT = str(BIN / "ergot")
DOCS = PROJECT_ROOT / "docs" / "performance.md"
PG_ADMIN_URL = os.environ.get(
    "ERGOT_BENCH_PG_ADMIN_URL",
    os.environ.get("ERGOT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)


class BenchError(RuntimeError):
    """A benchmark could not run (a server did not start, a run failed): the message says why."""


# -- statistics ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no measurements to take a median of")
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct`th percentile by linear interpolation between closest ranks."""
    if not values:
        raise BenchError("no measurements to take a percentile of")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def until(what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; `BenchError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- the machine -----------------------------------------------------------------------------


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return out.strip().splitlines()[0] if out.strip() else "not found"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def machine() -> dict[str, str]:
    """The machine and the software versions the figures were taken with."""
    from importlib.metadata import version

    return {
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{_os_name()} (kernel {platform.release()})",
        "python": platform.python_version(),
        "ffmpeg": _first_line(["ffmpeg", "-hide_banner", "-version"]).split(" Copyright")[0],
        "dagster": version("dagster"),
    }


def machine_line() -> str:
    m = machine()
    return (
        f"{m['cpu']}, {m['ram']} RAM; {m['os']}; Python {m['python']}; {m['ffmpeg']}; "
        f"Dagster {m['dagster']}"
    )


# -- memory of process trees -----------------------------------------------------------------

ROLES: list[tuple[str, tuple[str, ...]]] = [
    # The code server starts each run worker with multiprocessing's spawn (`spawn_main`).
    ("run worker", ("execute_run", "execute_step", "spawn_main")),
    ("webserver", ("dagster_webserver", "dagster-webserver")),
    ("daemon", ("dagster._daemon", "dagster-daemon")),
    ("code server", ("code-server", "api grpc")),
    ("dagster dev", (" dev ",)),
    ("ffmpeg", ("ffmpeg", "ffprobe")),
]


def role_of(cmdline: list[str]) -> str:
    text = " ".join(cmdline) + " "
    for role, marks in ROLES:
        if any(mark in text for mark in marks):
            return role
    return "other"


class RssSampler:
    """Samples the resident memory of process trees in the background; peaks by role.

    `roots` are pids whose whole trees are watched (children come and go: run workers, ffmpeg);
    `own_role`, when given, counts this process too (an in-process run). A role's peak is the
    largest single process of that role seen at any sample.
    """

    def __init__(self, roots: Sequence[int] = (), own_role: str | None = None, every_s=0.2):
        self.roots = list(roots)
        self.own_role = own_role
        self.every_s = every_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add_root(self, pid: int) -> None:
        self.roots.append(pid)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def _note(self, role: str, rss: int) -> None:
        if rss > self.peaks.get(role, 0):
            self.peaks[role] = rss

    def sample(self) -> None:
        if self.own_role:
            with contextlib.suppress(psutil.Error):
                self._note(self.own_role, psutil.Process().memory_info().rss)
        for root in list(self.roots):
            try:
                top = psutil.Process(root)
                procs = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    self._note(role_of(proc.cmdline()), proc.memory_info().rss)
                except psutil.Error:
                    continue

    def table(self, roles: Sequence[str] = ("daemon", "webserver", "run worker")) -> str:
        """One markdown line per role, peak RSS in MiB, or what did not run."""
        parts = []
        for role in roles:
            peak = self.peaks.get(role)
            parts.append(f"{role} {peak / 2**20:.0f} MiB" if peak else f"{role}: not running")
        extra = [
            f"{role} {rss / 2**20:.0f} MiB"
            for role, rss in sorted(self.peaks.items())
            if role not in roles and role != "other"
        ]
        return "; ".join(parts + extra)


# -- the figures document --------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Section:
    """One benchmark's part of docs/performance.md: a title, the run's context and a body.

    `figures` are the headline numbers by name, also printed to the terminal and kept in JSON.
    """

    name: str
    title: str
    body: str
    figures: dict[str, float] = field(default_factory=dict)
    started: str = ""
    load: str = ""
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [
            # The document's own heading and prose for the benchmark come before the markers.
            f"#### {self.title}: the recorded run",
            "",
            f"Run {self.started} on {machine_line()}. Load average at the start "
            f"(1/5/15 min): {self.load}.",
            "",
            self.body.strip(),
        ]
        for note in self.notes:
            lines += ["", note]
        lines += ["", "Figures (machine-readable):", "", "```json"]
        lines.append(json.dumps(self.figures, indent=1, sort_keys=True))
        lines += ["```"]
        return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


DOC_HEAD = """# Performance

Figures written by `make bench` (`python -m bench`); each benchmark rewrites only its own section.
"""


def write_section(path: Path, section: Section) -> None:
    """Put `section` between its markers in `path`, leaving everything else as it is.

    A document without the markers gets the section appended; a missing document is created.
    The file is replaced atomically, so a reader never sees half a document.
    """
    start, end = _markers(section.name)
    text = path.read_text(encoding="utf-8") if path.exists() else DOC_HEAD
    block = f"{start}\n{section.markdown()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_figures(path: Path, name: str) -> dict[str, float]:
    """The figures JSON of section `name` in `path` (what `write_section` wrote)."""
    start, end = _markers(name)
    text = path.read_text(encoding="utf-8")
    if start not in text:
        raise BenchError(f"{path} has no section {name!r}")
    block = text.split(start, 1)[1].split(end, 1)[0]
    found = re.search(r"```json\n(.*?)\n```", block, re.DOTALL)
    if not found:
        raise BenchError(f"section {name!r} of {path} has no figures")
    return json.loads(found.group(1))


# -- a private plane -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Plane:
    """One isolated plane: its directories, instance configuration and environment."""

    home: Path
    env: dict[str, str]
    url: str | None = None

    @property
    def ingest(self) -> Path:
        return self.home / "ingest"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def ergot(self, *args: str, timeout_s: float = 3600) -> subprocess.CompletedProcess[str]:
        """The `ergot` command against this plane; `BenchError` if it fails."""
        result = subprocess.run(
            [ERGOT, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if result.returncode != 0:
            raise BenchError(f"ergot {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
        return result

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """This process's environment set to the plane's, for in-process work."""
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)


def make_plane(
    root: Path,
    *,
    postgres_url: str | None = None,
    targets_file: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Plane:
    """A fresh plane under `root`: SQLite instance (the repository's template) by default, or
    PostgreSQL (deploy/dagster.postgres.yaml) with `postgres_url`."""
    home = root / f"plane-{uuid.uuid4().hex[:8]}"
    (home / "dagster").mkdir(parents=True)
    (home / "ingest").mkdir()
    (home / "inbox").mkdir()
    template = (
        PROJECT_ROOT / "deploy" / "dagster.postgres.yaml"
        if postgres_url
        else PROJECT_ROOT / "dagster.yaml"
    )
    shutil.copyfile(template, home / "dagster" / "dagster.yaml")
    env = dict(os.environ)
    env.update(
        {
            "ERGOT_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "ERGOT_STORAGE": str(home / "artifacts"),
            "ERGOT_INGEST_ROOT": str(home / "ingest"),
            "ERGOT_REQUEST_INBOX": str(home / "inbox"),
            "ERGOT_WORKFLOW_DEFS": str(PROJECT_ROOT / "workflow_defs"),
            "ERGOT_RUNTIME_TARGETS": str(targets_file or PROJECT_ROOT / "runtime_targets.yaml"),
            # Benchmarks ingest with `ergot ingest`; the sensor would only add noise.
            "ERGOT_INGEST_INTERVAL_S": "3600",
            # Children import this checkout's code, whatever is installed.
            "PYTHONPATH": os.pathsep.join(
                p for p in [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")] if p
            ),
        }
    )
    if postgres_url:
        env["ERGOT_PG_URL"] = postgres_url
    env.update(extra_env or {})
    return Plane(home=home, env=env)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a process group started with `start_new_session`, forcefully if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _location_loaded(url: str) -> bool:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    try:
        answer = httpx.post(f"{url}/graphql", json={"query": query}, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return False
    entries = ((answer.get("data") or {}).get("workspaceOrError") or {}).get("locationEntries")
    return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)


def _start(args: list[str], plane: Plane, log: Path) -> subprocess.Popen[Any]:
    with open(log, "w") as out:
        return subprocess.Popen(
            args,
            cwd=plane.home,
            env=plane.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_up(proc: subprocess.Popen[Any], url: str, log: Path, timeout_s: float) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"the webserver exited: {log.read_text()[-3000:]}")
        return _location_loaded(url)

    until("the Dagster webserver and its code location", up, timeout_s, poll_s=0.3)


@contextlib.contextmanager
def dagster_dev(plane: Plane, sampler: RssSampler | None = None) -> Iterator[str]:
    """`dagster dev` (webserver, daemon, code server) for `plane` on a free loopback port, as
    `make dev` starts it; yields the URL once the code location has loaded."""
    port = free_port()
    log = plane.home / "dagster-dev.log"
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    proc = _start(
        [DAGSTER, "dev", "--host", "127.0.0.1", "--port", str(port), "-w", workspace], plane, log
    )
    if sampler is not None:
        sampler.add_root(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, url, log, timeout_s=240)
        plane.url = url
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def webserver(plane: Plane, sampler: RssSampler | None = None) -> Iterator[str]:
    """The Dagster webserver alone (no daemon: queued runs stay queued)."""
    port = free_port()
    log = plane.home / "webserver.log"
    args = [
        str(BIN / "dagster-webserver"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
    ]
    proc = _start(args, plane, log)
    if sampler is not None:
        sampler.add_root(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, url, log, timeout_s=240)
        plane.url = url
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def daemon(plane: Plane, sampler: RssSampler | None = None) -> Iterator[subprocess.Popen[Any]]:
    """The Dagster daemon alone (`dagster-daemon run`): the run queue, sensors, monitoring."""
    log = plane.home / "daemon.log"
    proc = _start(
        [str(BIN / "dagster-daemon"), "run", "-w", str(PROJECT_ROOT / "workspace.yaml")],
        plane,
        log,
    )
    if sampler is not None:
        sampler.add_root(proc.pid)
    try:
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def postgres_database(prefix: str = "ergot_bench") -> Iterator[str]:
    """A new PostgreSQL database (its URL), dropped afterwards; `BenchError` without a server."""
    import psycopg2

    try:
        admin = psycopg2.connect(PG_ADMIN_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise BenchError(f"no PostgreSQL at {PG_ADMIN_URL}: {exc}") from None
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def postgres_available() -> bool:
    import psycopg2

    try:
        psycopg2.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


# -- media -----------------------------------------------------------------------------------


def make_clips(folder: Path, count: int, duration: float, size: str) -> list[Path]:
    """`count` distinct generated clips (each its own tone, so each has its own sha256)."""
    from ergot_dagster.media.synth import make_clip

    clips = []
    for index in range(count):
        path = folder / f"clip_{index:04d}.mov"
        make_clip(path, duration=duration, size=size, tone_hz=220.0 + index)
        clips.append(path)
    return clips


# -- recording the tool commands a plane runs ------------------------------------------------

_SHIM = """#!/bin/bash
printf '%s\\0' "{tool}" "$@" > "{log}/$(date +%s%N).$$"
exec {real} "$@"
"""


@contextlib.contextmanager
def recorded_tools(scratch: Path, tools: Sequence[str] = ("ffmpeg", "ffprobe")) -> Iterator[Path]:
    """Put recording shims of `tools` first on PATH (in this process's environment) and yield
    the folder where each call's argv lands, one file per call named by its start time."""
    shims = scratch / f"shims-{uuid.uuid4().hex[:6]}"
    log = shims / "calls"
    log.mkdir(parents=True)
    for tool in tools:
        real = shutil.which(tool)
        if real is None:
            raise BenchError(f"{tool} is not installed")
        shim = shims / tool
        shim.write_text(_SHIM.format(tool=tool, log=log, real=real))
        shim.chmod(0o755)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{shims}{os.pathsep}{saved}"
    try:
        yield log
    finally:
        os.environ["PATH"] = saved


def recorded_calls(log: Path) -> list[list[str]]:
    """The argv of every recorded call, in the order they started."""
    calls = []
    for entry in sorted(log.iterdir(), key=lambda p: int(p.name.split(".")[0])):
        parts = entry.read_bytes().split(b"\0")[:-1]
        calls.append([p.decode() for p in parts])
    return calls


def shell_quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def print_section(section: Section) -> None:
    print(f"\n== {section.title} ==")
    for key, value in section.figures.items():
        print(f"  {key}: {value:g}" if isinstance(value, int | float) else f"  {key}: {value}")
