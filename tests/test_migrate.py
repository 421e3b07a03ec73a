"""Tests of zodbkmi.migrate and the ``zodbkmi migrate`` command."""
import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)


def b64(key):
    return base64.b64encode(key).decode('ascii')


class _TempDir:

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)


def make_database(path, count, start=0):
    """A FileStorage of ``count`` PersistentMapping objects under the root
    (in one BTree); return {oid: record} of every current record."""
    import transaction
    import ZODB
    import ZODB.FileStorage
    from BTrees.IOBTree import IOBTree
    from persistent.mapping import PersistentMapping
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        tree = root.setdefault('tree', IOBTree())
        for i in range(start, start + count):
            tree[i] = PersistentMapping(n=i, text='secret %d' % i)
            if i % 5000 == 4999:
                tm.commit()
        tm.commit()
        conn.close()
    finally:
        db.close()
    return current_records(path)


def current_records(path):
    import ZODB.FileStorage
    from zodbkmi.migrate import iter_records
    fs = ZODB.FileStorage.FileStorage(path, read_only=True)
    try:
        return {oid: data for oid, tid, data in iter_records(fs)}
    finally:
        fs.close()


class IterRecordsTests(unittest.TestCase):

    def _callFUT(self, storage, start=None):
        from zodbkmi.migrate import iter_records
        return list(iter_records(storage, start))

    def _undo(self, db):
        import transaction
        info = db.undoInfo()[0]
        db.undo(info['id'])
        transaction.commit()

    def test_filestorage_w_undo_matches_load(self):
        # undo writes records that point back to older data, and an undone
        # creation leaves an oid without data: both are read correctly.
        import transaction
        import ZODB
        import ZODB.FileStorage
        from persistent.mapping import PersistentMapping
        from ZODB.utils import load_current
        tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, tmp, True)
        fs = ZODB.FileStorage.FileStorage(os.path.join(tmp, 'Data.fs'))
        db = ZODB.DB(fs)
        closed = []
        self.addCleanup(lambda: closed or db.close())
        conn = db.open()
        for i in range(600):
            conn.root()[i] = PersistentMapping(v=i)
        transaction.commit()
        conn.root()[5]['v'] = 'changed'
        transaction.commit()
        self._undo(db)                      # back pointer for oid of 5
        conn.root()['new'] = PersistentMapping(v='new')
        transaction.commit()
        new_oid = conn.root()['new']._p_oid
        self._undo(db)                      # undone creation
        conn.close()
        records = self._callFUT(fs)
        oids = [r[0] for r in records]
        self.assertEqual(oids, sorted(oids))
        self.assertNotIn(new_oid, oids)
        self.assertEqual(len(records), 601)   # root, 600, no 'new'
        for oid, tid, data in records:
            self.assertEqual((data, tid), load_current(fs, oid))
        self.assertEqual(self._callFUT(fs, oids[300]), records[300:])

        class SubclassedFileStorage(ZODB.FileStorage.FileStorage):
            """Read through record_iternext, not the FileStorage path."""
        db.close()
        closed.append(True)
        other = SubclassedFileStorage(os.path.join(tmp, 'Data.fs'))
        self.addCleanup(other.close)
        self.assertEqual(self._callFUT(other), records)

    def test_storage_wo_record_iternext(self):
        import ZODB
        from persistent.mapping import PersistentMapping
        from ZODB.MappingStorage import MappingStorage
        storage = MappingStorage()
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        with db.transaction() as conn:
            for i in range(10):
                conn.root()[i] = PersistentMapping()
        records = self._callFUT(storage)
        self.assertEqual(len(records), 11)

    def test_empty_storage(self):
        from ZODB.MappingStorage import MappingStorage
        self.assertEqual(self._callFUT(MappingStorage()), [])


class KeysFromEnvironTests(unittest.TestCase):

    def _callFUT(self, mode, **environ):
        from zodbkmi.migrate import keys_from_environ
        return keys_from_environ(mode, environ)

    def setUp(self):
        self.old = b64(os.urandom(32))
        self.new = b64(os.urandom(32))

    def _env(self, old='', new='', algorithm='aes256-gcm'):
        return {'OLD_ENCRYPTION_KEY': old, 'NEW_ENCRYPTION_KEY': new,
                'ENCRYPTION_ALGORITHM': algorithm}

    def assertRefused(self, mode, env, text):
        from zodbkmi.exceptions import InvalidKeyError
        with self.assertRaises(InvalidKeyError) as cm:
            self._callFUT(mode, **env)
        msg = str(cm.exception)
        self.assertIn(text, msg)
        self.assertNotIn('\n', msg)
        self.assertNotIn(self.old, msg)
        self.assertNotIn(self.new, msg)

    def test_encrypt_w_new_only(self):
        old, new = self._callFUT('encrypt', **self._env(new=self.new))
        self.assertIsNone(old)
        self.assertTrue(new.key_id.startswith('aes-'))

    def test_encrypt_w_old_key_refused(self):
        self.assertRefused('encrypt', self._env(self.old, self.new),
                           'OLD_ENCRYPTION_KEY must be empty')

    def test_encrypt_wo_new_key_refused(self):
        self.assertRefused('encrypt', self._env(),
                           'NEW_ENCRYPTION_KEY is empty')
        self.assertRefused('encrypt', self._env(self.old),
                           'encrypt needs NEW_ENCRYPTION_KEY only')

    def test_rekey_w_both(self):
        old, new = self._callFUT('rekey', **self._env(self.old, self.new))
        self.assertNotEqual(old.key_id, new.key_id)

    def test_rekey_w_one_key_refused(self):
        self.assertRefused('rekey', self._env(new=self.new),
                           'OLD_ENCRYPTION_KEY is empty')
        self.assertRefused('rekey', self._env(old=self.old),
                           'NEW_ENCRYPTION_KEY is empty')

    def test_rekey_w_same_key_refused(self):
        self.assertRefused('rekey', self._env(self.old, self.old),
                           'are the same key')

    def test_decrypt_w_old_only(self):
        old, new = self._callFUT('decrypt', **self._env(old=self.old))
        self.assertIsNone(new)
        self.assertIsNotNone(old)

    def test_decrypt_w_new_key_refused(self):
        self.assertRefused('decrypt', self._env(self.old, self.new),
                           'NEW_ENCRYPTION_KEY must be empty')

    def test_rotate_kek_needs_both(self):
        self.assertRefused('rotate-kek', self._env(old=self.old),
                           'NEW_ENCRYPTION_KEY is empty')

    def test_scan_w_any(self):
        self.assertEqual(self._callFUT('scan', **self._env()), (None, None))

    def test_algorithm_missing(self):
        env = self._env(new=self.new)
        del env['ENCRYPTION_ALGORITHM']
        self.assertRefused('encrypt', env, 'ENCRYPTION_ALGORITHM is not set')
        self.assertRefused('encrypt', self._env(new=self.new, algorithm=''),
                           'ENCRYPTION_ALGORITHM is not set')

    def test_algorithm_unknown(self):
        self.assertRefused('encrypt',
                           self._env(new=self.new, algorithm='aes-256-cbc'),
                           'not supported')

    def test_bad_base64(self):
        self.assertRefused('encrypt', self._env(new='not base64!'),
                           'NEW_ENCRYPTION_KEY: the key is not base64')

    def test_wrong_size(self):
        self.assertRefused('encrypt', self._env(new=b64(b'x' * 16)),
                           'an AES-256 key has 32 bytes, not 16')

    def test_whitespace_is_empty(self):
        old, new = self._callFUT('encrypt',
                                 **self._env(old='  ', new=self.new))
        self.assertIsNone(old)


class ReportTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.migrate import Report
        return Report

    def _makeOne(self, mode='scan'):
        return self._getTargetClass()(mode, 'storage')

    def _failures(self, report):
        lines = report.format()
        return lines[lines.index('  FAILED     %d' % report.failed) + 1:]

    def test_failures_grouped_by_reason_most_frequent_first(self):
        from ZODB.utils import p64
        report = self._makeOne()
        for i in range(1, 151):
            report.fail(p64(i), 'authentication failed')
        report.fail(p64(200), 'malformed envelope')
        self.assertEqual(report.failed, 151)
        self.assertEqual(len(report.failed_oids), 100)    # kept as before
        self.assertEqual(self._failures(report), [
            '    FAILED 150: authentication failed (oids 0x01, 0x02, 0x03 '
            'and 147 more)',
            '    FAILED 1: malformed envelope (oid 0xc8)'])

    def test_few_failures_list_every_oid(self):
        from ZODB.utils import p64
        report = self._makeOne('rekey')
        report.fail(p64(1), 'x')
        report.fail(p64(2), 'x')
        self.assertEqual(self._failures(report),
                         ['    FAILED 2: x (oids 0x01, 0x02)'])

    def test_no_failure_no_line(self):
        self.assertFalse([line for line in self._makeOne().format()
                          if 'FAILED' in line])


