"""Tests of zodbkmi.storage (EncryptingStorage on FileStorage)."""
import io
import os
import shutil
import tempfile
import unittest
import zlib

import transaction
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
import ZODB.interfaces
from persistent.mapping import PersistentMapping
from ZODB.utils import p64
from zope.interface.verify import verifyObject

from tests.storage_support import facility
from tests.storage_support import read_blob

SECRET = 'THE-STORED-SECRET-VALUE'


class _TempDir:

    def setUp(self):
        self.here = os.getcwd()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-storage-')
        os.chdir(self.tmp)
        self.facility = facility(os.path.join(self.tmp, 'keys'))

    def tearDown(self):
        transaction.abort()
        os.chdir(self.here)
        shutil.rmtree(self.tmp, ignore_errors=True)


class EncryptingStorageTests(_TempDir, unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.storage import EncryptingStorage
        return EncryptingStorage

    def _makeOne(self, base=None, **kw):
        from zodbkmi.testing import KeyEncryptingKey
        if base is None:
            base = ZODB.FileStorage.FileStorage('Data.fs', **kw.pop(
                'base_kw', {}))
        kw.setdefault('key', KeyEncryptingKey)
        return self._getTargetClass()(base, self.facility, **kw)

    def _fill(self, storage):
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
            conn.root()['child'] = PersistentMapping(value=SECRET + '-child')
        return db

    def _oids(self, storage):
        return [p64(0), p64(1)]

    def test_verifyObject(self):
        storage = self._makeOne()
        try:
            verifyObject(ZODB.interfaces.IStorageWrapper, storage)
            verifyObject(ZODB.interfaces.IStorage, storage)
            verifyObject(ZODB.interfaces.IStorageIteration, storage)
            verifyObject(ZODB.interfaces.IStorageUndoable, storage)
        finally:
            storage.close()

    def test_declares_only_interfaces_of_base(self):
        import ZODB.MappingStorage
        storage = self._makeOne(ZODB.MappingStorage.MappingStorage())
        try:
            self.assertFalse(
                ZODB.interfaces.IStorageUndoable.providedBy(storage))
            self.assertFalse(ZODB.interfaces.IBlobStorage.providedBy(storage))
            self.assertTrue(
                ZODB.interfaces.IStorageWrapper.providedBy(storage))
        finally:
            storage.close()

    def test_every_data_method_of_provided_interfaces_is_wrapped(self):
        from zodbkmi.storage import PASS_THROUGH
        storage = self._makeOne(base_kw=dict(blob_dir='blobs'))
        try:
            klass = self._getTargetClass()
            unwrapped = []
            for iface in zope_interfaces(storage):
                for name, desc in iface.namesAndDescriptions(all=True):
                    if not hasattr(desc, 'getSignatureString'):
                        continue   # an attribute
                    if name in PASS_THROUGH:
                        continue
                    if not _defined_by_wrapper(klass, name):
                        unwrapped.append('%s.%s' % (iface.__name__, name))
            self.assertEqual(unwrapped, [])
        finally:
            storage.close()

    def test_pass_through_methods_return_no_record_data(self):
        storage = self._makeOne()
        db = self._fill(storage)
        try:
            for entry in storage.history(p64(0), size=10):
                self.assertNotIn('data', entry)
            self.assertNotIn(SECRET.encode(), repr(storage.undoLog()).encode())
        finally:
            db.close()

    def test_roundtrip_and_raw_file_has_no_plaintext(self):
        storage = self._makeOne()
        db = self._fill(storage)
        db.close()
        with open('Data.fs', 'rb') as f:
            raw = f.read()
        self.assertNotIn(SECRET.encode(), raw)
        self.assertNotIn(b'PersistentMapping', raw)
        db = ZODB.DB(self._makeOne())
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], SECRET)
            self.assertEqual(conn.root()['child']['value'], SECRET + '-child')
        db.close()

    def test_load_paths_return_plaintext(self):
        storage = self._makeOne()
        db = self._fill(storage)
        try:
            data, serial = storage.load(p64(0))
            self.assertIn(SECRET.encode(), data)
            self.assertEqual(storage.loadSerial(p64(0), serial), data)
            self.assertEqual(storage.loadBefore(p64(0), b'\xff' * 8)[0], data)
            records = [r for t in storage.iterator() for r in t]
            self.assertTrue(all(not r.data or r.data[:1] != b'.'
                                for r in records))
            oid, tid, rdata, nxt = storage.record_iternext()
            self.assertEqual(oid, p64(0))
            self.assertEqual(rdata, data)
        finally:
            db.close()

    def test_load_w_record_moved_to_other_oid(self):
        from zodbkmi.exceptions import AuthenticationError
        storage = self._makeOne()
        db = self._fill(storage)
        sealed1, _ = storage.base.load(p64(1))
        db.close()
        plain = ZODB.FileStorage.FileStorage('Data.fs')
        _raw_store(plain, p64(0), sealed1)
        plain.close()
        storage = self._makeOne()
        try:
            with self.assertRaises(AuthenticationError) as cm:
                storage.load(p64(0))
            self.assertIn('0x00', str(cm.exception))
            self.assertEqual(cm.exception.oid, p64(0))
        finally:
            storage.close()

    def test_load_w_flipped_bit(self):
        from zodbkmi.exceptions import AuthenticationError
        storage = self._makeOne()
        db = self._fill(storage)
        sealed, _ = storage.base.load(p64(1))
        db.close()
        flipped = sealed[:-5] + bytes([sealed[-5] ^ 1]) + sealed[-4:]
        plain = ZODB.FileStorage.FileStorage('Data.fs')
        _raw_store(plain, p64(1), flipped)
        plain.close()
        storage = self._makeOne()
        try:
            with self.assertRaises(AuthenticationError) as cm:
                storage.load(p64(1))
            self.assertIn('0x01', str(cm.exception))
        finally:
            storage.close()

    def test_load_w_truncated_record(self):
        from zodbkmi.exceptions import DecryptionError
        storage = self._makeOne()
        db = self._fill(storage)
        sealed, _ = storage.base.load(p64(1))
        db.close()
        for cut in (20, len(sealed) - 1):
            plain = ZODB.FileStorage.FileStorage('Data.fs')
            _raw_store(plain, p64(1), sealed[:cut])
            plain.close()
            storage = self._makeOne()
            try:
                with self.assertRaises(DecryptionError) as cm:
                    storage.load(p64(1))
                self.assertIn('0x01', str(cm.exception))
            finally:
                storage.close()

    def test_load_w_missing_key(self):
        from zodbkmi.exceptions import UnknownKeyError
        from zodbkmi.facility import KeyManagementFacility
        storage = self._makeOne()
        db = self._fill(storage)
        db.close()
        self.facility = KeyManagementFacility(os.path.join(self.tmp, 'empty'))
        base = ZODB.FileStorage.FileStorage('Data.fs')
        try:
            # refused when opened (DatabaseKeyError, an UnknownKeyError)
            with self.assertRaises(UnknownKeyError) as cm:
                self._makeOne(base)
            self.assertIn('0x00', str(cm.exception))
        finally:
            base.close()

    def test_load_w_wrong_kek(self):
        from zodbkmi.exceptions import WrongKeyError
        storage = self._makeOne()
        db = self._fill(storage)
        db.close()
        from zodbkmi.exceptions import DatabaseKeyError
        from zodbkmi.kek import as_kek
        other = os.urandom(32)
        self.facility.ensure_key(other)
        base = ZODB.FileStorage.FileStorage('Data.fs')
        try:
            # refused when opened, naming the KEK given; the KEK of the
            # record would have raised WrongKeyError when loading
            with self.assertRaises(DatabaseKeyError) as cm:
                self._makeOne(base, key=other)
            self.assertIn(as_kek(other).key_id, str(cm.exception))
            self.assertNotIsInstance(cm.exception, WrongKeyError)
        finally:
            base.close()

    def test_previous_keys_read_after_kek_change(self):
        from zodbkmi.testing import KeyEncryptingKey
        db = self._fill(self._makeOne())
        db.close()
        new = os.urandom(32)
        self.facility.ensure_key(new)
        storage = self._makeOne(key=new, previous_keys=[KeyEncryptingKey])
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], SECRET)
            conn.root()['more'] = 1
        db.close()

    def test_strict_mode_refuses_plaintext(self):
        from zodbkmi.exceptions import NotEncryptedError
        db = self._fill(ZODB.FileStorage.FileStorage('Data.fs'))
        db.close()
        storage = self._makeOne()
        try:
            with self.assertRaises(NotEncryptedError) as cm:
                storage.load(p64(0))
            self.assertIn('0x00', str(cm.exception))
        finally:
            storage.close()

    def test_migrate_mode_reads_plaintext_writes_encrypted(self):
        from zodbkmi.storage import MIGRATE
        db = self._fill(ZODB.FileStorage.FileStorage('Data.fs'))
        db.close()
        db = ZODB.DB(self._makeOne(mode=MIGRATE))
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], SECRET)
            conn.root()['new'] = 'NEW-SECRET-VALUE'
        db.close()
        with open('Data.fs', 'rb') as f:
            raw = f.read()
        self.assertIn(SECRET.encode(), raw)   # the old plaintext revision
        self.assertNotIn(b'NEW-SECRET-VALUE', raw)
        storage = self._makeOne()   # strict: root is now encrypted
        try:
            self.assertIn(b'NEW-SECRET-VALUE', storage.load(p64(0))[0])
        finally:
            storage.close()

    def test_decrypt_only_mode_reads_both_writes_plaintext(self):
        from zodbkmi.storage import DECRYPT_ONLY
        db = self._fill(self._makeOne())
        db.close()
        db = ZODB.DB(self._makeOne(mode=DECRYPT_ONLY))
        with db.transaction() as conn:
            self.assertEqual(conn.root()['child']['value'], SECRET + '-child')
            conn.root()['new'] = 'NEW-PLAIN-VALUE'
        db.close()
        with open('Data.fs', 'rb') as f:
            self.assertIn(b'NEW-PLAIN-VALUE', f.read())

    def test_unknown_mode(self):
        import ZODB.MappingStorage
        with self.assertRaises(ValueError):
            self._makeOne(ZODB.MappingStorage.MappingStorage(),
                          mode='lenient')

    def test_needs_key(self):
        import ZODB.MappingStorage
        with self.assertRaises(TypeError):
            self._getTargetClass()(ZODB.MappingStorage.MappingStorage(),
                                   self.facility)

    def test_keyholder(self):
        from zodbkmi.testing import TestingKeyHolder
        storage = self._makeOne(key=None, keyholder=TestingKeyHolder())
        db = self._fill(storage)
        db.close()

    def test_conflict_resolution_binds_oid(self):
        from ZODB.tests.ConflictResolution import PCounter
        db = ZODB.DB(self._makeOne())
        tm1, tm2 = transaction.TransactionManager(), \
            transaction.TransactionManager()
        c1 = db.open(transaction_manager=tm1)
        c1.root()['c'] = PCounter()
        c1.root()['c'].inc()
        tm1.commit()
        c2 = db.open(transaction_manager=tm2)
        c1.root()['c'].inc()
        c2.root()['c'].inc()
        tm1.commit()
        tm2.commit()   # resolved by the wrapper, with the oid
        tm1.begin()
        self.assertEqual(c1.root()['c']._value, 3)
        c1.close()
        c2.close()
        db.close()

    def test_pack_gc_reads_references(self):
        import time
        db = self._fill(self._makeOne())
        with db.transaction() as conn:
            del conn.root()['child']
        db.pack(time.time() + 1)
        storage = db.storage
        from ZODB.POSException import POSKeyError
        with self.assertRaises(POSKeyError):
            storage.load(p64(1))
        self.assertIn(SECRET.encode(), storage.load(p64(0))[0])
        db.close()

    def test_untransform_without_oid_refused(self):
        from zodbkmi.exceptions import DecryptionError
        storage = self._makeOne()
        db = self._fill(storage)
        sealed, _ = storage.base.load(p64(0))
        try:
            with self.assertRaises(DecryptionError):
                storage.untransform_record_data(sealed)
            self.assertIn(SECRET.encode(),
                          storage.untransform_record_data(sealed, p64(0)))
        finally:
            db.close()

    def test_copyTransactionsFrom_encrypts(self):
        source = ZODB.FileStorage.FileStorage('Source.fs')
        db = self._fill(source)
        dest = self._makeOne()
        dest.copyTransactionsFrom(source)
        db.close()
        dest.close()
        with open('Data.fs', 'rb') as f:
            self.assertNotIn(SECRET.encode(), f.read())

    def test_zlibstorage_inside_works(self):
        # the envelope magic b'.km' is not zc.zlibstorage's b'.z': stacked
        # either way, each wrapper reads only its own records (outside is
        # the sensible order: compressing ciphertext gains nothing)
        import zc.zlibstorage
        import ZODB.MappingStorage
        base = ZODB.MappingStorage.MappingStorage()
        db = self._fill(self._makeOne(zc.zlibstorage.ZlibStorage(base)))
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], SECRET)
        raw = base.load(b'\0' * 8)[0]
        if raw.startswith(b'.z'):      # kept compressed only when smaller
            raw = zlib.decompress(raw[2:])
        self.assertTrue(raw.startswith(b'.km'))
        self.assertNotIn(SECRET.encode(), raw)
        db.close()

    def test_stacks_under_another_wrapper(self):
        import zc.zlibstorage
        storage = zc.zlibstorage.ZlibStorage(self._makeOne())
        db = self._fill(storage)
        db.close()
        db = ZODB.DB(zc.zlibstorage.ZlibStorage(self._makeOne()))
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], SECRET)
        db.close()


