"""System packages some tests need (headless Chromium, Prometheus/promtool, libpython).

``make test`` installs them with ``deploy/ci/install-system-deps.sh`` where it may (root or
passwordless sudo). Where it may not, a test that needs one is skipped with a reason that
starts with :data:`NOT_RUN` and names the command that enables it (``make test`` prints the
reasons: ``pytest -rs``). Under CI (``CI=true``, set by ``.ci/run``) a missing package is a
failure, so CI always runs every test.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

NOT_RUN = "NOT RUN"
INSTALL = "sudo deploy/ci/install-system-deps.sh"


def in_ci() -> bool:
    """True under CI (``CI`` set to 1/true/yes)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(present: object, what: str, package: str) -> None:
    """Skip (locally) or fail (CI) the calling test unless ``present`` is truthy.

    Parameters
    ----------
    present : object
        The dependency was found (a path, True, ...).
    what : str
        What the test needs, for the message.
    package : str
        The Debian package that provides it (installed by ``deploy/ci/install-system-deps.sh``).
    """
    if present:
        return
    if in_ci():
        pytest.fail(f"{what} is missing under CI (Debian package {package}): .ci/run installs "
                    f"it with {INSTALL}")
    pytest.skip(f"{NOT_RUN}: needs {what} (Debian package {package}); enable with: {INSTALL}")


def binary(*names: str, package: str) -> str:
    """Path of the first of ``names`` on PATH; else skip (locally) or fail (CI)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    require(None, " or ".join(names), package)
    raise AssertionError("unreachable")  # pragma: no cover


def python_version() -> tuple[int, int]:
    """This interpreter's (major, minor), e.g. for the ``libpython3.11`` package name."""
    return sys.version_info[0], sys.version_info[1]
