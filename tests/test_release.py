"""The distributions: complete, installable, their tests run.

Built as a release is built (``python -m build``: the sdist, then the
wheel from the sdist): the sdist must hold every file of the repository
(the docs are doctests, the tests need their vectors, legacy data and
server helpers), both must pass ``twine check``, each must install in a
fresh virtual environment, and the installed package must pass the
doctests of README.rst and the format tests of the sdist's test suite.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import unittest

from tests import foreign_environ
from zodbkmi.testing import child_environ

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _run(*args, **kw):
    # the fresh virtual environments import nothing of the runner's path
    kw.setdefault('env', foreign_environ())
    kw.setdefault('stdout', subprocess.PIPE)
    kw.setdefault('stderr', subprocess.STDOUT)
    kw.setdefault('text', True)
    kw.setdefault('timeout', 900)
    return subprocess.run(args, **kw)


class SdistLayer:
    """The sdist, built once for the tests of this module."""

    @classmethod
    def setUp(cls):
        if not (_has('build') and _has('twine')):
            cls.tmp = None
            return
        cls.tmp = tempfile.mkdtemp(prefix='zodbkmi-sdist-')
        out = _run(sys.executable, '-m', 'build', '--outdir', cls.tmp, HERE,
                   env=child_environ())
        cls.output = out.stdout
        if out.returncode:
            raise AssertionError('the sdist does not build:\n' +
                                 out.stdout[-3000:])
        (cls.sdist,) = glob.glob(os.path.join(cls.tmp, '*.tar.gz'))
        (cls.wheel,) = glob.glob(os.path.join(cls.tmp, '*.whl'))
        with tarfile.open(cls.sdist) as tar:
            names = tar.getnames()
            top = names[0].split('/')[0]
            cls.members = {n[len(top) + 1:] for n in names
                           if n.startswith(top + '/')}
            tar.extractall(cls.tmp, filter='data')
        cls.unpacked = os.path.join(cls.tmp, top)

    @classmethod
    def tearDown(cls):
        if cls.tmp is not None:
            shutil.rmtree(cls.tmp, ignore_errors=True)


class SdistTests(unittest.TestCase):

    layer = SdistLayer

    def setUp(self):
        if SdistLayer.tmp is None:
            self.skipTest('needs the build and twine packages')
        for name in ('tmp', 'sdist', 'wheel', 'members', 'unpacked'):
            setattr(self, name, getattr(SdistLayer, name))

    def test_holds_every_file_of_the_repository(self):
        for name in ('setup.py', 'README.rst', 'CHANGES.rst', 'LICENSE.txt',
                     'buildout.cfg', 'docs/index.rst', 'tests/run.sh',
                     'tests/vectors/envelope.json',
                     'src/zodbkmi/component.xml'):
            self.assertIn(name, self.members)
        if not os.path.isdir(os.path.join(HERE, '.git')):
            return      # not a git checkout: the list above is the check
        tracked = _run('git', '-C', HERE, 'ls-files', '-z')
        if tracked.returncode:
            self.skipTest('git ls-files failed: %s' % tracked.stdout[-200:])
        missing = sorted(
            name for name in tracked.stdout.split('\0')
            if name and name not in self.members
            and name != '.gitignore'
            and os.path.exists(os.path.join(HERE, name)))
        self.assertEqual(missing, [])

    def test_twine_check(self):
        out = _run(sys.executable, '-m', 'twine', 'check', '--strict',
                   self.sdist, self.wheel, env=child_environ())
        self.assertEqual(out.returncode, 0, out.stdout[-3000:])

    def _install_and_test(self, dist, *tests):
        venv = tempfile.mkdtemp(prefix='venv-', dir=self.tmp)
        _run(sys.executable, '-m', 'venv', venv, check=True)
        python = os.path.join(venv, 'bin', 'python')
        site = _run(python, '-c',
                    'import sysconfig; print(sysconfig.get_path("purelib"))',
                    check=True).stdout.strip()
        # the dependencies come from this environment: its site-packages
        # as a plain path (its .pth files, among them the editable install
        # of the checkout, are not processed), after the fresh one; under
        # zc.buildout its eggs, each on sys.path (not the develop egg of
        # the checkout, which is a src directory)
        deps = [sysconfig.get_path('purelib')]
        deps += [p for p in sys.path if p.endswith('.egg')]
        with open(os.path.join(site, 'deps.pth'), 'w') as f:
            f.write(''.join(p + '\n' for p in deps))
        out = _run(python, '-m', 'pip', 'install', '-q', '--no-deps', dist)
        self.assertEqual(out.returncode, 0, out.stdout[-3000:])
        out = _run(python, '-c', 'import zodbkmi.facility; '
                   'print(zodbkmi.facility.__file__)', cwd=self.tmp)
        self.assertEqual(out.returncode, 0, out.stdout[-3000:])
        self.assertTrue(out.stdout.strip().startswith(site), out.stdout)
        # README.rst (and ``tests``) of the sdist, run against the
        # installed package
        selected = ['-t', 'README.rst']
        for name in tests:
            selected += ['-t', name]
        out = _run(python, '-m', 'zope.testrunner', '--path', self.unpacked,
                   '--tests-pattern', '^tests$', *selected,
                   cwd=self.unpacked)
        self.assertEqual(out.returncode, 0, out.stdout[-3000:])
        self.assertIn('README.rst', _run(
            python, '-m', 'zope.testrunner', '--path', self.unpacked,
            '--tests-pattern', '^tests$', '-t', 'README.rst', '--list-tests',
            cwd=self.unpacked).stdout)
        ran = re.findall(r'Ran (\d+) tests with 0 failures, 0 errors',
                         out.stdout)
        self.assertTrue(ran, out.stdout[-3000:])
        return int(ran[-1])

    def test_sdist_installs_in_a_fresh_venv_and_its_tests_pass(self):
        ran = self._install_and_test(self.sdist, 'test_format_vectors',
                                     'test_envelope', 'format.rst')
        self.assertGreaterEqual(ran, 20)

    def test_wheel_installs_in_a_fresh_venv_and_its_tests_pass(self):
        self.assertGreaterEqual(self._install_and_test(self.wheel), 1)

    def test_builds_without_warnings(self):
        # setuptools warns on every install about deprecated metadata
        for text in ('BuildBackendWarning', 'SetuptoolsDeprecationWarning',
                     'deprecated'):
            self.assertNotIn(text, SdistLayer.output)