class StorageMigrationTests(_TempDir, unittest.TestCase):

    def setUp(self):
        super().setUp()
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        self.original = make_database(self.path('Data.fs'), 300)
        self.facility = KeyManagementFacility(self.path('keys'))
        self.kek1 = AESKeyEncryptingKey.generate()
        self.kek2 = AESKeyEncryptingKey.generate()

    def _getTargetClass(self):
        from zodbkmi.migrate import Migration
        return Migration

    def _makeOne(self, mode, new=None, old=(), legacy=None, **kw):
        import ZODB.FileStorage
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        storage = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        self.addCleanup(storage.close)
        keys = MigrationKeys(self.facility, new, old)
        kw.setdefault('chunk_size', 64)
        return self._getTargetClass()(
            storage, RecordTransformer(keys, legacy), mode, **kw)

    def _run(self, mode, new=None, old=(), **kw):
        migration = self._makeOne(mode, new, old, **kw)
        try:
            return migration.run()
        finally:
            migration.storage.close()

    def _plaintexts(self, *keks):
        from zodbkmi.format import envelope
        out = {}
        for oid, data in current_records(self.path('Data.fs')).items():
            if envelope.is_envelope(data):
                data = self.facility.decrypt(keks, data, oid=oid)
            out[oid] = data
        return out

    def _dek_ids(self):
        return {self.facility.key_id_of(d, oid=o)
                for o, d in current_records(self.path('Data.fs')).items()}

    def test_encrypt(self):
        report = self._run('encrypt', self.kek1)
        self.assertEqual(report.records, len(self.original))
        self.assertEqual(report.kinds['plaintext'], len(self.original))
        self.assertEqual(report.rewritten, len(self.original))
        self.assertEqual(report.transactions,
                         -(-len(self.original) // 64))
        self.assertEqual(report.failed, 0)
        self.assertEqual(self._dek_ids(),
                         {self.facility.ensure_key(self.kek1)})
        self.assertEqual(self._plaintexts(self.kek1), self.original)

    def test_encrypt_twice_rewrites_nothing(self):
        self._run('encrypt', self.kek1)
        before = current_records(self.path('Data.fs'))
        report = self._run('encrypt', self.kek1)
        self.assertEqual(report.rewritten, 0)
        self.assertEqual(report.transactions, 0)
        self.assertEqual(report.kinds['encrypted'], len(self.original))
        self.assertEqual(current_records(self.path('Data.fs')), before)

    def test_encrypt_leaves_records_under_other_keys(self):
        self._run('encrypt', self.kek1)
        report = self._run('encrypt', self.kek2)
        self.assertEqual(report.rewritten, 0)

    def test_rekey(self):
        self._run('encrypt', self.kek1)
        old_dek = self.facility.ensure_key(self.kek1)
        report = self._run('rekey', self.kek2, [self.kek1])
        self.assertEqual(report.rewritten, len(self.original))
        self.assertEqual(report.by_dek, {old_dek: len(self.original)})
        self.assertEqual(report.by_kek,
                         {self.kek1.key_id: len(self.original)})
        self.assertEqual(self._dek_ids(),
                         {self.facility.ensure_key(self.kek2)})
        self.assertEqual(self._plaintexts(self.kek2), self.original)
        again = self._run('rekey', self.kek2, [self.kek1])
        self.assertEqual(again.rewritten, 0)

    def test_rekey_to_new_dek_of_same_kek(self):
        self._run('encrypt', self.kek1)
        new_dek = self.facility.rotate(self.kek1)
        report = self._run('rekey', self.kek1)
        self.assertEqual(report.rewritten, len(self.original))
        self.assertEqual(self._dek_ids(), {new_dek})

    def test_rekey_leaves_plaintext_alone(self):
        report = self._run('rekey', self.kek2, [self.kek1])
        self.assertEqual(report.rewritten, 0)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)

    def test_rekey_w_wrong_old_key_fails_records(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        self._run('encrypt', self.kek1)
        other = AESKeyEncryptingKey.generate()
        report = self._run('rekey', self.kek2, [other])
        self.assertEqual(report.rewritten, 0)
        self.assertEqual(report.failed, len(self.original))
        self.assertLessEqual(len(report.failed_oids), 100)
        self.assertIn('was not given', report.failed_oids[0][1])
        self.assertEqual(self._plaintexts(self.kek1), self.original)

    def test_decrypt(self):
        self._run('encrypt', self.kek1)
        report = self._run('decrypt', None, [self.kek1])
        self.assertEqual(report.rewritten, len(self.original))
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)
        again = self._run('decrypt', None, [self.kek1])
        self.assertEqual(again.rewritten, 0)

    def test_dry_run_writes_nothing(self):
        size = os.path.getsize(self.path('Data.fs'))
        report = self._run('encrypt', self.kek1, dry_run=True)
        self.assertEqual(report.rewritten, len(self.original))
        self.assertEqual(report.transactions, 0)
        self.assertEqual(os.path.getsize(self.path('Data.fs')), size)
        self.assertEqual(len(self.facility), 0)   # not even a key created

    def test_scan_counts_and_detects_tampering(self):
        import ZODB.FileStorage
        from ZODB.Connection import TransactionMetaData
        self._run('encrypt', self.kek1)
        oids = sorted(self.original)
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        try:
            data, tid = fs.load(oids[5])
            bad = data[:-1] + bytes([data[-1] ^ 1])
            txn = TransactionMetaData()
            fs.tpc_begin(txn)
            fs.store(oids[5], tid, bad, '', txn)
            # a record of another oid, swapped in
            data7, tid7 = fs.load(oids[7])
            fs.store(oids[7], tid7, fs.load(oids[8])[0], '', txn)
            fs.tpc_vote(txn)
            fs.tpc_finish(txn)
        finally:
            fs.close()
        report = self._run('scan', None, [self.kek1])
        self.assertEqual(report.kinds['encrypted'], len(self.original))
        self.assertEqual(report.failed, 2)
        self.assertEqual(sorted(o for o, _ in report.failed_oids),
                         sorted(('0x%02x' % oids[5][-1],
                                 '0x%02x' % oids[7][-1])))
        self.assertEqual(report.rewritten, 0)
        text = '\n'.join(report.format())
        self.assertIn('FAILED     2', text)
        self.assertIn('KEK %s: %d' % (self.kek1.key_id, len(self.original)),
                      text)

    def test_scan_w_wrong_key_summarises_failures_by_reason(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        self._run('encrypt', self.kek1)
        report = self._run('scan', None, [AESKeyEncryptingKey.generate()])
        n = len(self.original)
        self.assertEqual(report.failed, n)
        failed = [line for line in report.format() if 'FAILED' in line]
        # the total, then one line for the one reason (not one per oid)
        self.assertEqual(len(failed), 2, failed)
        self.assertEqual(failed[0], '  FAILED     %d' % n)
        first = ', '.join('0x%02x' % oid[-1] for oid in sorted(
            self.original)[:3])
        self.assertTrue(failed[1].startswith('    FAILED %d: ' % n))
        self.assertIn('was not given', failed[1])
        self.assertTrue(failed[1].endswith(
            ' (oids %s and %d more)' % (first, n - 3)), failed[1])

    def test_scan_wo_keys_reads_headers_only(self):
        self._run('encrypt', self.kek1)
        report = self._run('scan')
        self.assertEqual(report.kinds['encrypted'], len(self.original))
        self.assertEqual(report.failed, 0)

    def test_malformed_envelope_is_never_rewritten(self):
        import ZODB.FileStorage
        from zodbkmi.format.envelope import MAGIC
        from ZODB.Connection import TransactionMetaData
        oid = sorted(self.original)[3]
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        try:
            tid = fs.load(oid)[1]
            txn = TransactionMetaData()
            fs.tpc_begin(txn)
            fs.store(oid, tid, MAGIC + b'\x09garbage', '', txn)
            fs.tpc_vote(txn)
            fs.tpc_finish(txn)
        finally:
            fs.close()
        for mode, new, old in (('encrypt', self.kek1, ()),
                               ('decrypt', None, [self.kek1])):
            report = self._run(mode, new, old)
            self.assertEqual(report.kinds['invalid'], 1)
            self.assertEqual(report.failed, 1)
        self.assertEqual(current_records(self.path('Data.fs'))[oid],
                         MAGIC + b'\x09garbage')

    def test_legacy_record_wo_reader_refused(self):
        import ZODB.FileStorage
        from ZODB.Connection import TransactionMetaData
        from zodbkmi.migrate import MigrationError
        oid = sorted(self.original)[0]
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        try:
            tid = fs.load(oid)[1]
            txn = TransactionMetaData()
            fs.tpc_begin(txn)
            fs.store(oid, tid, b'.e' + b'\0' * 32, '', txn)
            fs.tpc_vote(txn)
            fs.tpc_finish(txn)
        finally:
            fs.close()
        with self.assertRaises(MigrationError) as cm:
            self._run('encrypt', self.kek1)
        self.assertIn('cipher.encryptingstorage', str(cm.exception))

    def test_concurrent_write_is_not_lost(self):
        # The application writes an object of the chunk being rekeyed
        # between the migration's read and its write: the chunk conflicts,
        # is read again and the application's data survives, rekeyed.
        from ZODB.Connection import TransactionMetaData
        from zodbkmi.migrate import RecordTransformer
        self._run('encrypt', self.kek1)
        target = sorted(self.original)[10]
        facility = self.facility
        kek1 = self.kek1

        class Racing(RecordTransformer):
            raced = False

            def write(self, storage, items, description):
                if not self.raced:
                    self.raced = True
                    data, tid = storage.load(target)
                    txn = TransactionMetaData()
                    storage.tpc_begin(txn)
                    storage.store(target, tid, facility.encrypt(
                        kek1, b'written by the application', oid=target),
                        '', txn)
                    storage.tpc_vote(txn)
                    storage.tpc_finish(txn)
                return super().write(storage, items, description)

        migration = self._makeOne('rekey', self.kek2, [self.kek1])
        migration.transformer.__class__ = Racing
        report = migration.run()
        migration.storage.close()
        self.assertEqual(report.conflicts, 1)
        self.assertEqual(report.rewritten, len(self.original))
        plain = self._plaintexts(self.kek2)
        self.assertEqual(plain[target], b'written by the application')
        self.assertEqual(self._dek_ids(),
                         {self.facility.ensure_key(self.kek2)})

    def test_unknown_mode(self):
        from ZODB.MappingStorage import MappingStorage
        from zodbkmi.migrate import MigrationError
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        transformer = RecordTransformer(MigrationKeys(self.facility))
        with self.assertRaises(MigrationError):
            self._getTargetClass()(MappingStorage(), transformer, 'shred')
        with self.assertRaises(MigrationError):
            self._getTargetClass()(MappingStorage(), transformer, 'scan',
                                   chunk_size=0)

    def test_progress_lines(self):
        from zodbkmi.cli.progress import Progress
        out = io.StringIO()
        progress = Progress(len(self.original), out, verbose=True)
        report = self._run('encrypt', self.kek1, progress=progress)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), report.chunks)
        self.assertEqual(lines[-1], 'chunk %d: %d records seen, %d rewritten'
                         % (report.chunks, len(self.original),
                            len(self.original)))

    def test_progress_bar_on_a_terminal(self):
        from zodbkmi.cli.progress import Progress
        out = io.StringIO()
        progress = Progress(1000, out, tty=True)
        progress.update(1000, 1, 0)
        progress.finish()
        text = out.getvalue()
        self.assertTrue(text.startswith('\r[' + '#' * 30 + '] 1000/1000'))
        self.assertIn('rec/s ETA 0:00:00', text)
        self.assertTrue(text.endswith('\n'))
        half = Progress(1000, io.StringIO(), tty=True).line(500)
        self.assertIn('#' * 15 + '-' * 15, half)
        self.assertIn(' 50.0%', half)


