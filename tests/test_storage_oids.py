"""Tests of zodbkmi.storage.oids.OidRecovery, without a storage."""
import os
import threading
import unittest

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import AuthenticationError
from zodbkmi.format import envelope
from zodbkmi.storage.oids import OidRecovery
from zodbkmi.storage.oids import undone_tid

OID_A = b'\0' * 7 + b'\1'
OID_B = b'\0' * 7 + b'\2'


def _sealer():
    return envelope.Sealer(os.urandom(16), os.urandom(32))


class OidRecoveryTests(unittest.TestCase):

    def setUp(self):
        self.sealer = _sealer()
        self.oids = OidRecovery()

    def seal(self, oid, data=b'state'):
        return self.sealer.seal(data, envelope.CONTEXT_RECORD, oid=oid)

    def test_record_of_a_running_transaction(self):
        a, b = self.seal(OID_A), self.seal(OID_B)
        self.oids.remember(a, OID_A, 'txn')
        self.oids.remember(b, OID_B, 'txn')
        self.assertEqual(self.oids.oid_for(b), OID_B)
        self.assertEqual(self.oids.oid_for(a), OID_A)

    def test_older_revision_gets_the_oid_of_the_conflict(self):
        # conflict resolution opens the new state first, then the old and
        # the committed ones: they get the oid of the new state
        new, committed = self.seal(OID_A), self.seal(OID_A)
        self.oids.remember(new, OID_A, 'txn')
        self.assertEqual(self.oids.oid_for(new), OID_A)
        self.assertEqual(self.oids.oid_for(committed), OID_A)

    def test_no_hint_for_an_envelope_is_an_error(self):
        with self.assertRaises(DecryptionError):
            self.oids.oid_for(self.seal(OID_A))

    def test_plaintext_without_hint_is_none(self):
        self.assertIsNone(self.oids.oid_for(b'plain pickle'))

    def test_forget_ends_the_hints_of_a_transaction(self):
        a = self.seal(OID_A)
        self.oids.remember(a, OID_A, 'txn')
        self.oids.oid_for(a)
        self.oids.forget('txn')
        with self.assertRaises(DecryptionError):
            self.oids.oid_for(a)

    def test_hints_are_per_thread(self):
        a = self.seal(OID_A)
        self.oids.remember(a, OID_A, 'txn')
        self.oids.oid_for(a)
        seen = []
        t = threading.Thread(target=lambda: seen.append(
            self.oids.oid_for(b'plaintext')))
        t.start()
        t.join()
        self.assertEqual(seen, [None])

    def test_resolved_state_comes_back_with_its_oid(self):
        # a ZEO server whose clients resolve conflicts hands a resolved
        # state back when it conflicts again; meanwhile the thread
        # resolved a conflict on another object
        a, b = self.seal(OID_A), self.seal(OID_B)
        self.oids.remember(a, OID_A, 'txn')
        self.oids.remember(b, OID_B, 'txn')
        self.assertEqual(self.oids.oid_for(a), OID_A)
        resolved_a = self.seal(OID_A, b'resolved')
        self.oids.remember_resolved(resolved_a, OID_A)
        self.assertEqual(self.oids.oid_for(b), OID_B)
        self.oids.remember_resolved(self.seal(OID_B, b'resolved'), OID_B)
        self.assertEqual(self.oids.oid_for(resolved_a), OID_A)
        self.oids.forget('txn')
        with self.assertRaises(DecryptionError):
            self.oids.oid_for(resolved_a)

    def test_resolved_state_outside_a_transaction_is_not_kept(self):
        resolved = self.seal(OID_A, b'resolved')
        self.oids.resolving(OID_A)
        self.oids.remember_resolved(resolved, OID_A)
        self.assertEqual(self.oids._pending, {})

    def test_pack_index(self):
        a, b = self.seal(OID_A), self.seal(OID_B)
        read = []

        def records():
            read.append(1)
            return [(OID_A, a), (OID_B, b), (OID_B, b'')]
        self.oids.packing(records)
        self.assertEqual(self.oids.oid_for(b), OID_B)
        self.assertEqual(self.oids.oid_for(a), OID_A)
        self.assertEqual(read, [1])     # read once
        self.oids.packed()
        with self.assertRaises(DecryptionError):
            self.oids.oid_for(self.seal(OID_B))

    def test_pack_refuses_a_record_under_two_oids(self):
        a = self.seal(OID_A)
        self.oids.packing(lambda: [(OID_A, a), (OID_B, a)])
        with self.assertRaises(DecryptionError):
            self.oids.oid_for(a)

    def test_undo_candidates(self):
        sealed = self.seal(OID_B, b'old state')

        def unseal(data, oid):
            return self.sealer.open(data, envelope.CONTEXT_RECORD, oid=oid)
        self.oids.candidates = (OID_A, OID_B)
        self.assertEqual(self.oids.open_candidates(sealed, unseal),
                         b'old state')
        self.assertEqual(self.oids.oid_for(b'x'), OID_B)
        self.oids.candidates = (OID_A,)
        with self.assertRaises(AuthenticationError):
            self.oids.open_candidates(sealed, unseal)

    def test_undone_tid(self):
        import base64
        tid = b'\x03\xff' + b'\0' * 6
        self.assertEqual(undone_tid(base64.encodebytes(tid).rstrip()), tid)
        self.assertIsNone(undone_tid(b'\xff not base64 \x00'))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
