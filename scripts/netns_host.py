"""A second host on this machine, for off-node runs: a network namespace running the code server.

    scripts/netns-host.sh up [--name N] [--subnet 10.231.0|auto] [--port 4266] [--hide PATH]...
    scripts/netns-host.sh status|restart|down [--name N]
    scripts/netns-host.sh exec [--name N] -- COMMAND...

`up` makes the host and starts the project's code location on it as a Dagster gRPC code server:

- a network namespace joined to this node by a veth pair (<subnet>.1 here, <subnet>.2 there),
  with nothing else: no route out, so the host reaches only what is relayed to it;
- a process that holds the host's own UTS namespace (its host name, so it is another host to
  worker identity) and mount namespace, in which this node's ERGOT_HOME, DAGSTER_HOME and the
  repository's .ergot are covered by empty tmpfs mounts, and the host's own home (its ERGOT_HOME,
  DAGSTER_HOME and scratch space) is a private tmpfs;
- TCP relays bound to <subnet>.1 for PostgreSQL (ERGOT_PG_URL) and the S3 server
  (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3): the only services the host can reach. Nothing is
  changed in PostgreSQL's configuration; it sees the relay's connections from this node;
- `dagster api grpc -h <subnet>.2 -p <port> -m ergot_dagster.definitions` in the host, with the
  plane's environment (read from this process's: ERGOT_* and AWS_* variables, the PostgreSQL and
  S3 addresses rewritten to the relays) and an instance on the same PostgreSQL.

The plane's ERGOT_STORAGE and ERGOT_INGEST_ROOT must be s3:// (a remote run never reads this
node's disk) and ERGOT_PG_URL must be set. Secrets travel in environment variables only; they are
never written to the state file or given on a command line. `down` stops every process in the
namespace and the relays, and deletes the namespace and the veth pair. Run as root.

The state (pids, addresses) is kept in --state-dir (default /run/ergot-netns/<name>), with the
code server's and relays' logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
LOCK = Path("/run/ergot-netns.lock")
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# Never passed to the host: its own locations replace them.
NOT_PASSED = {"ERGOT_HOME", "DAGSTER_HOME", "ERGOT_REQUEST_INBOX", "ERGOT_PG_URL", *ENDPOINT_VARS}
READY_TIMEOUT_S = 180.0


class HostError(Exception):
    """Something the operator must fix; printed as one line."""


# -- small helpers ---------------------------------------------------------------------------


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise HostError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal_and_wait(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            return


def _veth_names(name: str) -> tuple[str, str]:
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"eg{digest}c", f"eg{digest}r"


class State:
    """The host's state file: written as each part is made, so `down` can undo a failed `up`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self, **fields: Any) -> None:
        self.data.update(fields)
        self.dir.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_suffix(".tmp")
        staged.write_text(json.dumps(self.data, indent=2) + "\n")
        staged.replace(self.path)

    def __getitem__(self, key: str) -> Any:
        if key not in self.data:
            raise HostError(f"no {key} in {self.path}: is the host up?")
        return self.data[key]


# -- the network -----------------------------------------------------------------------------


def _used_subnets() -> set[str]:
    text = _run("ip", "-4", "-o", "addr", "show").stdout + _run("ip", "-4", "route").stdout
    return {".".join(word.split("/")[0].split(".")[:3]) for word in text.split() if "." in word}


def _pick_subnet(wanted: str) -> str:
    used = _used_subnets()
    if wanted != "auto":
        parts = wanted.split(".")
        if len(parts) != 3:
            raise HostError(f"--subnet {wanted!r}: give three octets, e.g. 10.231.0")
        ipaddress.IPv4Address(f"{wanted}.1")
        if wanted in used:
            raise HostError(f"--subnet {wanted}: already in use on this machine")
        return wanted
    free = [f"10.231.{n}" for n in range(256) if f"10.231.{n}" not in used]
    if not free:
        raise HostError("no free 10.231.x subnet")
    return random.choice(free)


def _make_network(state: State, name: str, subnet: str) -> None:
    netns = name
    control_if, remote_if = _veth_names(name)
    if netns in _run("ip", "netns", "list").stdout.split():
        raise HostError(f"network namespace {netns} exists already; `down --name {name}` first")
    _run("ip", "netns", "add", netns)
    state.save(netns=netns)
    _run("ip", "link", "add", control_if, "type", "veth", "peer", "name", remote_if)
    state.save(veth=control_if)
    _run("ip", "link", "set", remote_if, "netns", netns)
    _run("ip", "addr", "add", f"{subnet}.1/30", "dev", control_if)
    _run("ip", "link", "set", control_if, "up")
    _run("ip", "-n", netns, "addr", "add", f"{subnet}.2/30", "dev", remote_if)
    _run("ip", "-n", netns, "link", "set", remote_if, "up")
    _run("ip", "-n", netns, "link", "set", "lo", "up")
    state.save(control_ip=f"{subnet}.1", remote_ip=f"{subnet}.2")


