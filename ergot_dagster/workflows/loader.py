"""Loading workflow definitions from `workflow_defs/`, checked against the version lock.

Files live at `<family>/<name>.v<version>.yaml`. Loading fails, naming the file, when a file is not
valid YAML, breaks the definition model, does not match its path, is not published, or differs from
what was published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ergot_dagster.errors import DefinitionError
from ergot_dagster.workflows.lock import LOCK_FILENAME, LockEntry, WorkflowLock, content_hash
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.registry import WorkflowRegistry

# libyaml's parser when PyYAML has it (the same safe constructor and resolver, so the same data):
# every run worker parses every definition when it loads the code location, and the pure-Python
# parser took most of that time (docs/performance.md).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class DefinitionFile:
    """A parsed, validated definition file and its content hash."""

    path: Path
    relpath: str
    definition: WorkflowDefinition
    sha256: str


def _format_validation(relpath: str, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{relpath}: field `{field}`: {message}")
    return "\n".join(lines)


def parse_file(root: Path, path: Path) -> DefinitionFile:
    """Parse and validate one definition file; `DefinitionError` names the file and field."""
    relpath = path.relative_to(root).as_posix()
    try:
        data: Any = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{relpath}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise DefinitionError(f"{relpath}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise DefinitionError(f"{relpath}: a definition is a YAML mapping of fields")
    try:
        definition = WorkflowDefinition.model_validate(data)
    except ValidationError as exc:
        raise DefinitionError(_format_validation(relpath, exc)) from None
    _check_runnable(relpath, definition)
    expected = f"{definition.family}/{definition.name}.v{definition.version}"
    if relpath.rsplit(".", 1)[0] != expected:
        raise DefinitionError(
            f"{relpath}: holds {definition.ref}, so it must be named {expected}.yaml "
            "(family directory, workflow name, version)"
        )
    return DefinitionFile(
        path=path, relpath=relpath, definition=definition, sha256=content_hash(data)
    )


def _check_runnable(relpath: str, definition: WorkflowDefinition) -> None:
    """Every stage has an adapter that can run it, and every check a known evaluator."""
    # Imported here: the adapters module imports the registry, which this module provides.
    import ergot_dagster.resources.adapters  # noqa: F401  (registers the built-in adapters)
    from ergot_dagster.checks import evaluator_names
    from ergot_dagster.resources.runtime import registered_runtimes

    adapters = registered_runtimes()
    for index, stage in enumerate(definition.plan):
        runtime = stage.runtime or definition.runtime
        adapter = adapters.get(runtime)
        if adapter is None:
            raise DefinitionError(
                f"{relpath}: field `plan.{index}.runtime`: no runtime adapter is registered for "
                f"{runtime!r} (known: {', '.join(sorted(adapters))})"
            )
        try:
            adapter.validate_stage(stage)
        except ValueError as exc:
            field = "operation" if stage.operation is not None else "template"
            raise DefinitionError(f"{relpath}: field `plan.{index}.{field}`: {exc}") from None
    known = evaluator_names()
    for index, check in enumerate(definition.checks):
        if check.evaluator not in known:
            raise DefinitionError(
                f"{relpath}: field `checks.{index}.evaluator`: no check evaluator "
                f"{check.evaluator!r} (known: {', '.join(known)})"
            )


def scan(root: Path) -> list[DefinitionFile]:
    """Every definition under `root`, validated, with duplicate names checked."""
    if not root.is_dir():
        raise DefinitionError(f"workflow definitions directory {root} does not exist")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix in (".yaml", ".yml")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    parsed = [parse_file(root, p) for p in files]
    seen: dict[str, str] = {}
    families: dict[str, str] = {}
    for item in parsed:
        d = item.definition
        if d.spec in seen:
            raise DefinitionError(f"{item.relpath}: {d.spec} is also defined in {seen[d.spec]}")
        seen[d.spec] = item.relpath
        if families.setdefault(d.name, d.family) != d.family:
            raise DefinitionError(
                f"{item.relpath}: workflow {d.name!r} is already in family "
                f"{families[d.name]!r}; workflow names are unique across families"
            )
    return parsed


def _check_against_lock(files: list[DefinitionFile], lock: WorkflowLock) -> None:
    for item in files:
        d = item.definition
        entry = lock.published.get(d.spec)
        if entry is None:
            raise DefinitionError(
                f"{item.relpath}: {d.spec} is not published. Run `ergot workflows publish` to "
                "lock it before it can be loaded."
            )
        if entry.sha256 != item.sha256:
            raise DefinitionError(
                f"{item.relpath}: {d.ref} was published and is immutable, but the file has "
                f"changed since (locked sha256 {entry.sha256[:12]}, now {item.sha256[:12]}). "
                f"Undo the edit, and put the change in a new version instead: copy it to "
                f"{d.family}/{d.name}.v{d.version + 1}.yaml with `version: {d.version + 1}` "
                "and run `ergot workflows publish`."
            )
    present = {item.definition.spec for item in files}
    for spec, entry in sorted(lock.published.items()):
        if spec not in present:
            raise DefinitionError(
                f"{entry.path}: {spec} is published in {LOCK_FILENAME} but the file is missing. "
                "Restore it; published versions are not deleted (remove its lock entry by hand "
                "only to retire it on purpose)."
            )


def load_registry(root: Path) -> WorkflowRegistry:
    """Load every published definition under `root`."""
    files = scan(root)
    _check_against_lock(files, WorkflowLock.read(root / LOCK_FILENAME))
    return WorkflowRegistry([item.definition for item in files])


def publish(root: Path, only: list[str] | None = None) -> list[WorkflowDefinition]:
    """Lock every definition not yet published (or only those whose paths relative to `root` are
    in `only`); refuse if a published one has changed."""
    files = scan(root)
    lock_path = root / LOCK_FILENAME
    lock = WorkflowLock.read(lock_path)
    if only is not None:
        unknown = sorted(set(only) - {item.relpath for item in files})
        if unknown:
            raise DefinitionError(
                f"no definition file {', '.join(unknown)} under {root} (give paths relative to it)"
            )
    new: list[DefinitionFile] = []
    for item in files:
        entry = lock.published.get(item.definition.spec)
        if entry is None and (only is None or item.relpath in only):
            new.append(item)
    # Run the full check on the published part first: publishing never re-locks an edited file.
    _check_against_lock([f for f in files if f not in new], lock)
    for item in new:
        lock.published[item.definition.spec] = LockEntry(
            family=item.definition.family, path=item.relpath, sha256=item.sha256
        )
    if new:
        lock.write(lock_path)
    return [item.definition for item in new]


_cache: dict[tuple[str, int], WorkflowRegistry] = {}


def cached_registry(root: Path) -> WorkflowRegistry:
    """`load_registry`, re-read only when the lock changes (published files never do)."""
    lock = root / LOCK_FILENAME
    key = (str(root), lock.stat().st_mtime_ns if lock.exists() else 0)
    if key not in _cache:
        registry = load_registry(root)
        _cache.clear()
        _cache[key] = registry
    return _cache[key]
