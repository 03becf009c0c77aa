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
