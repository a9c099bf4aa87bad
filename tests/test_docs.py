"""The API reference builds from the docstrings with warnings as errors (mkdocs --strict)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_api_reference_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr
    page = (tmp_path / "api" / "models" / "index.html").read_text(encoding="utf-8")
    for name in ("ntklens.models.layers.Linear", "ntklens.models.layers.param_groups"):
        assert f'id="{name}"' in page
    studies = (tmp_path / "api" / "studies" / "index.html").read_text(encoding="utf-8")
    assert 'id="ntklens.sweep.api.run_study"' in studies
    probe = (tmp_path / "api" / "probe" / "index.html").read_text(encoding="utf-8")
    assert 'id="ntklens.train.probes.Probe"' in probe
