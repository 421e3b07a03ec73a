"""Attacks of the security review (issue 16) on the storage wrapper.

Finding 3: a blob file forged with the public half of an RSA KEK (a
self-contained stream bound to the blob's oid) must not open through ZODB
nor through ``zodbkmi migrate``.

Finding 6: in migrate mode, a plaintext record written over an object that
is already encrypted, or committed after the migration started, must be
refused with NotEncryptedError, on every load path.

Each test performs the attack on the files on disk or through a storage
client that holds no key, then shows what the application now gets.
"""
import io
import os
import shutil
import tempfile
import unittest

import transaction
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
import ZODB.serialize
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from zodbkmi import exceptions

SECRET = b'BLOB-SECRET-OF-THE-APPLICATION'
FORGED = b'FORGED BY THE HOLDER OF THE PUBLIC KEY'


class _TempDir:

    def setUp(self):
        self.here = os.getcwd()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-review-storage-')
        os.chdir(self.tmp)

    def tearDown(self):
        transaction.abort()
        os.chdir(self.here)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- finding 3: blob forgery with the public key -------------------------

class BlobForgeryTests(_TempDir, unittest.TestCase):
    """The application's KEK is RSA; the attacker has its public half and
    write access to the blob directory."""

    def setUp(self):
        super().setUp()
        from tests.test_facility import shared_rsa_kek
        from zodbkmi.facility import KeyManagementFacility
        self.kek = shared_rsa_kek()
        self.facility = KeyManagementFacility(os.path.abspath('keys'))
        self.facility.ensure_key(self.kek)
        db = ZODB.DB(self._storage())
        with db.transaction() as conn:
            conn.root()['scan'] = ZODB.blob.Blob(SECRET)
        with db.transaction() as conn:
            blob = conn.root()['scan']
            blob._p_activate()
            self.oid, self.serial = blob._p_oid, blob._p_serial
        db.close()
        self.blob_file = ZODB.FileStorage.FileStorage(
            'Data.fs', blob_dir='blobs', read_only=True)
        try:
            self.path = self.blob_file.fshelper.getBlobFilename(
                self.oid, self.serial)
        finally:
            self.blob_file.close()
        self.assertTrue(os.path.exists(self.path))

    def _storage(self, **kw):
        from zodbkmi.storage import EncryptingStorage
        return EncryptingStorage(
            ZODB.FileStorage.FileStorage('Data.fs', blob_dir='blobs'),
            self.facility, self.kek, **kw)

    def _forge(self):
        """What the attacker does: a self-contained stream bound to the
        blob's oid, made with the public key only, written over the
        committed blob file."""
        from zodbkmi.files import public_key_pem
        from zodbkmi.format import stream
        from zodbkmi.format import wrapped
        from zodbkmi.kek import RSAPublicKeyEncryptingKey
        public = RSAPublicKeyEncryptingKey.from_pem(public_key_pem(self.kek))
        dek, dek_id = os.urandom(32), os.urandom(16)
        # wrapped as encrypt_to_recipient (encrypt-file --recipient) wraps:
        # the wrapped-DEK version a public key can make
        version = getattr(wrapped, 'VERSION_1', None)
        header = stream.build_header(wrapped=wrapped.wrap(
            public, dek_id, dek,
            **({} if version is None else {'version': version})))
        out = io.BytesIO()
        # the storage binds a blob file to its oid as associated data
        stream.encrypt(io.BytesIO(FORGED), out, dek, header, self.oid)
        os.chmod(self.path, 0o644)
        with open(self.path, 'wb') as f:
            f.write(out.getvalue())
        return out.getvalue()

    def test_forged_stream_is_a_real_forgery(self):
        # The forged file does open under the application's key when a
        # self-contained stream is asked for: this is the attack that the
        # storage used to fall for.
        forged = self._forge()
        out = io.BytesIO()
        self.facility.decrypt_file(self.kek, io.BytesIO(forged), out,
                                   oid=self.oid, self_contained=True)
        self.assertEqual(out.getvalue(), FORGED)

    def test_blob_open_through_zodb_refuses_the_forgery(self):
        self._forge()
        db = ZODB.DB(self._storage())
        try:
            with db.transaction() as conn:
                blob = conn.root()['scan']
                with self.assertRaises(
                        exceptions.SelfContainedStreamError) as cm:
                    with blob.open() as f:
                        f.read()
                with self.assertRaises(exceptions.SelfContainedStreamError):
                    blob.committed()
        finally:
            db.close()
        self.assertIn(self.oid.hex().lstrip('0') or '0', str(cm.exception))
        self.assertIsInstance(cm.exception, exceptions.UnsupportedFormatError)
        self.assertIsInstance(cm.exception, exceptions.DecryptionError)

    def test_storage_blob_methods_refuse_the_forgery(self):
        self._forge()
        storage = self._storage()
        try:
            for method in (storage.loadBlob, storage.openCommittedBlobFile):
                with self.assertRaises(exceptions.SelfContainedStreamError):
                    method(self.oid, self.serial)
            private = storage._copies.path
            # no copy of the forged plaintext is left behind
            self.assertEqual(os.listdir(private) if private else [], [])
        finally:
            storage.close()

    def test_every_mode_refuses_the_forgery(self):
        from zodbkmi.storage import MODES
        self._forge()
        for mode in MODES:
            storage = self._storage(mode=mode)
            try:
                with self.assertRaises(exceptions.SelfContainedStreamError):
                    storage.openCommittedBlobFile(self.oid, self.serial)
            finally:
                storage.close()

    def test_decrypt_file_range_refuses_the_forgery(self):
        forged = self._forge()
        with self.assertRaises(exceptions.SelfContainedStreamError):
            self.facility.decrypt_file_range(
                self.kek, io.BytesIO(forged), io.BytesIO(), 0, oid=self.oid)

    def _migration(self, mode, **keys):
        from zodbkmi import migrate
        storage = ZODB.FileStorage.FileStorage('Data.fs', blob_dir='blobs')
        self.addCleanup(storage.close)
        keys = migrate.MigrationKeys(self.facility, **keys)
        return migrate.Migration(storage, migrate.RecordTransformer(keys),
                                 mode).run()

    def test_migrate_scan_reports_the_forgery(self):
        self._forge()
        report = self._migration('scan', old=(self.kek,))
        self.assertEqual(report.failed, 1)
        (oid, reason), = report.failed_oids
        self.assertIn('self-contained', reason)
        self.assertIn('blob file', reason)

    def test_migrate_decrypt_does_not_take_the_forgery(self):
        self._forge()
        report = self._migration('decrypt', old=(self.kek,))
        self.assertEqual(report.failed, 1)
        self.assertIn('self-contained', report.failed_oids[0][1])
        # the record and its file were left as they were: nothing of the
        # forgery became a plaintext blob
        for dirpath, _, names in os.walk('blobs'):
            for name in names:
                with open(os.path.join(dirpath, name), 'rb') as f:
                    self.assertNotIn(FORGED, f.read())

    def test_migrate_rekey_does_not_take_the_forgery(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        self._forge()
        new = AESKeyEncryptingKey.generate()
        report = self._migration('rekey', old=(self.kek,), new=new)
        self.assertEqual(report.failed, 1)
        self.assertIn('self-contained', report.failed_oids[0][1])

    def test_migrate_scan_command_exits_1(self):
        import contextlib
        from zodbkmi.cli import main
        from zodbkmi.keyholder import write_key_file
        self._forge()
        write_key_file('kek.pem', self.kek)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(out):
            code = main(['migrate', 'scan', 'Data.fs', '--blob-dir', 'blobs',
                         '--key-dir', 'keys', '--old-key-file', 'kek.pem'])
        self.assertEqual(code, 1, out.getvalue())
        self.assertIn('self-contained', out.getvalue())

    def test_decrypt_file_command_opens_what_is_asked_for(self):
        # zodbkmi decrypt-file is where self-contained streams belong:
        # with --key-dir too, the user asks for this file.
        import contextlib
        from zodbkmi.cli import main
        from zodbkmi.keyholder import write_key_file
        forged = self._forge()
        del forged
        from zodbkmi.files import encrypt_to_recipient
        with open('backup.zks', 'wb') as f:
            encrypt_to_recipient(self.kek, io.BytesIO(b'backup'), f)
        write_key_file('kek.pem', self.kek)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(['decrypt-file', '--identity', 'kek.pem',
                         '--key-dir', 'keys', 'backup.zks', '-o', 'out'])
        self.assertEqual(code, 0, err.getvalue())
        with open('out', 'rb') as f:
            self.assertEqual(f.read(), b'backup')


# -- finding 6: downgrade in migrate mode --------------------------------

def plain_record(state):
    """The record a plain ZODB writes for a PersistentMapping holding
    ``state``: what an attacker without any key can write."""
    from ZODB.MappingStorage import MappingStorage
    db = ZODB.DB(MappingStorage())
    try:
        with db.transaction() as conn:
            conn.root().update(state)
        return db.storage.load(z64)[0]
    finally:
        db.close()


def length_record(value):
    from BTrees.Length import Length
    from ZODB.MappingStorage import MappingStorage
    db = ZODB.DB(MappingStorage())
    try:
        with db.transaction() as conn:
            conn.root()['n'] = Length(value)
        with db.transaction() as conn:
            oid = conn.root()['n']._p_oid
        return db.storage.load(oid)[0]
    finally:
        db.close()


def write_raw(storage, oid, data, tid=None):
    """Commit ``data`` as the new record of ``oid`` in ``storage`` (no
    zodbkmi, no key): a plain FileStorage or ZEO client.  With ``tid``
    the transaction gets that id (someone who writes the file can)."""
    try:
        serial = storage.load(oid)[1]
    except KeyError:
        serial = z64
    txn = TransactionMetaData(user='attacker')
    storage.tpc_begin(txn, tid) if tid else storage.tpc_begin(txn)
    try:
        if tid:
            storage.restore(oid, tid, data, '', None, txn)
        else:
            storage.store(oid, serial, data, '', txn)
        storage.tpc_vote(txn)
    except BaseException:
        storage.tpc_abort(txn)
        raise
    return storage.tpc_finish(txn)


class _MigrateBase(_TempDir):

    def setUp(self):
        super().setUp()
        from tests.storage_support import facility
        self.facility = facility(os.path.abspath('keys'))

    def _wrap(self, base, **kw):
        from zodbkmi.storage import EncryptingStorage
        from zodbkmi.testing import KeyEncryptingKey
        return EncryptingStorage(base, self.facility, KeyEncryptingKey, **kw)

    def _storage(self, **kw):
        return self._wrap(ZODB.FileStorage.FileStorage('Data.fs'), **kw)

    def _commit(self, storage, **values):
        db = ZODB.DB(storage)
        try:
            with db.transaction() as conn:
                conn.root().update(values)
        finally:
            db.close()

    def _attacker(self, data, oid=z64, tid=None):
        fs = ZODB.FileStorage.FileStorage('Data.fs')
        try:
            return write_raw(fs, oid, data, tid)
        finally:
            fs.close()

    def _read(self, storage, name='dose'):
        try:
            db = ZODB.DB(storage)
        except BaseException:
            storage.close()
            raise
        try:
            with db.transaction() as conn:
                return conn.root()[name]
        finally:
            db.close()


class DowngradeOverEncryptedTests(_MigrateBase, unittest.TestCase):
    """The application wrote the object encrypted; the attacker appends a
    transaction with a plaintext pickle for it to Data.fs (a plain
    FileStorage opened on the file, no zodbkmi); then the application opens
    the database in migrate mode."""

    def setUp(self):
        super().setUp()
        self._commit(self._storage(), dose='5 mg')
        self.attack = self._attacker(plain_record({'dose': '500 mg'}))

    def test_load_through_zodb(self):
        from zodbkmi.storage import MIGRATE
        with self.assertRaises(exceptions.NotEncryptedError) as cm:
            self._read(self._storage(mode=MIGRATE))
        message = str(cm.exception)
        self.assertIn('oid 0x00', message)
        self.assertIn('over an encrypted revision', message)
        self.assertIn(self.attack.hex(), message)
        self.assertEqual(cm.exception.oid, z64)

    def test_every_load_path(self):
        from zodbkmi.storage import MIGRATE
        storage = self._storage(mode=MIGRATE)
        try:
            # the start is the attacker's own transaction: only the
            # encrypted revision before it gives the record away
            self.assertEqual(storage.migrate_since, self.attack)
            paths = [
                lambda: storage.load(z64),
                lambda: storage.loadBefore(z64, p64(u64(self.attack) + 1)),
                lambda: storage.loadSerial(z64, self.attack),
                lambda: storage.record_iternext(),
                lambda: self._iterate(storage),
            ]
            for path in paths:
                with self.assertRaises(exceptions.NotEncryptedError):
                    path()
            # the encrypted revision before it still opens
            r = storage.loadBefore(z64, self.attack)
            self.assertIn(b'5 mg', r[0])
        finally:
            storage.close()

    @staticmethod
    def _iterate(storage):
        it = storage.iterator()
        try:
            return [r for t in it for r in t]
        finally:
            it.close()

    def test_a_restart_does_not_help_the_attacker(self):
        # the check does not depend on the start: opened again later (and
        # with a start recorded after the attack), it still refuses
        from zodbkmi.storage import MIGRATE
        for since in (None, self.attack.hex(), 'f' * 16):
            with self.assertRaises(exceptions.NotEncryptedError):
                self._read(self._storage(mode=MIGRATE, migrate_since=since))

    def test_forged_old_transaction_id(self):
        # Someone who writes Data.fs can give the transaction any id, one
        # older than the encrypted revision too; the history is read in
        # the order of the file, so the encrypted revision is still seen.
        from zodbkmi.storage import MIGRATE
        attack = self._attacker(plain_record({'dose': '900 mg'}),
                                tid=p64(u64(self.attack) - 10 ** 12))
        storage = self._storage(mode=MIGRATE)
        try:
            data, serial = storage.base.load(z64)
            self.assertEqual(serial, attack)      # the current record
            self.assertLess(serial, self.attack)
            self.assertLessEqual(serial, storage.migrate_since)
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                storage.load(z64)
            self.assertIn('over an encrypted revision', str(cm.exception))
        finally:
            storage.close()

    def test_strict_mode_refuses_too(self):
        with self.assertRaises(exceptions.NotEncryptedError):
            self._read(self._storage())

    def test_unchecked_window_accepts_it(self):
        # documented: migrate_since='unchecked' (the window of a rolling
        # upgrade) and decrypt-only read plaintext as it is
        from zodbkmi.storage import DECRYPT_ONLY
        from zodbkmi.storage import MIGRATE
        from zodbkmi.storage import UNCHECKED
        self.assertEqual(self._read(self._storage(
            mode=MIGRATE, migrate_since=UNCHECKED)), '500 mg')
        self.assertEqual(self._read(self._storage(mode=DECRYPT_ONLY)),
                         '500 mg')


class PlaintextAfterStartTests(_MigrateBase, unittest.TestCase):
    """A database being migrated: its objects are plaintext, never
    encrypted.  Plaintext committed after the migration started is
    refused."""

    def setUp(self):
        super().setUp()
        self._commit(ZODB.FileStorage.FileStorage('Data.fs'), dose='5 mg',
                     note='old')

    def test_plaintext_written_before_the_start_is_read(self):
        from zodbkmi.storage import MIGRATE
        self.assertEqual(self._read(self._storage(mode=MIGRATE)), '5 mg')

    def test_recorded_start_refuses_later_plaintext(self):
        from zodbkmi.storage import MIGRATE
        storage = self._storage(mode=MIGRATE)
        since = storage.migrate_since.hex()   # what the operator records
        self._commit(storage, note='written encrypted')
        # the application is stopped; the attacker appends plaintext for an
        # object that was never encrypted
        self._attacker(plain_record({'dose': '500 mg', 'note': 'old'}))
        storage = self._storage(mode=MIGRATE, migrate_since=since)
        with self.assertRaises(exceptions.NotEncryptedError) as cm:
            self._read(storage)
        self.assertIn('after the start of the migration', str(cm.exception))
        self.assertIn(since, str(cm.exception))

    def test_default_start_moves_with_a_restart(self):
        # documented limit: without a recorded start, the start is the last
        # transaction when the storage is opened, so plaintext written
        # while the application was stopped, over an object never
        # encrypted, is taken for a record written before the migration
        from zodbkmi.storage import MIGRATE
        self._attacker(plain_record({'dose': '500 mg', 'note': 'old'}))
        self.assertEqual(self._read(self._storage(mode=MIGRATE)), '500 mg')

    def test_while_the_application_runs(self):
        # A ZEO server; the application is a client in migrate mode, the
        # attacker any other client (ZEO asks for no credentials, and a
        # client of decrypt-only mode writes plaintext as well).
        import ZEO
        from zodbkmi.storage import MIGRATE
        addr, stop = ZEO.server(path='Data.fs', threaded=False)
        self.addCleanup(stop)
        app = self._wrap(ZEO.client(addr, wait_timeout=10), mode=MIGRATE)
        db = ZODB.DB(app)
        self.addCleanup(db.close)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['dose'], '5 mg')
        attacker = ZEO.client(addr, wait_timeout=10)
        try:
            tid = write_raw(attacker, z64,
                            plain_record({'dose': '500 mg', 'note': 'old'}))
        finally:
            attacker.close()
        self.assertGreater(tid, app.migrate_since)
        # a round trip to the server: the invalidation sent before its
        # answer has arrived
        app.base.history(z64)
        self.assertEqual(app.base.lastTransaction(), tid)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                conn.root()['dose']
        finally:
            tm.abort()
            conn.close()
        self.assertIn('after the start of the migration', str(cm.exception))

    def test_undo_that_would_restore_plaintext_is_refused(self):
        from zodbkmi.storage import MIGRATE
        storage = self._storage(mode=MIGRATE)
        db = ZODB.DB(storage)
        try:
            with db.transaction() as conn:
                conn.root()['dose'] = '10 mg'      # now encrypted
            undo_id = db.undoLog(0, 1)[0]['id']
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                db.undo(undo_id)
                transaction.commit()
            transaction.abort()
            self.assertIn('would restore a plaintext revision',
                          str(cm.exception))
            with db.transaction() as conn:
                self.assertEqual(conn.root()['dose'], '10 mg')
        finally:
            db.close()

    def test_plaintext_blob_file_under_an_encrypted_record(self):
        # migrate mode reads plaintext blob files of plaintext records
        # only: a plaintext file put in place of an encrypted one is refused
        # (without the cache of plaintext copies: with it, see below)
        from zodbkmi.storage import MIGRATE
        storage = self._wrap(ZODB.FileStorage.FileStorage(
            'Blobs.fs', blob_dir='blobs'), mode=MIGRATE, blob_cache_size=0)
        db = ZODB.DB(storage)
        try:
            oid, serial = self._forge_blob_file(db, storage)
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                storage.openCommittedBlobFile(oid, serial)
            self.assertIn('its record is', str(cm.exception))
        finally:
            db.close()

    def test_plaintext_blob_file_under_a_cached_revision(self):
        # a revision the cache of plaintext copies holds was authenticated
        # when it was decrypted, and a revision never changes: a file
        # forged afterwards is not read at all
        from zodbkmi.storage import MIGRATE
        from zodbkmi.storage.blobcache import default_directory
        if default_directory() is None:
            self.skipTest('no RAM-backed file system for the cache')
        cache = tempfile.mkdtemp(dir=default_directory())
        self.addCleanup(shutil.rmtree, cache, True)
        storage = self._wrap(ZODB.FileStorage.FileStorage(
            'Blobs.fs', blob_dir='blobs'), mode=MIGRATE,
            blob_cache_dir=cache)
        db = ZODB.DB(storage)
        try:
            oid, serial = self._forge_blob_file(db, storage)
            with storage.openCommittedBlobFile(oid, serial) as f:
                self.assertEqual(f.read(), SECRET)
        finally:
            db.close()

    def _forge_blob_file(self, db, storage):
        """Commit and load a blob, then put a plaintext file in place of
        its encrypted one; return its oid and serial."""
        with db.transaction() as conn:
            conn.root()['scan'] = ZODB.blob.Blob(SECRET)
        with db.transaction() as conn:
            blob = conn.root()['scan']
            blob._p_activate()
            oid, serial = blob._p_oid, blob._p_serial
        path = storage.fshelper.getBlobFilename(oid, serial)
        os.chmod(path, 0o644)
        with open(path, 'wb') as f:
            f.write(FORGED)
        return oid, serial