def _defined_by_wrapper(klass, name):
    """Whether ``name`` is defined by ``klass`` or a class of zodbkmi it
    inherits (the wrapper's mix-ins), not by ``object``."""
    return any(name in vars(k) for k in klass.__mro__
               if k.__module__.startswith('zodbkmi.'))


def zope_interfaces(storage):
    import zope.interface
    return [i for i in zope.interface.providedBy(storage).flattened()
            if i.__module__ == 'ZODB.interfaces']


def _raw_store(storage, oid, data):
    """Store ``data`` as the record of ``oid`` in the plain ``storage``."""
    from ZODB.Connection import TransactionMetaData
    t = TransactionMetaData()
    serial = storage.load(oid)[1]
    storage.tpc_begin(t)
    storage.store(oid, serial, data, '', t)
    storage.tpc_vote(t)
    storage.tpc_finish(t)


class ConfigTests(_TempDir, unittest.TestCase):

    def _write_keys(self):
        from zodbkmi.keyholder import write_key_file
        from zodbkmi.testing import KeyEncryptingKey
        os.mkdir('vault')
        write_key_file(os.path.join(self.tmp, 'kek'), KeyEncryptingKey)

    def _config(self, settings='', storage='<mappingstorage/>'):
        """ZConfig text of an encryptingstorage with the test's keys."""
        return """
        %%import zodbkmi
        <zodb>
          <encryptingstorage>
            key-file %(tmp)s/kek
            key-dir %(tmp)s/vault
            %(settings)s
            %(storage)s
          </encryptingstorage>
        </zodb>
        """ % dict(tmp=self.tmp, settings=settings, storage=storage)

    def test_zconfig_section(self):
        import ZODB.config
        self._write_keys()
        config = self._config(storage='<filestorage>\n path %s/Data.fs\n'
                                      '</filestorage>' % self.tmp)
        db = ZODB.config.databaseFromString(config)
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
        db.close()
        with open('Data.fs', 'rb') as f:
            self.assertNotIn(SECRET.encode(), f.read())
        self.assertEqual(len(os.listdir('vault')), 1)
        db = ZODB.config.databaseFromString(config)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], SECRET)
        db.close()

    def test_zconfig_plaintext_dir(self):
        import ZConfig
        import ZODB.config
        self._write_keys()
        os.mkdir('plain')
        plain = os.path.join(self.tmp, 'plain')
        db = ZODB.config.databaseFromString(
            self._config('plaintext-dir %s' % plain))
        self.assertEqual(db.storage._plaintext_dir, plain)
        db.close()
        with self.assertRaises(ZConfig.DataConversionError):
            ZODB.config.databaseFromString(
                self._config('plaintext-dir %s/no' % self.tmp))

    def test_zconfig_bad_mode(self):
        import ZConfig
        import ZODB.config
        self._write_keys()
        config = self._config('mode lenient')
        with self.assertRaises(ZConfig.DataConversionError):
            ZODB.config.databaseFromString(config)

    def test_zodburi_scheme(self):
        import zodburi
        self._write_keys()
        uri = ('zodbkmi+file://%s/Data.fs?key_file=%s/kek&key_dir=%s/vault'
               '&database_name=enc' % (self.tmp, self.tmp, self.tmp))
        factory, dbkw = zodburi.resolve_uri(uri)
        self.assertEqual(dbkw['database_name'], 'enc')
        db = ZODB.DB(factory(), **dbkw)
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
        db.close()
        with open('Data.fs', 'rb') as f:
            self.assertNotIn(SECRET.encode(), f.read())

    def test_zodburi_plaintext_dir(self):
        import zodburi
        self._write_keys()
        os.mkdir('plain')
        uri = ('zodbkmi+memory://?key_file=%s/kek&key_dir=%s/vault'
               '&plaintext_dir=%s/plain' % (self.tmp, self.tmp, self.tmp))
        factory, dbkw = zodburi.resolve_uri(uri)
        storage = factory()
        self.assertEqual(storage._plaintext_dir,
                         os.path.join(self.tmp, 'plain'))
        storage.close()
        with self.assertRaisesRegex(ValueError, 'not a directory'):
            zodburi.resolve_uri(uri.replace('/plain', '/no'))

    def test_zodburi_needs_keys(self):
        import zodburi
        with self.assertRaises(ValueError):
            zodburi.resolve_uri('zodbkmi+memory://?key_file=kek')


