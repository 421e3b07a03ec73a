"""EncryptedPersistent in a real ZODB over FileStorage: every ZODB operation
with a mix of plain and encrypted objects."""
import io
import os
import threading
import time
import unittest

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB.POSException import POSKeyError

from tests.test_persistent import Counter
from tests.test_persistent import KeyedTestBase
from tests.test_persistent import Marker
from tests.test_persistent import Plain
from tests.test_persistent import Secret
from zodbkmi import exceptions

SECRETS = {
    'alice': 'alice-secret-5e1f',
    'bob': 'bob-secret-90ac',
    'profile': 'profile-secret-77d2',     # reachable only via alice
    'mapped': 'mapped-secret-3b08',       # in a PersistentMapping
    'child': 'child-secret-c4e9',         # below a plain object
}


class ZODBTestBase(KeyedTestBase):

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.tmp, 'Data.fs')
        self.db = self._open(self.path)

    def _open(self, path):
        db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
        self.addCleanup(db.close)
        return db

    def _connect(self, db=None, **kw):
        tm = transaction.TransactionManager()
        conn = (db or self.db).open(tm, **kw)
        self.addCleanup(conn.close)
        self.addCleanup(tm.abort)
        return tm, conn

    def _build(self):
        """Store the graph; return the transaction manager and root."""
        tm, conn = self._connect()
        root = conn.root()
        alice = Secret('alice', SECRETS['alice'], marker=Marker(1))
        bob = Secret('bob', SECRETS['bob'])
        alice.friend, bob.friend = bob, alice
        alice.profile = Secret('profile', SECRETS['profile'])
        alice.profile.notes = Plain('notes', owner=alice)  # only via alice
        users = OOBTree()
        users['alice'], users['bob'] = alice, bob
        alice.parent = bob.parent = users
        root['users'] = users
        root['mapping'] = PersistentMapping(
            {'m': Secret('mapped', SECRETS['mapped'])})
        root['plain'] = Plain('plain', child=Secret('child', SECRETS['child']))
        tm.commit()
        return tm, root

    def _assertGraph(self, root):
        users = root['users']
        alice, bob = users['alice'], users['bob']
        self.assertEqual(alice.value, SECRETS['alice'])
        self.assertEqual(alice.marker, Marker(1))
        self.assertEqual(bob.value, SECRETS['bob'])
        self.assertIs(alice.friend, bob)
        self.assertIs(bob.friend, alice)
        self.assertIs(alice.parent, users)
        self.assertIs(bob.parent, users)
        self.assertEqual(alice.profile.value, SECRETS['profile'])
        self.assertIs(alice.profile.notes.owner, alice)
        self.assertEqual(root['mapping']['m'].value, SECRETS['mapped'])
        self.assertEqual(root['plain'].child.value, SECRETS['child'])

    def _raw(self, path=None):
        with open(path or self.path, 'rb') as f:
            return f.read()

    def _assertNoSecrets(self, data):
        for secret in SECRETS.values():
            self.assertNotIn(secret.encode(), data)
        self.assertNotIn(b'Marker', data)