class ConflictResolutionTests(_MigrateBase, unittest.TestCase):
    """Conflict resolution reads the committed state without the wrapper
    knowing its transaction id: the same rules hold."""

    def setUp(self):
        super().setUp()
        from BTrees.Length import Length
        from zodbkmi.storage import MIGRATE
        self.storage = self._storage(mode=MIGRATE)
        self.db = ZODB.DB(self.storage)
        with self.db.transaction() as conn:
            conn.root()['n'] = Length(1)
            conn.root()['plain'] = Length(1)
        with self.db.transaction() as conn:
            self.oid = conn.root()['n']._p_oid

    def tearDown(self):
        self.db.close()
        super().tearDown()

    def test_resolution_of_legitimate_conflicts_still_works(self):
        tm1, tm2 = transaction.TransactionManager(), \
            transaction.TransactionManager()
        c1, c2 = self.db.open(tm1), self.db.open(tm2)
        c1.root()['n'].change(1)
        c2.root()['n'].change(10)
        tm1.commit()
        tm2.commit()            # resolved: both changes count
        with self.db.transaction() as conn:
            self.assertEqual(conn.root()['n'](), 12)
        c1.close()
        c2.close()

    def test_attacker_state_is_not_merged(self):
        from ZODB.POSException import ConflictError
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        n = conn.root()['n']
        self.assertEqual(n(), 1)
        # another writer of the storage under the wrapper (another client
        # of a shared storage) commits plaintext for the object
        write_raw(self.storage.base, self.oid, length_record(1000))
        n.change(1)
        with self.assertRaises(ConflictError):
            tm.commit()     # resolution refused the plaintext state
        tm.abort()
        conn.close()
        with self.assertRaises(exceptions.NotEncryptedError):
            with self.db.transaction() as conn:
                conn.root()['n']()

    def test_untransform_without_oid_refuses_plaintext(self):
        with self.assertRaises(exceptions.NotEncryptedError):
            self.storage.untransform_record_data(length_record(5))


