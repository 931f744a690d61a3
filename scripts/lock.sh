#!/usr/bin/env bash
# Regenerates the checked-in locks from pyproject.toml's ranges (`make lock`), or resolves the newest releases
# into a scratch folder (`make upgrade-check`, via scripts/upgrade-check.sh). uv is itself pinned by the dev lock.
#   requirements/dev.lock        every package of the dev venv (runtime + dev + k8s extras + build backend)
#   requirements/cuda-image.lock docker/Dockerfile.cuda: runtime + k8s + build backend, torch from PyPI
#   requirements/cpu-image.lock  docker/Dockerfile: the same without torch/torchvision (CPU wheels installed first)
# The image locks are constrained by the dev lock, so every file names the same version of every shared package.
# Usage: scripts/lock.sh UV OUT_DIR [--upgrade]
set -euo pipefail
uv=$1
out=$2
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
# --universal: one lock for Linux, macOS and Windows (platform-specific packages carry markers);
# --python-version 3.11: the oldest Python pyproject admits, which is also what the images and CI run.
common=(--universal --python-version 3.11 --generate-hashes --quiet --annotation-style line --custom-compile-command "make lock")
"$uv" pip compile pyproject.toml requirements/build.in --extra dev --extra k8s "${common[@]}" "$@" \
    -o "$out/dev.lock"
"$uv" pip compile pyproject.toml requirements/build.in --extra k8s "${common[@]}" -c "$out/dev.lock" \
    -o "$out/cuda-image.lock"
"$uv" pip compile pyproject.toml requirements/build.in --extra k8s "${common[@]}" -c "$out/dev.lock" \
    --override requirements/no-torch.txt --no-emit-package torch --no-emit-package torchvision \
    -o "$out/cpu-image.lock"
