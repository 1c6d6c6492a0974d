"""Sparse reconstruction (photogrammetry) on a real engine: COLMAP from the pycolmap wheel, on CPU.

The scene is made here: a textured box on a textured floor before a textured wall, ray-cast with
numpy from twelve cameras on a known arc (fixed seeds, so every run sees the same pixels). The
workflow runs end to end through Dagster: the renders become a capture video (ffmpeg), which is
ingested, sampled by frame_sampling and reconstructed from the sampled frames' set. Camera centres
are checked against the arc up to a similarity, the PLY against the cameras document, lineage
against the input set. The adapter is also called directly for masks, failures, cancellation and
deadlines. Waits poll with deadlines; nothing sleeps and hopes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, materialize
from PIL import Image

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.store import LocalArtifactStore, open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.sniff import verify_media_type
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.adapters import BUILTIN_ADAPTERS
from ergot_dagster.resources.reconstruction.adapter import ReconstructionRuntime
from ergot_dagster.resources.reconstruction.ply import vertex_count
from ergot_dagster.resources.runtime import (
    ProgressReporter,
    StageFile,
    StageRequest,
    StageResult,
    adapter_class,
    no_progress,
)
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.config import load_targets
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.model import StageSpec
from ergot_dagster.workflows.run_config import run_config_for
from tests.servers.comfyui_server import ComfyUILoopbackServer

LOG = logging.getLogger("test.sparse")

# -- the scene ------------------------------------------------------------------------------------

WIDTH, HEIGHT, FOCAL = 640, 480, 520.0
VIEWS = 12
ARC_RADIUS, ARC_HEIGHT, ARC_SPAN_DEG = 5.0, 2.5, 120.0
LOOK_AT = np.array([0.0, 0.0, 0.6])
WALL = 1  # index of the wall among the scene's rectangles

# Axis-aligned textured rectangles: (normal axis, coordinate on it, (u axis, low, high),
# (v axis, low, high)). World z is up; the cameras look at the box from the -y side.
RECTANGLES = [
    (2, 0.0, (0, -3.0, 3.0), (1, -3.0, 3.0)),  # floor
    (1, 3.0, (0, -3.0, 3.0), (2, 0.0, 3.0)),  # wall
    (2, 1.5, (0, -0.75, 0.75), (1, -0.75, 0.75)),  # box top
    (0, -0.75, (1, -0.75, 0.75), (2, 0.0, 1.5)),  # box sides
    (0, 0.75, (1, -0.75, 0.75), (2, 0.0, 1.5)),
    (1, -0.75, (0, -0.75, 0.75), (2, 0.0, 1.5)),
    (1, 0.75, (0, -0.75, 0.75), (2, 0.0, 1.5)),
]


def _texture(rng: np.random.Generator, size: int = 384) -> np.ndarray:
    """Tinted noise at three scales: blobs and corners that SIFT finds from any of the views."""
    image = np.zeros((size, size))
    for cells, amplitude in ((4, 0.5), (16, 0.35), (64, 0.25)):
        grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
        smooth = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        image += amplitude * np.asarray(smooth, dtype=np.float64) / 255
    image = (image - image.min()) / (image.max() - image.min())
    tint = rng.random(3) * 0.6 + 0.4
    return image[..., None] * tint[None, None, :]


def _look_at(centre: np.ndarray) -> np.ndarray:
    """World-to-camera rotation of a camera at `centre` looking at LOOK_AT (x right, y down)."""
    forward = LOOK_AT - centre
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(forward, right), forward])


def arc_centres() -> np.ndarray:
    """The VIEWS camera centres, left to right on the arc."""
    angles = np.radians(np.linspace(-ARC_SPAN_DEG / 2, ARC_SPAN_DEG / 2, VIEWS))
    return np.stack(
        [ARC_RADIUS * np.sin(angles), -ARC_RADIUS * np.cos(angles), np.full(VIEWS, ARC_HEIGHT)],
        axis=1,
    )


def render(
    textures: list[np.ndarray], centre: np.ndarray, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """RGB pixels (H x W x 3, 0..1) of the view from `centre`, by ray casting with bilinear
    texture lookups, and the share of each pixel that shows the box or the floor (a matte)."""
    rotation = _look_at(centre)
    ss = supersample
    xs, ys = np.meshgrid((np.arange(WIDTH * ss) + 0.5) / ss, (np.arange(HEIGHT * ss) + 0.5) / ss)
    rays = np.stack([(xs - WIDTH / 2) / FOCAL, (ys - HEIGHT / 2) / FOCAL, np.ones_like(xs)], -1)
    rays = rays @ rotation  # camera to world: R^T d, row by row
    nearest = np.full(xs.shape, np.inf)
    colour = np.full((*xs.shape, 3), 0.5)
    which = np.full(xs.shape, -1)
    for number, ((axis, at, (ua, u0, u1), (va, v0, v1)), texture) in enumerate(
        zip(RECTANGLES, textures, strict=True)
    ):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (at - centre[axis]) / rays[..., axis]
        hit_at = centre + t[..., None] * rays
        u = (hit_at[..., ua] - u0) / (u1 - u0)
        v = (hit_at[..., va] - v0) / (v1 - v0)
        hit = (t > 1e-6) & (t < nearest) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
        side = texture.shape[0] - 1
        fu = np.clip(u[hit] * side, 0, side - 1e-3)
        fv = np.clip(v[hit] * side, 0, side - 1e-3)
        iu, iv = fu.astype(int), fv.astype(int)
        au, av = (fu - iu)[:, None], (fv - iv)[:, None]
        colour[hit] = (
            texture[iv, iu] * (1 - au) * (1 - av)
            + texture[iv, iu + 1] * au * (1 - av)
            + texture[iv + 1, iu] * (1 - au) * av
            + texture[iv + 1, iu + 1] * au * av
        )
        nearest[hit] = t[hit]
        which[hit] = number
    pixels = colour.reshape(HEIGHT, ss, WIDTH, ss, 3).mean(axis=(1, 3))
    kept = ((which != WALL) & (which >= 0)).reshape(HEIGHT, ss, WIDTH, ss).mean(axis=(1, 3))
    return pixels, kept


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Twelve views as PNGs, the same with the wall transparent (RGBA), and a capture video."""
    root = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(7)
    textures = [_texture(rng) for _ in RECTANGLES]
    views, cutouts = [], []
    for number, centre in enumerate(arc_centres(), start=1):
        pixels, kept = render(textures, centre)
        rgb = (pixels * 255).round().clip(0, 255).astype(np.uint8)
        view = root / f"view_{number:02d}.png"
        Image.fromarray(rgb).save(view)
        views.append(view)
        # The wall (and the empty sky) removed, as a background removal would leave it.
        alpha = (kept * 255).round().astype(np.uint8)
        cutout = root / f"cutout_{number:02d}.png"
        Image.fromarray(np.dstack([rgb, alpha])).save(cutout)
        cutouts.append(cutout)
    capture = root / "orbit.mp4"
    # One view every half second, each held for five frames at 10 fps: frame_sampling's 12
    # frames fall in the middle of each view's half second (a seek returns the first frame at or
    # after the time asked for, so a view held for a single frame would be missed).
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-nostdin", "-y", "-loglevel", "error",
            "-framerate", "2", "-i", str(root / "view_%02d.png"),
            "-r", "10", "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p", str(capture),
        ],
        check=True,
        timeout=120,
    )  # fmt: skip
    return {"views": views, "cutouts": cutouts, "capture": capture}