class GenericStorageTests(_MigrateBase, unittest.TestCase):
    """Storages other than FileStorage: the history is read with
    loadBefore (here MappingStorage)."""

    def setUp(self):
        super().setUp()
        from ZODB.MappingStorage import MappingStorage
        self.base = MappingStorage()
        db = ZODB.DB(self.base)
        for i in range(3):
            with db.transaction() as conn:
                conn.root()['dose'] = '%d mg' % i
        self.calls = 0
        load_before = self.base.loadBefore

        def counting(oid, tid):
            self.calls += 1
            return load_before(oid, tid)
        self.base.loadBefore = counting

    def test_clean_plaintext_is_read_and_checked_once(self):
        from zodbkmi.storage import MIGRATE
        storage = self._wrap(self.base, mode=MIGRATE)
        self.calls = 0              # opening checked the keys
        self.base.load(z64)
        own = self.calls            # what the base's load costs itself
        self.calls = 0
        self.assertEqual(storage.load(z64)[0], self.base.load(z64)[0])
        # back to the first of the 4 revisions (the root's creation, 3
        # changes), then once more for nothing before it
        self.assertEqual(self.calls, 2 * own + 4)
        self.calls = 0
        storage.load(z64)
        self.assertEqual(self.calls, own)     # remembered: no walk

    def test_downgrade_is_refused(self):
        from zodbkmi.storage import MIGRATE
        db = ZODB.DB(self._wrap(self.base, mode=MIGRATE))
        with db.transaction() as conn:
            conn.root()['dose'] = '5 mg'      # encrypted
        write_raw(self.base, z64, plain_record({'dose': '500 mg'}))
        for kw in ({}, {'migrate_since': 'f' * 16}):
            storage = self._wrap(self.base, mode=MIGRATE, **kw)
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                storage.load(z64)
            self.assertIn('over an encrypted revision', str(cm.exception))


