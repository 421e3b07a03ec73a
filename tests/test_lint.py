"""The code passes flake8 with the project's settings (tests/flake8.cfg)."""
import os
import subprocess
import sys
import unittest

from zodbkmi.testing import child_environ

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What is checked: the package, its tests, scripts, benchmarks, setup.py
#: and the Sphinx configuration.
PATHS = ('src', 'tests', 'scripts', 'benchmarks', 'setup.py', 'docs/conf.py')


class Flake8Tests(unittest.TestCase):

    def test_flake8_is_clean(self):
        try:
            import flake8  # noqa: F401
        except ImportError:   # pragma: no cover
            self.skipTest('flake8 is not installed (the test extra has it)')
        proc = subprocess.run(
            [sys.executable, '-m', 'flake8', '--config',
             os.path.join('tests', 'flake8.cfg'), *PATHS], cwd=TOP,
            capture_output=True, text=True, timeout=600,
            # buildout's bin/test puts the eggs on sys.path only
            env=child_environ())
        found = (proc.stdout + proc.stderr)[-4000:]
        self.assertEqual(proc.returncode, 0, 'flake8 found:\n' + found)
