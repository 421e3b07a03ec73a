"""Run the atheris fuzzers of scripts/fuzz.py on every parser.

At level 1 (the suite) each parser gets a short run; the long runs are at
zope.testrunner level 2 (``sh tests/run.sh -t test_fuzz --at-level 2``) or
``scripts/fuzz.py TARGET -atheris_runs=N`` by hand.  ``ZODBKMI_FUZZ_RUNS``
overrides both counts.
"""
import os
import subprocess
import sys
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'scripts', 'fuzz.py')
RUNS = os.environ.get('ZODBKMI_FUZZ_RUNS')
SHORT = int(RUNS or 20000)
LONG = int(RUNS or 500000)


class FuzzTests(unittest.TestCase):

    runs = SHORT

    def _fuzz(self, target):
        try:
            import atheris  # noqa: F401
        except ImportError:   # pragma: no cover
            self.skipTest('atheris is not installed')
        proc = subprocess.run(
            [sys.executable, SCRIPT, target, '-atheris_runs=%d' % self.runs],
            capture_output=True, text=True, timeout=3600,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
        self.assertIn('Done %d' % self.runs, proc.stderr)

    def test_fuzz_envelope(self):
        self._fuzz('envelope')

    def test_fuzz_wrapped(self):
        self._fuzz('wrapped')

    def test_fuzz_vault(self):
        self._fuzz('vault')

    def test_fuzz_legacy(self):
        self._fuzz('legacy')

    def test_fuzz_stream(self):
        self._fuzz('stream')

    def test_fuzz_rest(self):
        self._fuzz('rest')


class LongFuzzTests(FuzzTests):
    """The same fuzzers, long enough to find something new."""

    level = 2
    runs = LONG
