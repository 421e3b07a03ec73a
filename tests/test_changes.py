"""CHANGES.rst: a changelog for users, which PyPI renders.

setup.py puts it in the long description, so a docutils warning in it
fails ``twine check`` and the release.  Its shape is that of
../shared/STYLE.md: newest release first, ``X.Y (unreleased)`` or
``X.Y (YYYY-MM-DD)`` headings, bullets for users, not a diary of fixes to
unreleased code.
"""
import io
import os
import re
import unittest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(HERE, 'CHANGES.rst')
RELEASE = re.compile(
    r'^(\d+\.\d+(?:\.\d+)?) \((unreleased|\d{4}-\d\d-\d\d)\)$')


def read():
    with open(PATH, encoding='utf-8') as f:
        return f.read()


class ChangesTests(unittest.TestCase):

    def test_renders_without_warnings(self):
        import docutils.core
        warnings = io.StringIO()
        docutils.core.publish_doctree(read(), settings_overrides={
            'report_level': 2, 'halt_level': 5, 'warning_stream': warnings})
        self.assertEqual(warnings.getvalue(), '')

    def releases(self):
        lines = read().splitlines()
        return [(line, lines[i + 1]) for i, line in enumerate(lines[:-1])
                if RELEASE.match(line)]

    def test_release_headings_newest_first(self):
        releases = self.releases()
        self.assertTrue(releases, 'no "X.Y (unreleased)" heading')
        for heading, underline in releases:
            self.assertEqual(underline, '=' * len(heading), heading)
        versions = [tuple(map(int, RELEASE.match(h).group(1).split('.')))
                    for h, _ in releases]
        self.assertEqual(versions, sorted(versions, reverse=True))
        unreleased = [h for h, _ in releases if h.endswith('(unreleased)')]
        self.assertIn(unreleased, ([], [releases[0][0]]))

    def test_no_diary(self):
        """Entries say what users get: no issue numbers, no "Fixed:"
        entries for unreleased code, no test files."""
        text = read()
        for pattern in (r'[Ii]ssue #?\d', r'^- Fix(ed)?:', r'tests/test_'):
            self.assertIsNone(re.search(pattern, text, re.M), pattern)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromTestCase(ChangesTests)
