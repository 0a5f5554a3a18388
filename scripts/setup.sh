#!/usr/bin/env bash
# Install what agentfs needs on a Debian machine (as root) and build the venv.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRA_APT=${EXTRA_APT:-}

need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc $EXTRA_APT; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ! "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    need+=(python3-dev)
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1; then
    need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing packages: ${need[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.agentfs-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[test]'
    touch "$stamp"
fi
echo "setup: ready ($VENV)"
