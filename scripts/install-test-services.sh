#!/usr/bin/env bash
# Installs, from Debian's packages, the servers and browser the test suite starts on 127.0.0.1:
#   - postgresql (initdb/pg_ctl/postgres under /usr/lib/postgresql/*/bin): tests/servers/postgres.py
#   - chromium (headless, /usr/bin/chromium): tests/ui/
# Skips whatever is already there, so a second run costs nothing. Needs root (or sudo) for apt-get.
set -euo pipefail
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    echo "test services: postgresql and chromium already installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "test services: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
