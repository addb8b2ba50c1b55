#!/usr/bin/env bash
# Installs qllm's build and test dependencies from Debian 12's archive and builds in Release.
# Leaves the CLI at build/qllm and the Python module in build/python.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  g++ cmake ninja-build \
  libgtest-dev libcli11-dev nlohmann-json3-dev \
  python3-dev pybind11-dev python3-numpy python3-torch python3-pytest \
  libopenblas-dev

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DQLLM_PYTHON=/usr/bin/python3
cmake --build build