class PackTests(_MigrateBase, unittest.TestCase):

    def test_pack_reads_references_and_removes_the_evidence(self):
        # Pack's garbage collection reads the references of plaintext
        # records unchecked; once the encrypted revision under the
        # attacker's record is packed away, only a start recorded before
        # the attack refuses it (documented).
        import time
        from zodbkmi.storage import MIGRATE
        self._commit(ZODB.FileStorage.FileStorage('Data.fs'),
                     dose='5 mg', child=PersistentMapping(v='plain'))
        fs = ZODB.FileStorage.FileStorage('Data.fs', read_only=True)
        plain_root = fs.load(z64)[0]      # with the reference to the child
        fs.close()
        storage = self._storage(mode=MIGRATE)
        since = storage.migrate_since
        self._commit(storage, dose='6 mg')          # the root is encrypted
        # the attacker's record keeps the reference to the child
        self._attacker(plain_root.replace(b'5 mg', b'9 mg'))
        storage = self._storage(mode=MIGRATE)
        with self.assertRaises(exceptions.NotEncryptedError):
            storage.load(z64)
        time.sleep(0.01)
        storage.pack(time.time(), ZODB.serialize.referencesf)
        # the child survived (its reference was read)
        self.assertIn(b'plain', storage.load(p64(1))[0])
        storage.close()
        with self.assertRaises(exceptions.NotEncryptedError):
            self._read(self._storage(mode=MIGRATE, migrate_since=since))
        self.assertEqual(self._read(self._storage(mode=MIGRATE)), '9 mg')


