"""photogrammetry/image_set_prep: a ComfyUI graph mapped over frame_sampling's image set.

Dagster samples a real capture (a yellow box moving across a blue backdrop) with ffmpeg, then
runs the background-removal graph once per frame on the loopback ComfyUI server. A user sees one
RGBA PNG per frame, in the frames' order, at the normalised size, the backdrop transparent and
the box opaque; the set's manifest descends from the frames. The adapter's map is also checked
on its own: a bad member names its file, and cancelling or running out of time mid-set takes the
prompt in flight with it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, materialize
from PIL import Image

from ergot_dagster.artifacts.store import open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.process import run_process
from ergot_dagster.media.synth import make_corrupt
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.comfyui.adapter import ComfyUIRuntime
from ergot_dagster.resources.runtime import (
    ProgressReporter,
    StageFile,
    StageRequest,
    no_progress,
)
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.execute import resolve_params
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.model import StageSpec, WorkflowDefinition
from ergot_dagster.workflows.run_config import run_config_for
from ergot_dagster.workflows.settings_schema import apply_defaults
from tests.servers.comfyui_server import ComfyUILoopbackServer
from tests.support import until

LOG = logging.getLogger("test.image_set_prep")
CAPTURE = "cam/turntable take 1.mp4"
BACKDROP = "0x2050a0"
BOX = "0xf0c020"


def make_capture(path: Path, *, duration: float = 2.0, size: str = "320x240") -> Path:
    """A capture to reconstruct: a yellow box sliding right across a plain blue backdrop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_process(
        [
            "ffmpeg",
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            # overlay evaluates its position per frame (drawbox's `t` is its thickness).
            f"color=c={BACKDROP}:s={size}:r=25:d={duration}[backdrop];"
            f"color=c={BOX}:s=100x90:r=25:d={duration}[box];"
            "[backdrop][box]overlay=x='40+60*t':y=70",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        timeout_s=60,
        tool="ffmpeg",
    )
    return path


def make_frame(path: Path, box_x: int) -> Path:
    """One sampled frame as frame_sampling writes them (JPEG): the box at `box_x`."""
    run_process(
        [
            "ffmpeg",
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"color=c={BACKDROP}:s=320x240:d=1,"
            f"drawbox=x={box_x}:y=70:w=100:h=90:color={BOX}:t=fill",
            "-frames:v",
            "1",
            str(path),
        ],
        timeout_s=60,
        tool="ffmpeg",
    )
    return path


def alpha_centre_x(path: Path) -> float:
    """Where the opaque part of an RGBA image lies, left to right (its mean column)."""
    with Image.open(path) as image:
        alpha = np.asarray(image.getchannel("A"))
    columns = np.nonzero(alpha > 127)[1]
    assert columns.size, f"{path.name} is transparent all over"
    return float(columns.mean())


# -- through Dagster -------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ComfyUILoopbackServer]:
    with ComfyUILoopbackServer(step_seconds=0.01) as running:
        yield running


@pytest.fixture
def plane(
    server: ComfyUILoopbackServer,
    plane_settings: ErgotSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> ErgotSettings:
    """The repository's definitions; ffmpeg on this machine and a ComfyUI target at the loopback
    (the root runtime_targets.yaml has no ComfyUI target)."""
    targets = tmp_path / "runtime_targets.yaml"
    targets.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "ffmpeg-local",
                        "runtime": "ffmpeg",
                        "capabilities": ["video.decode", "image.encode"],
                        "locality": {"kind": "local"},
                    },
                    {
                        "name": "comfyui-loop",
                        "runtime": "comfyui",
                        "capabilities": ["image.matte"],
                        "locality": {"kind": "local"},
                        "endpoint": server.url,
                    },
                ]
            }
        )
    )
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(targets))
    return ErgotSettings.from_env()


def materialize_artifacts(
    plane: ErgotSettings,
    instance: DagsterInstance,
    workflow: str,
    artifacts: list[str],
    settings: dict[str, Any],
) -> Any:
    registry = load_registry(plane.workflow_defs)
    spec = registry.get(workflow)
    return materialize(
        build_assets(registry),
        selection=[AssetKey([spec.family, spec.name, name]) for name in artifacts],
        partition_key=ref_to_partition_key(CAPTURE),
        instance=instance,
        resources=build_definitions(plane).resources,
        run_config=run_config_for(spec, settings, None),
        raise_on_error=False,
    )


