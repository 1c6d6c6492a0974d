"""Evaluators over the JSON report of the `qc` FFmpeg recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.checks import CheckOutcome, evaluator


def _report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _number(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    return None if value is None else float(value)


@evaluator("qc.duration")
def duration_in_range(
    path: Path, manifest: ArtifactManifest, params: dict[str, Any]
) -> CheckOutcome:
    """Duration within [min_s, max_s] (either bound may be absent)."""
    duration = _report(path).get("duration_s")
    low, high = _number(params, "min_s"), _number(params, "max_s")
    if duration is None:
        return CheckOutcome(passed=False, description="the media has no known duration")
    problems = []
    if low is not None and duration < low:
        problems.append(f"shorter than {low:g} s")
    if high is not None and duration > high:
        problems.append(f"longer than {high:g} s")
    return CheckOutcome(
        passed=not problems,
        description=f"duration {duration:.2f} s"
        + (f" is {' and '.join(problems)}" if problems else " is within bounds"),
        metadata={"duration_s": duration, "min_s": low, "max_s": high},
    )


@evaluator("qc.loudness")
def loudness_in_range(
    path: Path, manifest: ArtifactManifest, params: dict[str, Any]
) -> CheckOutcome:
    """Integrated loudness within target ± tolerance and true peak under its ceiling."""
    loudness = _report(path).get("loudness")
    require_audio = bool(params.get("require_audio", False))
    if not loudness:
        return CheckOutcome(
            passed=not require_audio,
            description="no audio stream"
            + (", and audio is required" if require_audio else "; loudness not applicable"),
        )
    target, tolerance = _number(params, "target_lufs"), _number(params, "tolerance_lu")
    ceiling = _number(params, "max_true_peak_dbtp")
    integrated, peak = loudness.get("integrated_lufs"), loudness.get("true_peak_dbtp")
    problems = []
    if target is not None and tolerance is not None:
        if integrated is None:
            problems.append("integrated loudness is unmeasurable (digital silence)")
        elif abs(integrated - target) > tolerance:
            problems.append(
                f"integrated {integrated:.1f} LUFS is outside {target:g} ± {tolerance:g}"
            )
    if ceiling is not None and peak is not None and peak > ceiling:
        problems.append(f"true peak {peak:.1f} dBTP is above {ceiling:g}")
    return CheckOutcome(
        passed=not problems,
        description="; ".join(problems) or "loudness within limits",
        metadata={
            "integrated_lufs": integrated,
            "true_peak_dbtp": peak,
            "target_lufs": target,
            "tolerance_lu": tolerance,
            "max_true_peak_dbtp": ceiling,
        },
    )


def _total_under(kind: str, path: Path, params: dict[str, Any]) -> CheckOutcome:
    report = _report(path)
    total = float((report.get("totals") or {}).get(f"{kind}_s") or 0.0)
    limit = _number(params, "max_total_s")
    segments = report.get(f"{kind}_segments") or []
    passed = limit is None or total <= limit
    return CheckOutcome(
        passed=passed,
        description=f"{total:.2f} s {kind} in {len(segments)} segment(s)"
        + (
            "" if limit is None else (" within " if passed else " over ") + f"the {limit:g} s limit"
        ),
        metadata={f"{kind}_s": total, "segments": len(segments), "max_total_s": limit},
    )


@evaluator("qc.black")
def black_under_limit(
    path: Path, manifest: ArtifactManifest, params: dict[str, Any]
) -> CheckOutcome:
    """Total black video under `max_total_s`."""
    return _total_under("black", path, params)


@evaluator("qc.silence")
def silence_under_limit(
    path: Path, manifest: ArtifactManifest, params: dict[str, Any]
) -> CheckOutcome:
    """Total silent audio under `max_total_s`."""
    return _total_under("silent", path, params)


@evaluator("qc.frozen")
def frozen_under_limit(
    path: Path, manifest: ArtifactManifest, params: dict[str, Any]
) -> CheckOutcome:
    """Total frozen video under `max_total_s`."""
    return _total_under("frozen", path, params)