class BlobMigrationTests(_TempDir, unittest.TestCase):
    """Storage-level migrations carry each blob file along with its
    record: a new revision of a blob object needs a file of its own."""

    def setUp(self):
        super().setUp()
        import transaction
        import ZODB
        import ZODB.blob
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        self.facility = KeyManagementFacility(self.path('keys'))
        self.kek1 = AESKeyEncryptingKey.generate()
        self.kek2 = AESKeyEncryptingKey.generate()
        self.payloads = {'b%d' % i: b'blob secret %d ' % i * (i * 7000 + 1)
                         for i in range(4)}
        db = ZODB.DB(self._storage())
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for name, payload in self.payloads.items():
            root[name] = ZODB.blob.Blob(payload)
            tm.commit()
        db.close()

    def _storage(self):
        import ZODB.FileStorage
        return ZODB.FileStorage.FileStorage(self.path('Data.fs'),
                                            blob_dir=self.path('blobs'))

    def _run(self, mode, new=None, old=()):
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        storage = self._storage()
        try:
            keys = MigrationKeys(self.facility, new, old)
            return Migration(storage, RecordTransformer(keys), mode,
                             chunk_size=2).run()
        finally:
            storage.close()

    def _read(self, key=None, previous=()):
        """{name: payload} read through EncryptingStorage (strict) with
        ``key``, or through the plain storage."""
        import ZODB
        from zodbkmi.storage import EncryptingStorage
        storage = self._storage()
        if key is not None:
            storage = EncryptingStorage(storage, self.facility, key,
                                        previous_keys=previous)
        db = ZODB.DB(storage)
        try:
            root = db.open().root()
            out = {}
            for name in self.payloads:
                with root[name].open() as f:
                    out[name] = f.read()
            return out
        finally:
            db.close()

    def _blob_files(self):
        for dirpath, _, names in os.walk(self.path('blobs')):
            for name in names:
                if name.endswith('.blob'):
                    yield os.path.join(dirpath, name)

    def _current_blob_files(self):
        import ZODB.POSException
        from zodbkmi.migrate import iter_records
        storage = self._storage()
        try:
            out = []
            for oid, tid, _ in iter_records(storage):
                try:
                    out.append(storage.loadBlob(oid, tid))
                except ZODB.POSException.POSKeyError:
                    pass    # the root: no blob
            return out
        finally:
            storage.close()

    def _current_blob_deks(self):
        """The DEK id of each current blob file (None: plaintext)."""
        from zodbkmi.format import stream
        out = set()
        for name in self._current_blob_files():
            with open(name, 'rb') as f:
                head = f.read(3)
                f.seek(0)
                out.add(stream.read_header(f).dek_id.hex()
                        if head == stream.MAGIC else None)
        return out

    def test_encrypt_rekey_decrypt(self):
        report = self._run('encrypt', self.kek1)
        self.assertEqual(report.failed, 0)
        self.assertEqual(self._read(self.kek1), self.payloads)
        self.assertEqual(self._current_blob_deks(),
                         {self.facility.ensure_key(self.kek1)})
        # again: nothing to do
        self.assertEqual(self._run('encrypt', self.kek1).rewritten, 0)
        report = self._run('rekey', self.kek2, [self.kek1])
        self.assertEqual(report.failed, 0)
        self.assertEqual(self._current_blob_deks(),
                         {self.facility.ensure_key(self.kek2)})
        self.assertEqual(self._read(self.kek2), self.payloads)
        report = self._run('decrypt', None, [self.kek2])
        self.assertEqual(report.failed, 0)
        self.assertEqual(self._current_blob_deks(), {None})
        self.assertEqual(self._read(), self.payloads)

    def test_pack_after_encrypt_leaves_no_plaintext_blob(self):
        from zodbkmi.migrate import pack
        self._run('encrypt', self.kek1)
        storage = self._storage()
        try:
            pack(storage)
        finally:
            storage.close()
        self.assertEqual(self._read(self.kek1), self.payloads)
        files = list(self._blob_files())
        self.assertEqual(len(files), len(self.payloads))
        for name in files:
            with open(name, 'rb') as f:
                self.assertNotIn(b'blob secret', f.read())

    def test_scan_counts_and_checks_blob_files(self):
        report = self._run('scan')
        self.assertEqual(report.blobs, {'plaintext': 4, 'encrypted': 0})
        self._run('encrypt', self.kek1)
        report = self._run('scan', None, [self.kek1])
        self.assertEqual(report.blobs, {'plaintext': 0, 'encrypted': 4})
        self.assertEqual(report.failed, 0)
        self.assertIn('  blob files: 0 plaintext, 4 encrypted',
                      report.format())
        victim = sorted(self._current_blob_files())[1]
        os.chmod(victim, 0o600)
        with open(victim, 'r+b') as f:
            # flip bits of a ciphertext byte (writing a fixed byte would
            # leave the file unchanged when the byte is already that one)
            f.seek(60)
            byte = f.read(1)[0]
            f.seek(60)
            f.write(bytes([byte ^ 0xFF]))
        report = self._run('scan', None, [self.kek1])
        self.assertEqual(report.failed, 1)
        self.assertIn('blob file: ', report.failed_oids[0][1])

    def test_command_w_blob_dir(self):
        key = base64.b64encode(os.urandom(32)).decode()
        args = ['encrypt', self.path('Data.fs'), '--key-dir',
                self.path('keys'), '--no-progress']
        # without its blob directory the blob records are refused, and
        # nothing of them is written
        before = current_records(self.path('Data.fs'))
        env = dict(NEW_ENCRYPTION_KEY=key, ENCRYPTION_ALGORITHM='aes256-gcm')
        code, out, err = call_migrate(*args, **env)
        self.assertEqual(code, 2, out + err)
        self.assertIn('is a blob, and the storage was opened without its '
                      'blob directory: give --blob-dir', err)
        self.assertEqual(self._read(), self.payloads)
        self.assertEqual(
            {o: d for o, d in current_records(self.path('Data.fs')).items()
             if b'ZODB.blob' in d},
            {o: d for o, d in before.items() if b'ZODB.blob' in d})
        code, out, err = call_migrate(
            *args + ['--blob-dir', self.path('blobs')], **env)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self._current_blob_deks(), {
            self.facility.key_id_of(
                self.facility.encrypt(base64.b64decode(key), b''))})

    def test_pack_names_the_old_blob_directory(self):
        # FileStorage's pack keeps the dropped blob revisions in
        # blobs.old, with hard links to every current blob file beside
        # them: the command says which of its files to destroy
        key = base64.b64encode(os.urandom(32)).decode()
        code, out, err = call_migrate(
            'encrypt', self.path('Data.fs'), '--key-dir', self.path('keys'),
            '--no-progress', '--blob-dir', self.path('blobs'), '--pack',
            NEW_ENCRYPTION_KEY=key, ENCRYPTION_ALGORITHM='aes256-gcm')
        self.assertEqual(code, 0, out + err)
        self.assertIn('destroy %s.old' % self.path('Data.fs'), out)
        self.assertIn('the files of %s.old with one link only'
                      % self.path('blobs'), out)
        old = self.path('blobs') + '.old'
        links = [os.stat(os.path.join(d, n)).st_nlink
                 for d, _, names in os.walk(old) for n in names
                 if n.endswith('.blob')]
        self.assertIn(1, links)       # the dropped plaintext revisions
        self.assertTrue([n for n in links if n > 1])   # current blobs
        self.assertEqual(self._read(base64.b64decode(key)), self.payloads)

    def test_blob_of_legacy_record_is_not_imported(self):
        import shutil as sh
        from ZODB.Connection import TransactionMetaData
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        from zodbkmi.migrate import iter_records
        storage = self._storage()
        self.addCleanup(storage.close)
        from ZODB.utils import get_pickle_metadata
        oid, tid, plain = [r for r in iter_records(storage)
                           if get_pickle_metadata(r[2])[1] == 'Blob'][0]
        copy = os.path.join(storage.temporaryDirectory(), 'copy.blob')
        sh.copyfile(storage.loadBlob(oid, tid), copy)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.storeBlob(oid, tid, b'.e legacy', copy, '', txn)
        storage.tpc_vote(txn)
        storage.tpc_finish(txn)

        class Reader:   # what zodbkmi.migrate.legacy's readers provide
            def decrypt_record(self, data):
                assert data == b'.e legacy'
                return plain

        keys = MigrationKeys(self.facility, self.kek1)
        report = Migration(storage, RecordTransformer(keys, Reader()),
                           'encrypt').run()
        self.assertEqual(report.kinds['legacy'], 1)
        self.assertEqual(report.failed, 1)
        self.assertIn('not imported', report.failed_oids[0][1])
        self.assertEqual(storage.load(oid)[0], b'.e legacy')
        self.assertEqual(report.rewritten, report.records - 1)

    def test_blob_that_does_not_open_is_reported_and_left_alone(self):
        self._run('encrypt', self.kek1)
        # alter one current blob file: its record must stay as it was
        victim = sorted(self._current_blob_files())[0]
        os.chmod(victim, 0o600)
        with open(victim, 'r+b') as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        report = self._run('rekey', self.kek2, [self.kek1])
        self.assertEqual(report.failed, 1)
        self.assertIn('blob file', report.failed_oids[0][1])
        self.assertEqual(report.rewritten, report.records - 1)
        self.assertEqual(
            self._current_blob_deks(),
            {self.facility.ensure_key(self.kek1),
             self.facility.ensure_key(self.kek2)})


