"""zodbkmi's test suite (run with zope.testrunner, see README.rst)."""


def _start_dek_reaper():
    """Start zodbkmi.cache's reaper thread before any test runs, so that
    the test runner does not report it as a thread left behind by the
    first test that caches a key (it lives as long as the process)."""
    from zodbkmi.cache import _reaper
    _reaper.wake(float('inf'))


_start_dek_reaper()