def test_the_sampled_frames_become_matted_pngs_in_order(
    server: ComfyUILoopbackServer, plane: ErgotSettings, instance: DagsterInstance
) -> None:
    root = Path(plane.ingest_root)
    make_capture(root / CAPTURE)
    outcomes = ingest_refs(root, [CAPTURE], lambda key: latest_source_record(instance, key))
    record_sources(instance, [o.record for o in outcomes if o.record])
    store = open_store(plane.storage)

    # image_set_prep takes frame_sampling's frames of the same capture: sample them first.
    sampled = materialize_artifacts(
        plane, instance, "frame_sampling", ["frames"], {"count": 3, "width": 320}
    )
    assert sampled.success
    frames = {m.name: m for m in store.list_run(sampled.run_id)}["frames"]
    assert len(frames.members) == 3

    result = materialize_artifacts(plane, instance, "image_set_prep", ["images"], {"width": 160})
    assert result.success
    images = {m.name: m for m in store.list_run(result.run_id)}["images"]
    assert (images.kind, images.media_type) == ("set", "image/png")
    assert len(images.members) == len(frames.members)
    positions = []
    for member in images.members:
        path = store.local_path(member.uri)
        box_x = alpha_centre_x(path)
        with Image.open(path) as png:
            assert (png.format, png.mode, png.size) == ("PNG", "RGBA", (160, 120))
            assert png.getpixel((2, 2))[3] == 0  # the backdrop is gone
            assert png.getpixel((round(box_x), 57))[3] == 255  # the box is kept
        positions.append(box_x)
    # In the frames' order: the box moves right through the capture.
    assert positions == sorted(positions) and positions[0] < positions[-1] - 10
    # The set descends from the frames it was made from, by ref and sha256.
    assert [(p.kind, p.ref, p.sha256, p.input) for p in images.parents] == [
        ("artifact", frames.ref, frames.sha256, "frames")
    ]
    # One prompt per frame, all named in the manifest, in order.
    prompts = server.state()["prompts"]
    assert len(prompts) == 3
    assert images.runtime.job_id == ",".join(prompts)
    materialization = result.get_asset_materialization_events()[0].materialization
    stage = materialization.metadata["stage_metadata"].value
    assert stage["comfyui_prompt_ids"] == prompts
    # Each prompt took the frame at its place in the set (stored frames are named by content).
    assert [Path(m["file"]).stem for m in stage["comfyui_members"]] == [
        m.sha256 for m in frames.members
    ]


# -- the adapter's map on its own ------------------------------------------------------------------


@pytest.fixture
def adapter() -> ComfyUIRuntime:
    return ComfyUIRuntime(
        poll_interval_s=0.1,
        quiet_check_s=0.5,
        lost_grace_s=0.6,
        history_wait_s=3.0,
        request_timeout_s=5.0,
        ws_open_timeout_s=3.0,
        cancel_timeout_s=2.0,
    )


def definition() -> WorkflowDefinition:
    return load_registry(PROJECT_ROOT / "workflow_defs").get("image_set_prep")


def set_request(
    workdir: Path,
    url: str,
    frames: list[Path],
    *,
    stage: StageSpec | None = None,
    timeout_s: float = 60.0,
    progress: ProgressReporter = no_progress,
) -> StageRequest:
    spec = definition()
    stage = stage or spec.plan[0]
    settings = apply_defaults(spec.settings, {"width": 64})
    return StageRequest(
        workflow=spec.ref,
        stage=stage,
        run_id="r1",
        inputs={"load.image": [StageFile(path=f, media_type="image/jpeg") for f in frames]},
        params=resolve_params(stage, settings, {}),
        output_types={"save": "image/png"},
        workdir=workdir,
        timeout_s=timeout_s,
        target=RuntimeTarget(name="comfyui-test", runtime="comfyui", endpoint=url),
        progress=progress,
    )


@pytest.fixture
def frames(tmp_path: Path) -> list[Path]:
    (tmp_path / "frames").mkdir()
    return [make_frame(tmp_path / "frames" / f"frame_{i:04d}.jpg", 30 + 60 * i) for i in range(3)]


