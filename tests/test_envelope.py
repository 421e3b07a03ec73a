"""Tests of zodbkmi.format.envelope."""
import os
import unittest


class SealerTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.format.envelope import Sealer
        return Sealer

    def _makeOne(self):
        return self._getTargetClass()(os.urandom(16), os.urandom(32))

    def test_roundtrip(self):
        s = self._makeOne()
        self.assertEqual(s.open(s.seal(b'data')), b'data')
