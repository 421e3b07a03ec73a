"""Transaction metadata (user, description, extension) sealed by the storage
wrapper (zodbkmi.storage.metadata): FileStorage, ZEO, RelStorage."""
import os
import shutil
import tempfile
import unittest
import uuid

import transaction
import ZODB
import ZODB.FileStorage
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64
from ZODB.utils import tid_repr

from tests.storage_support import facility
from zodbkmi.testing import KeyEncryptingKey

# what Zope writes into every transaction, and markers to look for
USER = 'admin-USERMARKER'
PATH = '/admin/patients/PATIENT-4711/manage_edit'
NOTE = 'edited the DOSE-MARKER'
EXTENSION_VALUE = 'EXTENSION-MARKER'
MARKERS = (b'USERMARKER', b'PATIENT-4711', b'DOSE-MARKER',
           b'EXTENSION-MARKER', b'request_path')
KEY = 'zodbkmi-metadata'
ERROR_KEY = 'zodbkmi-metadata-error'


def commit_with_metadata(db, value='v', user=USER, note=NOTE):
    """Commit a change whose transaction carries a user, a description
    and an extension, as Zope does; return the transaction id."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        txn = tm.begin()
        conn.root()['value'] = value
        txn.setUser(user)
        txn.note(PATH)
        txn.note(note)
        txn.setExtendedInfo('request_path', EXTENSION_VALUE)
        tm.commit()
    finally:
        conn.close()
    return db.lastTransaction()


def in_temporary_directory(test, prefix):
    """Make a temporary directory the current one for ``test``; return
    it.  Cleanups, not tearDown, go back and remove it: they run after the
    cleanups registered later (the databases a test closes), so nothing is
    written outside the directory."""
    here = os.getcwd()
    tmp = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, tmp, True)
    test.addCleanup(os.chdir, here)
    test.addCleanup(transaction.abort)
    os.chdir(tmp)
    return tmp


def closing(test, db):
    """``db``, closed at the end of ``test`` unless closed before."""
    test.addCleanup(lambda: hasattr(db, '_mvcc_storage') and db.close())
    return db


def undo_latest(db):
    """Undo a transaction found through the undo log with a filter on
    its user, in a transaction with a description of its own, as Zope's
    undo form does."""
    commit_with_metadata(db, 'first')
    commit_with_metadata(db, 'second', user='undoer')
    entry = db.undoLog(0, 20, lambda d: 'undoer' in text(
        d['user_name']))[0]
    db.undo(entry['id'])
    transaction.get().note('undo of the second')
    transaction.commit()
    with db.transaction() as conn:
        assert conn.root()['value'] == 'first', conn.root()['value']
    assert text(db.undoLog(0, 1)[0]['description']) == 'undo of the second'


def text(value):
    return value.decode('utf-8') if isinstance(value, bytes) else value


def transactions(storage, start=None):
    """The transactions of ``storage`` from ``start``, in a list; the
    iterator is closed (an iterator left open keeps the file open)."""
    it = storage.iterator(start)
    try:
        return list(it)
    finally:
        it.close()


class _Checks:
    """Assertions shared by the storages."""

    def assertNoMarkers(self, raw, hexed=False):
        for marker in MARKERS:
            self.assertNotIn(marker, raw)
            if hexed:   # bytea columns as pg_dump writes them
                self.assertNotIn(marker.hex().encode(), raw)

    def assertOpened(self, entry):
        self.assertEqual(text(entry['user_name']), '/ ' + USER)
        self.assertEqual(text(entry['description']), PATH + '\n' + NOTE)
        self.assertEqual(entry['request_path'], EXTENSION_VALUE)
        self.assertNotIn(KEY, entry)
        self.assertNotIn(ERROR_KEY, entry)

    def assertListingsOpen(self, db, tid, undo=True, history=True):
        storage = db.storage
        if undo:
            entry = storage.undoLog(0, 1)[0]
            self.assertOpened(entry)
            self.assertOpened(db.undoLog(0, 1)[0])
            self.assertOpened(storage.undoInfo(0, 1)[0])
            # a filter and a specification see the opened values (Zope's
            # undo form filters on user and description)
            found = db.undoLog(0, 20, lambda d: USER in text(d['user_name']))
            self.assertEqual([d['id'] for d in found], [entry['id']])
            found = db.undoInfo(0, 20, {'request_path': EXTENSION_VALUE})
            self.assertEqual([d['id'] for d in found], [entry['id']])
            self.assertEqual(db.undoLog(0, 20, lambda d: 'nobody' in text(
                d['user_name'])), [])
        if history:
            entry = storage.history(p64(0), 1)[0]
            self.assertEqual(entry['tid'], tid)
            self.assertOpened(entry)
        txn = [t for t in transactions(storage) if t.tid == tid][0]
        self.assertEqual(txn.user, ('/ ' + USER).encode())
        self.assertEqual(txn.description, (PATH + '\n' + NOTE).encode())
        self.assertEqual(txn.extension, {'request_path': EXTENSION_VALUE})
        self.assertEqual(TransactionMetaData(
            extension=txn.extension_bytes).extension, txn.extension)


class FileStorageMetadataTests(_Checks, unittest.TestCase):

    def setUp(self):
        self.tmp = in_temporary_directory(self, 'zodbkmi-metadata-')
        self.facility = facility(os.path.join(self.tmp, 'keys'))

    def _storage(self, path='Data.fs', facility=None, **kw):
        from zodbkmi.storage import EncryptingStorage
        kw.setdefault('key', KeyEncryptingKey)
        return EncryptingStorage(ZODB.FileStorage.FileStorage(path),
                                 facility or self.facility, **kw)

    def _db(self, path='Data.fs', **kw):
        return closing(self, ZODB.DB(self._storage(path, **kw)))

    def _opened_storage(self, path='Data.fs', **kw):
        storage = self._storage(path, **kw)
        self.addCleanup(storage.close)
        return storage

    def _raw(self, path='Data.fs'):
        with open(path, 'rb') as f:
            return f.read()

    def _base_undo_log(self, path='Data.fs'):
        base = ZODB.FileStorage.FileStorage(path, read_only=True)
        try:
            return base.undoLog(0, 100)
        finally:
            base.close()

    def test_data_fs_holds_no_metadata(self):
        db = self._db()
        commit_with_metadata(db)
        db.close()
        raw = self._raw()
        self.assertNoMarkers(raw)
        self.assertNotIn(b'initial database creation', raw)
        self.assertIn(KEY.encode(), raw)
        # the base storage sees an empty user and description and the
        # envelope as the only item of the extension
        entry = self._base_undo_log()[0]
        self.assertEqual(entry['user_name'], b'')
        self.assertEqual(entry['description'], b'')
        self.assertEqual(sorted(entry), ['description', 'id', 'size',
                                         'time', 'user_name', KEY])
        self.assertEqual(entry[KEY][:6], b'.km\x02\x01\x03')

    def test_listings_and_iterator_open_the_metadata(self):
        db = self._db()
        tid = commit_with_metadata(db)
        self.assertListingsOpen(db, tid)
        db.close()
        db = self._db()
        self.assertListingsOpen(db, tid)
        self.assertEqual(text(db.undoLog(0, 20)[-1]['description']),
                         'initial database creation')

    def test_undo_through_the_undo_log(self):
        db = self._db()
        undo_latest(db)
        db.close()
        self.assertNotIn(b'undo of the second', self._raw())

    def test_filter_applied_in_pages_matches_the_base_filter(self):
        # where the base storage does not apply filters (ZEO), the wrapper
        # reads its undo log in pages: the same entries, in the same order
        db = self._db()
        for i in range(150):
            commit_with_metadata(db, i, user='user-%d' % (i % 3))
        storage = db.storage
        metadata = storage._metadata

        def by_user_1(entry):
            return entry['user_name'] == b'/ user-1'

        for first, last in ((0, -20), (0, 20), (5, 45), (0, -200),
                            (30, -7), (60, 40), (0, 1)):
            with self.subTest(first=first, last=last):
                paged = metadata._search(storage.base.undoLog, first, last,
                                         by_user_1)
                expected = storage.undoLog(first, last, by_user_1)
                self.assertEqual([d['id'] for d in paged],
                                 [d['id'] for d in expected])
                self.assertTrue(all(by_user_1(d) for d in paged))
        self.assertEqual(len(storage.undoLog(0, -200, by_user_1)), 50)

    def test_transaction_object_gets_its_metadata_back(self):
        storage = self._storage()
        self.addCleanup(storage.close)
        for end in ('tpc_finish', 'tpc_abort'):
            txn = TransactionMetaData('u-' + end, 'd-' + end, {'k': end})
            storage.tpc_begin(txn)
            self.assertEqual((txn.user, txn.description), (b'', b''))
            self.assertEqual(list(txn.extension), [KEY])
            if end == 'tpc_finish':
                storage.tpc_vote(txn)
            getattr(storage, end)(txn)
            self.assertEqual(txn.user, ('u-' + end).encode())
            self.assertEqual(txn.description, ('d-' + end).encode())
            self.assertEqual(txn.extension, {'k': end})
            self.assertEqual(TransactionMetaData(extension={'k': end})
                             .extension_bytes, txn.extension_bytes)
        # given as bytes, the extension comes back as bytes
        ext = TransactionMetaData(extension={'k': 1}).extension_bytes
        txn = TransactionMetaData('u', 'd', ext)
        storage.tpc_begin(txn)
        storage.tpc_abort(txn)
        self.assertEqual(vars(txn)['extension_bytes'], ext)
        self.assertNotIn('extension', vars(txn))

    def test_refused_tpc_begin_gives_the_metadata_back(self):
        db = self._db()
        db.close()
        from zodbkmi.storage import EncryptingStorage
        storage = EncryptingStorage(
            ZODB.FileStorage.FileStorage('Data.fs', read_only=True),
            self.facility, KeyEncryptingKey)
        self.addCleanup(storage.close)
        txn = TransactionMetaData('someone', 'something')
        with self.assertRaises(ZODB.POSException.ReadOnlyError):
            storage.tpc_begin(txn)
        self.assertEqual((txn.user, txn.description),
                         (b'someone', b'something'))

    def test_empty_metadata_is_not_sealed(self):
        storage = self._storage()
        self.addCleanup(storage.close)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        self.assertEqual(txn.extension, {})
        storage.tpc_abort(txn)

    def test_wrong_key_gives_error_entries(self):
        db = self._db()
        commit_with_metadata(db)
        db.close()
        dek_id = self.facility.keys()[0]
        # another KEK (an AES key), which did not wrap the DEK.  A storage
        # whose keys open no record is refused when it is opened
        # (DatabaseKeyError, tests/test_storage_wrongkey.py): here the
        # root was written again under the new KEK, and the old KEK is not
        # given any more
        new = os.urandom(32)
        self.facility.ensure_key(new)
        db = self._db(key=new, previous_keys=(KeyEncryptingKey,))
        with db.transaction() as conn:
            conn.root()['value'] = 'under the new KEK'
        db.close()
        other = self._opened_storage(key=new)
        log = other.undoLog(0, 20)
        self.assertEqual(len(log), 3)    # the whole listing, in place
        self.assertNotIn(ERROR_KEY, log[0])
        history = other.history(p64(0), 5)
        self.assertNotIn(ERROR_KEY, history[0])
        for entry in log[1:] + history[1:]:
            self.assertIn(ERROR_KEY, entry)
            self.assertIn(dek_id, entry[ERROR_KEY])
            self.assertIn('WrongKeyError', entry[ERROR_KEY])
            self.assertNotIn(KEY, entry)
            self.assertEqual(entry['user_name'], b'')
            self.assertEqual(entry['description'], b'')
        # a filter sees the error entries too
        self.assertEqual(len(other.undoLog(
            0, 20, lambda d: ERROR_KEY in d)), 2)
        # the iterator raises, naming the transaction
        from zodbkmi.exceptions import WrongKeyError
        it = other.iterator()
        self.addCleanup(it.close)
        with self.assertRaises(WrongKeyError) as cm:
            next(it)
        self.assertIn('transaction 0x', str(cm.exception))
        self.assertIsNotNone(cm.exception.tid)

    def _tamper_metadata(self, tid):
        """Flip a bit of the tag of the metadata envelope of ``tid`` in
        Data.fs."""
        base = ZODB.FileStorage.FileStorage('Data.fs', read_only=True)
        try:
            sealed = [t for t in transactions(base)
                      if t.tid == tid][0].extension[KEY]
        finally:
            base.close()
        raw = bytearray(self._raw())
        self.assertEqual(raw.count(sealed), 1)
        at = raw.index(sealed) + len(sealed) - 1
        raw[at] ^= 1
        with open('Data.fs', 'wb') as f:
            f.write(raw)
        return sealed[6:22].hex()

    def test_tampered_metadata_gives_an_error_entry(self):
        from zodbkmi.exceptions import AuthenticationError
        db = self._db()
        tid = commit_with_metadata(db, 'first')
        commit_with_metadata(db, 'second')
        db.close()
        dek_id = self._tamper_metadata(tid)
        db = self._db()
        log = db.storage.undoLog(0, 20)
        self.assertEqual(len(log), 3)
        self.assertOpened(log[0])
        self.assertIn(ERROR_KEY, log[1])
        self.assertIn('AuthenticationError', log[1][ERROR_KEY])
        self.assertIn(dek_id, log[1][ERROR_KEY])
        self.assertEqual(text(log[2]['description']),
                         'initial database creation')
        it = db.storage.iterator()
        self.addCleanup(it.close)
        with self.assertRaises(AuthenticationError) as cm:
            list(it)
        self.assertIn(tid_repr(tid), str(cm.exception))
        # the records of the transaction are untouched
        with db.transaction() as conn:
            self.assertEqual(conn.root()['value'], 'second')

    def _write_raw_transaction(self, extension, data=None):
        """A transaction written to Data.fs directly (as someone who can
        write the file would), with ``extension``."""
        base = ZODB.FileStorage.FileStorage('Data.fs')
        try:
            txn = TransactionMetaData('', '', extension)
            serial = base.load(p64(0))[1]
            base.tpc_begin(txn)
            if data is not None:
                base.store(p64(0), serial, data, '', txn)
            base.tpc_vote(txn)
            return base.tpc_finish(txn)
        finally:
            base.close()

    def test_record_envelope_in_the_metadata_slot_fails(self):
        db = self._db()
        commit_with_metadata(db)
        db.close()
        base = ZODB.FileStorage.FileStorage('Data.fs', read_only=True)
        record = base.load(p64(0))[0]
        base.close()
        self.assertEqual(record[:6], b'.km\x02\x01\x01')
        self._write_raw_transaction({KEY: record})
        entry = self._opened_storage().undoLog(0, 1)[0]
        self.assertIn('UnsupportedFormatError', entry[ERROR_KEY])
        self.assertIn('storage record envelope where a transaction '
                      'metadata envelope is required', entry[ERROR_KEY])

    def test_metadata_envelope_in_a_record_slot_fails(self):
        from zodbkmi.exceptions import UnsupportedFormatError
        db = self._db()
        commit_with_metadata(db)
        db.close()
        sealed = self._base_undo_log()[0][KEY]
        self._write_raw_transaction({}, data=sealed)
        with self.assertRaises(UnsupportedFormatError) as cm:
            self._opened_storage().load(p64(0))
        self.assertIn('transaction metadata envelope where a storage '
                      'record envelope is required', str(cm.exception))

    def test_clear_metadata_of_old_transactions_is_shown_as_it_is(self):
        plain = ZODB.DB(ZODB.FileStorage.FileStorage('Data.fs'))
        tid = commit_with_metadata(plain)
        plain.close()
        db = self._db(mode='migrate')
        self.assertListingsOpen(db, tid)
        db.close()
        # strict mode refuses the plaintext records, not the metadata
        entry = self._opened_storage().undoLog(0, 1)[0]
        self.assertOpened(entry)

    def test_decrypt_only_writes_metadata_in_the_clear(self):
        db = self._db(mode='decrypt-only')
        tid = commit_with_metadata(db)
        self.assertListingsOpen(db, tid)
        db.close()
        self.assertIn(b'DOSE-MARKER', self._raw())
        self.assertNotIn(KEY.encode(), self._raw())

    def test_migrate_mode_seals_new_and_reads_old(self):
        plain = ZODB.DB(ZODB.FileStorage.FileStorage('Data.fs'))
        old = commit_with_metadata(plain, user='olduser')
        plain.close()
        db = self._db(mode='migrate')
        new = commit_with_metadata(db, user='newuser')
        users = [text(d['user_name']) for d in db.undoLog(0, 2)]
        self.assertEqual(users, ['/ newuser', '/ olduser'])
        self.assertEqual([t.user for t in transactions(db.storage, old)],
                         [b'/ olduser', b'/ newuser'])
        self.assertEqual(transactions(db.storage, new)[0].tid, new)
        db.close()
        raw = self._raw()
        self.assertIn(b'olduser', raw)
        self.assertNotIn(b'newuser', raw)

    def test_copy_transactions_keeps_the_metadata(self):
        db = self._db()
        tid = commit_with_metadata(db)
        db.close()
        source = self._storage()
        dest = self._storage('Copy.fs')
        dest.copyTransactionsFrom(source)
        source.close()
        dest.close()
        self.assertNoMarkers(self._raw('Copy.fs'))
        db = self._db('Copy.fs')
        self.assertListingsOpen(db, tid)

    def test_copied_file_keeps_the_metadata_readable(self):
        # repozo and file copies take Data.fs as it is
        db = self._db()
        tid = commit_with_metadata(db)
        db.close()
        shutil.copy('Data.fs', 'Backup.fs')
        db = self._db('Backup.fs')
        self.assertListingsOpen(db, tid)

    def test_metadata_is_not_bound_to_its_transaction(self):
        # documented: an envelope moved to another transaction opens there
        db = self._db()
        commit_with_metadata(db)
        db.close()
        sealed = self._base_undo_log()[0][KEY]
        self._write_raw_transaction({KEY: sealed})
        first, second = self._opened_storage().undoLog(0, 2)
        self.assertOpened(first)
        self.assertOpened(second)

    def test_facility_without_metadata_encryption_is_refused(self):
        from zodbkmi.storage import EncryptingStorage

        class Facility:
            encrypt = self.facility.encrypt
            decrypt = self.facility.decrypt

        base = ZODB.FileStorage.FileStorage('Data.fs')
        self.addCleanup(base.close)
        with self.assertRaisesRegex(TypeError, 'IMetadataEncryption'):
            EncryptingStorage(base, Facility(), KeyEncryptingKey)

    def test_facilities_provide_metadata_encryption(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.interfaces import IExtendedKeyManagementFacility
        from zodbkmi.interfaces import IMetadataEncryption
        self.assertTrue(IExtendedKeyManagementFacility.isOrExtends(
            IMetadataEncryption))
        for klass in (KeyManagementFacility, LocalKeyManagementFacility):
            self.assertTrue(IMetadataEncryption.implementedBy(klass))
        self.assertTrue(verifyObject(IMetadataEncryption, self.facility))

    def test_local_facility_seals_metadata(self):
        # the REST client: keys on the key server, sealing here
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.testing import setupRestApi
        local = LocalKeyManagementFacility('https://keys.invalid')
        setupRestApi(local, self.facility)
        self.facility.ensure_key(KeyEncryptingKey)
        sealed = local.encrypt_metadata(KeyEncryptingKey, b'{"x":1}')
        self.assertEqual(self.facility.decrypt_metadata(
            KeyEncryptingKey, sealed), b'{"x":1}')
        db = self._db(facility=local)
        tid = commit_with_metadata(db)
        self.assertListingsOpen(db, tid)

    def test_migrate_tool_transactions_stay_in_the_clear(self):
        # zodbkmi migrate writes to the base storage: its own metadata
        # ("zodbkmi migrate", the mode and a count) is shown as it is
        from zodbkmi.migrate import storage_migration
        plain = ZODB.DB(ZODB.FileStorage.FileStorage('Data.fs'))
        commit_with_metadata(plain)
        plain.close()
        wrapper = self._storage(mode='migrate')
        storage_migration(wrapper, 'encrypt').run()
        wrapper.close()
        db = self._db()
        entry = db.storage.undoLog(0, 1)[0]
        self.assertEqual(entry['user_name'], b'zodbkmi migrate')
        self.assertTrue(entry['description'].startswith(
            b'zodbkmi migrate encrypt'))


class ZEOMetadataTests(_Checks, unittest.TestCase):
    """The client seals and opens; the server stores what it is given."""

    def setUp(self):
        self.tmp = in_temporary_directory(self, 'zodbkmi-metadata-zeo-')
        self.facility = facility(os.path.join(self.tmp, 'keys'))

    def _server(self, keys):
        import ZEO
        path = os.path.join(self.tmp, 'server', 'Data.fs')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not keys:
            return ZEO.server(path=path, threaded=False)
        from zodbkmi.keyholder import write_key_file
        write_key_file(os.path.join(self.tmp, 'kek'), KeyEncryptingKey)
        return ZEO.server(storage_conf="""
            %%import zodbkmi
            <serverencryptingstorage>
              key-file %(tmp)s/kek
              key-dir %(tmp)s/keys
              <filestorage 1>
                path %(path)s
              </filestorage>
            </serverencryptingstorage>
            """ % dict(tmp=self.tmp, path=path), threaded=False)

    def _check(self, keys):
        import ZEO
        from zodbkmi.storage import EncryptingStorage
        addr, stop = self._server(keys)
        try:
            db = ZODB.DB(EncryptingStorage(ZEO.client(addr, wait_timeout=30),
                                           self.facility, KeyEncryptingKey))
            try:
                tid = commit_with_metadata(db)
                self.assertListingsOpen(db, tid)
                undo_latest(db)
            finally:
                db.close()
        finally:
            stop()
        with open(os.path.join(self.tmp, 'server', 'Data.fs'), 'rb') as f:
            raw = f.read()
        self.assertNoMarkers(raw)
        self.assertNotIn(b'undo of the second', raw)
        self.assertIn(KEY.encode(), raw)

    def test_server_without_keys(self):
        self._check(keys=False)

    def test_server_with_keys_passes_metadata_through(self):
        from zodbkmi.storage import ServerEncryptingStorage
        for name in ('tpc_begin', 'undoLog', 'undoInfo', 'history'):
            self.assertIn(name, ServerEncryptingStorage.passed_through)
        self._check(keys=True)


class RelStorageMetadataTests(_Checks, unittest.TestCase):

    from tests.postgres import PostgresLayer as layer

    def setUp(self):
        from tests.postgres import PostgresLayer
        from tests.postgres import needs_postgres
        needs_postgres(self)
        self.tmp = in_temporary_directory(self, 'zodbkmi-metadata-rs-')
        self.dbname = 'md_' + uuid.uuid4().hex[:12]
        self.dsn = PostgresLayer.server.createdb(self.dbname)
        self.facility = facility(os.path.join(self.tmp, 'keys'))

    def _db(self, keep_history):
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        from zodbkmi.storage import EncryptingStorage
        opts = Options(keep_history=keep_history, cache_local_mb=0)
        base = RelStorage(PostgreSQLAdapter(dsn=self.dsn, options=opts),
                          options=opts)
        return closing(self, ZODB.DB(EncryptingStorage(
            base, self.facility, KeyEncryptingKey)))

    def _dump(self):
        from tests.postgres import PostgresLayer
        return PostgresLayer.server.dump(self.dbname)

    def test_history_preserving(self):
        db = self._db(keep_history=True)
        tid = commit_with_metadata(db)
        self.assertListingsOpen(db, tid)
        undo_latest(db)
        dump = self._dump()
        self.assertIn(b'transaction', dump)
        self.assertNoMarkers(dump, hexed=True)
        self.assertNotIn(b'undo of the second', dump)
        self.assertNotIn(b'undo of the second'.hex().encode(), dump)
        self.assertIn(KEY.encode().hex().encode(), dump)

    def test_history_free(self):
        db = self._db(keep_history=False)
        commit_with_metadata(db)
        self.assertNoMarkers(self._dump(), hexed=True)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['value'], 'v')
