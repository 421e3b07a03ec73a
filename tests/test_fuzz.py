"""Run the atheris fuzzers of scripts/fuzz.py briefly on every parser."""
import os
import subprocess
import sys
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'scripts', 'fuzz.py')
RUNS = int(os.environ.get('ZODBKMI_FUZZ_RUNS', '20000'))


class FuzzTests(unittest.TestCase):

    def _fuzz(self, target):
        try:
            import atheris  # noqa: F401
        except ImportError:   # pragma: no cover
            self.skipTest('atheris is not installed')
        proc = subprocess.run(
            [sys.executable, SCRIPT, target, '-atheris_runs=%d' % RUNS],
            capture_output=True, text=True, timeout=600,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
        self.assertIn('Done %d' % RUNS, proc.stderr)

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
