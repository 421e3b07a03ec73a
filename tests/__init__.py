"""zodbkmi's test suite (run with zope.testrunner, see README.rst)."""


def _start_dek_reaper():
    """Start zodbkmi.cache's reaper thread before any test runs, so that
    the test runner does not report it as a thread left behind by the
    first test that caches a key (it lives as long as the process)."""
    from zodbkmi.cache import _reaper
    _reaper.wake(float('inf'))


_start_dek_reaper()


def _children_import_what_the_runner_imports():
    """Python child processes of the tests (the CLI, key servers, repozo,
    ZEO) run ``sys.executable``; under zc.buildout's ``bin/test`` the eggs
    are on the runner's ``sys.path`` only.  Children inherit it through
    ``PYTHONPATH`` (:func:`zodbkmi.testing.child_environ`)."""
    import os
    from zodbkmi.testing import child_environ
    os.environ['PYTHONPATH'] = child_environ()['PYTHONPATH']


_children_import_what_the_runner_imports()


def foreign_environ():
    """The environment for another Python installation (a virtual
    environment a test makes): without the runner's ``PYTHONPATH``."""
    import os
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    return env