def test_each_member_is_one_prompt_and_progress_counts_members(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, frames: list[Path], tmp_path: Path
) -> None:
    seen: list[tuple[float | None, str]] = []
    result = adapter.run_stage(
        set_request(tmp_path / "w", server.url, frames, progress=lambda f, m: seen.append((f, m))),
        LOG,
    )
    prompts = server.state()["prompts"]
    assert len(prompts) == 3 and result.job_id == ",".join(prompts)
    outputs = result.outputs["save"]
    assert isinstance(outputs, list) and len(outputs) == 3
    assert len({p.name for p in outputs}) == 3  # distinct names in one workdir
    assert [alpha_centre_x(p) for p in outputs] == sorted(alpha_centre_x(p) for p in outputs)
    # Progress names the member and never goes back.
    assert seen[0][1] == f"load.image 1/3: prompt {prompts[0]} queued on comfyui-test"
    assert any(m.startswith("load.image 3/3: ") for _, m in seen)
    fractions = [f for f, _ in seen if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_member_that_fails_names_its_file(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, frames: list[Path], tmp_path: Path
) -> None:
    frames[1] = make_corrupt(tmp_path / "frames" / "frame_0001.jpg")
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(set_request(tmp_path / "w", server.url, frames), LOG)
    message = str(caught.value)
    assert message.startswith("load.image file 2 of 3 (frame_0001.jpg): ")
    assert "node 1 (LoadImage) raised" in message
    prompts = server.state()["prompts"]
    assert len(prompts) == 2  # the third frame was never sent
    assert caught.value.job_id == prompts[1]


def test_cancelling_mid_set_interrupts_the_prompt_in_flight(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, frames: list[Path], tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.5})  # each matte takes a while, as a model would

    def cancel_during_the_second(fraction: float | None, message: str) -> None:
        # Dagster's run termination arrives the same way: a BaseException while waiting.
        if message.startswith("load.image 2/3") and "(InspyrenetRembgAdvanced) running" in message:
            raise KeyboardInterrupt

    request = set_request(tmp_path / "w", server.url, frames, progress=cancel_during_the_second)
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(request, LOG)
    state = server.state()
    first, second = state["prompts"]  # the third was never sent
    assert state["status"][first] == "success"
    assert state["interrupts"] == [{"prompt_id": second, "hit": True}]
    until(
        "the second prompt to be interrupted",
        lambda: server.state()["status"][second] == "interrupted",
        10,
    )


def test_the_stage_deadline_covers_the_whole_set(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, frames: list[Path], tmp_path: Path
) -> None:
    server.configure({"step_seconds": 30})  # one matte outlasts the stage
    with pytest.raises(RuntimeTimeoutError) as caught:
        adapter.run_stage(set_request(tmp_path / "w", server.url, frames, timeout_s=1.5), LOG)
    (prompt_id,) = server.state()["prompts"]
    message = str(caught.value)
    assert message.startswith("load.image file 1 of 3 (frame_0000.jpg): the stage's 1.5 s ran out")
    assert f"interrupted prompt {prompt_id}" in message
    assert caught.value.job_id == prompt_id
    assert server.state()["interrupts"] == [{"prompt_id": prompt_id, "hit": True}]


def _stage(**changes: Any) -> StageSpec:
    data = {**definition().plan[0].model_dump(exclude_none=True), **changes}
    return StageSpec.model_validate(data)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"for_each": "load.imag"}, "names 'load.imag', which is not one of the stage's `inputs`"),
        ({"for_each": 3}, "names one of the stage's `inputs` keys"),
        ({"for_each": "${settings.width}"}, "names one of the stage's `inputs` keys"),
    ],
)
def test_for_each_must_name_a_stage_input(params: dict[str, Any], message: str) -> None:
    stage = _stage(params={**definition().plan[0].params, **params})
    with pytest.raises(ValueError) as caught:
        ComfyUIRuntime.validate_stage(stage)
    assert message in str(caught.value)


def test_a_set_without_for_each_is_refused_with_the_way_out(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, frames: list[Path], tmp_path: Path
) -> None:
    params = copy.deepcopy(definition().plan[0].params)
    params.pop("for_each")
    request = set_request(tmp_path / "w", server.url, frames, stage=_stage(params=params))
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    assert "input 'load.image' is a set of 3 files" in str(caught.value)
    assert "`for_each: load.image`" in str(caught.value)
    assert server.state()["prompts"] == []
