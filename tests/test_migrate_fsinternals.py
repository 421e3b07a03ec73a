"""Tests of zodbkmi.migrate.fsinternals: the private parts of FileStorage that
migrations read are still there, and hold what we expect, in the installed
ZODB.  A failure names the attribute that changed."""
import importlib
import os
import shutil
import tempfile
import unittest

import transaction
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping


def _resolve(dotted):
    module, _, name = dotted.rpartition('.')
    return getattr(importlib.import_module(module), name)


class FileStorageInternalsTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbkmi-fsinternals-')
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, 'Data.fs')
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.path))
        with db.transaction() as conn:
            conn.root()['x'] = PersistentMapping(a=1)
        db.close()
        self.storage = ZODB.FileStorage.FileStorage(self.path)
        self.addCleanup(self.storage.close)

    def _holder(self, where):
        from zodbkmi.migrate import fsinternals
        if where == 'storage':
            return self.storage
        self.assertEqual(where, 'index')
        return fsinternals.index(self.storage)

    def _check(self, where, name, expected):
        holder = self._holder(where)
        if not hasattr(holder, name):
            self.fail('ZODB changed: %s.%s has no attribute %r (see '
                      'zodbkmi/migrate/fsinternals.py)'
                      % (type(holder).__module__, type(holder).__name__,
                         name))
        value = getattr(holder, name)
        if expected == 'lock':
            ok = all(hasattr(value, a)
                     for a in ('acquire', 'release', '__enter__'))
        else:
            types = tuple(_resolve(t) for t in expected.split('|'))
            ok = isinstance(value, types)
        if not ok:
            self.fail('ZODB changed: %s.%s is a %s, not %s (see '
                      'zodbkmi/migrate/fsinternals.py)'
                      % (type(holder).__name__, name,
                         type(value).__name__, expected))

    def test_every_attribute_named_is_there_with_its_type(self):
        from zodbkmi.migrate.fsinternals import ATTRIBUTES
        for where, name, expected, reason in ATTRIBUTES:
            with self.subTest(attribute=name):
                self.assertTrue(reason)
                self._check(where, name, expected)

    def test_tid_while_committing(self):
        # _tid is what restore() needs between tpc_begin and tpc_finish
        from ZODB.Connection import TransactionMetaData
        from zodbkmi.migrate import fsinternals
        txn = TransactionMetaData()
        self.storage.tpc_begin(txn)
        try:
            tid = fsinternals.committing_tid(self.storage)
            self.assertIsInstance(tid, bytes)
            self.assertEqual(len(tid), 8)
            self.assertGreater(tid, fsinternals.last_tid(self.storage))
        finally:
            self.storage.tpc_abort(txn)

    def test_positions_and_last_tid_follow_commits(self):
        from zodbkmi.migrate import fsinternals
        oid = b'\0' * 8
        pos = fsinternals.current_position(self.storage, oid)
        ltid = fsinternals.last_tid(self.storage)
        self.assertIsInstance(pos, int)
        self.assertEqual(ltid, self.storage.lastTransaction())
        db = ZODB.DB(self.storage)
        conn = db.open()
        conn.root()['y'] = 2
        transaction.commit()
        conn.close()
        self.assertNotEqual(fsinternals.last_tid(self.storage), ltid)
        self.assertGreater(fsinternals.current_position(self.storage, oid),
                           pos)

    def test_records_read_through_the_internals_are_those_load_gives(self):
        from zodbkmi.migrate import fsinternals
        from zodbkmi.migrate.scan import iter_filestorage
        self.assertTrue(fsinternals.is_filestorage(self.storage))
        self.assertIsNotNone(
            fsinternals.index_buckets(fsinternals.index(self.storage)))
        records = list(iter_filestorage(self.storage))
        self.assertEqual(len(records), len(self.storage))
        for oid, tid, data in records:
            self.assertEqual((data, tid), self.storage.load(oid))

    def test_file_name(self):
        from zodbkmi.migrate import fsinternals
        self.assertEqual(fsinternals.file_name(self.storage),
                         os.path.abspath(self.path))
        self.assertEqual(fsinternals.file_name(object(), 'x'), 'x')

    def test_subclasses_and_other_storages_take_the_public_path(self):
        from ZODB.MappingStorage import MappingStorage
        from zodbkmi.migrate import fsinternals

        class Sub(ZODB.FileStorage.FileStorage):
            pass
        sub = Sub(os.path.join(self.dir, 'Sub.fs'))
        self.addCleanup(sub.close)
        self.assertFalse(fsinternals.is_filestorage(sub))
        self.assertFalse(fsinternals.is_filestorage(MappingStorage()))
