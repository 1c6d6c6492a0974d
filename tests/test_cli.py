"""The `ergot` command as a user runs it: a real process, real media, its output and exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance

from ergot_dagster.media.probe import probe
from ergot_dagster.media.synth import make_clip
from ergot_dagster.settings import ErgotSettings
from tests.conftest import subprocess_env

ERGOT = str(Path(sys.executable).parent / "ergot")
DAGSTER = str(Path(sys.executable).parent / "dagster")


def _ergot(settings: ErgotSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ERGOT, *args], env=subprocess_env(settings), capture_output=True, text=True, timeout=300
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ingest_run_artifacts_lineage(plane_settings: ErgotSettings, ingest_root: Path) -> None:
    clip = make_clip(
        ingest_root / "camA" / "2026-11-24" / "take 01.mov",
        duration=4.0,
        size="640x360",
        black_lead_s=1.0,
    )
    ingested = _ergot(plane_settings, "ingest", str(clip))
    assert ingested.returncode == 0, ingested.stderr
    assert ingested.stdout.startswith(f"{_sha(clip)}  camA/2026-11-24/take 01.mov  (new,")

    workflows = json.loads(_ergot(plane_settings, "workflows", "--json").stdout)
    assert {w["name"] for w in workflows} >= {
        "poster_extraction",
        "media_qc",
        "review_proxy",
        "frame_sampling",
    }

    ran = _ergot(
        plane_settings,
        "run",
        "poster_extraction@1",
        "camA/2026-11-24/take 01.mov",
        "--set",
        "width=320",
        "--json",
    )
    assert ran.returncode == 0, ran.stderr
    outcome = json.loads(ran.stdout)
    assert outcome["status"] == "SUCCESS"
    run_id = outcome["run_id"]
    by_name = {a["name"]: a for a in outcome["artifacts"]}
    poster = Path(by_name["poster"]["uri"].removeprefix("file://"))
    assert by_name["poster"]["sha256"] == _sha(poster)
    assert probe(poster).width == 320

    # The run is a Dagster run in the instance the UI reads.
    with DagsterInstance.from_config(str(plane_settings.dagster_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status.value == "SUCCESS"
        assert run.tags["dagster/partition"] == "camA/2026-11-24/take 01.mov"

    listed = json.loads(_ergot(plane_settings, "artifacts", run_id, "--json").stdout)
    assert sorted(m["ref"] for m in listed) == [
        f"artifact:{run_id}/poster",
        f"artifact:{run_id}/poster_info",
    ]

    lineage = _ergot(plane_settings, "lineage", f"artifact:{run_id}/poster")
    assert lineage.returncode == 0
    assert lineage.stdout.splitlines()[-1].strip() == (
        f"<- source camA/2026-11-24/take 01.mov  video/quicktime  sha256 {_sha(clip)}  [current]"
    )
    tree = json.loads(
        _ergot(plane_settings, "lineage", f"artifact:{run_id}/poster", "--json").stdout
    )
    assert tree["parents"][0]["sha256"] == _sha(clip)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "posters", "x.mov"], "unknown workflow 'posters'; known workflows: "),
        (["run", "poster_extraction@7", "x.mov"], "has no version '7'; published versions: 1"),
        (
            ["run", "poster_extraction", "x.mov", "--set", "width=huge"],
            "invalid settings: settings.width: 'huge' is not of type 'integer'",
        ),
        (["run", "poster_extraction", "../../etc/passwd"], "contains a '..' segment"),
        (["run", "poster_extraction", "never/ingested.mov"], "has not been ingested"),
        (["lineage", "artifact:0d9f6c3e-5b7a-4c1e-8f2d-1a2b3c4d5e6f/poster"], "no artifact"),
        (["lineage", "poster"], "is not an artifact ref"),
        (["artifacts", "not-a-run"], "unknown run 'not-a-run'"),
        (["ingest", "/etc/hostname"], "is not inside the ingest root"),
    ],
)
def test_errors_go_to_stderr_with_nonzero_exit(
    plane_settings: ErgotSettings, args: list[str], message: str
) -> None:
    result = _ergot(plane_settings, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_plainly_wrong_requests_leave_no_failed_run(
    plane_settings: ErgotSettings, ingest_root: Path
) -> None:
    make_clip(ingest_root / "a.mp4", duration=1.0)
    assert _ergot(plane_settings, "ingest", str(ingest_root / "a.mp4")).returncode == 0
    wrong_input = _ergot(plane_settings, "run", "review_proxy", "a.mp4", "--input", "voice=x")
    assert wrong_input.returncode == 1
    assert "no input(s) named voice; the inputs are source" in wrong_input.stderr
    with DagsterInstance.from_config(str(plane_settings.dagster_home)) as instance:
        assert instance.get_runs() == []


def test_a_failing_run_prints_one_clear_line(
    plane_settings: ErgotSettings, ingest_root: Path
) -> None:
    make_clip(ingest_root / "a.mp4", duration=1.0)
    assert _ergot(plane_settings, "ingest", str(ingest_root / "a.mp4")).returncode == 0
    make_clip(ingest_root / "a.mp4", duration=2.0)  # changed without re-ingest
    result = _ergot(plane_settings, "run", "review_proxy", "a.mp4")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "FAILURE: review_proxy@1: source 'a.mp4' has changed since it was ingested" in lines[0]


def test_dagster_asset_materialize_for_a_partition(
    plane_settings: ErgotSettings, ingest_root: Path
) -> None:
    make_clip(ingest_root / "odd, name.mp4", duration=2.0)
    assert _ergot(plane_settings, "ingest", str(ingest_root / "odd, name.mp4")).returncode == 0
    result = subprocess.run(
        [
            DAGSTER,
            "asset",
            "materialize",
            "-m",
            "ergot_dagster.definitions",
            "--select",
            "core/review_proxy/proxy",
            "--partition",
            "odd%2C name.mp4",
        ],
        env=subprocess_env(plane_settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifests = list((Path(plane_settings.storage) / "manifests").glob("*/proxy.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["source_ref"] == "odd, name.mp4"
    assert os.path.exists(manifest["uri"].removeprefix("file://"))
