"""Shared pytest fixtures and per-process thread limits."""

from __future__ import annotations

import os
from pathlib import Path

# one BLAS/torch thread per process on small machines (set before numpy/torch import)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL = (ROOT.parent / "shared" / "data" / "real").resolve()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder with the real reference data (../shared/data/real)."""
    if not SHARED_REAL.is_dir():
        pytest.fail(f"real data folder missing: {SHARED_REAL} (clone beside ../shared)")
    return SHARED_REAL


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line naming the command that enables the tests skipped for a missing package."""
    from sysdeps import INSTALL, NOT_RUN

    not_run = [r for r in terminalreporter.stats.get("skipped", [])
               if NOT_RUN in str(getattr(r, "longrepr", ""))]
    if not_run:
        terminalreporter.write_line(
            f"{len(not_run)} test(s) NOT RUN for missing system packages (listed above); "
            f"enable them with: {INSTALL}", yellow=True, bold=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped for a missing system package is listed under its own name (-rs)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        from sysdeps import NOT_RUN

        reason = rep.longrepr[2]
        if NOT_RUN in reason:
            rep.longrepr = (item.nodeid, item.location[1] + 1, reason)
