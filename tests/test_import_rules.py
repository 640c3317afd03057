"""The import rules of docs/architecture.md hold: ``lint-imports`` (import-linter, the contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO, clean_env


@pytest.mark.skipif(
    shutil.which("lint-imports") is None, reason="import-linter is not installed (pip install -e .[dev])"
)
def test_import_contracts_are_kept():
    proc = subprocess.run(
        ["lint-imports", "--no-cache"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "Layers" in proc.stdout