class RotateKekTests(_TempDir, unittest.TestCase):

    def _callFUT(self, *args):
        from zodbkmi.migrate import rotate_kek
        return rotate_kek(*args)

    def test_rewraps_every_dek_and_leaves_data(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        facility = KeyManagementFacility(self.path('keys'))
        old, new, other = (AESKeyEncryptingKey.generate() for _ in '123')
        ciphertexts = []
        for i in range(3):
            facility.rotate(old)
            ciphertexts.append(facility.encrypt(old, b'data %d' % i))
        facility.create_key(other)
        self.assertEqual(self._callFUT(facility, old, new), 3)
        self.assertEqual(sorted(e.kek_id
                                for e in facility.key_store.entries()),
                         sorted([new.key_id] * 3 + [other.key_id]))
        fresh = KeyManagementFacility(self.path('keys'))
        self.assertEqual([fresh.decrypt(new, c) for c in ciphertexts],
                         [b'data 0', b'data 1', b'data 2'])
        self.assertEqual(self._callFUT(facility, old, new), 0)


KEY_VARIABLES = ('ENCRYPTION_ALGORITHM', 'OLD_ENCRYPTION_KEY',
                 'NEW_ENCRYPTION_KEY')


def call_migrate(*argv, **variables):
    """Run ``zodbkmi migrate *argv`` with the key environment variables
    set to ``variables`` (the others of KEY_VARIABLES unset; os.environ is
    restored afterwards); return (exit code, stdout, stderr)."""
    from zodbkmi.cli import main
    environ = dict(os.environ)
    for name in KEY_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(variables)
    out, err = io.StringIO(), io.StringIO()
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(['migrate'] + list(argv))
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        os.environ.clear()
        os.environ.update(environ)
    return code, out.getvalue(), err.getvalue()


class CommandTests(_TempDir, unittest.TestCase):

    def setUp(self):
        super().setUp()
        self.original = make_database(self.path('Data.fs'), 50)
        self.n = len(self.original)   # 50 objects, the root, a BTree
        self.old = b64(os.urandom(32))
        self.new = b64(os.urandom(32))
        self.environ = dict(os.environ)
        self.addCleanup(self._restore)

    def _restore(self):
        os.environ.clear()
        os.environ.update(self.environ)

    def _callFUT(self, *argv, old='', new='', algorithm='aes256-gcm'):
        return call_migrate(*argv, OLD_ENCRYPTION_KEY=old,
                            NEW_ENCRYPTION_KEY=new,
                            ENCRYPTION_ALGORITHM=algorithm)

    def _args(self, mode):
        return [mode, self.path('Data.fs'), '--key-dir', self.path('keys'),
                '--chunk-size', '7']

    def test_encrypt_rekey_decrypt_round_trip(self):
        code, out, err = self._callFUT(*self._args('encrypt'), new=self.old)
        self.assertEqual(code, 0, err)
        self.assertIn('a backup of this database exists', err)
        self.assertIn('rewritten %d in 8 transactions' % self.n, out)
        self.assertNotIn(self.old, out + err)
        code, out, err = self._callFUT(*self._args('rekey'), old=self.old,
                                       new=self.new)
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)
        code, out, err = self._callFUT(*self._args('scan'))
        self.assertEqual(code, 0, err)
        self.assertIn('encrypted  %d' % self.n, out)
        self.assertNotIn('a backup', err)
        code, out, err = self._callFUT(*self._args('decrypt'), old=self.new)
        self.assertEqual(code, 0, err)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)

    def test_refused_environment_is_one_line(self):
        code, out, err = self._callFUT(*self._args('decrypt'), old=self.old,
                                       new=self.new)
        self.assertEqual(code, 2)
        self.assertEqual(err.strip().count('\n'), 0)
        self.assertIn('decrypt needs OLD_ENCRYPTION_KEY only', err)
        code, out, err = self._callFUT(*self._args('encrypt'), new=self.new,
                                       algorithm='')
        self.assertEqual(code, 2)
        self.assertIn('ENCRYPTION_ALGORITHM is not set', err)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)

    def test_dry_run_and_pack(self):
        code, out, err = self._callFUT(*self._args('encrypt'), '--dry-run',
                                       new=self.new)
        self.assertEqual(code, 0, err)
        self.assertIn('would rewrite %d' % self.n, out)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)
        code, out, err = self._callFUT(*self._args('encrypt'), '--pack',
                                       new=self.new)
        self.assertEqual(code, 0, err)
        self.assertIn('packed; destroy', out)
        # after the pack no plaintext revision is left in Data.fs
        with open(self.path('Data.fs'), 'rb') as f:
            self.assertNotIn(b'secret 1', f.read())

    def test_key_files(self):
        from zodbkmi.keyholder import write_key_file
        write_key_file(self.path('old.key'), base64.b64decode(self.old))
        write_key_file(self.path('new.key'), base64.b64decode(self.new))
        code, out, err = self._callFUT(*self._args('encrypt'), '--key-file',
                                       self.path('old.key'))
        self.assertEqual(code, 0, err)
        code, out, err = self._callFUT(*self._args('rekey'), '--key-file',
                                       self.path('new.key'), '--old-key-file',
                                       self.path('old.key'), '-v')
        self.assertEqual(code, 0, err)
        self.assertIn('chunk 8: %d records seen, %d rewritten'
                      % (self.n, self.n), err)
        code, out, err = self._callFUT(*self._args('decrypt'),
                                       '--old-key-file', self.path('new.key'))
        self.assertEqual(code, 0, err)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)

    def test_key_settings(self):
        import json
        from zodbkmi.keystore import write_atomic

        def settings(current, *previous):
            write_atomic(self.path('settings.json'), json.dumps({
                'enabled': True, 'algorithm': 'aes256-gcm',
                'params': {'source': 'raw', 'key': current},
                'previous': [{'source': 'raw', 'key': k}
                             for k in previous]}).encode())
            return ['--key-settings', self.path('settings.json')]
        code, out, err = self._callFUT(*self._args('encrypt'),
                                       *settings(self.old))
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)
        # the operator adds a new current key, the old one is previous
        code, out, err = self._callFUT(*self._args('rekey'),
                                       *settings(self.new, self.old))
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)
        code, out, err = self._callFUT(*self._args('decrypt'),
                                       *settings(self.new))
        self.assertEqual(code, 0, err)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)
        code, out, err = self._callFUT(
            *self._args('encrypt'), *settings(self.new), '--key-file',
            self.path('Data.fs'))
        self.assertEqual(code, 2)
        self.assertIn('not both', err)

    def test_rotate_kek(self):
        code, out, err = self._callFUT(*self._args('encrypt'), new=self.old)
        self.assertEqual(code, 0, err)
        before = current_records(self.path('Data.fs'))
        code, out, err = self._callFUT('rotate-kek', '--key-dir',
                                       self.path('keys'), old=self.old,
                                       new=self.new)
        self.assertEqual(code, 0, err)
        self.assertIn('rotate-kek: 1 data keys rewrapped', out)
        self.assertEqual(current_records(self.path('Data.fs')), before)
        code, out, err = self._callFUT(*self._args('decrypt'), old=self.new)
        self.assertEqual(code, 0, err)
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)

    def test_wrong_key_exit_2(self):
        # refused before anything is read or created (DatabaseKeyError,
        # defect 4 of issue #17), where each record used to fail in turn
        self._callFUT(*self._args('encrypt'), new=self.old)
        code, out, err = self._callFUT(*self._args('decrypt'), old=self.new)
        self.assertEqual(code, 2)
        self.assertIn('cannot open this database', err)
        self.assertIn('KEKs given', err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_zconfig_file(self):
        with open(self.path('db.conf'), 'w') as f:
            f.write('<filestorage>\n  path %s\n</filestorage>\n'
                    % self.path('Data.fs'))
        args = self._args('encrypt')
        args[1] = self.path('db.conf')
        code, out, err = self._callFUT(*args, new=self.new)
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)

    def test_zodburi(self):
        try:
            import zodburi  # noqa: F401
        except ImportError:   # pragma: no cover
            self.skipTest('zodburi is not installed')
        args = self._args('encrypt')
        args[1] = 'file://' + self.path('Data.fs')
        code, out, err = self._callFUT(*args, new=self.new)
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)

    def test_missing_database(self):
        code, out, err = self._callFUT('scan', self.path('nothere.fs'))
        self.assertEqual(code, 2)
        self.assertIn('no such database', err)