# -- checking a reconstruction --------------------------------------------------------------------


class Similarity:
    """The similarity (scale, rotation, shift) that best maps `found` onto `truth` (Umeyama)."""

    def __init__(self, found: np.ndarray, truth: np.ndarray) -> None:
        self.mean_found, self.mean_truth = found.mean(axis=0), truth.mean(axis=0)
        f, t = found - self.mean_found, truth - self.mean_truth
        u, singular, vt = np.linalg.svd(t.T @ f / len(found))
        flip = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
        self.rotation = u @ flip @ vt
        self.scale = float(np.trace(np.diag(singular) @ flip) / (f**2).sum(axis=1).mean())
        self.rms = float(np.sqrt(((self(found) - truth) ** 2).sum(axis=1).mean()))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return self.scale * (points - self.mean_found) @ self.rotation.T + self.mean_truth


def arc_fit(doc: dict[str, Any]) -> Similarity:
    """The registered centres lie on the rendered arc, in order; the fit that puts them there."""
    indices = np.array([image["index"] for image in doc["images"]])
    found = np.array([image["centre"] for image in doc["images"]])
    fit = Similarity(found, arc_centres()[indices - 1])
    # Within 1% of the arc's radius (5 cm here), camera by camera.
    errors = np.linalg.norm(fit(found) - arc_centres()[indices - 1], axis=1)
    assert fit.rms < 0.01 * ARC_RADIUS, f"centres off the arc by {fit.rms:.3f} RMS: {errors}"
    aligned = fit(found)
    azimuths = np.arctan2(aligned[:, 0], -aligned[:, 1])
    assert list(np.argsort(azimuths)) == list(np.argsort(indices))
    return fit