class DecryptedDatabaseTests(_MigrateBase, unittest.TestCase):

    def test_decrypted_without_pack_is_refused_until_packed(self):
        from zodbkmi import migrate
        from zodbkmi.storage import MIGRATE
        from zodbkmi.testing import KeyEncryptingKey
        self._commit(self._storage(), dose='5 mg')
        raw = ZODB.FileStorage.FileStorage('Data.fs')
        keys = migrate.MigrationKeys(self.facility, old=(KeyEncryptingKey,))
        report = migrate.Migration(raw, migrate.RecordTransformer(keys),
                                   'decrypt').run()
        self.assertEqual(report.rewritten, 1)
        raw.close()
        with self.assertRaises(exceptions.NotEncryptedError):
            self._read(self._storage(mode=MIGRATE))
        raw = ZODB.FileStorage.FileStorage('Data.fs')
        migrate.pack(raw)
        raw.close()
        self.assertEqual(self._read(self._storage(mode=MIGRATE)), '5 mg')


class SettingsTests(_MigrateBase, unittest.TestCase):

    def _write_keys(self):
        from zodbkmi.keyholder import write_key_file
        from zodbkmi.testing import KeyEncryptingKey
        os.mkdir('vault')
        write_key_file(os.path.join(self.tmp, 'kek'), KeyEncryptingKey)

    def _zconfig(self, settings):
        import ZODB.config
        return ZODB.config.storageFromString("""
        %%import zodbkmi
        <encryptingstorage>
          key-file %(tmp)s/kek
          key-dir %(tmp)s/vault
          %(settings)s
          <filestorage>
            path %(tmp)s/Data.fs
          </filestorage>
        </encryptingstorage>
        """ % dict(tmp=self.tmp, settings=settings))

    def test_zconfig(self):
        import ZConfig
        self._write_keys()
        storage = self._zconfig('mode migrate\nmigrate-since 03e0c0ffee000000')
        try:
            self.assertEqual(storage.migrate_since,
                             bytes.fromhex('03e0c0ffee000000'))
        finally:
            storage.close()
        storage = self._zconfig('mode migrate\nmigrate-since unchecked')
        try:
            self.assertIsNone(storage.migrate_since)
        finally:
            storage.close()
        with self.assertRaises(ZConfig.ConfigurationError):
            self._zconfig('mode migrate\nmigrate-since yesterday')

    def test_zodburi(self):
        try:
            import zodburi
        except ImportError:   # pragma: no cover
            self.skipTest('zodburi is not installed')
        self._write_keys()
        factory, _ = zodburi.resolve_uri(
            'zodbkmi+file://%s/Data.fs?key_file=%s/kek&key_dir=%s/vault'
            '&mode=migrate&migrate_since=0x3e0c0ffee000000'
            % (self.tmp, self.tmp, self.tmp))
        storage = factory()
        try:
            self.assertEqual(storage.migrate_since,
                             bytes.fromhex('03e0c0ffee000000'))
        finally:
            storage.close()
        with self.assertRaises(ValueError):
            zodburi.resolve_uri(
                'zodbkmi+file://%s/Data.fs?key_file=%s/kek&key_dir=%s/vault'
                '&mode=migrate&migrate_since=soon'
                % (self.tmp, self.tmp, self.tmp))

    def test_the_start_is_logged(self):
        from zodbkmi.storage import MIGRATE
        self._commit(ZODB.FileStorage.FileStorage('Data.fs'), dose='5 mg')
        with self.assertLogs('zodbkmi.storage', 'INFO') as logs:
            storage = self._storage(mode=MIGRATE)
        storage.close()
        self.assertIn('migrate-since %s' % storage.migrate_since.hex(),
                      logs.output[0])


