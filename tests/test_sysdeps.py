"""A test that needs a missing system package: NOT RUN (with the enabling command) on a
developer machine, a failure under CI (tests/sysdeps.py, tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

NEEDS_MISSING = '''
import sysdeps

def test_needs_a_missing_tool():
    sysdeps.binary("leukoflow-no-such-tool", package="leukoflow-no-such-package")

def test_plain():
    assert True
'''


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_needs.py").write_text(NEEDS_MISSING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "conftest",
         "--rootdir", str(tmp_path), str(tmp_path / "test_needs.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_missing_package_is_reported_not_run_locally(tmp_path: Path) -> None:
    r = _pytest(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED"))
    assert "test_needs_a_missing_tool" in line and "NOT RUN" in line
    assert "leukoflow-no-such-package" in line
    assert "sudo deploy/ci/install-system-deps.sh" in line
    assert "1 test(s) NOT RUN for missing system packages" in r.stdout


def test_missing_package_fails_under_ci(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed" in r.stdout and "missing under CI" in r.stdout