def check_document(doc: dict[str, Any], *, images: int, min_registered: int) -> None:
    counts = doc["counts"]
    assert doc["format"] == "ergot.sparse/1"
    assert doc["engine"]["name"] == "colmap" and doc["engine"]["pycolmap"].startswith("4.")
    assert counts["input_images"] == images
    assert counts["registered_images"] == len(doc["images"]) >= min_registered
    assert len(doc["images"]) + len(doc["unregistered"]) == images
    assert counts["points"] > 1000
    assert 0 < counts["mean_reprojection_error_px"] < 1.0
    assert counts["mean_track_length"] > 2.5
    for image in doc["images"]:
        camera = image["camera"]
        assert (camera["model"], camera["width"], camera["height"]) == ("SIMPLE_RADIAL", 640, 480)
        # The renders' focal length is 520 px; a camera's own calibration finds it within 2%.
        assert abs(camera["params"]["f"] - FOCAL) < 0.02 * FOCAL
        assert abs(np.linalg.norm(image["rotation_wxyz"]) - 1) < 1e-6
        assert image["observations"] > 100


# -- calling the adapter directly -----------------------------------------------------------------


def local_target(**options: Any) -> RuntimeTarget:
    return RuntimeTarget(
        name="reconstruction-test",
        runtime="reconstruction",
        capabilities=["sfm.sparse"],
        options={"threads": 2, **options},
    )


def stage_request(
    workdir: Path,
    images: list[Path],
    *,
    target: RuntimeTarget | None = None,
    params: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
    progress: ProgressReporter = no_progress,
    media_type: str = "image/png",
) -> StageRequest:
    return StageRequest(
        workflow="photogrammetry/sparse_reconstruction@1",
        stage=StageSpec(
            id="sparse",
            runtime="reconstruction",
            operation="sparse_reconstruction",
            inputs={"images": "${inputs.images}"},
        ),
        run_id="r1",
        inputs={"images": [StageFile(path=p, media_type=media_type) for p in images]},
        params=params or {},
        output_types={
            "points": "model/x-ply",
            "cameras": "application/json",
            "model": "application/zip",
        },
        workdir=workdir,
        timeout_s=timeout_s,
        target=target or local_target(),
        progress=progress,
    )


def document_of(result: StageResult) -> dict[str, Any]:
    path = result.outputs["cameras"]
    assert isinstance(path, Path)
    verify_media_type(path, "application/json", "cameras")
    return json.loads(path.read_text())


def _worker_pids(job_file: Path) -> list[int]:
    """The live processes whose command line names `job_file` (the stage's worker)."""
    needle = str(job_file).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if needle in cmdline and "State:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


