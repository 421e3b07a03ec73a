#!/bin/sh
# Set up everything the test suite needs on a fresh Debian machine, then run
# every test.  Usage: sh tests/run.sh [zope-testrunner options]
# Environment: VENV (default .venv), ZODBKMI_SKIP_SETUP=1 to skip installs.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ "${ZODBKMI_SKIP_SETUP:-0}" != 1 ]; then
    # Debian packages for the real components the tests start (servers on
    # 127.0.0.1 only): listed one per line in tests/debian-packages.txt.
    pkgs=$(grep -v '^#' tests/debian-packages.txt | tr '\n' ' ')
    missing=""
    for p in $pkgs; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ]; then
            echo "installing Debian packages:$missing"
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
        else
            echo "warning: missing Debian packages:$missing (tests needing them are skipped)" >&2
        fi
    fi
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e '.[test]'
fi

exec "$VENV/bin/zope-testrunner" --path=. --tests-pattern='^tests$' "$@"