KILL_SCRIPT = textwrap.dedent('''\
    """Run a migration and SIGKILL this process at a chosen point."""
    import os, signal, sys
    from zodbkmi.cli import main
    import ZODB.FileStorage
    point, n = os.environ['KILL_AT'].split(':')
    n = int(n)
    calls = [0]
    orig = getattr(ZODB.FileStorage.FileStorage, point)

    def hook(self, *args, **kw):
        calls[0] += 1
        if calls[0] == n:
            if point == 'tpc_finish':
                os.kill(os.getpid(), signal.SIGKILL)   # voted, not finished
            result = orig(self, *args, **kw)
            os.kill(os.getpid(), signal.SIGKILL)       # just committed
        return orig(self, *args, **kw)
    setattr(ZODB.FileStorage.FileStorage, point, hook)
    sys.exit(main(sys.argv[1:]))
    ''')


class _KillTests(_TempDir):
    """Migrations of a 20,000 object database killed with SIGKILL."""

    objects = 20000

    def setUp(self):
        super().setUp()
        self.original = make_database(self.path('Data.fs'), self.objects)
        with open(self.path('kill.py'), 'w') as f:
            f.write(KILL_SCRIPT)
        self.env = dict(os.environ, ENCRYPTION_ALGORITHM='aes256-gcm',
                        OLD_ENCRYPTION_KEY='',
                        NEW_ENCRYPTION_KEY=b64(os.urandom(32)))

    def _migrate(self, mode, kill_at=None, env=None, expect_killed=False):
        env = dict(self.env if env is None else env)
        argv = [sys.executable]
        if kill_at:
            argv.append(self.path('kill.py'))
            env['KILL_AT'] = kill_at
        else:
            argv += ['-m', 'zodbkmi.cli']
        argv += ['migrate', mode, self.path('Data.fs'), '--key-dir',
                 self.path('keys'), '--chunk-size', '500', '--no-progress']
        proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=600)
        if expect_killed:
            self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
        else:
            self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc

    def _plaintexts(self, *keys):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.format import envelope
        from zodbkmi.kek import AESKeyEncryptingKey
        facility = KeyManagementFacility(self.path('keys'))
        kek = tuple(AESKeyEncryptingKey(base64.b64decode(k))
                    for k in keys if k)
        out = {}
        kinds = set()
        for oid, data in current_records(self.path('Data.fs')).items():
            kinds.add(envelope.is_envelope(data))
            if envelope.is_envelope(data):
                data = facility.decrypt(kek, data, oid=oid)
            out[oid] = data
        return out, kinds

    def _kill_and_resume(self, mode, points):
        for point in points:
            self._migrate(mode, point, expect_killed=True)
            # every object reads back equal, under one key or the other
            plain, kinds = self._plaintexts(self.env['OLD_ENCRYPTION_KEY'],
                                            self.env['NEW_ENCRYPTION_KEY'])
            self.assertEqual(plain, self.original)
            if mode != 'rekey':   # the kill left the job half done
                self.assertEqual(kinds, {True, False})
        proc = self._migrate(mode)
        return proc


