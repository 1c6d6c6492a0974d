"""The `ergot` command: ingest, workflows, run, artifacts and lineage, from a terminal.

Every command prints for people by default and JSON with `--json`. Errors go to stderr, name what
is wrong, and exit non-zero. The command uses the same instance (`DAGSTER_HOME`), artifact store
and ingest root as `make dev`, so what it does shows up in the Dagster UI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import BaseModel

from ergot_dagster.errors import ErgotError
from ergot_dagster.refs import InvalidRefError
from ergot_dagster.settings import ErgotSettings, ensure_dagster_home
from ergot_dagster.workflows.settings_schema import SettingsError


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"ergot: error: {message}", err=True)
    sys.exit(code)


def _emit_json(value: Any) -> None:
    def default(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return json.loads(obj.model_dump_json())
        raise TypeError(f"cannot serialise {type(obj).__name__}")

    click.echo(json.dumps(value, indent=2, default=default, ensure_ascii=False))


def _instance(settings: ErgotSettings) -> Any:
    from dagster import DagsterInstance

    ensure_dagster_home(settings)
    return DagsterInstance.get()


def _parse_set(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set width=320 --set preset=fast` -> {"width": 320, "preset": "fast"}.

    Values are read as JSON when they parse as JSON (numbers, booleans, null, lists), otherwise as
    strings; dotted keys build nested objects.
    """
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = settings
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise click.BadParameter(
                    f"{key!r} conflicts with another --set", param_hint="--set"
                )
        target[parts[-1]] = value
    return settings


def _workflow_arguments(command: Any) -> Any:
    """WORKFLOW SOURCE_REF [--set K=V]... [--input NAME=REF]...: what `run` and `submit` share."""
    for decorator in reversed(
        [
            click.argument("workflow"),
            click.argument("source_ref"),
            click.option(
                "--set", "sets", multiple=True, metavar="KEY=VALUE", help="a workflow setting"
            ),
            click.option(
                "--input",
                "input_pairs",
                multiple=True,
                metavar="NAME=REF",
                help="another input: a source ref or an artifact ref",
            ),
        ]
    ):
        command = decorator(command)
    return command


def _parse_inputs(pairs: tuple[str, ...]) -> dict[str, str | list[str]]:
    """`--input voice=artifact:...` -> {"voice": "artifact:..."}; a name given twice is a list."""
    inputs: dict[str, str | list[str]] = {}
    for pair in pairs:
        name, sep, ref = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=REF", param_hint="--input")
        if name in inputs:
            earlier = inputs[name]
            inputs[name] = [*earlier, ref] if isinstance(earlier, list) else [earlier, ref]
        else:
            inputs[name] = ref
    return inputs


class _Errors(click.Group):
    """Turns errors into one clear line on stderr (set ERGOT_DEBUG=1 for the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ErgotError, SettingsError, InvalidRefError, FileNotFoundError) as exc:
            _fail(str(exc))
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # The reader went away (`ergot runs | head`): not an error of ours. Point stdout at
            # /dev/null so that Python's own flush at exit does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:
            # Something outside the plane's own checks (the instance's database unreachable, a
            # missing driver...): still one line naming it, not a wall of traceback.
            if os.environ.get("ERGOT_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {exc}")


@click.group(cls=_Errors)
def main() -> None:
    """Ergot's media processing plane."""


# -- ingest ---------------------------------------------------------------------------------


