#!/usr/bin/env bash
# Run HERE (CPU machine with the registries) before a device session: downloads the wheels
# the lent GPU machine lacks (it has Python 3.12 + PyTorch + CUDA, and no network) into
# .gpu-wheels/ (git-ignored). Then call the device tool with carry [".gpu-wheels"] and the
# command `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-wheels
grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> .git/info/exclude
.venv/bin/python -m pip download --quiet --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  --no-deps -d .gpu-wheels \
  pyzmq msgpack typer rich shellingham markdown-it-py mdurl pygments click \
  prometheus-client captum h5py hdf5plugin tifffile scikit-image lazy-loader imageio \
  scikit-learn threadpoolctl joblib tqdm
du -sh .gpu-wheels