class ZEODeploymentTests(_TempDir, unittest.TestCase):
    """Clients encrypt; the ZEO server (no keys) stores ciphertext."""

    def test_server_files_hold_no_plaintext(self):
        import ZEO
        from zodbkmi.testing import KeyEncryptingKey
        from zodbkmi.storage import EncryptingStorage
        addr, stop = ZEO.server(path=os.path.join(self.tmp, 'Data.fs'),
                                blob_dir=os.path.join(self.tmp, 'blobs'),
                                threaded=False)
        try:
            def client():
                return EncryptingStorage(
                    ZEO.client(addr, wait_timeout=10,
                               blob_dir=os.path.join(self.tmp, 'cache')),
                    self.facility, KeyEncryptingKey)
            db = ZODB.DB(client())
            with db.transaction() as conn:
                conn.root()['secret'] = SECRET
                conn.root()['child'] = PersistentMapping(value=SECRET)
            db.close()
            db = ZODB.DB(client())
            with db.transaction() as conn:
                self.assertEqual(conn.root()['child']['value'], SECRET)
            db.close()
        finally:
            stop()
        raw = b''
        for dirpath, _, files in os.walk(self.tmp):
            if 'keys' in dirpath.split(os.sep):
                continue
            for name in files:
                with open(os.path.join(dirpath, name), 'rb') as f:
                    raw += f.read()
        self.assertIn(b'.km', raw)
        self.assertNotIn(SECRET.encode(), raw)
        self.assertNotIn(b'PersistentMapping', raw)