def _expand(root: Path, paths: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    from ergot_dagster.refs import ref_for_path
    from ergot_dagster.sources.ingest import scan_root

    refs: list[str] = []
    errors: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_absolute() and not path.exists() and (root / raw).exists():
            path = root / raw  # a ref given relative to the root
        try:
            if path.is_dir() and not path.is_symlink():
                prefix = ref_for_path(root, path) + "/" if path.resolve() != root.resolve() else ""
                refs += [prefix + r for r in scan_root(path)]
            else:
                refs.append(ref_for_path(root, path))
        except (InvalidRefError, OSError) as exc:
            errors.append((raw, str(exc)))
    return list(dict.fromkeys(refs)), errors


@main.command()
@click.option("--root", type=click.Path(file_okay=False), help="ingest root (ERGOT_INGEST_ROOT)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.argument("paths", nargs=-1, required=True)
def ingest(root: str | None, as_json: bool, paths: tuple[str, ...]) -> None:
    """Record files (or folders of files) under the ingest root as source media."""
    from ergot_dagster.refs import ref_to_partition_key
    from ergot_dagster.sources.ingest import ingest_refs
    from ergot_dagster.sources.record import SourceRecordLookup, record_sources

    settings = ErgotSettings.from_env()
    location = root or settings.ingest_root
    source_root: Any
    if location.startswith("s3://"):
        # In object storage, names are refs (or folders) relative to the prefix.
        from ergot_dagster.sources.root import open_source_root

        try:
            source_root = open_source_root(location)
        except ErgotError as exc:
            _fail(f"the ingest root {location}: {exc}")
        problem = source_root.problem()
        if problem:
            _fail(problem)
        refs, errors = source_root.expand(paths)
        root_label = source_root.location
    else:
        root_path = source_root = Path(location).expanduser()
        if not root_path.is_dir():
            _fail(f"the ingest root {root_path} does not exist")
        refs, errors = _expand(root_path, paths)
        root_label = str(root_path.resolve())
    instance = _instance(settings)
    keys = []
    for ref in refs:
        try:
            keys.append(ref_to_partition_key(ref))
        except InvalidRefError:
            continue  # ingest_refs refuses it with the reason
    # Previous records are read a chunk at a time, and new ones written in batches while the
    # files after them are hashed and probed: no transaction per file.
    outcomes = ingest_refs(
        source_root,
        refs,
        SourceRecordLookup(instance, keys),
        record=lambda records: record_sources(instance, records),
    )
    refused = [(o.ref, o.error or "") for o in outcomes if o.status == "refused"] + errors
    if as_json:
        _emit_json(
            {
                "root": root_label,
                "ingested": [
                    {
                        "ref": o.ref,
                        "status": o.status,
                        "sha256": o.record.sha256,
                        "size": o.record.size,
                        "media_type": o.record.media_type,
                    }
                    for o in outcomes
                    if o.record
                ],
                "refused": [{"path": p, "error": e} for p, e in refused],
            }
        )
    else:
        for o in outcomes:
            if o.record:
                click.echo(f"{o.record.sha256}  {o.ref}  ({o.status}, {o.record.media_type})")
    for path, error in refused:
        click.echo(f"ergot: refused {path}: {error}", err=True)
    if refused:
        sys.exit(1)


# -- workflows ------------------------------------------------------------------------------


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def workflows(ctx: click.Context, as_json: bool) -> None:
    """List workflows and their published versions."""
    if ctx.invoked_subcommand is not None:
        return
    from ergot_dagster.workflows.loader import load_registry

    registry = load_registry(ErgotSettings.from_env().workflow_defs)
    rows = [
        {
            "name": name,
            "family": registry.latest(name).family,
            "versions": [d.version for d in registry.versions(name)],
            "latest": registry.latest(name).version,
            "runtime": registry.latest(name).runtime,
            "capabilities": registry.latest(name).capabilities,
            "outputs": {k: v.media_type for k, v in registry.latest(name).outputs.items()},
            "description": registry.latest(name).description,
        }
        for name in registry.names()
    ]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        versions = ",".join(str(v) for v in row["versions"])
        click.echo(
            f"{row['family']}/{row['name']}  versions {versions} (latest "
            f"{row['latest']})  runtime {row['runtime']}  outputs "
            f"{', '.join(row['outputs'])}"
        )


@workflows.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.argument("paths", nargs=-1)
def publish(as_json: bool, paths: tuple[str, ...]) -> None:
    """Lock new workflow versions in workflow_defs/workflows.lock: every new one, or only PATHS
    (relative to workflow_defs/, e.g. speech/transcribe.v1.yaml)."""
    from ergot_dagster.workflows.loader import publish as publish_versions

    published = publish_versions(
        ErgotSettings.from_env().workflow_defs, list(paths) if paths else None
    )
    if as_json:
        _emit_json({"published": [d.ref for d in published]})
        return
    if not published:
        click.echo("nothing new to publish")
    for definition in published:
        click.echo(f"published {definition.ref}")


# -- runtime targets ------------------------------------------------------------------------


@main.command()
@click.option("--probe", is_flag=True, help="probe every target now (and record the result)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def targets(probe: bool, as_json: bool) -> None:
    """List the runtime targets with their last recorded health."""
    from ergot_dagster.targets.config import load_targets
    from ergot_dagster.targets.health import last_health, max_age_s, probe_all

    settings = ErgotSettings.from_env()
    config = load_targets(settings.runtime_targets)
    instance = _instance(settings)
    if probe:
        healths = probe_all(config)
        for health in healths:
            instance.report_runless_asset_event(health.observation())
            instance.report_runless_asset_event(health.check_evaluation())
    else:
        healths = [last_health(instance, target) for target in config.targets]
    rows = []
    for target, health in zip(config.targets, healths, strict=True):
        age = health.age_s()
        stale = age is not None and age > max_age_s()
        rows.append(
            {
                "name": target.name,
                "runtime": target.runtime,
                "locality": target.locality.model_dump(),
                "endpoint": target.public_endpoint,
                "concurrency": target.concurrency,
                "capabilities": target.capabilities,
                "routing": target.routing.model_dump(),
                "health": {**health.model_dump(mode="json"), "age_s": age, "stale": stale},
            }
        )
    if as_json:
        _emit_json(rows)
        return
    for row, health in zip(rows, healths, strict=True):
        age = row["health"]["age_s"]
        when = "never probed" if age is None else f"{age:.0f} s ago"
        if row["health"]["stale"]:
            when += ", too old to count"
        latency = f" {health.latency_ms:.0f} ms" if health.latency_ms is not None else ""
        click.echo(
            f"{row['name']:<22} {row['runtime']:<14} {row['locality']['kind']:<6} "
            f"x{row['concurrency']:<3} {health.status.upper():<7}{latency}  ({when})  "
            f"{health.detail if health.status != 'unknown' else ''}".rstrip()
        )


# -- run ------------------------------------------------------------------------------------


@main.command()
@_workflow_arguments
@click.option("--verbose", is_flag=True, help="show the run's log as it happens")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def run(
    workflow: str,
    source_ref: str,
    sets: tuple[str, ...],
    input_pairs: tuple[str, ...],
    verbose: bool,
    as_json: bool,
) -> None:
    """Run WORKFLOW[@VERSION] on SOURCE_REF now, as a Dagster run, and wait for it."""
    from ergot_dagster.workflows.sync_run import run_workflow

    settings = ErgotSettings.from_env()
    inputs = _parse_inputs(input_pairs)
    outcome = run_workflow(
        workflow,
        source_ref,
        _parse_set(sets),
        instance=_instance(settings),
        settings=settings,
        inputs=inputs,
        # The outcome is printed below; Dagster's own console lines only with --verbose.
        log_level="INFO" if verbose else "CRITICAL",
    )
    if as_json:
        _emit_json(outcome)
    else:
        click.echo(
            f"run {outcome.run_id}  {outcome.status}  {outcome.workflow}  {outcome.source_ref}"
        )
        for manifest in outcome.artifacts:
            click.echo(
                f"  {manifest.ref}  {manifest.media_type}  {manifest.size} bytes  "
                f"sha256 {manifest.sha256}"
            )
            click.echo(f"      {manifest.uri}")
        for check in outcome.checks:
            mark = "pass" if check["passed"] else "FAIL"
            click.echo(f"  check {check['check']}: {mark} - {check['description']}")
    if outcome.status != "SUCCESS":
        _fail(f"run {outcome.run_id} {outcome.status}: {outcome.error or 'see the run log'}")


# -- requests through the queue -------------------------------------------------------------


def _client() -> Any:
    """A client of the plane at ERGOT_DAGSTER_URL (default http://127.0.0.1:3000)."""
    from ergot_dagster.client import ErgotClient

    return ErgotClient.from_env()


def _client_errors() -> tuple[type[Exception], ...]:
    from ergot_dagster.client import ClientError

    return (ClientError, TimeoutError)


def _print_status(status: Any, as_json: bool) -> None:
    if as_json:
        _emit_json(status)
        return
    started = status.created_at.strftime("%Y-%m-%d %H:%M:%S") if status.created_at else "-"
    click.echo(
        f"run {status.run_id}  {status.status}  {status.workflow or '-'}  "
        f"source {status.source_ref or '-'}  request {status.request_id or '-'}  "
        f"priority {status.priority}  created {started}"
    )
    if status.parent_run_id:
        click.echo(f"  retry of {status.parent_run_id}")
    for outcome in status.artifacts:
        detail = outcome.ref or outcome.error or ""
        click.echo(f"  {outcome.name:<16} {outcome.status:<12} {detail}")
    if status.error is not None:
        click.echo(f"  error: {status.error.message}")


@main.command()
@_workflow_arguments
@click.option("--request-id", help="idempotency key (default: a new one)")
@click.option("--priority", type=int, default=0, show_default=True, help="higher runs first")
@click.option(
    "--target", default="local", show_default=True, help="local, remote, or a runtime target's name"
)
@click.option(
    "--max-retries",
    type=int,
    default=0,
    show_default=True,
    help="new runs after a run whose worker died",
)
@click.option("--timeout", "timeout_s", type=float, help="bound on the whole run, seconds")
@click.option("--context", "context_json", help="consumer context, a JSON object")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    is_flag=False,
    flag_value=3600.0,
    help="wait for the run to finish (optionally: at most this many seconds)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def submit(
    workflow: str,
    source_ref: str,
    sets: tuple[str, ...],
    input_pairs: tuple[str, ...],
    request_id: str | None,
    priority: int,
    target: str,
    max_retries: int,
    timeout_s: float | None,
    context_json: str | None,
    wait_s: float | None,
    as_json: bool,
) -> None:
    """Queue WORKFLOW[@VERSION] on SOURCE_REF as a request; the daemon runs it."""
    import uuid

    from pydantic import ValidationError

    from ergot_dagster.requests.model import ProcessingRequest, validation_summary

    inputs = _parse_inputs(input_pairs)
    try:
        context = json.loads(context_json) if context_json else {}
        request = ProcessingRequest(
            request_id=request_id or f"cli-{uuid.uuid4()}",
            workflow=workflow,
            sources={"primary": source_ref, "inputs": inputs},
            settings=_parse_set(sets),
            context=context,
            execution_target=target,
            priority=priority,
            max_retries=max_retries,
            timeout_s=timeout_s,
        )
    except ValidationError as exc:
        _fail(f"invalid request: {validation_summary(exc)}")
    except json.JSONDecodeError as exc:
        _fail(f"invalid request: --context is not JSON: {exc}")
    client = _client()
    try:
        handle = client.submit(request)
        if wait_s is not None:
            final = client.wait(handle.run_id, wait_s)
            if as_json:
                _emit_json({**json.loads(final.model_dump_json()), "existing": handle.existing})
            else:
                _print_status(final, as_json)
            if final.status != "SUCCESS":
                _fail(f"run {final.run_id} ended {final.status}")
            return
    except _client_errors() as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(handle)
    else:
        note = " (already accepted)" if handle.existing else ""
        click.echo(f"run {handle.run_id}  {handle.status}  request {handle.request_id}{note}")


def _run_command(action: str) -> Any:
    """A command that applies client method `action` to RUN_ID and prints the run's status."""

    @click.argument("run_id")
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    def command(run_id: str, as_json: bool) -> None:
        try:
            _print_status(getattr(_client(), action)(run_id), as_json)
        except _client_errors() as exc:
            _fail(str(exc))

    return command


main.command(name="status", help="Where a run stands, and each artifact's outcome.")(
    _run_command("status")
)
main.command(
    name="cancel", help="Cancel a run: a queued one never starts, a running one ends CANCELED."
)(_run_command("cancel"))


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def retry(run_id: str, as_json: bool) -> None:
    """Start a new run of a failed or canceled run's request, linked to it."""
    try:
        handle = _client().retry(run_id)
    except _client_errors() as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(handle)
    else:
        click.echo(f"run {handle.run_id}  {handle.status}  retries {run_id}")


@main.command()
@click.argument("artifact_ref")
@click.option("--library", required=True, help="the library, e.g. voices")
@click.option("--name", required=True, help="the entry's name, e.g. narrator-01")
@click.option("--note", default="", help="why it was promoted, for whoever reuses it")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def promote(
    artifact_ref: str, library: str, name: str, note: str, timeout_s: float, as_json: bool
) -> None:
    """Promote an artifact to a library entry that requests can name (library:LIBRARY/NAME)."""
    try:
        entry = _client().promote(
            artifact_ref, library=library, name=name, note=note, timeout_s=timeout_s
        )
    except _client_errors() as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(entry)
    else:
        click.echo(f"{entry.ref}  ->  {entry.artifact}  {entry.media_type}  sha256 {entry.sha256}")


@main.command()
@click.argument("library", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def libraries(library: str | None, as_json: bool) -> None:
    """List promoted library entries (of LIBRARY, if given)."""
    try:
        entries = _client().libraries(library)
    except _client_errors() as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(entries)
        return
    if not entries:
        click.echo("no library entries" + (f" in {library}" if library else ""))
    for entry in entries:
        promoted = entry.promoted_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{entry.ref:<40} {entry.media_type:<18} {entry.artifact}  promoted {promoted}"
            + (f"  ({entry.note})" if entry.note else "")
        )


@main.command()
@click.option("--workflow", help="`name` or `name@version`")
@click.option("--status", "statuses", multiple=True, help="e.g. QUEUED, STARTED, FAILURE")
@click.option("--source", "source_ref", help="a source ref")
@click.option("--request-id", help="a request id")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--cursor", help="the cursor printed after the previous page")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def runs(
    workflow: str | None,
    statuses: tuple[str, ...],
    source_ref: str | None,
    request_id: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List runs, newest first, one page at a time."""
    try:
        page = _client().list_runs(
            workflow=workflow,
            status=list(statuses) or None,
            source_ref=source_ref,
            request_id=request_id,
            limit=limit,
            cursor=cursor,
        )
    except _client_errors() as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(page)
        return
    for status in page.runs:
        click.echo(
            f"{status.run_id}  {status.status:<9} {status.workflow or '-':<24} "
            f"{status.source_ref or '-'}  request {status.request_id or '-'}"
        )
    if not page.runs:
        click.echo("no runs")
    if page.has_more:
        click.echo(f"more: --cursor {page.cursor}")


@main.command()
@click.argument("run_id")
@click.option("--all", "everything", is_flag=True, help="also Dagster's own step/engine events")
@click.option("--cursor", help="read on from this cursor")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def events(run_id: str, everything: bool, cursor: str | None, as_json: bool) -> None:
    """A run's structured events: stages, progress, artifacts, failures."""
    try:
        page = _client().events(run_id, cursor=cursor)
    except _client_errors() as exc:
        _fail(str(exc))
    shown = [
        e
        for e in page.events
        if everything
        or e.kind
        or e.type in ("ASSET_MATERIALIZATION", "STEP_FAILURE", "RUN_FAILURE", "RUN_SUCCESS")
        or e.type.startswith("RUN_")
    ]
    if as_json:
        _emit_json({**json.loads(page.model_dump_json()), "events": shown})
        return
    for event in shown:
        label = event.kind or event.type
        click.echo(f"{event.timestamp:%H:%M:%S.%f}"[:-3] + f"  {label:<22} {event.message}")
    if page.has_more:
        click.echo(f"more: --cursor {page.cursor}")


# -- artifacts and lineage ------------------------------------------------------------------


@main.command()
@click.argument("run_id")
@click.option(
    "--presign",
    is_flag=True,
    help="also give a presigned URL for each file (object storage only), for consumers that "
    "cannot reach the bucket",
)
@click.option(
    "--expires",
    type=click.IntRange(1, 7 * 24 * 3600),
    default=3600,
    show_default=True,
    help="seconds a presigned URL stays valid",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def artifacts(run_id: str, presign: bool, expires: int, as_json: bool) -> None:
    """List the artifact manifests a run produced."""
    from ergot_dagster.artifacts.store import open_store

    settings = ErgotSettings.from_env()
    instance = _instance(settings)
    if instance.get_run_by_id(run_id) is None:
        _fail(f"unknown run {run_id!r}")
    store = open_store(settings.storage)
    manifests = store.list_run(run_id)
    # Presigning is local arithmetic with this machine's credentials: nothing is sent anywhere.
    urls = {
        uri: store.presigned_url(uri, expires)
        for manifest in (manifests if presign else [])
        for uri in (manifest.uri, *(member.uri for member in manifest.members))
    }
    if as_json:
        if not presign:
            _emit_json(manifests)
            return
        rows = []
        for manifest in manifests:
            row = json.loads(manifest.model_dump_json())
            row["presigned_url"] = urls[manifest.uri]
            for member in row["members"]:
                member["presigned_url"] = urls[member["uri"]]
            row["presigned_expires_s"] = expires
            rows.append(row)
        _emit_json(rows)
        return
    if not manifests:
        click.echo(f"run {run_id} produced no artifacts")
    for manifest in manifests:
        click.echo(
            f"{manifest.ref}  {manifest.media_type}  {manifest.size} bytes  sha256 "
            f"{manifest.sha256}  {manifest.uri}"
        )
        if presign:
            click.echo(f"    presigned for {expires} s: {urls[manifest.uri]}")
        for member in manifest.members:
            click.echo(f"    {member.name}  {member.size} bytes  sha256 {member.sha256}")
            if presign:
                click.echo(f"        presigned for {expires} s: {urls[member.uri]}")


@main.command()
@click.argument("artifact_ref")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def lineage(artifact_ref: str, as_json: bool) -> None:
    """Print an artifact's parents, down to the ingested source files and their sha256."""
    from ergot_dagster.artifacts.lineage import render, store_entries, store_manifests, walk
    from ergot_dagster.artifacts.store import open_store
    from ergot_dagster.refs import ref_to_partition_key
    from ergot_dagster.sources.record import latest_source_record

    settings = ErgotSettings.from_env()
    instance = _instance(settings)
    store = open_store(settings.storage)
    tree = walk(
        artifact_ref,
        store_manifests(store),
        lambda ref: latest_source_record(instance, ref_to_partition_key(ref)),
        store_entries(store),
    )
    if as_json:
        _emit_json(tree)
    else:
        for line in render(tree):
            click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    main()
