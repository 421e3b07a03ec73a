"""EncryptingStorage around RelStorage on a throwaway PostgreSQL."""
import os
import shutil
import tempfile
import time
import unittest
import uuid

import transaction
import ZODB
import ZODB.blob
from persistent.mapping import PersistentMapping

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres
from tests.s3server import S3Layer
from tests.storage_support import facility
from zodbkmi.storage import EncryptingStorage
from zodbkmi.testing import KeyEncryptingKey

SECRET = 'RELSTORAGE-SECRET-VALUE'


class RelStorageTests(unittest.TestCase):

    layer = PostgresLayer

    def setUp(self):
        needs_postgres(self)
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-rs-')
        self.dbname = 'rs_' + uuid.uuid4().hex[:12]
        self.dsn = PostgresLayer.server.createdb(self.dbname)
        self.facility = facility(os.path.join(self.tmp, 'keys'))
        self.opened = []

    def tearDown(self):
        transaction.abort()
        for db in self.opened:
            db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _base(self, keep_history=False, cache_local_mb=0):
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        opts = Options(keep_history=keep_history,
                       cache_local_mb=cache_local_mb,
                       blob_dir=os.path.join(self.tmp, 'blobs'),
                       shared_blob_dir=False)
        return RelStorage(PostgreSQLAdapter(dsn=self.dsn, options=opts),
                          options=opts)

    def _makeOne(self, keep_history=False, **kw):
        return EncryptingStorage(self._base(keep_history), self.facility,
                                 KeyEncryptingKey, **kw)

    def test_every_data_method_of_mvcc_interfaces_is_wrapped(self):
        import zope.interface
        from zodbkmi.storage import PASS_THROUGH
        from tests.test_storage import _defined_by_wrapper
        storage = self._makeOne()
        try:
            names = set()
            for iface in zope.interface.providedBy(storage).flattened():
                if iface.__module__ == 'ZODB.interfaces':
                    names.update(n for n, d in iface.namesAndDescriptions(
                        all=True) if hasattr(d, 'getSignatureString'))
            self.assertIn('new_instance', names)
            self.assertEqual(
                sorted(n for n in names if n not in PASS_THROUGH
                       and not _defined_by_wrapper(EncryptingStorage, n)),
                [])
        finally:
            storage.close()

    def test_works_with_local_cache(self):
        # RelStorage's local cache decompresses states starting with b'.z'
        # or b'.b'; the envelope magic b'.km' passes through it unchanged
        def db():
            d = ZODB.DB(EncryptingStorage(self._base(cache_local_mb=10),
                                          self.facility, KeyEncryptingKey))
            self.opened.append(d)
            return d
        self._fill(db())
        reader = db()
        for _ in range(2):     # the second read comes from the local cache
            with reader.transaction() as conn:
                self.assertEqual(conn.root()['child']['value'],
                                 SECRET + '-child')

    def _db(self, **kw):
        db = ZODB.DB(self._makeOne(**kw))
        self.opened.append(db)
        return db

    def test_declares_mvcc(self):
        import ZODB.interfaces
        storage = self._makeOne()
        try:
            self.assertTrue(ZODB.interfaces.IMVCCStorage.providedBy(storage))
            instance = storage.new_instance()
            self.assertIsInstance(instance, EncryptingStorage)
            instance.release()
        finally:
            storage.close()

    def _fill(self, db):
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
            conn.root()['child'] = PersistentMapping(value=SECRET + '-child')

    def test_roundtrip_and_tables_hold_no_plaintext(self):
        self._fill(self._db())
        db = self._db()
        with db.transaction() as conn:
            self.assertEqual(conn.root()['child']['value'], SECRET + '-child')
        dump = PostgresLayer.server.dump(self.dbname)
        self.assertIn(b'object_state', dump)
        self.assertNotIn(SECRET.encode(), dump)
        self.assertNotIn(b'PersistentMapping', dump)

    def test_conflict_resolution(self):
        from ZODB.tests.ConflictResolution import PCounter
        db = self._db(keep_history=True)
        tm1 = transaction.TransactionManager()
        tm2 = transaction.TransactionManager()
        c1 = db.open(transaction_manager=tm1)
        c1.root()['c'] = PCounter()
        c1.root()['c'].inc()
        tm1.commit()
        c2 = db.open(transaction_manager=tm2)
        c2.root()['c']._p_activate()
        c1.root()['c'].inc()
        c2.root()['c'].inc()
        tm1.commit()
        tm2.commit()   # resolved in RelStorage's vote, with the oid
        tm1.begin()
        self.assertEqual(c1.root()['c']._value, 3)
        c1.close()
        c2.close()

    def test_pack_gc(self):
        from ZODB.POSException import POSKeyError
        db = self._db(keep_history=True)
        self._fill(db)
        with db.transaction() as conn:
            oid = conn.root()['child']._p_oid
            del conn.root()['child']
        db.pack(time.time() + 1)
        with self.assertRaises(POSKeyError):
            db.storage.load(oid)

    def test_blob(self):
        db = self._db()
        with db.transaction() as conn:
            conn.root()['blob'] = ZODB.blob.Blob(b'BLOB-' + SECRET.encode())
        db2 = self._db()
        with db2.transaction() as conn:
            with conn.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'BLOB-' + SECRET.encode())

    def test_blob_copies_removed_after_explicit_transaction(self):
        # the private copies (the cache of repeated loads keeps its files
        # pinned: tests/test_storage_blobs.py)
        db = self._db(blob_cache_size=0)
        with db.transaction() as conn:
            conn.root()['blob'] = ZODB.blob.Blob(b'BLOB-' + SECRET.encode())
        tm = transaction.TransactionManager(explicit=True)
        tm.begin()
        conn = db.open(tm)
        name = conn.root()['blob'].committed()
        with open(name, 'rb') as f:
            self.assertEqual(f.read(), b'BLOB-' + SECRET.encode())
        transaction.abort()     # the thread's default transaction
        self.assertTrue(os.path.exists(name))
        tm.abort()
        # explicit: removed when the connection polls, at the next begin
        self.assertTrue(os.path.exists(name))
        tm.begin()
        self.assertFalse(os.path.exists(name))
        tm.abort()
        conn.close()

    def test_historical_connection_reads_plaintext(self):
        db = self._db(keep_history=True)
        self._fill(db)
        with db.transaction() as conn:
            conn.root()['child']['value'] = 'changed'
        before = db.storage.lastTransaction()     # state before the change
        tm = transaction.TransactionManager()
        conn = db.open(tm, before=before)
        try:
            self.assertEqual(conn.root()['child']['value'],
                             SECRET + '-child')
            self.assertIsInstance(conn._storage._storage, EncryptingStorage)
            self.assertTrue(conn._storage.isReadOnly())
        finally:
            tm.abort()
            conn.close()


class StorageDocLayer(PostgresLayer, S3Layer):
    """docs/storage.rst needs PostgreSQL and an S3 server (the section
    "Stacked with other storages"); the base layers start them."""

    __name__ = 'StorageDocLayer'
    __module__ = __name__

    @classmethod
    def setUp(cls):
        pass

    @classmethod
    def tearDown(cls):
        pass


def _doc_setUp(test):
    from tests import test_docs
    from tests.s3server import needs_s3
    needs_postgres(test)
    needs_s3(test)
    test_docs.setUp(test)
    test.globs['postgres'] = PostgresLayer.server
    test.globs['s3'] = S3Layer.server


def test_suite():
    from tests import test_docs
    suite = unittest.TestSuite()
    suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(
        RelStorageTests))
    docs = test_docs.doc_suite(
        os.path.join(os.path.dirname(__file__), '..', 'docs', 'storage.rst'),
        setUp=_doc_setUp)
    docs.layer = StorageDocLayer
    suite.addTest(docs)
    return suite