class BlobTests(_TempDir, unittest.TestCase):

    def _makeOne(self, **kw):
        from zodbkmi.storage import EncryptingStorage
        from zodbkmi.testing import KeyEncryptingKey
        # the private copies (the cache of repeated loads is tested in
        # tests/test_storage_blobs.py)
        kw.setdefault('blob_cache_size', 0)
        return EncryptingStorage(
            ZODB.FileStorage.FileStorage('Data.fs', blob_dir='blobs'),
            self.facility, KeyEncryptingKey, **kw)

    def _store(self, data=SECRET.encode() * 1000):
        import ZODB.blob
        db = ZODB.DB(self._makeOne())
        with db.transaction() as conn:
            conn.root()['blob'] = ZODB.blob.Blob(data)
        return db

    def _blob_files(self):
        return [os.path.join(d, n) for d, _, names in os.walk('blobs')
                for n in names if n.endswith('.blob')]

    def test_blob_dir_holds_no_plaintext(self):
        self._store().close()
        files = self._blob_files()
        self.assertEqual(len(files), 1)
        with open(files[0], 'rb') as f:
            raw = f.read()
        self.assertTrue(raw.startswith(b'zks'))
        self.assertNotIn(SECRET.encode(), raw)

    def test_blob_longer_than_a_batch(self):
        # several batches of the stream format: written by the stream
        # writer thread when sealed at commit and when opened at load
        from zodbkmi.format import stream
        data = os.urandom(3 * stream.BATCH_SIZE + 12345)
        self._store(data).close()
        files = self._blob_files()
        self.assertEqual(len(files), 1)
        with open(files[0], 'rb') as f:
            header = stream.read_header(f)
        chunks = -(-len(data) // header.chunk_size)
        self.assertEqual(os.path.getsize(files[0]),
                         header.size + len(data) + stream.TAG_SIZE * chunks)
        db = ZODB.DB(self._makeOne())
        try:
            with db.transaction() as conn:
                with conn.root()['blob'].open() as f:
                    self.assertEqual(f.read(), data)
        finally:
            db.close()

    def test_reading_leaves_no_plaintext_file(self):
        self._store().close()
        storage = self._makeOne()
        try:
            serial = storage.base.load(p64(1))[1]
            with storage.openCommittedBlobFile(p64(1), serial) as f:
                self.assertEqual(f.read(9), SECRET.encode()[:9])
                private = storage._copies.path
                self.assertEqual(os.stat(private).st_mode & 0o777, 0o700)
                self.assertEqual(os.listdir(private), [])   # unlinked
        finally:
            storage.close()
        self.assertFalse(os.path.exists(private))

    def test_loaded_blob_removed_at_transaction_end(self):
        db = self._store()
        conn = db.open()
        with conn.root()['blob'].open() as f:
            self.assertEqual(f.read(9), SECRET.encode()[:9])
        name = conn.root()['blob'].committed()
        self.assertTrue(os.path.exists(name))
        self.assertEqual(os.stat(name).st_mode & 0o777, 0o400)
        transaction.abort()
        self.assertFalse(os.path.exists(name))
        conn.close()
        db.close()

    def _uncommitted(self, data=SECRET.encode() * 100):
        with open('upload', 'wb') as f:
            f.write(data)
        return 'upload'

    def _sealed_ok(self, name, data=SECRET.encode() * 100):
        from zodbkmi.testing import KeyEncryptingKey
        with open(name, 'rb') as f:
            sealed = f.read()
        self.assertNotIn(SECRET.encode(), sealed)
        out = io.BytesIO()
        self.facility.decrypt_file(KeyEncryptingKey, io.BytesIO(sealed),
                                   out, oid=p64(7))
        self.assertEqual(out.getvalue(), data)

    def test_blob_sealed_in_place(self):
        storage = self._makeOne()
        self.addCleanup(storage.close)
        name = self._uncommitted()
        ino = os.stat(name).st_ino
        self.assertEqual(storage._seal_blob(name, p64(7)), name)
        self.assertEqual(os.stat(name).st_ino, ino)    # the same file
        self._sealed_ok(name)

    def test_blob_with_other_names_sealed_into_a_new_file(self):
        # another hard link of the file keeps its plaintext
        storage = self._makeOne()
        self.addCleanup(storage.close)
        name = self._uncommitted()
        os.link(name, 'mine')
        sealed = storage._seal_blob(name, p64(7))
        self.assertNotEqual(sealed, name)
        self.assertFalse(os.path.exists(name))
        self._sealed_ok(sealed)
        with open('mine', 'rb') as f:
            self.assertEqual(f.read(), SECRET.encode() * 100)

    def test_read_only_blob_sealed_into_a_new_file(self):
        if os.getuid() == 0:
            self.skipTest('root may write read-only files')
        storage = self._makeOne()
        self.addCleanup(storage.close)
        name = self._uncommitted()
        os.chmod(name, 0o400)
        sealed = storage._seal_blob(name, p64(7))
        self.assertNotEqual(sealed, name)
        self._sealed_ok(sealed)

    def test_symbolic_link_sealed_into_a_new_file(self):
        # the file it points to is not the storage's to change
        storage = self._makeOne()
        self.addCleanup(storage.close)
        os.symlink(os.path.abspath(self._uncommitted()), 'link')
        sealed = storage._seal_blob('link', p64(7))
        self.assertNotEqual(sealed, 'link')
        self._sealed_ok(sealed)
        with open('upload', 'rb') as f:
            self.assertEqual(f.read(), SECRET.encode() * 100)

    def test_facility_without_in_place_sealing(self):
        from zope.interface import implementer
        from zodbkmi.interfaces import IMetadataEncryption
        from zodbkmi.storage import EncryptingStorage
        from zodbkmi.testing import KeyEncryptingKey

        @implementer(IMetadataEncryption)
        class Facility:
            encrypt_file = self.facility.encrypt_file
            decrypt_file = self.facility.decrypt_file
            encrypt = self.facility.encrypt
            decrypt = self.facility.decrypt
            encrypt_metadata = self.facility.encrypt_metadata
            decrypt_metadata = self.facility.decrypt_metadata

        storage = EncryptingStorage(ZODB.MappingStorage.MappingStorage(),
                                    Facility(), KeyEncryptingKey)
        self.addCleanup(storage.close)
        sealed = storage._seal_blob(self._uncommitted(), p64(7))
        self.assertNotEqual(sealed, 'upload')
        self._sealed_ok(sealed)

    def test_failed_in_place_sealing_removes_the_file(self):
        import unittest.mock
        storage = self._makeOne()
        self.addCleanup(storage.close)
        name = self._uncommitted()
        with unittest.mock.patch('os.pwrite',
                                 side_effect=OSError(28, 'disk full')):
            with self.assertRaises(OSError):
                storage._seal_blob(name, p64(7))
        self.assertFalse(os.path.exists(name))

    def test_one_pair_of_hooks_per_transaction(self):
        # used without a connection, the storage removes its copies at
        # the end of the thread's transaction, with one pair of hooks, and
        # forgets them: a long-running process keeps no list that grows
        import ZODB.blob
        db = ZODB.DB(self._makeOne())
        with db.transaction() as conn:
            for i in range(5):
                conn.root()[i] = ZODB.blob.Blob(b'%d' % i)
        with db.transaction() as conn:
            oids = [conn.root()[i]._p_oid for i in range(5)]
        storage = db.storage
        txn = transaction.get()
        commit_hooks = len(list(txn.getAfterCommitHooks()))
        abort_hooks = len(list(txn.getAfterAbortHooks()))
        names = [storage.loadBlob(oid, storage.load(oid)[1]) for oid in oids]
        self.assertEqual(len(list(txn.getAfterCommitHooks())),
                         commit_hooks + 1)
        self.assertEqual(len(list(txn.getAfterAbortHooks())),
                         abort_hooks + 1)
        self.assertEqual(list(storage._copies.names), names)
        transaction.abort()
        self.assertEqual(storage._copies.names, {})
        self.assertFalse([n for n in names if os.path.exists(n)])
        db.close()

    def _five_blobs(self):
        import ZODB.blob
        db = ZODB.DB(self._makeOne())
        with db.transaction() as conn:
            for i in range(5):
                conn.root()[i] = ZODB.blob.Blob(b'blob %d' % i)
        return db

    def test_connection_copies_need_no_transaction_hooks(self):
        db = self._five_blobs()
        conn = db.open()
        txn = transaction.get()
        hooks = len(list(txn.getAfterCommitHooks()))
        names = [conn.root()[i].committed() for i in range(5)]
        self.assertEqual(len(list(txn.getAfterCommitHooks())), hooks)
        self.assertEqual(db.storage._copies.names, {})
        private = os.path.dirname(names[0])
        self.assertEqual(os.path.dirname(private), db.storage._copies.path)
        self.assertEqual(os.stat(private).st_mode & 0o777, 0o700)
        transaction.commit()
        self.assertFalse([n for n in names if os.path.exists(n)])
        conn.close()
        db.close()

    def test_copies_removed_after_explicit_transaction(self):
        # a connection with a transaction manager of its own (pyramid_tm's
        # explicit mode): its copies go after its transaction ends, not
        # with the thread's default transaction: at once when the
        # connection starts its next transaction itself (not explicit),
        # else when the next transaction begins (the blob objects that
        # name them are invalidated then)
        db = self._five_blobs()
        for explicit in (True, False):
            tm = transaction.TransactionManager(explicit=explicit)
            tm.begin()
            conn = db.open(tm)
            names = [conn.root()[i].committed() for i in range(5)]
            with conn.root()[0].open() as f:
                self.assertEqual(f.read(), b'blob 0')
            self.assertTrue(all(os.path.exists(n) for n in names))
            transaction.abort()     # the thread's default transaction
            self.assertTrue(all(os.path.exists(n) for n in names))
            tm.abort()
            if explicit:
                self.assertTrue(all(os.path.exists(n) for n in names))
                tm.begin()
            self.assertFalse([n for n in names if os.path.exists(n)])
            if not explicit:
                tm.begin()
            with conn.root()[0].open() as f:     # decrypted again
                self.assertEqual(f.read(), b'blob 0')
            tm.commit()
            conn.close()
        db.close()

    def test_copies_of_two_connections_are_apart(self):
        # one connection's transaction end does not remove the copy the
        # other connection still uses ('r+' opens it by name)
        db = self._five_blobs()
        tm1 = transaction.TransactionManager()
        tm2 = transaction.TransactionManager()
        c1 = db.open(tm1)
        c2 = db.open(tm2)
        n1 = c1.root()[1].committed()
        n2 = c2.root()[1].committed()
        self.assertNotEqual(n1, n2)
        tm1.abort()
        self.assertFalse(os.path.exists(n1))
        with c2.root()[1].open('r+') as f:
            self.assertEqual(f.read(), b'blob 1')
            f.write(b' changed')
        tm2.commit()
        self.assertFalse(os.path.exists(n2))
        tm1.begin()
        with c1.root()[1].open() as f:
            self.assertEqual(f.read(), b'blob 1 changed')
        tm1.abort()
        c1.close()
        c2.close()
        db.close()

    def test_copies_removed_when_connection_closes(self):
        db = self._five_blobs()
        tm = transaction.TransactionManager(explicit=True)
        tm.begin()
        conn = db.open(tm)
        name = conn.root()[2].committed()
        conn.close()      # inside the transaction, nothing changed
        # the pooled connection's blob object still names the copy: it
        # goes when the connection next polls (its next transaction)
        self.assertTrue(os.path.exists(name))
        tm.abort()
        tm.begin()
        self.assertIs(db.open(tm), conn)
        self.assertFalse(os.path.exists(name))
        tm.abort()
        conn.close()
        db.close()
        self.assertFalse(os.path.exists(os.path.dirname(name)))

    def test_historical_connection(self):
        import ZODB.blob
        db = self._five_blobs()
        with db.transaction() as conn:
            conn.root()[3] = ZODB.blob.Blob(b'new blob 3')
        before = db.storage.lastTransaction()
        with db.transaction() as conn:
            self.assertEqual(read_blob(conn.root()[3]), b'new blob 3')
        tm = transaction.TransactionManager(explicit=True)
        tm.begin()
        conn = db.open(tm, before=before)
        name = conn.root()[3].committed()
        with conn.root()[3].open() as f:
            self.assertEqual(f.read(), b'blob 3')
        tm.abort()
        self.assertTrue(os.path.exists(name))     # explicit: see above
        tm.begin()
        self.assertFalse(os.path.exists(name))
        tm.abort()
        conn.close()
        db.close()

    def test_stacked_wrapper_reads_through_connection_storages(self):
        # a wrapper above (zc.zlibstorage) copies the interfaces and
        # new_instance of the wrapper below: connections read through it
        import zc.zlibstorage
        import ZODB.blob
        storage = zc.zlibstorage.ZlibStorage(self._makeOne())
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()['text'] = 'x' * 1000       # compressed
            conn.root()['blob'] = ZODB.blob.Blob(b'stacked')
        db.close()
        base = self._makeOne()
        self.assertTrue(base.unseal(base.base.load(p64(0))[0],
                                    p64(0)).startswith(b'.z'))
        base.close()
        db = ZODB.DB(zc.zlibstorage.ZlibStorage(self._makeOne()))
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        self.assertEqual(conn.root()['text'], 'x' * 1000)
        name = conn.root()['blob'].committed()
        with open(name, 'rb') as f:
            self.assertEqual(f.read(), b'stacked')
        tm.abort()
        self.assertFalse(os.path.exists(name))
        conn.close()
        db.close()

    def test_plaintext_dir(self):
        from zodbkmi.storage import PRIVATE_PREFIX
        os.mkdir('plain')
        self._store().close()
        db = ZODB.DB(self._makeOne(plaintext_dir='plain'))
        conn = db.open()
        name = conn.root()['blob'].committed()
        # the connection's directory in the storage's
        private = os.path.dirname(os.path.dirname(name))
        self.assertEqual(os.path.dirname(private), os.path.abspath('plain'))
        self.assertTrue(os.path.basename(private).startswith(
            '%s%d-' % (PRIVATE_PREFIX, os.getpid())))
        self.assertEqual(os.stat(private).st_mode & 0o777, 0o700)
        with open(name, 'rb') as f:
            self.assertEqual(f.read(9), SECRET.encode()[:9])
        transaction.abort()
        conn.close()
        db.close()
        self.assertEqual(os.listdir('plain'), [])

    def _dead_pid(self):
        import subprocess
        import sys
        p = subprocess.Popen([sys.executable, '-c', 'pass'])
        p.wait()
        return p.pid

    def test_directories_of_killed_processes_are_swept(self):
        # a process killed inside a transaction leaves its plaintext
        # copies; the next storage opened over the same directory of this
        # user removes them, and only those of processes that are gone
        from zodbkmi.storage import PRIVATE_PREFIX
        os.mkdir('plain')
        dead = os.path.join('plain', '%s%d-abc' % (PRIVATE_PREFIX,
                                                   self._dead_pid()))
        alive = os.path.join('plain', '%s%d-abc' % (PRIVATE_PREFIX,
                                                    os.getppid()))
        other = os.path.join('plain', 'zodbkmi-blobs-x-abc')
        for path in (dead, alive, other):
            os.mkdir(path, 0o700)
            with open(os.path.join(path, 'copy.blob'), 'wb') as f:
                f.write(SECRET.encode())
        self._store().close()
        db = ZODB.DB(self._makeOne(plaintext_dir='plain'))
        with db.transaction() as conn:
            with conn.root()['blob'].open() as f:
                self.assertEqual(f.read(9), SECRET.encode()[:9])
        db.close()
        self.assertFalse(os.path.exists(dead))
        self.assertTrue(os.path.exists(alive))
        self.assertTrue(os.path.exists(other))

    def test_sweep_leaves_directories_of_other_users(self):
        from zodbkmi.storage import PRIVATE_PREFIX
        from zodbkmi.storage import sweep_plaintext_dirs
        if os.getuid() != 0:
            self.skipTest('needs root to make a directory of another user')
        os.mkdir('plain')
        path = os.path.join('plain', '%s%d-abc' % (PRIVATE_PREFIX,
                                                   self._dead_pid()))
        os.mkdir(path, 0o700)
        os.chown(path, 65534, 65534)
        self.assertEqual(sweep_plaintext_dirs('plain'), [])
        self.assertTrue(os.path.exists(path))
        os.chown(path, 0, 0)
        self.assertEqual(sweep_plaintext_dirs('plain'), [path])

    def test_truncated_blob(self):
        from zodbkmi.exceptions import DecryptionError
        self._store().close()
        path = self._blob_files()[0]
        os.chmod(path, 0o600)
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) - 10)
        db = ZODB.DB(self._makeOne())
        storage = db.storage
        with db.transaction() as conn:
            with self.assertRaises(DecryptionError) as cm:
                conn.root()['blob'].open().read()
            self.assertIn('0x01', str(cm.exception))
            self.assertEqual(_files_under(storage._copies.path), [])
        db.close()

    def test_blob_file_moved_to_another_oid(self):
        import ZODB.blob
        from zodbkmi.exceptions import AuthenticationError
        db = ZODB.DB(self._makeOne())
        with db.transaction() as conn:
            conn.root()['a'] = ZODB.blob.Blob(b'blob of a' * 100)
            conn.root()['b'] = ZODB.blob.Blob(b'blob of b' * 100)
        with db.transaction() as conn:
            a = conn.root()['a']._p_oid
            b = conn.root()['b']._p_oid
        db.close()
        storage = self._makeOne()
        try:
            names = [storage.base.loadBlob(oid, storage.base.load(oid)[1])
                     for oid in (a, b)]
            for name in names:
                os.chmod(name, 0o600)
            with open(names[0], 'rb') as f:
                first = f.read()
            with open(names[1], 'rb') as f:
                second = f.read()
            with open(names[0], 'wb') as f:     # swap the two files
                f.write(second)
            with open(names[1], 'wb') as f:
                f.write(first)
            for oid in (a, b):
                with self.assertRaises(AuthenticationError):
                    storage.openCommittedBlobFile(
                        oid, storage.base.load(oid)[1])
            self.assertEqual(os.listdir(storage._copies.path), [])
        finally:
            storage.close()

    def test_plaintext_blob_in_strict_mode(self):
        import ZODB.blob
        from zodbkmi.exceptions import NotEncryptedError
        from zodbkmi.storage import DECRYPT_ONLY
        db = ZODB.DB(self._makeOne(mode=DECRYPT_ONLY))
        with db.transaction() as conn:
            conn.root()['blob'] = ZODB.blob.Blob(b'plain blob')
        db.close()
        storage = self._makeOne()
        try:
            serial = storage.base.load(p64(1))[1]
            with self.assertRaises(NotEncryptedError):
                storage.openCommittedBlobFile(p64(1), serial)
        finally:
            storage.close()

    def test_migrate_mode_reads_plaintext_blob(self):
        import ZODB.blob
        from zodbkmi.storage import DECRYPT_ONLY
        from zodbkmi.storage import MIGRATE
        db = ZODB.DB(self._makeOne(mode=DECRYPT_ONLY))
        with db.transaction() as conn:
            conn.root()['blob'] = ZODB.blob.Blob(b'plain blob')
        db.close()
        with open(self._blob_files()[0], 'rb') as f:
            self.assertEqual(f.read(), b'plain blob')
        db = ZODB.DB(self._makeOne(mode=MIGRATE))
        with db.transaction() as conn:
            with conn.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'plain blob')
            conn.root()['blob2'] = ZODB.blob.Blob(b'new blob')
        db.close()
        sealed = [p for p in self._blob_files()
                  if open_read(p).startswith(b'zks')]
        self.assertEqual(len(sealed), 1)


def _files_under(path):
    return [n for _, _, names in os.walk(path) for n in names]


def open_read(path):
    with open(path, 'rb') as f:
        return f.read()
