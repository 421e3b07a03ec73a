"""zope.testrunner, closing with the skipped tests and their reasons.

zope.testrunner names a skipped test's reason only at ``-vvv``; at the
default verbosity a run says "3 skipped" and nothing more.  This runs it
unchanged (same options, same output, same exit code: ``tests/run.sh``
calls it), and each process of the run (layers that run in a subprocess
start this script again) prints, when its tests are done::

    Skipped (reasons):
      tests.test_x.T.test_y: needs SoftHSM2 (apt-get install softhsm2)

At ``-vvv`` the runner prints the reasons itself and this list is left
out.
"""
import sys

from zope.testrunner import formatter
from zope.testrunner import run


def _record_skips(skipped):
    """Make the runner's formatters put every skip in ``skipped`` as well
    (``test_skipped`` is where the runner reports each skip)."""
    for cls in (formatter.OutputFormatter, formatter.ColorfulOutputFormatter):
        report = cls.test_skipped

        def test_skipped(self, test, reason, _report=report):
            if self.verbose <= 2:
                skipped.append((test.id(), reason))
            _report(self, test, reason)

        cls.test_skipped = test_skipped


def main(argv=None):
    skipped = []
    _record_skips(skipped)
    try:
        run(args=argv)          # exits with the runner's status
    finally:
        if skipped:
            print('Skipped (reasons):')
            for test_id, reason in skipped:
                print('  %s: %s' % (test_id, reason))
            sys.stdout.flush()


if __name__ == '__main__':
    main()