class MigrationToolTests(_MigrateBase, unittest.TestCase):
    """zodbkmi migrate opens the storage through its configuration in
    migrate mode and still works, resumably."""

    def test_encrypt_with_a_migrate_mode_configuration(self):
        from zodbkmi.migrate import storage_migration
        from zodbkmi.storage import MIGRATE
        self._commit(ZODB.FileStorage.FileStorage('Data.fs'), dose='5 mg',
                     note='old')
        storage = self._storage(mode=MIGRATE)
        self._commit(storage, note='new')     # the application runs
        storage = self._storage(mode=MIGRATE)
        since = storage.migrate_since
        report = storage_migration(storage, 'encrypt', chunk_size=1).run()
        storage.close()
        self.assertEqual(report.failed, 0)
        # the migration wrote encrypted records after the start: they open
        for mode, kw in ((MIGRATE, {'migrate_since': since}), ('strict', {})):
            self.assertEqual(self._read(self._storage(mode=mode, **kw)),
                             '5 mg')

    def test_migrate_since_is_a_migrate_mode_setting(self):
        from zodbkmi.storage import MIGRATE
        from zodbkmi.storage import parse_migrate_since
        base = ZODB.MappingStorage.MappingStorage()
        with self.assertRaises(ValueError):
            self._wrap(base, migrate_since='00' * 8)
        for bad in ('not a tid', '1' * 17, '', b'short', 3):
            with self.assertRaises(ValueError):
                self._wrap(base, mode=MIGRATE, migrate_since=bad)
        self.assertEqual(parse_migrate_since('0x3E8'), p64(1000))
        self.assertEqual(parse_migrate_since(p64(7)), p64(7))
        self.assertEqual(parse_migrate_since(' Unchecked '), 'unchecked')


