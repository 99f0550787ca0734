"""The package type-checks clean: ``py.typed`` promises adopters real annotations, so mypy
runs here with the project's settings (``[tool.mypy]`` in pyproject.toml: the package,
``example_app`` and ``bench``), on the paths, not through the editable install."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.conftest import missing_peer

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_errors() -> None:
    if importlib.util.find_spec("mypy") is None:
        missing_peer("mypy is not installed: pip install -e '.[test]'")
    # The incremental cache (.mypy_cache, git-ignored) makes a repeated run ~1 s.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
    assert "Success: no issues found" in result.stdout, result.stdout
