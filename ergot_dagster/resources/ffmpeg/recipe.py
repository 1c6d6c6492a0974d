"""What an FFmpeg recipe receives and returns, and the registry of recipes by name.

A recipe is one named operation an FFmpeg stage can ask for (`operation: poster`). It gets its
inputs and parameters, a private work directory and a bounded way to run ffmpeg, and returns the
paths of its outputs by output name.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError, SourceError
from ergot_dagster.media.probe import ProbeSummary, probe
from ergot_dagster.media.process import ProcessResult, run_process
from ergot_dagster.resources.runtime import ProgressReporter, StageFile, no_progress


@dataclass
class RecipeOutput:
    """A recipe's outputs (a list of paths for an image set) and metadata for the event log."""

    outputs: dict[str, Path | list[Path]]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeContext:
    """The world as a recipe sees it."""

    inputs: dict[str, StageFile | list[StageFile]]
    params: dict[str, Any]
    workdir: Path
    deadline: float
    log: logging.Logger
    ffmpeg_path: str = "ffmpeg"
    threads: int = 0
    pids: list[int] = field(default_factory=list)
    progress: ProgressReporter = no_progress

    def input(self, name: str) -> StageFile:
        """The single file bound to input `name`."""
        value = self.inputs.get(name)
        if value is None:
            raise PermanentRuntimeError(f"the stage has no input named {name!r}")
        if isinstance(value, list):
            raise PermanentRuntimeError(f"input {name!r} is a set of files, not one file")
        return value

    def files(self, name: str) -> list[StageFile]:
        """The files bound to input `name`, in order; a single file is a list of one."""
        value = self.inputs.get(name)
        if value is None:
            raise PermanentRuntimeError(f"the stage has no input named {name!r}")
        return list(value) if isinstance(value, list) else [value]

    def param(self, name: str, default: Any = None) -> Any:
        value = self.params.get(name)
        return default if value is None else value

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RuntimeTimeoutError("the stage used up its time budget")
        return left

    def ffmpeg(
        self, args: Sequence[str], *, check: bool = True, progress_of_s: float | None = None
    ) -> ProcessResult:
        """Run ffmpeg with `args` (after the common flags), bounded by the stage's deadline.

        With `progress_of_s` (the length of media the command processes), ffmpeg's `-progress`
        reports are turned into progress of the stage.
        """
        full = [self.ffmpeg_path, "-hide_banner", "-nostdin", "-y"]
        if self.threads:
            full += ["-threads", str(self.threads)]
        on_line = None
        if progress_of_s:
            full += ["-progress", "pipe:1", "-stats_period", "1"]
            on_line = _progress_parser(progress_of_s, self.progress)
        result = run_process(
            [*full, *args],
            timeout_s=self.remaining(),
            tool="ffmpeg",
            check=check,
            on_stdout_line=on_line,
        )
        self.pids.append(result.pid)
        return result

    def probe(self, path: Path) -> ProbeSummary:
        """Probe `path`; media ffprobe cannot read fails the stage permanently (no retry)."""
        try:
            return probe(path, timeout_s=min(self.remaining(), 60.0))
        except SourceError as exc:
            raise PermanentRuntimeError(str(exc)) from exc

    def probe_of(self, name: str) -> ProbeSummary:
        """The probe of input `name`, reusing the one recorded at ingest when there is one."""
        stage_file = self.input(name)
        return stage_file.probe or self.probe(stage_file.path)


def _progress_parser(total_s: float, report: ProgressReporter) -> Callable[[str], None]:
    """Turn ffmpeg's `-progress` key=value lines into fractions of `total_s`."""

    def on_line(line: str) -> None:
        key, _, value = line.partition("=")
        if key == "out_time_us" and value.strip().isdigit():
            done_s = int(value) / 1_000_000
            report(min(1.0, done_s / total_s), f"{done_s:.1f} of {total_s:.1f} s")
        elif key == "progress" and value.strip() == "end":
            report(1.0, "done")

    return on_line


Recipe = Callable[[RecipeContext], RecipeOutput]
_RECIPES: dict[str, Recipe] = {}


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Decorator: register a function as the FFmpeg recipe `name`."""

    def register(fn: Recipe) -> Recipe:
        if name in _RECIPES:
            raise ValueError(f"ffmpeg recipe {name!r} is registered twice")
        _RECIPES[name] = fn
        return fn

    return register


def get_recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        known = ", ".join(sorted(_RECIPES))
        raise PermanentRuntimeError(f"ffmpeg has no recipe {name!r} (known: {known})")
    return _RECIPES[name]


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


def write_json(path: Path, document: dict[str, Any]) -> Path:
    """Write a JSON document strictly: NaN and infinities are errors, not invalid JSON."""
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def ffmpeg_available(path: str = "ffmpeg") -> str | None:
    return shutil.which(path)
