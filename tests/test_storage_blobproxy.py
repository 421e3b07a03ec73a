"""Blob files behind ZODB's BlobStorage proxy survive concurrent commits.

``ZODB.blob.BlobStorage`` (``<blobstorage>``, zodburi's
``file://...?blobstorage_dir=``) keeps the blob files of the transaction
being committed in one list shared by all transactions, and clears it in
``tpc_finish`` only after the storage inside has released its commit
lock.  A transaction that takes the lock in that window and aborts removes
the blob files of the transaction just committed: its records then name
files that are gone (``POSKeyError`` on every load).  Found in a Pyramid
application with eight concurrent writers (``tests/test_app_pyramid.py``);
plain ZODB loses blob files the same way.

The test below makes the window wide instead of waiting for a thread
switch to fall into it: right after the inner storage's ``tpc_finish``
(commit lock released, the list not cleared yet), the committing thread
lets another transaction commit and abort before it goes on.
"""
import os
import shutil
import tempfile
import threading
import unittest

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

from tests.storage_support import facility
from tests.storage_support import wrap


class FailingDataManager:
    """Joins a transaction and fails it in ``commit``, after the
    connection has begun and stored (so the storage aborts a transaction
    that holds its commit lock)."""

    transaction_manager = None

    def sortKey(self):
        return '~zzz'      # after the connection

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        raise RuntimeError('failed on purpose')

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass


class BlobProxyTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-blobproxy-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.inner = ZODB.FileStorage.FileStorage(
            os.path.join(self.tmp, 'Data.fs'))
        self.proxy = ZODB.blob.BlobStorage(os.path.join(self.tmp, 'blobs'),
                                           self.inner)
        self.db = ZODB.DB(wrap(
            self.proxy, facility=facility(os.path.join(self.tmp, 'keys')),
            create_key=True, blob_cache_size=0))
        self.addCleanup(self.db.close)
        with self.db.transaction() as conn:
            conn.root()['scan'] = ZODB.blob.Blob(b'one')
            conn.root()['notes'] = PersistentMapping()

    def test_an_abort_right_after_a_commit_keeps_its_blob_files(self):
        released = threading.Event()
        aborted = threading.Event()
        committer = []
        failures = []
        real_finish = self.inner.tpc_finish

        def tpc_finish(*args, **kw):
            tid = real_finish(*args, **kw)      # commit lock released
            if threading.current_thread() in committer:
                # the other transaction's turn, as a thread switch here
                # would give it; with the fix it cannot end before this
                # one has ended
                released.set()
                aborted.wait(2)
            return tid

        self.inner.tpc_finish = tpc_finish

        def commit_new_revision():
            tm = transaction.TransactionManager()
            conn = self.db.open(tm)
            try:
                with conn.root()['scan'].open('w') as f:
                    f.write(b'two')
                tm.commit()
            except BaseException as e:
                failures.append(repr(e))
            finally:
                conn.close()

        def commit_and_fail():
            released.wait(60)
            tm = transaction.TransactionManager()
            conn = self.db.open(tm)
            try:
                conn.root()['notes']['x'] = 1
                tm.get().join(FailingDataManager())
                try:
                    tm.commit()
                except RuntimeError:
                    pass
                else:
                    failures.append('the failing commit did not fail')
            except BaseException as e:
                failures.append(repr(e))
            finally:
                aborted.set()
                tm.abort()
                conn.close()

        writer = threading.Thread(target=commit_new_revision)
        committer.append(writer)
        failing = threading.Thread(target=commit_and_fail)
        failing.start()
        writer.start()
        writer.join(120)
        failing.join(120)
        self.assertFalse(writer.is_alive() or failing.is_alive())
        self.assertEqual(failures, [])
        del self.inner.tpc_finish
        with self.db.transaction() as conn:
            with conn.root()['scan'].open() as f:
                self.assertEqual(f.read(), b'two')
