"""Run README.rst and docs/*.rst as doctests, and build the docs with Sphinx.

A document that needs a real server (and so a layer of its own) is listed in
OWN_SUITE and run by the test module named there instead.
"""
import doctest
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import unittest

import transaction
import zope.component.testing

from zodbkmi.testing import child_environ

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)

#: docs/*.rst file name -> the test module that runs it with its own setup.
OWN_SUITE = {
    'storage.rst': 'tests.test_storage_relstorage',
    'keysources.rst': 'tests.test_sources',
    'server.rst': 'tests.test_server',
}

FLAGS = (doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
         | doctest.IGNORE_EXCEPTION_DETAIL)


def setUp(test):
    """Run the document in a fresh temporary directory with an empty
    component registry, as a module of its own (``zodbkmi_doc_<name>`` in
    ``sys.modules``), so that ZODB can import the classes it defines."""
    zope.component.testing.setUp(test)
    name = 'zodbkmi_doc_' + re.sub(r'\W', '_', os.path.splitext(
        os.path.basename(test.filename or test.name))[0])
    module = types.ModuleType(name)
    module.__dict__.update(test.globs)
    module.__dict__['__name__'] = name
    test.globs = module.__dict__
    sys.modules[name] = module
    test.globs['_old_cwd'] = os.getcwd()
    test.globs['_tmp'] = tempfile.mkdtemp(prefix='zodbkmi-doc-')
    os.chdir(test.globs['_tmp'])


def tearDown(test):
    transaction.abort()
    os.chdir(test.globs['_old_cwd'])
    shutil.rmtree(test.globs['_tmp'], ignore_errors=True)
    sys.modules.pop(test.globs['__name__'], None)
    zope.component.testing.tearDown(test)


def doc_files():
    files = [os.path.join(TOP, 'README.rst')]
    files += sorted(glob.glob(os.path.join(TOP, 'docs', '*.rst')))
    return [f for f in files if os.path.basename(f) not in OWN_SUITE]


def doc_suite(path, **kw):
    """A DocFileSuite for ``path`` with the project's flags and setup."""
    kw.setdefault('setUp', setUp)
    kw.setdefault('tearDown', tearDown)
    return doctest.DocFileSuite(path, module_relative=False,
                                optionflags=FLAGS, encoding='utf-8', **kw)


class SphinxBuildTests(unittest.TestCase):

    def test_docs_build_without_warnings(self):
        """The documentation, API reference (docs/api/) included, builds
        without a warning, and every cross-reference resolves (``-n``):
        a docstring naming a class that moved fails here."""
        try:
            import sphinx  # noqa: F401
        except ImportError:   # pragma: no cover
            self.skipTest('Sphinx is not installed')
        out = tempfile.mkdtemp(prefix='zodbkmi-sphinx-')
        try:
            proc = subprocess.run(
                [sys.executable, '-m', 'sphinx', '-n', '-W', '--keep-going',
                 '-q', '-b', 'html', os.path.join(TOP, 'docs'), out],
                capture_output=True, text=True, timeout=300,
                # buildout's bin/test puts the eggs on sys.path only
                env=child_environ())
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])


def test_suite():
    suite = unittest.TestSuite()
    for path in doc_files():
        suite.addTest(doc_suite(path))
    suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(
        SphinxBuildTests))
    return suite
