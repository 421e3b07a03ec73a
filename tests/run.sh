#!/bin/sh
# Set up everything the test suite needs on a fresh Debian machine, then run
# every test.  Usage: sh tests/run.sh [--buildout] [zope-testrunner options]
# --buildout: run the suite as a zc.buildout user does (buildout.cfg):
# zc.buildout in its own virtual environment (BUILDOUT_VENV, default
# .venv-buildout), `buildout`, then `bin/test`.
# Environment: VENV (default .venv), ZODBKMI_SKIP_SETUP=1 to skip installs.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
BUILDOUT=0
if [ "${1:-}" = --buildout ]; then
    BUILDOUT=1
    shift
fi

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
    # pip's output, shown only when it fails, without the warnings a pip
    # configuration with index directories that do not exist repeats for
    # every package
    pip_install() {
        pip_log=$(mktemp)
        if "$VENV/bin/python" -m pip install -q "$@" >"$pip_log" 2>&1; then
            grep -v -e "is ignored: it is neither a file nor a directory" \
                -e '^ *$' "$pip_log" >&2 || true
            rm -f "$pip_log"
        else
            cat "$pip_log" >&2
            rm -f "$pip_log"
            echo "tests/run.sh: pip install $* failed" >&2
            exit 1
        fi
    }
    pip_install --upgrade pip
    pip_install -e '.[test]'
    # zodb-s3blobs (setup.py, S3_TEST_REQUIRE) declares Python >= 3.12;
    # 1.2.1 runs on older ones too: install it without the declaration
    if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
        pip_install --no-deps --ignore-requires-python 'zodb-s3blobs == 1.2.1'
    fi
fi

# TMPDIR: every temporary file and directory of the suite (tempfile, the
# key servers, ZEO, PostgreSQL and OpenBao that tests start, the CLI runs)
# goes to a private directory made fresh for each run (ZODBKMI_TEST_TMP,
# default var/test-tmp).  Tests remove what they create; after
# the run, scripts/leakscan.py scans what is left there for the public keys
# of zodbkmi.testing and for the canary marker tests put in plaintext
# (scripts/leakscan.py, CANARY).  A leak fails the run even when every test
# passed; otherwise the exit code is the test runner's.  The directory is
# kept for inspection until the next run.  Mode 0711: others cannot list
# it, but the PostgreSQL tests' initdb, run as the postgres user, must
# traverse it to reach the (0700, random-named) directory made for it.
TEST_TMP=${ZODBKMI_TEST_TMP:-$PWD/var/test-tmp}
rm -rf "$TEST_TMP"
mkdir -p "$TEST_TMP"
chmod 711 "$TEST_TMP"
TMPDIR=$TEST_TMP
export TMPDIR

if [ "$BUILDOUT" = 1 ]; then
    BVENV=${BUILDOUT_VENV:-.venv-buildout}
    if [ ! -x "$BVENV/bin/buildout" ]; then
        "$PY" -m venv "$BVENV"
        # buildout resolves the eggs against the setuptools it runs
        # with: pyramid (the Pyramid application tests) wants < 82
        "$BVENV/bin/python" -m pip install -q zc.buildout 'setuptools < 82'
    fi
    # buildout fetches the eggs into ./eggs (pip's cache is not used);
    # bin/test runs in parts/test with the eggs' paths baked in
    "$BVENV/bin/buildout" -q
fi

touch "$TEST_TMP/.started"
rc=0
if [ "$BUILDOUT" = 1 ]; then
    bin/test "$@" || rc=$?
else
    "$VENV/bin/python" scripts/testrunner.py --path=. \
        --tests-pattern='^tests$' "$@" || rc=$?
fi

# The cache of plaintext blob copies lives on a RAM-backed file system
# (/dev/shm by default), outside TMPDIR: what the run left there (a
# storage a test did not close) is moved into TEST_TMP for the leak scan.
# A directory of a process still running (another test run on this
# machine) is left alone.
for shm in /dev/shm/zodbkmi-blobs-*; do
    [ -d "$shm" ] && [ "$shm" -nt "$TEST_TMP/.started" ] || continue
    pid=${shm#/dev/shm/zodbkmi-blobs-}
    pid=${pid%%-*}
    case "$pid" in
        ''|*[!0-9]*) ;;
        *) kill -0 "$pid" 2>/dev/null && continue ;;
    esac
    echo "left by the tests: $shm (moved into $TEST_TMP/dev-shm)" >&2
    mkdir -p "$TEST_TMP/dev-shm"
    mv "$shm" "$TEST_TMP/dev-shm/" 2>/dev/null || rm -rf "$shm"
done

scan_rc=0
"$VENV/bin/python" scripts/leakscan.py --testing "$TEST_TMP" >&2 || scan_rc=$?
if [ "$scan_rc" = 1 ]; then
    echo "LEAK SCAN FAILED: the test suite left key material or canary" \
         "plaintext in $TEST_TMP (see the LEAK lines above)" >&2
elif [ "$scan_rc" != 0 ]; then
    echo "LEAK SCAN FAILED: scripts/leakscan.py could not scan" \
         "$TEST_TMP (exit code $scan_rc)" >&2
fi
if [ "$scan_rc" != 0 ] && [ "$rc" = 0 ]; then
    rc=3
fi
exit "$rc"