def test_a_transparent_background_is_masked_out(scene: dict[str, Any], tmp_path: Path) -> None:
    """RGBA cutouts (the wall removed, as image_set_prep leaves them) reconstruct the box and
    floor and no point of the wall; matched sequentially, each image with its next four."""
    progress: list[tuple[float | None, str]] = []
    result = ReconstructionRuntime().run_stage(
        stage_request(
            tmp_path / "w",
            scene["cutouts"],
            params={"matcher": "sequential", "sequential_overlap": 4},
            progress=lambda f, m: progress.append((f, m)),
        ),
        LOG,
    )
    assert result.job_id is not None and result.job_id.startswith("pid:")
    doc = document_of(result)
    check_document(doc, images=VIEWS, min_registered=VIEWS - 1)
    assert doc["engine"]["masked_images"] == VIEWS
    assert (doc["params"]["matcher"], doc["params"]["sequential_overlap"]) == ("sequential", 4)
    assert result.metadata["registered_images"] == doc["counts"]["registered_images"]
    # Points into the scene's frame, by the similarity that puts the cameras on the arc.
    fit = arc_fit(doc)
    ply = result.outputs["points"]
    assert isinstance(ply, Path)
    count = vertex_count(ply)
    assert count == doc["counts"]["points"]
    body = ply.read_bytes()[-count * 15 :]
    vertices = np.frombuffer(body, dtype=np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)]))[
        "xyz"
    ].astype(np.float64)
    world = fit(vertices)
    # The wall stands at y = 3; the box and floor end at y = 0.75 and 3. Points near the wall
    # plane above the floor would be the wall's.
    on_wall = (world[:, 1] > 2.8) & (world[:, 2] > 0.2)
    assert on_wall.mean() < 0.01, f"{on_wall.sum()} of {count} points on the removed wall"
    fractions = [f for f, _ in progress if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


@pytest.mark.parametrize("kind", ["blank", "identical"])
def test_images_without_parallax_fail_permanently_saying_how_many_registered(
    kind: str, scene: dict[str, Any], tmp_path: Path
) -> None:
    images = []
    for number in range(1, 7):
        path = tmp_path / f"{kind}_{number}.png"
        if kind == "blank":
            Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128)).save(path)
        else:
            path.write_bytes(scene["views"][0].read_bytes())
        images.append(path)
    with pytest.raises(PermanentRuntimeError) as caught:
        ReconstructionRuntime().run_stage(stage_request(tmp_path / "w", images), LOG)
    message = str(caught.value)
    assert "of 6 images registered; at least 3 are needed" in message, message
    assert message.startswith("only 0 of 6") or message.startswith("only 1 of 6"), message
    if kind == "blank":
        assert "a median of 0 features and 0 geometrically verified image pairs" in message
    assert (caught.value.job_id or "").startswith("pid:")
    assert not caught.value.transient


def test_bad_params_options_and_inputs_fail_permanently_naming_them(
    scene: dict[str, Any], tmp_path: Path
) -> None:
    adapter = ReconstructionRuntime()
    views = scene["views"][:3]
    cases: list[tuple[StageRequest, str]] = [
        (stage_request(tmp_path / "a", views, params={"matcher": "vocab"}), "matcher"),
        (stage_request(tmp_path / "b", views, params={"max_features": "many"}), "max_features"),
        (stage_request(tmp_path / "c", views, target=local_target(threads=-1)), "threads"),
        (stage_request(tmp_path / "d", views, target=local_target(engine="openmvg")), "engine"),
        (stage_request(tmp_path / "e", views[:1]), "set of 2 to"),
        (stage_request(tmp_path / "f", views, media_type="video/mp4"), "not an image"),
    ]
    remote = RuntimeTarget(
        name="reconstruction-far", runtime="reconstruction", endpoint="http://127.0.0.1:9"
    )
    cases.append((stage_request(tmp_path / "g", views, target=remote), "this machine only"))
    for request, needle in cases:
        with pytest.raises(PermanentRuntimeError, match=needle):
            adapter.run_stage(request, LOG)
        assert not (request.workdir / "worker_job.json").exists()


