#!/usr/bin/env bash
# Regenerates the checked-in locks from pyproject.toml's ranges (`make lock`), or resolves the newest releases
# into a scratch folder (`make upgrade-check`, via scripts/upgrade-check.sh). uv is itself pinned by the dev lock.
#   requirements/pip.lock        the installer, installed first (see requirements/pip.in)
#   requirements/dev.lock        every package of the dev venv (runtime + dev + k8s extras + build backend)
#   requirements/cuda-image.lock docker/Dockerfile.cuda: runtime + k8s + build backend, torch from PyPI
#   requirements/cpu-image.lock  docker/Dockerfile: the same without torch/torchvision (CPU wheels installed first)
#                                but with their non-CUDA dependencies (names in requirements/torch-cpu-deps.txt)
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
"$uv" pip compile requirements/pip.in "${common[@]}" "$@" -o "$out/pip.lock"
"$uv" pip compile pyproject.toml requirements/build.in --extra dev --extra k8s "${common[@]}" "$@" \
    -o "$out/dev.lock"
"$uv" pip compile pyproject.toml requirements/build.in --extra k8s "${common[@]}" -c "$out/dev.lock" \
    -o "$out/cuda-image.lock"
# The CPU image installs PyTorch's CPU wheels with --no-deps, so its lock needs torch's own dependencies without the
# CUDA ones: those of the locked torch/torchvision as resolved for macOS, where the same release has no CUDA deps.
torch_deps=$out/torch-cpu-deps.txt
grep -E '^(torch|torchvision)==' "$out/dev.lock" | sed 's/ .*//' \
    | MACOSX_DEPLOYMENT_TARGET=14.0 "$uv" pip compile - --python-version 3.11 --python-platform aarch64-apple-darwin --quiet --no-header \
        --no-annotate --no-emit-package torch --no-emit-package torchvision -c "$out/dev.lock" \
    | sed -n 's/==.*//p' > "$torch_deps"  # names only: the dev lock's constraints pick each version
"$uv" pip compile pyproject.toml requirements/build.in "$torch_deps" --extra k8s "${common[@]}" -c "$out/dev.lock" \
    --override requirements/no-torch.txt --no-emit-package torch --no-emit-package torchvision \
    -o "$out/cpu-image.lock"
