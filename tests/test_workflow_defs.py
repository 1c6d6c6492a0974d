"""Workflow definitions: the model, the version lock, and how requests name versions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from ergot_dagster.errors import DefinitionError, RequestError
from ergot_dagster.settings import PROJECT_ROOT
from ergot_dagster.workflows.factory import build_workflow_asset
from ergot_dagster.workflows.loader import load_registry, publish
from ergot_dagster.workflows.settings_schema import SettingsError, validate_settings

REPO_DEFS = PROJECT_ROOT / "workflow_defs"
POSTER = REPO_DEFS / "core" / "poster_extraction.v1.yaml"


def _poster() -> dict[str, Any]:
    return yaml.safe_load(POSTER.read_text())


def _write(root: Path, data: dict[str, Any]) -> Path:
    path = root / data["family"] / f"{data['name']}.v{data['version']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_repository_definitions_load_and_are_published() -> None:
    registry = load_registry(REPO_DEFS)
    assert {"poster_extraction", "media_qc", "review_proxy", "frame_sampling"} <= set(
        registry.names()
    )
    qc = registry.get("media_qc")
    assert qc.ref == "core/media_qc@1"
    assert qc.inputs["source"].primary
    assert registry.get("frame_sampling").runtime == "plan"
    assert registry.get("review_proxy").outputs["audio"].required is False


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda d: d.pop("description"), "description", "Field required"),
        (lambda d: d.update(version=0), "version", "greater than or equal to 1"),
        (
            lambda d: d["inputs"]["source"].update(media_types=["video"]),
            "inputs.source.media_types",
            "not a media type",
        ),
        (
            lambda d: d["outputs"]["poster"].update(media_type="image/*"),
            "outputs.poster.media_type",
            "one concrete media type",
        ),
        (
            lambda d: d["plan"][0]["params"].update(width="${settings.nope}"),
            "(top level)",
            "names no setting",
        ),
        (
            lambda d: d["inputs"].update(extra={"media_types": ["audio/*"], "primary": True}),
            "(top level)",
            "exactly one input must be `primary: true`",
        ),
        (
            lambda d: d["settings"]["properties"]["width"].update(default="wide"),
            "settings",
            "defaults do not satisfy the schema",
        ),
        (
            lambda d: d["settings"]["properties"]["width"].update(type="integr"),
            "settings",
            "not a valid JSON Schema",
        ),
        (lambda d: d.update(colour="red"), "colour", "Extra inputs are not permitted"),
        (
            lambda d: d["plan"][0]["outputs"].update(info="nonexistent"),
            "(top level)",
            "not in `outputs`",
        ),
        (
            lambda d: d["plan"][0].update(operation="postr"),
            "plan.0.operation",
            "ffmpeg has no recipe 'postr' (known: ",
        ),
        (
            lambda d: d.update(runtime="telepathy"),
            "plan.0.runtime",
            "no runtime adapter is registered for 'telepathy'",
        ),
        (
            lambda d: d["plan"][0]["params"].update(width="${stages.extract.poster}"),
            "plan.0",
            "files from earlier stages go in `inputs`",
        ),
        (
            lambda d: d.update(
                checks=[{"name": "c", "artifact": "poster", "evaluator": "qc.nope"}]
            ),
            "checks.0.evaluator",
            "no check evaluator 'qc.nope'",
        ),
        (
            lambda d: d.update(
                checks=[
                    {
                        "name": "c",
                        "artifact": "poster",
                        "evaluator": "qc.black",
                        "params": {"max_total_s": "${settings.max_blak_s}"},
                    }
                ]
            ),
            "(top level)",
            "names no setting in the schema",
        ),
    ],
)
def test_invalid_definition_names_file_and_field(
    tmp_path: Path, mutate: Any, field: str, message: str
) -> None:
    data = _poster()
    mutate(data)
    path = tmp_path / "core" / "poster_extraction.v1.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DefinitionError) as caught:
        publish(tmp_path)
    text = str(caught.value)
    assert text.startswith("core/poster_extraction.v1.yaml: ")
    assert f"field `{field}`" in text
    assert message in text


def test_file_name_must_match_its_content(tmp_path: Path) -> None:
    data = _poster()
    path = tmp_path / "core" / "poster_extraction.v7.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DefinitionError, match=r"must be named core/poster_extraction\.v1\.yaml"):
        load_registry(tmp_path)


def test_unpublished_definitions_do_not_load(tmp_path: Path) -> None:
    _write(tmp_path, _poster())
    with pytest.raises(DefinitionError, match=r"not published.*ergot workflows publish"):
        load_registry(tmp_path)
    assert [d.spec for d in publish(tmp_path)] == ["poster_extraction@1"]
    assert load_registry(tmp_path).get("poster_extraction").version == 1
    assert publish(tmp_path) == []


def test_editing_a_published_version_fails_loading_and_publishing(tmp_path: Path) -> None:
    path = _write(tmp_path, _poster())
    publish(tmp_path)
    # Formatting and comments are not changes.
    path.write_text("# a comment\n" + yaml.safe_dump(yaml.safe_load(path.read_text()), indent=4))
    load_registry(tmp_path)
    data = _poster()
    data["settings"]["properties"]["width"]["default"] = 800
    path.write_text(yaml.safe_dump(data))
    for attempt in (load_registry, publish):
        with pytest.raises(DefinitionError) as caught:
            attempt(tmp_path)
        text = str(caught.value)
        assert "core/poster_extraction.v1.yaml" in text
        assert "core/poster_extraction@1 was published and is immutable" in text
        assert "poster_extraction.v2.yaml" in text and "version: 2" in text


def test_deleting_a_published_version_fails_loading(tmp_path: Path) -> None:
    path = _write(tmp_path, _poster())
    publish(tmp_path)
    path.unlink()
    with pytest.raises(DefinitionError, match=r"published .* but the file is missing"):
        load_registry(tmp_path)


def test_several_versions_load_and_requests_choose_one(tmp_path: Path) -> None:
    _write(tmp_path, _poster())
    v2 = _poster()
    v2["version"] = 2
    v2["settings"]["properties"]["width"]["default"] = 1280
    v2["outputs"]["thumb"] = {"media_type": "image/jpeg", "required": False}
    v2["plan"][0]["outputs"]["thumb"] = "thumb"
    _write(tmp_path, v2)
    publish(tmp_path)
    registry = load_registry(tmp_path)
    assert registry.get("poster_extraction").version == 2
    assert registry.get("poster_extraction@1").version == 1
    with pytest.raises(RequestError, match="has no version '3'; published versions: 1, 2"):
        registry.get("poster_extraction@3")
    with pytest.raises(RequestError, match="unknown workflow 'posters'"):
        registry.get("posters")
    # One multi-asset covers both versions, with the latest version as its code version.
    asset = build_workflow_asset(registry, "poster_extraction")
    specs = {spec.key.to_user_string(): spec for spec in asset.specs}
    assert set(specs) == {
        "core/poster_extraction/poster",
        "core/poster_extraction/poster_info",
        "core/poster_extraction/thumb",
    }
    assert specs["core/poster_extraction/thumb"].skippable
    assert specs["core/poster_extraction/poster"].code_version == "2"


def test_settings_validation_names_the_field() -> None:
    schema = load_registry(REPO_DEFS).get("poster_extraction").settings
    assert validate_settings(schema, {})["width"] == 640
    assert validate_settings(schema, {"width": 320})["width"] == 320
    with pytest.raises(SettingsError, match=r"settings\.width: 5 is less than the minimum of 16"):
        validate_settings(schema, {"width": 5})
    with pytest.raises(SettingsError, match=r"settings\.width: 'big' is not of type 'integer'"):
        validate_settings(schema, {"width": "big"})
    with pytest.raises(SettingsError, match=r"unknown setting.*colour.*allowed: candidates"):
        validate_settings(schema, {"colour": "red"})


def test_repository_lock_matches_every_file(tmp_path: Path) -> None:
    copy = tmp_path / "defs"
    shutil.copytree(REPO_DEFS, copy)
    assert publish(copy) == [], "every definition in the repository is published"
