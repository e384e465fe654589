"""Installing a test tool's locked npm dependencies (`npm ci`) on a fresh clone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NPM_TIMEOUT_S = 180


def ensure_installed(folder: Path, marker_package: str, what: str) -> None:
    """Run `npm ci` in `folder` unless `marker_package` is installed there already."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            f"node and npm are required for the {what}; "
            "`make test` installs nodejs/npm (Debian packages) when they are missing"
        )
    if (folder / "node_modules" / marker_package / "package.json").exists():
        return
    run = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    assert run.returncode == 0, f"npm ci failed:\n{run.stdout}\n{run.stderr}"