class KillTests(_KillTests, unittest.TestCase):

    def test_encrypt_killed_between_vote_and_finish(self):
        self._kill_and_resume('encrypt', ['tpc_finish:7'])
        plain, kinds = self._plaintexts(self.env['NEW_ENCRYPTION_KEY'])
        self.assertEqual(kinds, {True})
        self.assertEqual(plain, self.original)
        # a third run has nothing left to do
        proc = self._migrate('encrypt')
        self.assertIn('rewritten 0 in 0 transactions', proc.stdout)


class KillAtSeveralPointsTests(_KillTests, unittest.TestCase):

    def test_encrypt_killed_at_several_points(self):
        # after the first commit, between vote and finish, in the middle
        # of writing the 3rd chunk (its records are written with
        # FileStorage.restore, see RecordTransformer.write), late in the run
        proc = self._kill_and_resume(
            'encrypt', ['tpc_finish:2', 'tpc_vote:2', 'restore:1200',
                        'tpc_finish:20'])
        plain, kinds = self._plaintexts(self.env['NEW_ENCRYPTION_KEY'])
        self.assertEqual(kinds, {True})
        self.assertEqual(plain, self.original)
        self.assertIn('plaintext  ', proc.stdout)

    def test_rekey_killed_and_resumed(self):
        self._migrate('encrypt')
        env = dict(self.env, OLD_ENCRYPTION_KEY=self.env[
            'NEW_ENCRYPTION_KEY'], NEW_ENCRYPTION_KEY=b64(os.urandom(32)))
        self.env = env
        self._kill_and_resume('rekey', ['tpc_finish:3', 'tpc_finish:11'])
        plain, kinds = self._plaintexts(env['NEW_ENCRYPTION_KEY'])
        self.assertEqual(plain, self.original)

    def test_decrypt_killed_and_resumed(self):
        self._migrate('encrypt')
        env = dict(self.env, OLD_ENCRYPTION_KEY=self.env[
            'NEW_ENCRYPTION_KEY'], NEW_ENCRYPTION_KEY='')
        self.env = env
        self._kill_and_resume('decrypt', ['tpc_finish:5', 'tpc_vote:9'])
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)


class EncryptingStorageIntegrationTests(_TempDir, unittest.TestCase):
    """Migrations of a storage opened as an EncryptingStorage."""

    def setUp(self):
        super().setUp()
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        self.original = make_database(self.path('Data.fs'), 200)
        self.facility = KeyManagementFacility(self.path('keys'))
        self.kek = AESKeyEncryptingKey.generate()
        self.facility.ensure_key(self.kek)

    def _wrapper(self, mode, **kw):
        import ZODB.FileStorage
        from zodbkmi.storage import EncryptingStorage
        return EncryptingStorage(
            ZODB.FileStorage.FileStorage(self.path('Data.fs')),
            self.facility, kw.pop('key', self.kek), mode=mode, **kw)

    def _read_all(self, wrapper):
        import ZODB
        try:
            db = ZODB.DB(wrapper)       # opening reads the root
        except BaseException:
            wrapper.close()
            raise
        try:
            with db.transaction() as conn:
                tree = conn.root()['tree']
                return {i: dict(v) for i, v in tree.items()}
        finally:
            db.close()

    def test_encrypt_then_strict_mode_reads_everything(self):
        import ZODB
        from zodbkmi.exceptions import NotEncryptedError
        from zodbkmi.migrate import storage_migration
        # the application already writes through the wrapper (migrate
        # mode): the database holds plaintext and encrypted records
        wrapper = self._wrapper('migrate')
        db = ZODB.DB(wrapper)
        with db.transaction() as conn:
            conn.root()['tree'][3]['text'] = 'changed'
        db.close()
        wrapper = self._wrapper('migrate')
        report = storage_migration(wrapper, 'encrypt', chunk_size=50).run()
        wrapper.close()
        self.assertEqual(report.kinds['encrypted'], 1)   # tree[3]
        self.assertEqual(report.rewritten, len(self.original) - 1)
        values = self._read_all(self._wrapper('strict'))
        self.assertEqual(values[3]['text'], 'changed')
        self.assertEqual(values[150], {'n': 150, 'text': 'secret 150'})
        # and strict mode refuses plaintext: the check above is not empty
        wrapper = self._wrapper('strict')
        report = storage_migration(wrapper, 'decrypt').run()
        wrapper.close()
        with self.assertRaises(NotEncryptedError):
            self._read_all(self._wrapper('strict'))


