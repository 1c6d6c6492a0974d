"""The benchmark harness works: `python -m bench` writes its sections with numbers that parse,
and leaves the rest of the document alone. Timings are never asserted: this machine is shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import Section, percentile, read_figures, write_section
from ergot_dagster.settings import PROJECT_ROOT

HAND_WRITTEN = "# Performance\n\nWritten by hand: why the figures are what they are.\n"


def _doc_with_other_section(path: Path) -> None:
    path.write_text(HAND_WRITTEN)
    write_section(path, Section(name="catalog", title="4. Scale", body="kept", figures={"x": 1}))


def test_a_section_is_written_between_its_markers_and_rewritten_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    _doc_with_other_section(doc)
    write_section(doc, Section(name="batch", title="1. Batch", body="first", figures={"ratio": 2}))
    write_section(
        doc, Section(name="batch", title="1. Batch", body="again", figures={"ratio": 1.5})
    )
    text = doc.read_text()
    assert text.startswith(HAND_WRITTEN)
    assert text.count("<!-- bench:batch:start -->") == 1 and "first" not in text
    assert read_figures(doc, "batch") == {"ratio": 1.5}
    assert read_figures(doc, "catalog") == {"x": 1}
    assert "kept" in text


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_quick_batch_and_ingest_write_their_sections(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    _doc_with_other_section(doc)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "batch",
            "ingest",
            "--quick",
            "--clips",
            "2",
            "--files",
            "3",
            "--clip-seconds",
            "1",
            "--clip-size",
            "160x90",
            "--docs",
            str(doc),
            "--workdir",
            str(tmp_path),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    batch = read_figures(doc, "batch")
    assert batch["clips"] == 2
    assert batch["bare_median_s"] > 0 and batch["plane_median_s"] > 0
    assert batch["ratio"] == pytest.approx(batch["plane_median_s"] / batch["bare_median_s"], 0.01)
    ingest = read_figures(doc, "ingest")
    assert ingest["files"] == 3 and ingest["ingest_files_per_s"] > 0
    text = doc.read_text()
    assert text.startswith(HAND_WRITTEN) and read_figures(doc, "catalog") == {"x": 1}
    assert "Load average at the start" in text and "Dagster 1.13" in text
    # Nothing of the planes is left behind in the work directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["performance.md"]
