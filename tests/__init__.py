"""zodbkmi's test suite (run with zope.testrunner, see README.rst)."""