# -- the host's namespaces -------------------------------------------------------------------

_HOLDER = r"""
set -e
hostname "$1"
root="$2"
shift 2
for hidden in "$@"; do mount -t tmpfs -o mode=0755,size=1m ergot-hidden "$hidden"; done
mount -t tmpfs -o mode=0700 ergot-remote-home "$root"
echo ready
exec sleep infinity
"""


def _hidden_paths(extra: list[str], root: Path) -> list[str]:
    """This node's plane directories the host must not see (those that exist)."""
    home = Path(os.environ.get("ERGOT_HOME", REPO / ".ergot"))
    candidates = [home, REPO / ".ergot", *(Path(p) for p in extra)]
    for var in ("DAGSTER_HOME", "ERGOT_REQUEST_INBOX", "ERGOT_STORAGE", "ERGOT_INGEST_ROOT"):
        value = os.environ.get(var, "")
        if value and "://" not in value:
            candidates.append(Path(value))
    hidden: list[str] = []
    # Outermost first: a directory inside one already hidden is hidden with it.
    for path in sorted({p.expanduser().resolve() for p in candidates}, key=lambda p: len(p.parts)):
        if not path.is_dir() or any(Path(h) in path.parents for h in hidden):
            continue
        if root == path or path in root.parents:
            raise HostError(f"the state directory {root.parent} must not lie inside {path}")
        hidden.append(str(path))
    return hidden