def test_an_undecodable_image_fails_permanently_naming_its_place(
    scene: dict[str, Any], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    images = [scene["views"][0], junk, scene["views"][1]]
    with pytest.raises(PermanentRuntimeError, match="image 2 of 3 cannot be decoded"):
        ReconstructionRuntime().run_stage(stage_request(tmp_path / "w", images), LOG)


def test_a_cancelled_run_kills_the_worker_at_once(scene: dict[str, Any], tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    seen: list[int] = []

    def interrupt(fraction: float | None, message: str) -> None:
        # COLMAP is extracting features: cancel the run now, the way Dagster's run termination
        # arrives (a BaseException in the waiting thread).
        if message.startswith("extracting features"):
            seen.extend(_worker_pids(workdir / "worker_job.json"))
            raise KeyboardInterrupt

    adapter = ReconstructionRuntime(poll_interval_s=0.05)
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(stage_request(workdir, scene["views"], progress=interrupt), LOG)
    assert seen, "the worker was running when the run was cancelled"
    assert _worker_pids(workdir / "worker_job.json") == []
    assert not (workdir / "outputs" / "cameras.json").exists()


def test_a_stage_past_its_deadline_kills_the_worker_and_is_transient(
    scene: dict[str, Any], tmp_path: Path
) -> None:
    workdir = tmp_path / "w"
    with pytest.raises(RuntimeTimeoutError) as caught:
        ReconstructionRuntime(poll_interval_s=0.05).run_stage(
            stage_request(workdir, scene["views"], timeout_s=2.0), LOG
        )
    assert "did not finish within 2 s" in str(caught.value)
    assert "killed the reconstruction worker" in str(caught.value)
    assert caught.value.transient and (caught.value.job_id or "").startswith("pid:")
    assert _worker_pids(workdir / "worker_job.json") == []


def test_health_says_which_engine_and_refuses_bad_targets() -> None:
    adapter = ReconstructionRuntime()
    report = adapter.health(local_target())
    assert report.healthy, report.detail
    assert report.info["engine"] == "colmap" and report.info["pycolmap"].startswith("4.")
    assert report.detail.startswith("COLMAP (pycolmap 4.")
    assert not adapter.health(local_target(threads="all")).healthy
    remote = RuntimeTarget(
        name="reconstruction-far", runtime="reconstruction", endpoint="http://127.0.0.1:9"
    )
    assert "this machine only" in adapter.health(remote).detail


def test_the_adapter_is_registered_and_checks_stage_shape() -> None:
    assert adapter_class("reconstruction") is ReconstructionRuntime
    assert ReconstructionRuntime in BUILTIN_ADAPTERS
    ReconstructionRuntime.validate_stage(
        StageSpec(
            id="s",
            operation="sparse_reconstruction",
            inputs={"images": "${inputs.images}"},
            outputs={"points": "points"},
        )
    )
    with pytest.raises(ValueError, match="sparse_reconstruction"):
        ReconstructionRuntime.validate_stage(StageSpec(id="s", operation="dense"))
    with pytest.raises(ValueError, match="images"):
        ReconstructionRuntime.validate_stage(
            StageSpec(
                id="s", operation="sparse_reconstruction", inputs={"frames": "${inputs.source}"}
            )
        )
    with pytest.raises(ValueError, match="mesh"):
        ReconstructionRuntime.validate_stage(
            StageSpec(
                id="s",
                operation="sparse_reconstruction",
                inputs={"images": "${inputs.images}"},
                outputs={"mesh": "mesh"},
            )
        )


def test_the_workflow_routes_to_the_local_target() -> None:
    from ergot_dagster.targets.routing import route

    definition = load_registry(PROJECT_ROOT / "workflow_defs").get("sparse_reconstruction")
    assert definition.ref == "photogrammetry/sparse_reconstruction@1"
    assert definition.inputs["images"].asset == "photogrammetry/image_set_prep/images"
    targets = load_targets(PROJECT_ROOT / "runtime_targets.yaml")
    assert route(definition, targets)["reconstruction"].name == "reconstruction-local"


# -- the workflow in Dagster ----------------------------------------------------------------------


class Plane:
    """The plane's own assets and resources on a private instance, and runs through Dagster."""

    def __init__(self, settings: ErgotSettings, instance: DagsterInstance) -> None:
        self.instance = instance
        self.registry = load_registry(settings.workflow_defs)
        self.defs = build_definitions(settings)
        self.assets = build_assets(self.registry)
        store = open_store(settings.storage)
        assert isinstance(store, LocalArtifactStore)
        self.store = store

    def ingest(self, root: Path, ref: str) -> str:
        outcomes = ingest_refs(root, [ref], lambda key: latest_source_record(self.instance, key))
        assert all(o.record for o in outcomes), [o.error for o in outcomes]
        record_sources(self.instance, [o.record for o in outcomes if o.record])
        record = latest_source_record(self.instance, ref)
        assert record is not None
        return record.sha256

    def run(
        self, workflow: str, ref: str, settings: dict[str, Any], inputs: dict[str, str] | None
    ) -> Any:
        definition = self.registry.get(workflow)
        return materialize(
            self.assets,
            selection=[
                AssetKey([definition.family, definition.name, n]) for n in definition.outputs
            ],
            partition_key=ref_to_partition_key(ref),
            instance=self.instance,
            resources=self.defs.resources,
            run_config=run_config_for(definition, settings, inputs),
            raise_on_error=False,
        )

    def manifests(self, result: Any) -> dict[str, ArtifactManifest]:
        return {m.name: m for m in self.store.list_run(result.run_id)}

    def path(self, manifest: ArtifactManifest) -> Path:
        return self.store.local_path(manifest.uri)


def _failure(result: Any) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run was expected to fail"
    data = failures[0].step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


@pytest.fixture
def plane(plane_settings: ErgotSettings, instance: DagsterInstance) -> Plane:
    return Plane(plane_settings, instance)


def test_the_workflow_reconstructs_the_frames_sampled_from_a_capture(
    plane: Plane, ingest_root: Path, scene: dict[str, Any]
) -> None:
    """capture -> frame_sampling -> sparse_reconstruction of `artifact:<run>/frames`, in Dagster."""
    ref = "orbit/take_01.mp4"
    (ingest_root / "orbit").mkdir()
    (ingest_root / ref).write_bytes(scene["capture"].read_bytes())
    source_sha = plane.ingest(ingest_root, ref)

    sampled = plane.run("frame_sampling", ref, {"count": VIEWS, "width": WIDTH}, None)
    assert sampled.success
    frames = plane.manifests(sampled)["frames"]
    assert frames.kind == "set" and len(frames.members) == VIEWS

    result = plane.run("sparse_reconstruction", ref, {}, {"images": frames.ref})
    assert result.success, _failure(result)
    manifests = plane.manifests(result)
    assert set(manifests) == {"points", "cameras", "model"}
    expected_types = {
        "points": "model/x-ply",
        "cameras": "application/json",
        "model": "application/zip",
    }
    for name, manifest in manifests.items():
        path = plane.path(manifest)
        assert manifest.media_type == expected_types[name]
        assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.suffix == {"points": ".ply", "cameras": ".json", "model": ".zip"}[name]
        assert manifest.workflow == "photogrammetry/sparse_reconstruction@1"
        assert manifest.runtime.type == "reconstruction"
        assert manifest.runtime.target == "reconstruction-local"
        assert (manifest.runtime.job_id or "").startswith("pid:")
        # Lineage: the frames' set, which names the capture in turn.
        assert [(p.kind, p.ref, p.sha256, p.input) for p in manifest.parents] == [
            ("artifact", frames.ref, frames.sha256, "images")
        ]
    assert [(p.kind, p.ref, p.sha256) for p in frames.parents] == [("source", ref, source_sha)]

    doc = json.loads(plane.path(manifests["cameras"]).read_text())
    check_document(doc, images=VIEWS, min_registered=VIEWS - 1)
    arc_fit(doc)
    # Each image is named by its place in the set and the sha256 of the frame it is.
    members = {number: m.sha256 for number, m in enumerate(frames.members, start=1)}
    for image in doc["images"]:
        assert image["name"] == f"image_{image['index']:04d}.jpg"
        assert image["sha256"] == members[image["index"]]
    assert vertex_count(plane.path(manifests["points"])) == doc["counts"]["points"]
    with zipfile.ZipFile(plane.path(manifests["model"])) as archive:
        assert {"cameras.bin", "images.bin", "points3D.bin"} <= set(archive.namelist())
    # What the stage found is recorded with the materialization.
    events = {
        e.asset_key.to_user_string(): e.materialization
        for e in result.get_asset_materialization_events()
    }
    stage = events["photogrammetry/sparse_reconstruction/cameras"].metadata["stage_metadata"]
    assert stage.data["registered_images"] == doc["counts"]["registered_images"]


def test_without_an_image_set_the_workflow_names_the_missing_input(
    plane: Plane, ingest_root: Path, scene: dict[str, Any]
) -> None:
    ref = "orbit/take_02.mp4"
    (ingest_root / "orbit").mkdir()
    (ingest_root / ref).write_bytes(scene["capture"].read_bytes())
    plane.ingest(ingest_root, ref)
    result = plane.run("sparse_reconstruction", ref, {}, None)
    assert not result.success
    message = _failure(result)
    assert "'images'" in message and "photogrammetry/image_set_prep/images" in message, message


def test_a_blank_capture_fails_with_how_many_images_registered(
    plane: Plane, ingest_root: Path
) -> None:
    ref = "orbit/lens_cap.mp4"
    (ingest_root / "orbit").mkdir()
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-nostdin", "-y", "-loglevel", "error",
            "-f", "lavfi", "-i", "color=c=gray:s=320x240:d=3", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", str(ingest_root / ref),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    plane.ingest(ingest_root, ref)
    sampled = plane.run("frame_sampling", ref, {"count": 6, "width": 320}, None)
    assert sampled.success
    frames = plane.manifests(sampled)["frames"]
    result = plane.run("sparse_reconstruction", ref, {}, {"images": frames.ref})
    assert not result.success
    message = _failure(result)
    assert "only 0 of 6 images registered; at least 3 are needed" in message, message
    assert plane.manifests(result) == {}


def test_the_family_chains_sampling_matting_and_reconstruction_by_default(
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    ingest_root: Path,
    scene: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """capture -> frame_sampling -> image_set_prep (loopback ComfyUI) -> sparse_reconstruction,
    each step reading the one before it through the asset graph, with no input named."""
    with ComfyUILoopbackServer(step_seconds=0.01) as comfyui:
        # The root targets' comfyui-local, pointed at the loopback as a deployment would.
        monkeypatch.setenv("ERGOT_TARGET_COMFYUI_LOCAL_ENDPOINT", comfyui.url)
        chain = Plane(ErgotSettings.from_env(), instance)
        ref = "orbit/take_02.mp4"
        (ingest_root / "orbit").mkdir()
        (ingest_root / ref).write_bytes(scene["capture"].read_bytes())
        source_sha = chain.ingest(ingest_root, ref)

        sampled = chain.run("frame_sampling", ref, {"count": VIEWS, "width": WIDTH}, None)
        assert sampled.success
        frames = chain.manifests(sampled)["frames"]
        # Threshold 0 keeps every pixel that differs from the border at all: the loopback's
        # matte is a colour key, which on a textured wall would punch holes at random.
        prepared = chain.run("image_set_prep", ref, {"threshold": 0.0, "width": WIDTH}, None)
        assert prepared.success, _failure(prepared)
        images = chain.manifests(prepared)["images"]
        result = chain.run("sparse_reconstruction", ref, {}, None)
        assert result.success, _failure(result)

    assert images.kind == "set" and len(images.members) == VIEWS
    assert all(m.media_type == "image/png" for m in images.members)
    cameras = chain.manifests(result)["cameras"]
    # Lineage walks back step by step to the ingested capture.
    assert [(p.kind, p.ref, p.input) for p in cameras.parents] == [
        ("artifact", images.ref, "images")
    ]
    assert [(p.kind, p.ref, p.input) for p in images.parents] == [
        ("artifact", frames.ref, "frames")
    ]
    assert [(p.kind, p.ref, p.sha256) for p in frames.parents] == [("source", ref, source_sha)]
    doc = json.loads(chain.path(cameras).read_text())
    check_document(doc, images=VIEWS, min_registered=VIEWS - 1)
    members = {number: m.sha256 for number, m in enumerate(images.members, start=1)}
    for image in doc["images"]:
        assert image["sha256"] == members[image["index"]]
