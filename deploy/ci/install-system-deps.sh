#!/usr/bin/env bash
# System packages the test suite needs on Debian/Ubuntu (CI and developer machines):
#   prometheus       -> prometheus + promtool (deploy tests, real-Prometheus integration test)
#   chromium, chromium-driver -> headless browser test of the HTML run report
#   libpython3.11    -> shared libpython for the python-backend stub of the Triton server the
#                       Triton tests start (inference/triton_server.py)
#   hdf5-tools       -> h5clear, the reference for repairing a crashed SWMR recording
#                       (tests/test_durability.py)
# Idempotent (installs only what is missing) and quiet. Run as root or with passwordless sudo.
set -euo pipefail

packages=(prometheus chromium chromium-driver libpython3.11 hdf5-tools)
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-deps: all present (${packages[*]})"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Debian's package enables a Prometheus daemon on :9090; the tests start their own on free
# loopback ports, so switch the packaged one off where we just installed it (CI machines).
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null || { echo "install-system-deps: promtool missing" >&2; exit 1; }
echo "install-system-deps: done"