def _start_holder(state: State, hostname: str, hidden: list[str]) -> None:
    root = state.dir / "root"
    root.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [
            *("ip", "netns", "exec", state["netns"]),
            *("unshare", "--uts", "--mount", "--propagation", "private"),
            *("sh", "-c", _HOLDER, "sh", hostname, str(root), *hidden),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    state.save(holder_pid=holder.pid, hostname=hostname, root=str(root), hidden=hidden)
    assert holder.stdout is not None
    ready, _, _ = select.select([holder.stdout], [], [], 30)
    line = holder.stdout.readline().strip() if ready else ""
    if line != "ready":
        holder.kill()
        error = holder.stderr.read() if holder.stderr else ""
        raise HostError(f"the host's namespaces could not be made: {error.strip() or line}")


def _nsenter(state: State) -> list[str]:
    return ["nsenter", "-t", str(state["holder_pid"]), "-n", "-u", "-m", "--"]


# -- relays ----------------------------------------------------------------------------------


def _start_relay(state: State, target: str) -> str:
    """A relay on the control address to `target` (host:port); returns its host:port."""
    index = len(state.data.get("relays", []))
    port_file = state.dir / f"relay-{index}.port"
    port_file.unlink(missing_ok=True)
    with open(state.dir / f"relay-{index}.log", "w") as log:
        relay = subprocess.Popen(
            [
                *(sys.executable, str(Path(__file__).resolve()), "relay"),
                *("--listen", f"{state['control_ip']}:0", "--to", target),
                *("--port-file", str(port_file)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    relays = [*state.data.get("relays", []), {"pid": relay.pid, "to": target}]
    state.save(relays=relays)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            relays[-1]["address"] = f"{state['control_ip']}:{port_file.read_text().strip()}"
            state.save(relays=relays)
            return str(relays[-1]["address"])
        if relay.poll() is not None:
            break
        time.sleep(0.05)
    raise HostError(f"the relay to {target} did not start (see {state.dir}/relay-{index}.log)")


def _netloc_target(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise HostError(f"{parts.scheme}:// URL without a host")
    return parts.hostname, parts.port or default_port


def _with_netloc(url: str, address: str) -> str:
    """`url` pointing at `address` (host:port), keeping any user and password."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{address}" if userinfo else address))


def _relayed_urls() -> dict[str, tuple[str, str]]:
    """The variables to relay: name -> (URL, host:port it points at)."""
    pg_url = os.environ.get("ERGOT_PG_URL")
    if not pg_url:
        raise HostError("ERGOT_PG_URL is not set: the host shares the plane's PostgreSQL instance")
    host, port = _netloc_target(pg_url, 5432)
    urls = {"ERGOT_PG_URL": (pg_url, f"{host}:{port}")}
    for var in ENDPOINT_VARS:
        url = os.environ.get(var)
        if url:
            host, port = _netloc_target(url, 443 if url.startswith("https") else 80)
            urls[var] = (url, f"{host}:{port}")
    return urls


def _relay_environment(state: State, start: bool) -> dict[str, str]:
    """The host's values of the relayed variables, starting the relays when `start`."""
    addresses = {r["to"]: r["address"] for r in state.data.get("relays", []) if "address" in r}
    relayed = {}
    for var, (url, target) in _relayed_urls().items():
        if target not in addresses:
            if not start:
                raise HostError(f"{var} points at {target}, which `up` did not relay")
            addresses[target] = _start_relay(state, target)
        relayed[var] = _with_netloc(url, addresses[target])
    return relayed


# -- the code server -------------------------------------------------------------------------

_SERVE = r"""
set -e
mkdir -p "$DAGSTER_HOME" "$ERGOT_HOME"
cp "$1" "$DAGSTER_HOME/dagster.yaml"
cd "$ERGOT_HOME"
shift
exec "$@"
"""


def _check_plane_environment() -> None:
    for var in ("ERGOT_STORAGE", "ERGOT_INGEST_ROOT"):
        value = os.environ.get(var, "")
        if not value.startswith("s3://"):
            raise HostError(
                f"{var} is {value or 'unset (a directory here)'}: an off-node host reads and "
                "writes object storage only; set it to s3://bucket/prefix"
            )


def _host_environment(state: State) -> dict[str, str]:
    root = Path(state["root"])
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith(("ERGOT_", "AWS_")) and key not in NOT_PASSED
    }
    env.update(
        PATH=os.environ.get("PATH", "/usr/bin:/bin"),
        LANG=os.environ.get("LANG", "C.UTF-8"),
        HOME=str(root),
        ERGOT_HOME=str(root / "ergot"),
        DAGSTER_HOME=str(root / "dagster"),
        PYTHONUNBUFFERED="1",
    )
    return env


def _start_server(state: State, relayed: dict[str, str]) -> None:
    dagster = Path(sys.executable).parent / "dagster"
    env = {**_host_environment(state), **relayed}
    log = state.dir / "code-server.log"
    with open(log, "a") as out:
        server = subprocess.Popen(
            [
                *_nsenter(state),
                *("sh", "-c", _SERVE, "sh", str(REPO / "deploy" / "dagster.postgres.yaml")),
                *(str(dagster), "api", "grpc", "-h", state["remote_ip"]),
                *("-p", str(state["port"]), "-m", "ergot_dagster.definitions", "-a", "defs"),
            ],
            cwd="/",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    state.save(server_pid=server.pid)
    _wait_for_server(state, server, log)


def _wait_for_server(state: State, server: subprocess.Popen[bytes], log: Path) -> None:
    from dagster._grpc.client import DagsterGrpcClient

    client = DagsterGrpcClient(host=state["remote_ip"], port=int(state["port"]))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise HostError(
                f"the code server exited with status {server.returncode}:\n"
                + log.read_text()[-3000:]
            )
        try:
            client.ping("ready")
            return
        except Exception:  # not listening yet: Dagster raises its own unreachable error
            time.sleep(0.3)
    raise HostError(f"the code server did not answer within {READY_TIMEOUT_S:g} s (see {log})")


def _stop_server(state: State) -> None:
    pid = state.data.get("server_pid")
    if pid and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    # Run workers the server started outlive it: the host's restart does not keep them.
    _signal_and_wait(_namespace_pids(state, exclude_holder=True), timeout_s=5)
    state.save(server_pid=None)


def _namespace_pids(state: State, exclude_holder: bool = False) -> list[int]:
    netns = state.data.get("netns")
    if not netns:
        return []
    listed = _run("ip", "netns", "pids", netns, check=False).stdout.split()
    pids = [int(p) for p in listed if p.isdigit()]
    if exclude_holder:
        pids = [p for p in pids if p != state.data.get("holder_pid")]
    return pids


# -- commands --------------------------------------------------------------------------------


def up(args: argparse.Namespace) -> dict[str, Any]:
    _check_plane_environment()
    state = State(args.state_dir)
    if state.data.get("netns"):
        raise HostError(f"{state.path} exists: the host {args.name} is up (or `down` it first)")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(LOCK, "w") as lock:
            # Two hosts made at once must not pick the same subnet.
            fcntl.flock(lock, fcntl.LOCK_EX)
            _make_network(state, args.name, _pick_subnet(args.subnet))
        hidden = _hidden_paths(args.hide, (state.dir / "root").resolve())
        _start_holder(state, args.hostname or args.name, hidden)
        state.save(port=args.port, name=args.name)
        _start_server(state, _relay_environment(state, start=True))
    except BaseException:
        down(args)
        raise
    return status(args)


def restart(args: argparse.Namespace) -> dict[str, Any]:
    """Stop the code server (and the run workers it started) and start it again."""
    _check_plane_environment()
    state = State(args.state_dir)
    relayed = _relay_environment(state, start=False)
    _stop_server(state)
    _start_server(state, relayed)
    return status(args)


def down(args: argparse.Namespace) -> dict[str, Any]:
    state = State(args.state_dir)
    _signal_and_wait(_namespace_pids(state))
    for pid in [state.data.get("holder_pid"), state.data.get("server_pid")]:
        if pid and _alive(pid):
            _signal_and_wait([pid])
    for relay in state.data.get("relays", []):
        cmdline = Path(f"/proc/{relay['pid']}/cmdline")
        if cmdline.exists() and b"relay" in cmdline.read_bytes():
            _signal_and_wait([relay["pid"]])
    if state.data.get("veth"):
        _run("ip", "link", "del", state.data["veth"], check=False)
    if state.data.get("netns"):
        _run("ip", "netns", "del", state.data["netns"], check=False)
    for leftover in [state.path, *state.dir.glob("relay-*.port")]:
        leftover.unlink(missing_ok=True)
    root = state.dir / "root"
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return {"name": args.name, "down": True}


def status(args: argparse.Namespace) -> dict[str, Any]:
    state = State(args.state_dir)
    data = dict(state.data)
    data["server_running"] = _alive(data.get("server_pid"))
    data["address"] = f"{data.get('remote_ip')}:{data.get('port')}"
    return data


def exec_in_host(args: argparse.Namespace) -> None:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise HostError("exec: give a command after --")
    state = State(args.state_dir)
    os.execvp("nsenter", _nsenter(state) + command)


# -- the relay itself --------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _relay(listen: str, to: str, port_file: Path | None) -> None:
    to_host, _, to_port = to.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError as exc:
            print(f"relay: cannot reach {to}: {exc}", flush=True)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(handle, host, int(port))
    bound = server.sockets[0].getsockname()[1]
    print(f"relay {host}:{bound} -> {to}", flush=True)
    if port_file is not None:
        staged = port_file.with_suffix(".tmp")
        staged.write_text(f"{bound}\n")
        staged.replace(port_file)
    async with server:
        await server.serve_forever()


def relay(args: argparse.Namespace) -> None:
    asyncio.run(_relay(args.listen, args.to, args.port_file))


# -- the command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns-host.sh", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command_name", required=True)
    for name in ("up", "down", "status", "restart", "exec"):
        sub = commands.add_parser(name)
        sub.add_argument("--name", default="ergot-remote", help="namespace and host name")
        sub.add_argument("--state-dir", type=Path, help="default /run/ergot-netns/<name>")
        if name == "up":
            sub.add_argument("--subnet", default="10.231.0", help="three octets, or auto")
            sub.add_argument("--port", type=int, default=4266, help="the code server's port")
            sub.add_argument("--hostname", help="the host's name (default: --name)")
            sub.add_argument("--hide", action="append", default=[], help="another path to hide")
        if name == "exec":
            sub.add_argument("command", nargs=argparse.REMAINDER)
    sub = commands.add_parser("relay", help="(internal) a TCP relay")
    sub.add_argument("--listen", required=True)
    sub.add_argument("--to", required=True)
    sub.add_argument("--port-file", type=Path)
    args = parser.parse_args(argv)
    if args.command_name == "relay":
        relay(args)
        return 0
    if len(args.name) > 40 or not args.name.replace("-", "").isalnum():
        parser.error("--name: letters, digits and '-', at most 40")
    args.state_dir = (args.state_dir or Path("/run/ergot-netns") / args.name).resolve()
    if os.geteuid() != 0:
        print("netns-host: run as root (ip netns, unshare, mount)", file=sys.stderr)
        return 1
    try:
        if args.command_name == "exec":
            exec_in_host(args)
            return 0
        result = {"up": up, "down": down, "status": status, "restart": restart}[args.command_name](
            args
        )
    except HostError as exc:
        print(f"netns-host: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
