#!/usr/bin/env bash
# Run HERE (CPU machine with the registries) before a device session: downloads the wheels
# the lent GPU machine lacks (pyzmq, captum: its image has Python 3.12, PyTorch, CUDA and
# the rest; the working tree that travels is capped at 64 MiB) into
# .gpu-wheels/ (git-ignored). Then call the device tool with carry [".gpu-wheels"] and the
# command `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-wheels
grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> .git/info/exclude
.venv/bin/python -m pip download --quiet --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  --no-deps -d .gpu-wheels \
  pyzmq captum pytools platformdirs siphash24 mako
# pycuda ships as an sdist only (built on the GPU machine by gpu_check.sh); TensorRT comes
# from NVIDIA's index, which the GPU machine must provide itself
.venv/bin/python -m pip download --quiet --no-deps --no-binary=:all: -d .gpu-wheels pycuda
du -sh .gpu-wheels
# the PBC arrays for benchmarks/gpu_train_pbc.sh (../shared does not travel to the device)
mkdir -p .gpu-data
grep -qx '/.gpu-data/' .git/info/exclude || echo '/.gpu-data/' >> .git/info/exclude
cp ../shared/data/real/pbc-4class-64/pbc64.npz .gpu-data/
du -sh .gpu-data
