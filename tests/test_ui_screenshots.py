"""The operator's view, in the real Dagster UI, driven by headless Chromium.

Starts `dagster dev` with the repository's instance template, ingests a generated clip, submits a
`poster_extraction` request through the queue, then opens the asset graph, the run and the poster
artifact in Debian's chromium (through Playwright) and checks that each page shows what an
operator needs: lineage from `ergot/source`, the request's tags on the run, the manifest and the
preview on the artifact. Each page is saved as a PNG in `$ERGOT_SCREENSHOTS`
(default `<repo>/.ergot/screenshots/`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from ergot_dagster.media.synth import make_clip
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from tests.conftest import subprocess_env
from tests.support import dagster_dev

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ERGOT = str(Path(sys.executable).parent / "ergot")
SOURCE_REF = "cam/take 01.mov"
# Generous: the first visit to each page loads its JavaScript chunks.
PAGE_TIMEOUT_MS = 60_000
# Dagster's accent green: a materialized asset in the graph, a succeeded step in a run's chart.
SUCCESS_GREEN = "rgb(46, 204, 129)"


def screenshot_dir() -> Path:
    """Where the screenshots go: `$ERGOT_SCREENSHOTS`, else `<repo>/.ergot/screenshots`."""
    folder = Path(os.environ.get("ERGOT_SCREENSHOTS") or PROJECT_ROOT / ".ergot" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page: Page, path: Path) -> None:
    """A PNG of the window; dialogs that fade in are shown as they end up, not half-drawn."""
    page.screenshot(path=path, animations="disabled")


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/ensure-system.sh installs Debian's chromium)")
    with sync_playwright() as playwright:
        # Debian's browser, never Playwright's own download.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    # On localhost Dagster greets a new browser with a newsletter dialog that covers every page;
    # an operator dismisses it once and the browser remembers, which is what this stands for.
    context.add_init_script("window.localStorage.setItem('communityNux', '1')")
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _ergot(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run(
        [ERGOT, *args, "--json"], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_operator_view_screenshots(
    page: Page, plane_settings: ErgotSettings, ingest_root: Path, tmp_path: Path
) -> None:
    shots = screenshot_dir()
    # The repository's instance config, as `make dev` uses it (queued run coordinator, daemon).
    (plane_settings.dagster_home / "dagster.yaml").write_text(
        (PROJECT_ROOT / "dagster.yaml").read_text()
    )
    make_clip(ingest_root / SOURCE_REF, duration=4.0, size="640x360", black_lead_s=1.0)
    env = subprocess_env(plane_settings)
    with dagster_dev(plane_settings.home, env, tmp_path / "dagster-dev.log") as url:
        env["ERGOT_DAGSTER_URL"] = url
        _ergot(env, "ingest", str(ingest_root / SOURCE_REF))
        request_id = f"ui-{uuid.uuid4().hex[:8]}"
        status = _ergot(
            env,
            "submit",
            "poster_extraction",
            SOURCE_REF,
            "--request-id",
            request_id,
            "--priority",
            "5",
            "--wait",
            "180",
        )
        assert status["status"] == "SUCCESS", status
        run_id = status["run_id"]
        poster = next(a for a in status["artifacts"] if a["name"] == "poster")

        # The asset graph: every group opened, laid out top-down so that the whole lineage from
        # the source fits the window. The layout is chosen before a reload because the graph fits
        # itself to the window only when it first draws. The graph is narrowed to the core family
        # and the source it reads: with every family shown, the fitted graph is drawn too small
        # for the nodes to carry their names.
        page.goto(f"{url}/asset-groups")
        expect(page.get_by_text("core").first).to_be_visible()
        # The filter box is a CodeMirror editor: a click on its surface focuses its textarea.
        page.locator(".CodeMirror").first.click()
        page.keyboard.type('group:"core" or key:"ergot/source"')
        page.keyboard.press("Enter")
        settings = page.locator("button:has([aria-label=settings])").last

        def choose(item_name: str) -> None:
            # One menu at a time: the graph re-lays itself out after each choice, and a click
            # on a menu that is still closing lands on its backdrop.
            settings.click()
            item = page.get_by_role("menuitem", name=item_name)
            expect(item).to_be_visible()
            item.click()
            expect(item).to_be_hidden()

        choose("Expand all groups")
        choose("Change graph to vertical orientation")
        page.reload()
        for node in ("source", "poster", "poster_info", "report", "audio", "proxy"):
            expect(page.get_by_text(node, exact=True).last).to_be_visible()
        # Status arrives after the layout: a materialized asset's one partition is filled.
        for node in ("source", "poster", "poster_info"):
            name = page.get_by_text(node, exact=True).last
            box = name.locator("xpath=ancestor::div[contains(@class, 'assetNodeBox')]")
            expect(box.get_by_text("100% filled")).to_be_visible()
        shoot(page, shots / "asset-graph.png")

        # The run: its event log, then its tags, which say which request it is.
        page.goto(f"{url}/runs/{run_id}")
        expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible()
        expect(page.get_by_text("ASSET_MATERIALIZATION").first).to_be_visible()
        # The step chart fills in once the run's events are read.
        step = page.locator(".chart-element.box", has_text="core__poster_extraction")
        expect(step).to_have_css("background-color", SUCCESS_GREEN)
        shoot(page, shots / "run.png")
        page.get_by_role("button", name="View tags and config").click()
        dialog = page.get_by_role("dialog")
        for tag in (
            f"ergot/request_id: {request_id}",
            "ergot/workflow: poster_extraction@1",
            f"ergot/source_ref: {SOURCE_REF}",
            "priority: 5",  # dagster/priority; the UI drops the dagster/ prefix
            "ergot/execution_target: local",
            "ergot/target.ffmpeg-local: ffmpeg",
        ):
            expect(dialog.get_by_text(tag, exact=True)).to_be_visible()
        shoot(page, shots / "run-tags.png")

        # The poster artifact: its definition, its manifest, and a thumbnail in the preview.
        page.goto(f"{url}/assets/core/poster_extraction/poster")
        expect(page.get_by_text(poster["sha256"], exact=True).first).to_be_visible()
        expect(page.get_by_text(poster["ref"], exact=True).first).to_be_visible()
        expect(page.get_by_text("video.decode, image.encode").first).to_be_attached()
        expect(page.get_by_text("settings_schema", exact=True)).to_be_attached()
        expect(page.get_by_text(re.compile(r"^the poster frame — "))).to_be_visible()
        shoot(page, shots / "artifact.png")
        row = page.locator("tr", has=page.get_by_text("preview", exact=True))
        row.get_by_text("[Show Markdown]").click()
        thumbnail = page.get_by_role("dialog").locator("img[src^='data:image/jpeg;base64,']")
        expect(thumbnail).to_be_visible()
        # Visible is not drawn: the browser must have decoded the embedded JPEG.
        expect(thumbnail).to_have_js_property("complete", True)
        assert thumbnail.evaluate("img => img.naturalWidth") == 320
        shoot(page, shots / "artifact-preview.png")

    for name in ("asset-graph", "run", "run-tags", "artifact", "artifact-preview"):
        saved = shots / f"{name}.png"
        assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", saved