class OnlineRekeyTests(_TempDir, unittest.TestCase):
    """rekey through a real ZEO server while the application writes."""

    def setUp(self):
        super().setUp()
        try:
            import ZEO  # noqa: F401
        except ImportError:   # pragma: no cover
            self.skipTest('ZEO is not installed')
        import socket
        import time
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        import ZODB.FileStorage
        self.original = make_database(self.path('Data.fs'), 3000)
        self.facility = KeyManagementFacility(self.path('keys'))
        self.kek1 = AESKeyEncryptingKey.generate()
        self.kek2 = AESKeyEncryptingKey.generate()
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        Migration(fs, RecordTransformer(MigrationKeys(self.facility,
                                                      self.kek1)),
                  'encrypt').run()
        fs.close()
        self.facility.ensure_key(self.kek2)
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            self.port = s.getsockname()[1]
        log = open(self.path('zeo.log'), 'wb')
        self.addCleanup(log.close)
        # runzeo's module: its script is not there under zc.buildout
        self.server = subprocess.Popen(
            [sys.executable, '-m', 'ZEO.runzeo',
             '-a', '127.0.0.1:%d' % self.port, '-f', self.path('Data.fs')],
            stdout=log, stderr=subprocess.STDOUT,
            cwd=self.tmp)
        self.addCleanup(self._stop)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.server.poll():
                    raise RuntimeError('ZEO did not start')
                time.sleep(0.05)

    def _stop(self):
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:   # pragma: no cover
            self.server.kill()
            self.server.wait()

    def _client(self):
        from ZEO.ClientStorage import ClientStorage
        return ClientStorage(('127.0.0.1', self.port), wait_timeout=10)

    def test_application_writes_are_not_lost(self):
        import random
        import threading
        import transaction
        import ZODB
        from ZODB.POSException import ConflictError
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        from zodbkmi.storage import EncryptingStorage
        # the application, already switched to the new key
        app = ZODB.DB(EncryptingStorage(self._client(), self.facility,
                                        self.kek2, [self.kek1]))
        self.addCleanup(app.close)
        expected = {}
        done = threading.Event()
        writes = []

        def application():
            tm = transaction.TransactionManager()
            conn = app.open(tm)
            rnd = random.Random(42)
            while not done.is_set() or len(writes) < 50:
                i = rnd.randrange(3000)
                try:
                    tree = conn.root()['tree']
                    tree[i]['n'] = tree[i]['n'] + 1000000
                    value = tree[i]['n']
                    tm.commit()
                except ConflictError:
                    tm.abort()
                    continue
                expected[i] = value
                writes.append(i)
            conn.close()

        thread = threading.Thread(target=application)
        thread.start()
        raw = self._client()
        try:
            report = Migration(raw, RecordTransformer(
                MigrationKeys(self.facility, self.kek2, [self.kek1])),
                'rekey', chunk_size=50).run()
        finally:
            done.set()
            thread.join(60)
        self.assertGreater(len(writes), 0)
        self.assertEqual(report.failed, 0)
        # a second run only finds what the race left, then nothing
        Migration(raw, RecordTransformer(MigrationKeys(
            self.facility, self.kek2, [self.kek1])), 'rekey').run()
        again = Migration(raw, RecordTransformer(MigrationKeys(
            self.facility, self.kek2, [self.kek1])), 'rekey').run()
        raw.close()
        self.assertEqual(again.rewritten, 0)
        self.assertEqual(list(again.by_dek),
                         [self.facility.ensure_key(self.kek2)])
        with app.transaction() as conn:
            tree = conn.root()['tree']
            for i in range(3000):
                self.assertEqual(tree[i]['n'], expected.get(i, i))
                self.assertEqual(tree[i]['text'], 'secret %d' % i)


class ConfiguredStorageTests(_TempDir, unittest.TestCase):
    """The database given as a ZConfig file or a zodburi URI with an
    encrypting storage: the keys are those of its key settings."""

    def setUp(self):
        super().setUp()
        from zodbkmi.keyholder import write_key_file
        self.original = make_database(self.path('Data.fs'), 80)
        self.n = len(self.original)
        write_key_file(self.path('kek.key'), os.urandom(32))
        os.mkdir(self.path('keys'), 0o700)

    def _config(self, mode):
        path = self.path('db-%s.conf' % mode)
        with open(path, 'w') as f:
            f.write(textwrap.dedent('''\
                %%import zodbkmi
                <encryptingstorage>
                  key-file %s
                  key-dir %s
                  mode %s
                  <filestorage>
                    path %s
                  </filestorage>
                </encryptingstorage>
                ''' % (self.path('kek.key'), self.path('keys'), mode,
                       self.path('Data.fs'))))
        return path

    def _callFUT(self, *argv):
        return call_migrate(*argv)

    def _read_all(self, spec):
        import ZODB
        import ZODB.config
        if spec.endswith('.conf'):
            with open(spec) as f:
                storage = ZODB.config.storageFromFile(f)
        else:
            import zodburi
            factory, dbkw = zodburi.resolve_uri(spec)
            storage = factory()
        try:
            db = ZODB.DB(storage)
        except BaseException:
            storage.close()
            raise
        try:
            with db.transaction() as conn:
                return {i: dict(v)
                        for i, v in conn.root()['tree'].items()}
        finally:
            db.close()

    def test_zconfig_encrypt_then_strict(self):
        from zodbkmi.exceptions import NotEncryptedError
        with self.assertRaises(NotEncryptedError):
            self._read_all(self._config('strict'))
        code, out, err = self._callFUT('encrypt', self._config('migrate'),
                                       '--no-progress')
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)
        values = self._read_all(self._config('strict'))
        self.assertEqual(values[79], {'n': 79, 'text': 'secret 79'})
        code, out, err = self._callFUT('scan', self._config('strict'))
        self.assertEqual(code, 0, err)
        self.assertIn('encrypted  %d' % self.n, out)

    def test_zodburi_scheme(self):
        try:
            import zodburi
        except ImportError:   # pragma: no cover
            self.skipTest('zodburi is not installed')
        uri = 'zodbkmi+file://%s?key_file=%s&key_dir=%s&mode=%%s' % (
            self.path('Data.fs'), self.path('kek.key'), self.path('keys'))
        code, out, err = self._callFUT('encrypt', uri % 'migrate')
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten %d' % self.n, out)
        values = self._read_all(uri % 'strict')
        self.assertEqual(values[0], {'n': 0, 'text': 'secret 0'})
        del zodburi


class CommandWithoutKeysTests(_TempDir, unittest.TestCase):

    def test_encrypt_wo_any_key(self):
        self.original = make_database(self.path('Data.fs'), 5)
        from zodbkmi.cli import main
        environ = dict(os.environ)
        for name in ('ENCRYPTION_ALGORITHM', 'OLD_ENCRYPTION_KEY',
                     'NEW_ENCRYPTION_KEY'):
            os.environ.pop(name, None)
        err = io.StringIO()
        stderr, sys.stderr = sys.stderr, err
        try:
            # what the garbage collector finds of earlier tests meanwhile
            # is not this command's output
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', ResourceWarning)
                code = main(['migrate', 'encrypt', self.path('Data.fs')])
        finally:
            sys.stderr = stderr
            os.environ.update(environ)
        self.assertEqual(code, 2)
        self.assertEqual(err.getvalue().count('\n'), 1)
        self.assertIn('encrypt needs keys', err.getvalue())
        self.assertEqual(current_records(self.path('Data.fs')),
                         self.original)


class InterfaceTests(unittest.TestCase):
    """The classes that declare the migration interfaces provide them."""

    def test_record_transformer(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        from zodbkmi.migrate.interfaces import IBlobTransformer
        verifyObject(IBlobTransformer,
                     RecordTransformer(MigrationKeys(None)))

    def test_object_transformer(self):
        import ZODB
        from zope.interface.verify import verifyObject
        from zodbkmi.migrate import ObjectTransformer
        from zodbkmi.migrate.interfaces import IBlobTransformer
        from zodbkmi.migrate.interfaces import ITransformer
        db = ZODB.DB(None)
        self.addCleanup(db.close)
        transformer = ObjectTransformer(db)
        verifyObject(ITransformer, transformer)
        self.assertFalse(IBlobTransformer.providedBy(transformer))

    def test_progress(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.cli.progress import Progress
        from zodbkmi.migrate.interfaces import IMigrationProgress
        verifyObject(IMigrationProgress, Progress(10, io.StringIO()))