class RelStorageTests(_MigrateBase, unittest.TestCase):
    """RelStorage (history preserving) on PostgreSQL: every connection has
    a storage of its own, with the start and the rules of the first."""

    from tests.postgres import PostgresLayer as layer

    def setUp(self):
        import uuid
        from tests.postgres import needs_postgres
        needs_postgres(self)
        super().setUp()
        self.dsn = self.layer.server.createdb(
            'review_' + uuid.uuid4().hex[:12])

    def _base(self):
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        options = Options(keep_history=True, cache_local_mb=0)
        return RelStorage(PostgreSQLAdapter(dsn=self.dsn, options=options),
                          options=options)

    def _attack(self, state):
        base = self._base()
        try:
            return write_raw(base, z64, plain_record(state))
        finally:
            base.close()

    def test_plaintext_after_the_start_and_downgrades(self):
        from zodbkmi.storage import MIGRATE
        self._commit(self._base(), dose='5 mg')        # before encryption
        db = ZODB.DB(self._wrap(self._base(), mode=MIGRATE))
        try:
            with db.transaction() as conn:
                self.assertEqual(conn.root()['dose'], '5 mg')
            attack = self._attack({'dose': '500 mg'})
            self.assertGreater(attack, db.storage.migrate_since)
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                with db.transaction() as conn:
                    conn.root()['dose']
            self.assertIn('after the start', str(cm.exception))
        finally:
            db.close()
        # opened again, the start moves: the plaintext is now taken for a
        # record from before the migration, as the documentation says
        db = ZODB.DB(self._wrap(self._base(), mode=MIGRATE))
        try:
            with db.transaction() as conn:
                self.assertEqual(conn.root()['dose'], '500 mg')
                conn.root()['dose'] = '6 mg'            # encrypted
        finally:
            db.close()
        # once the object was encrypted, a downgrade is refused whatever
        # the start
        self._attack({'dose': '600 mg'})
        storage = self._wrap(self._base(), mode=MIGRATE)
        try:
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                storage.load(z64)
            self.assertIn('over an encrypted revision', str(cm.exception))
        finally:
            storage.close()


if __name__ == '__main__':   # pragma: no cover
    unittest.main()