class ZODBOperationTests(ZODBTestBase):

    def test_load_in_another_connection(self):
        self._build()
        _, conn = self._connect()
        self._assertGraph(conn.root())

    def test_raw_storage_has_no_encrypted_values(self):
        self._build()
        data = self._raw()
        self._assertNoSecrets(data)
        self.assertIn(b'plain', data)            # plain objects are plain
        self.assertIn(b'tests.test_persistent\nSecret', data)

    def test_pack_keeps_what_is_reachable_through_encrypted_objects(self):
        tm, root = self._build()
        alice = root['users']['alice']
        dropped = Secret('dropped', child=Plain('dropped-child'))
        weak_target = Plain('weakly referenced')
        alice.dropped = dropped
        alice.weak = WeakRef(weak_target)
        alice.weak_target = weak_target
        tm.commit()
        kept = [alice.profile._p_oid, alice.profile.notes._p_oid]
        gone = [dropped._p_oid, dropped.child._p_oid, weak_target._p_oid]
        del alice.dropped
        del alice.weak_target        # now only weakly referenced
        tm.commit()
        time.sleep(0.01)
        self.db.pack()
        for oid in kept:
            self.db.storage.load(oid)
        for oid in gone:
            with self.assertRaises(POSKeyError):
                self.db.storage.load(oid)
        _, conn = self._connect()
        self._assertGraph(conn.root())
        self.assertIsNone(conn.root()['users']['alice'].weak())

    def test_weak_reference(self):
        tm, root = self._build()
        target = root['plain']
        root['users']['bob'].weak = WeakRef(target)
        tm.commit()
        _, conn = self._connect()
        bob = conn.root()['users']['bob']
        self.assertIs(bob.weak(), conn.root()['plain'])
        self.assertEqual(bob.weak.oid, target._p_oid)

    def test_export_import(self):
        tm, root = self._build()
        f = io.BytesIO()
        root['users']['alice']._p_jar.exportFile(
            root['users']['alice']._p_oid, f)
        self._assertNoSecrets(f.getvalue())
        f.seek(0)
        other = self._open(os.path.join(self.tmp, 'Other.fs'))
        tm2, conn2 = self._connect(other)
        copy = conn2.importFile(f)
        conn2.root()['copy'] = copy
        tm2.commit()
        _, conn3 = self._connect(other)
        copy = conn3.root()['copy']
        self.assertEqual(copy.value, SECRETS['alice'])
        self.assertEqual(copy.friend.value, SECRETS['bob'])
        self.assertIs(copy.friend.friend, copy)
        self.assertIs(copy.profile.notes.owner, copy)
        self.assertIs(copy.parent, copy.friend.parent)
        self.assertNotEqual(copy._p_oid, root['users']['alice']._p_oid)
        self._assertNoSecrets(self._raw(os.path.join(self.tmp, 'Other.fs')))

    def test_undo(self):
        tm, root = self._build()
        alice = root['users']['alice']
        alice.value = 'changed'
        alice.profile.value = 'changed too'
        tm.commit()
        self.db.undo(self.db.undoLog(0, 1)[0]['id'])
        transaction.commit()
        _, conn = self._connect()
        self._assertGraph(conn.root())

    def test_historical_connection(self):
        tm, root = self._build()
        first = self.db.lastTransaction()
        root['users']['alice'].value = 'changed'
        root['users']['alice'].friend = None
        tm.commit()
        _, old = self._connect(at=first)
        self._assertGraph(old.root())
        _, new = self._connect()
        self.assertEqual(new.root()['users']['alice'].value, 'changed')
        self.assertIsNone(new.root()['users']['alice'].friend)

    def test_savepoints(self):
        tm, root = self._build()
        alice = root['users']['alice']
        alice.value = 'first'
        alice.new = Secret('new', 'new-secret')
        sp = tm.savepoint()
        alice.value = 'second'
        alice.new.value = 'changed'
        sp.rollback()
        self.assertEqual(alice.value, 'first')
        self.assertEqual(alice.new.value, 'new-secret')
        tm.commit()
        _, conn = self._connect()
        alice = conn.root()['users']['alice']
        self.assertEqual((alice.value, alice.new.value), ('first',
                                                          'new-secret'))
        self.assertNotIn(b'new-secret', self._raw())

    def test_invalidation(self):
        tm, root = self._build()
        tm2, conn2 = self._connect()
        alice2 = conn2.root()['users']['alice']
        self.assertEqual(alice2.value, SECRETS['alice'])
        root['users']['alice'].value = 'changed'
        tm.commit()
        self.assertEqual(alice2.value, SECRETS['alice'])   # its snapshot
        tm2.begin()
        self.assertEqual(alice2.value, 'changed')

    def test_conflict_resolution(self):
        tm, conn = self._connect()
        conn.root()['counter'] = Counter()
        tm.commit()
        tm2, conn2 = self._connect()
        conn.root()['counter'].value += 3
        conn2.root()['counter'].value += 4
        tm.commit()
        tm2.commit()                         # resolved, not a ConflictError
        _, conn3 = self._connect()
        counter = conn3.root()['counter']
        self.assertEqual(counter.value, 7)
        self.assertEqual(counter.label, 'S3cr3t-value-7d41')
        self.assertNotIn(b'S3cr3t-value-7d41', self._raw())

    def test_error_passes_through_zodb(self):
        self._build()
        self.facility.delete(self.dek_id)
        _, conn = self._connect()
        users = conn.root()['users']         # plain: loads
        alice = users['alice']
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            alice.value
        self.assertIn('0x%s' % alice._p_oid.hex(), str(cm.exception))
        self.assertIn(self.dek_id, str(cm.exception))
        self.assertIsNone(alice._p_changed)  # still a ghost


class ThreadTests(ZODBTestBase):

    threads = 8
    rounds = 15

    def test_threads_commit_and_load_at_once(self):
        tm, conn = self._connect()
        for n in range(self.threads):
            conn.root()['t%d' % n] = PersistentMapping()
        tm.commit()
        errors = []
        start = threading.Barrier(self.threads)

        def work(n):
            try:
                tm = transaction.TransactionManager()
                conn = self.db.open(tm)
                start.wait()
                mine = conn.root()['t%d' % n]
                previous = None
                for i in range(self.rounds):
                    obj = Secret('%d-%d' % (n, i), 'secret-%d-%d' % (n, i),
                                 previous=previous, shared=Plain(str(i)))
                    mine[i] = obj
                    previous = obj
                    tm.commit()
                    # load what the others wrote, in a fresh connection
                    other_tm = transaction.TransactionManager()
                    other = self.db.open(other_tm)
                    for k in range(self.threads):
                        for j, o in other.root()['t%d' % k].items():
                            assert o.value == 'secret-%d-%d' % (k, j)
                            if j:
                                assert o.previous is other.root()[
                                    't%d' % k][j - 1]
                    other_tm.abort()
                    other.close()
                tm.abort()
                conn.close()
            except Exception as e:  # pragma: no cover
                errors.append(e)
        threads = [threading.Thread(target=work, args=(n,))
                   for n in range(self.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        _, conn = self._connect()
        for n in range(self.threads):
            mine = conn.root()['t%d' % n]
            self.assertEqual(len(mine), self.rounds)
            self.assertEqual(mine[self.rounds - 1].previous.value,
                             'secret-%d-%d' % (n, self.rounds - 2))
        self.assertNotIn(b'secret-0-0', self._raw())


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
