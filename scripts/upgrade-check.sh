#!/usr/bin/env bash
# `make upgrade-check`: what would moving to the newest releases that pyproject.toml admits break?
# Resolves them into a scratch folder (never touching requirements/ or .venv), installs them into a scratch venv,
# runs the fast tests (`-m "not slow"`) against them and writes a report: which packages moved and which tests
# failed. Exit status: pytest's. To adopt the new set: `make lock UPGRADE=1 && make test`, then commit the locks.
# Usage: scripts/upgrade-check.sh UV [pytest args...]   (UPGRADE_CHECK_DIR=... keeps the scratch folder somewhere)
set -euo pipefail
uv=$1
shift
cd "$(dirname "$0")/.."
scratch=${UPGRADE_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/castlora-upgrade.XXXXXX")}
mkdir -p "$scratch"
echo "upgrade-check: scratch folder $scratch"

scripts/lock.sh "$uv" "$scratch/locks" --upgrade
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$scratch/locks/pip.lock"
"$py" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$scratch/locks/dev.lock"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

moved=$(python3 scripts/lock_diff.py requirements/dev.lock "$scratch/locks/dev.lock")
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DAGSTER_DISABLE_TELEMETRY=1 \
    "$py" -m pytest -m "not slow" -q -p no:cacheprovider "$@" 2>&1 | tee "$scratch/pytest.log"
status=${PIPESTATUS[0]}
set -e
{
    echo "# castlora upgrade check ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "## Packages that would move (locked -> newest admitted by pyproject.toml)"
    echo
    echo "$moved"
    echo
    echo "## Fast tests against the newest set: pytest exit status $status"
    echo
    grep -E "^(FAILED|ERROR) " "$scratch/pytest.log" || echo "(no failures)"
    tail -n 1 "$scratch/pytest.log"
} > "$scratch/report.md"
echo
cat "$scratch/report.md"
echo
echo "upgrade-check: report $scratch/report.md; new locks in $scratch/locks/"
exit "$status"
