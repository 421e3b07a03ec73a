"""Adversarial tests at scale, on real ciphertext, through the public paths.

The ciphertexts are made by running the product: FileStorage databases
behind ``EncryptingStorage`` (records and blobs; four databases: two under
the same DEK, one under another KEK of the same key vault, one whose key
vault is another one), a FileStorage database of ``EncryptedPersistent``
objects, files encrypted by ``encrypt_file``, the vault entries and key
files written to disk.  Then the bytes are taken from disk and attacked:
every bit flipped (of a few records and files, over their whole length),
truncated at every byte, bytes appended, records and blob files spliced
between oids and between databases, DEK ids replaced, stream chunks
dropped, duplicated and reordered, wrapped DEKs swapped between vault
entries, KEK ids changed, key files altered.

Every case goes through a public path (``EncryptingStorage.load`` /
``loadBefore`` / ``loadSerial`` / ``loadBlob`` / ``openCommittedBlobFile``,
``Connection.get`` and attribute access, ``facility.decrypt`` /
``decrypt_file``, ``KeyHolder``, the key sources) and must raise the exact
exception class ``docs/format.rst`` names for its rule, never return data.
The few cases the design accepts (documented in ``docs/security.rst``:
rollback, a record of another database under the same DEK and oid, an
object state moved between ``EncryptedPersistent`` objects, the
unauthenticated fields of a vault entry) are asserted as accepted, so that a
change of behaviour shows.

Each test collects its mismatches and reports the first ones, so one run
shows the extent of a regression.
"""
import base64
import io
import json
import logging
import os
import random
import shutil
import struct
import tempfile
import unittest

import transaction
import ZODB
import ZODB.FileStorage
import zope.component
import zope.component.testing
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError

from zodbkmi import exceptions as X
from zodbkmi.format import envelope as E
from zodbkmi.format import wrapped as wrappedmod
from zodbkmi.testing import StaticKeyHolder as Holder

from tests.test_leaks import load_leakscan

CANARY = load_leakscan().CANARY
SMALL_BLOB = CANARY + b' small blob ' + bytes(range(256)) + CANARY
LARGE_BLOB = (CANARY + bytes(range(256)) * 520)[:2 * 65536 + 1000]
FILE_CHUNK = 64
FILE_PLAIN = (CANARY + b' file ' + bytes(range(256)))[:300]
OIDS = [bytes(7) + bytes([i]) for i in range(6)]   # root, m, small, large, n
ROOT, MAPPING, SMALL, LARGE, OTHER = OIDS[:5]


def rejected_as(error):
    """The zodbkmi class of ``error`` (EncryptedPersistent raises private
    subclasses that ZODB passes through)."""
    return getattr(type(error), '_zodbkmi_class', type(error))


class Cases:
    """Collects the cases whose outcome differs from the expected one."""

    def __init__(self, test):
        self.test = test
        self.count = 0
        self.bad = []

    def check(self, label, expected, func, *args, **kw):
        """Call ``func``: it must raise exactly ``expected``, or, with
        ``expected`` bytes, return those bytes."""
        self.count += 1
        try:
            result = func(*args, **kw)
        except Exception as e:
            if isinstance(expected, type) and rejected_as(e) is expected:
                return e
            self.bad.append('%s: expected %s, raised %s: %s' % (
                label, _name(expected), rejected_as(e).__name__,
                str(e)[:150]))
            return e
        if not (isinstance(expected, bytes) and result == expected):
            self.bad.append('%s: expected %s, RETURNED DATA %r' % (
                label, _name(expected), result[:40]
                if isinstance(result, bytes) else result))
        return result

    def done(self, minimum=1):
        self.test.assertGreaterEqual(self.count, minimum)
        if self.bad:
            self.test.fail('%d of %d cases wrong:\n%s' % (
                len(self.bad), self.count, '\n'.join(self.bad[:15])))


def _name(expected):
    if isinstance(expected, type):
        return expected.__name__
    return 'the plaintext'


def drop_buffers(fs):
    """Make FileStorage ``fs`` read its file again: it keeps buffered read
    files (a pool for load, its own file for loadSerial), which would
    still hold the bytes from before an in-place change."""
    fs._files.flush()
    fs._file.flush()   # a flush of a buffered random file drops its buffer


def flip(data, i, bit):
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


# -- the world: real databases, key vaults and files, made once ---------------

class World:
    """Everything the tests attack, built by running the product."""

    def __init__(self):
        from zodbkmi.facility import KeyManagementFacility
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-adversarial-')
        self.kek_a = os.urandom(32)
        self.kek_b = os.urandom(32)
        self.keys = os.path.join(self.tmp, 'keys')
        self.facility = KeyManagementFacility(self.keys)
        self.dek_a_old = self.facility.create_key(self.kek_a)
        self.dek_a = self.facility.create_key(self.kek_a)   # retires old
        self.dek_b = self.facility.create_key(self.kek_b)
        self.keys2 = os.path.join(self.tmp, 'keys2')
        self.facility2 = KeyManagementFacility(self.keys2)
        self.dek_c = self.facility2.create_key(self.kek_a)
        # storage-level databases, identical object graphs (same oids)
        self.dbs = {
            'one': (self.facility, self.kek_a),
            'same': (self.facility, self.kek_a),     # same DEK
            'other': (self.facility, self.kek_b),    # other KEK, same vault
            'foreign': (self.facility2, self.kek_a),  # other vault
        }
        for name, (facility, kek) in self.dbs.items():
            self._build_storage_db(name, facility, kek)
        self._build_object_db()
        # a file encrypted under DEK a, in small chunks
        out = io.BytesIO()
        self.facility.encrypt_file(self.kek_a, io.BytesIO(FILE_PLAIN), out,
                                   chunk_size=FILE_CHUNK)
        self.file_stream = out.getvalue()
        out = io.BytesIO()
        self.facility.encrypt_file(self.kek_a, io.BytesIO(FILE_PLAIN), out,
                                   chunk_size=FILE_CHUNK)
        self.file_stream2 = out.getvalue()   # same plaintext, other salt
        self.data_envelope = self.facility.encrypt(self.kek_a,
                                                   CANARY + b' data')

    def path(self, name, *parts):
        return os.path.join(self.tmp, name, *parts)

    def open_fs(self, name, **kw):
        return ZODB.FileStorage.FileStorage(
            self.path(name, 'Data.fs'), blob_dir=self.path(name, 'blobs'),
            **kw)

    def wrap(self, base, facility=None, key=None):
        from zodbkmi.storage import EncryptingStorage
        return EncryptingStorage(base, facility or self.facility,
                                 key or self.kek_a)

    def _build_storage_db(self, name, facility, kek):
        os.mkdir(self.path(name))
        db = ZODB.DB(self.wrap(self.open_fs(name), facility, kek))
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            root = conn.root()
            root['m'] = PersistentMapping(
                {'text': CANARY + b' mapping of ' + name.encode()})
            root['small'] = Blob(SMALL_BLOB)
            root['large'] = Blob(LARGE_BLOB)
            root['n'] = PersistentMapping({'text': CANARY + b' n'})
            tm.commit()
            assert root['m']._p_oid == MAPPING, root['m']._p_oid
            assert root['n']._p_oid == OTHER
            conn.close()
        finally:
            db.close()

    def _build_object_db(self):
        from tests.test_persistent import Secret
        os.mkdir(self.path('objects'))
        zope.component.testing.setUp()
        try:
            zope.component.provideUtility(self.facility)
            zope.component.provideUtility(Holder(self.kek_a))
            db = ZODB.DB(ZODB.FileStorage.FileStorage(
                self.path('objects', 'Data.fs')))
            try:
                tm = transaction.TransactionManager()
                conn = db.open(tm)
                root = conn.root()
                root['alone'] = Secret('alone', CANARY + b' alone')
                root['friend'] = Secret('friend', CANARY + b' friend',
                                        other=root['alone'])
                root['twin'] = Secret('twin', CANARY + b' twin')
                tm.commit()
                self.object_oids = {k: root[k]._p_oid
                                    for k in ('alone', 'friend', 'twin')}
                conn.close()
            finally:
                db.close()
        finally:
            zope.component.testing.tearDown()

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class WorldLayer:
    """Builds the world once for the tests of this module."""

    __name__ = 'AdversarialWorld'
    __bases__ = ()
    __module__ = __name__
    world = None

    @classmethod
    def setUp(cls):
        cls.world = World()

    @classmethod
    def tearDown(cls):
        cls.world.cleanup()
        cls.world = None


class AdversarialBase(unittest.TestCase):

    layer = WorldLayer

    def setUp(self):
        self.w = WorldLayer.world
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-adv-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(transaction.abort)
        # ZODB logs every failed load with its traceback: thousands here
        log = logging.getLogger('ZODB.Connection')
        self.addCleanup(log.setLevel, log.level)
        log.setLevel(logging.CRITICAL)

    def copy_db(self, name):
        """A copy of database ``name`` to attack; return its directory."""
        target = os.path.join(self.tmp, name)
        shutil.copytree(self.w.path(name), target)
        for root, dirs, files in os.walk(target):
            for f in files:
                os.chmod(os.path.join(root, f), 0o600)
        return target

    def open_copy(self, name, facility=None, key=None):
        """The copy's raw FileStorage and the EncryptingStorage around it
        (keys of database "one" unless told)."""
        d = self.copy_db(name)
        fs = ZODB.FileStorage.FileStorage(
            os.path.join(d, 'Data.fs'), blob_dir=os.path.join(d, 'blobs'))
        storage = self.w.wrap(fs, facility, key)
        self.addCleanup(storage.close)
        return fs, storage

    def raw_record(self, name, oid):
        fs = self.w.open_fs(name, read_only=True)
        try:
            return fs.load(oid)
        finally:
            fs.close()

    def store_raw(self, fs, records):
        """Write ``{oid: data}`` into the raw FileStorage ``fs`` as one
        transaction (no encryption: the attacker's write); return its tid."""
        t = TransactionMetaData()
        fs.tpc_begin(t)
        for oid, data in records.items():
            try:
                serial = fs.load(oid)[1]
            except POSKeyError:
                serial = bytes(8)
            fs.store(oid, serial, data, '', t)
        fs.tpc_vote(t)
        return fs.tpc_finish(t)


# -- the record envelope ------------------------------------------------------

def envelope_expected(i, bit, data_context=True, strict_storage=False):
    """The exception a flipped bit ``bit`` of byte ``i`` of an envelope
    raises (docs/format.rst, "Opening")."""
    if i < 3:
        # not the magic: plaintext to a strict storage, else unsupported
        return X.NotEncryptedError if strict_storage else \
            X.UnsupportedFormatError
    if i < 6:
        return X.UnsupportedFormatError   # version, suite, context
    if i < 22:
        return X.UnknownKeyError          # another DEK id: no such key
    return X.AuthenticationError          # nonce, ciphertext, tag


def envelope_truncated_expected(n, strict_storage=False):
    """The exception of an envelope (version 2, what zodbkmi writes) cut
    to ``n`` bytes."""
    if strict_storage and n < 3:
        return X.NotEncryptedError
    if n < E.OVERHEAD:
        return X.TruncatedDataError
    return X.AuthenticationError


class StorageRecordTests(AdversarialBase):
    """Storage records (context 0x01) of EncryptingStorage in Data.fs."""

    def test_every_bit_flip_in_data_fs(self):
        # Bits flipped in place in a copy of Data.fs, read back through
        # load, loadBefore and loadSerial in turn.
        fs, storage = self.open_copy('one')
        path = fs._file_name
        cases = Cases(self)
        for oid in (MAPPING, OTHER):
            record, tid = fs.load(oid)
            with open(path, 'rb') as f:
                at = f.read().find(record)
            self.assertGreater(at, 0)
            with open(path, 'r+b') as f:
                for i in range(len(record)):
                    for bit in range(8):
                        f.seek(at + i)
                        f.write(bytes([record[i] ^ (1 << bit)]))
                        f.flush()
                        drop_buffers(fs)
                        how = (i * 8 + bit) % 3
                        label = 'oid %s byte %d bit %d' % (oid.hex(), i, bit)
                        exp = envelope_expected(i, bit, strict_storage=True)
                        if how == 0:
                            cases.check(label, exp, storage.load, oid)
                        elif how == 1:
                            cases.check(label, exp, storage.loadBefore,
                                        oid, b'\xff' * 8)
                        else:
                            cases.check(label, exp, storage.loadSerial,
                                        oid, tid)
                    f.seek(at + i)
                    f.write(record[i:i + 1])
            drop_buffers(fs)
            self.assertIn(CANARY, storage.load(oid)[0])   # restored
        cases.done(2 * 8 * 50)

    def test_truncated_at_every_byte_and_appended(self):
        # Each cut or extended record is written as a new revision of the
        # same oid; every revision is read with loadSerial, the last ones
        # with load and loadBefore.
        fs, storage = self.open_copy('one')
        record = fs.load(MAPPING)[0]
        variants = [(n, record[:n]) for n in range(1, len(record))]
        tails = [b'\0', b'\x01' * 16, os.urandom(100), record]
        variants += [(len(record) + len(t), record + t) for t in tails]
        cases = Cases(self)
        tids = []
        for n, data in variants:
            tids.append(self.store_raw(fs, {MAPPING: data}))
        for (n, data), tid in zip(variants, tids):
            exp = envelope_truncated_expected(n, strict_storage=True)
            cases.check('cut/extended to %d' % n, exp, storage.loadSerial,
                        MAPPING, tid)
            cases.check('loadBefore %d' % n, exp, storage.loadBefore,
                        MAPPING, struct.pack('>Q', struct.unpack(
                            '>Q', tid)[0] + 1))
        cases.check('load', X.AuthenticationError, storage.load, MAPPING)
        cases.done(2 * len(record))

    def test_splice_between_oids_and_databases(self):
        fs, storage = self.open_copy('one')
        own = {oid: fs.load(oid)[0] for oid in (MAPPING, OTHER)}
        same = self.raw_record('same', MAPPING)[0]
        other = self.raw_record('other', MAPPING)[0]
        foreign = self.raw_record('foreign', MAPPING)[0]
        cases = Cases(self)
        # another oid of the same database: bound to its oid
        self.store_raw(fs, {MAPPING: own[OTHER], OTHER: own[MAPPING]})
        cases.check('MAPPING <- OTHER', X.AuthenticationError,
                    storage.load, MAPPING)
        cases.check('OTHER <- MAPPING', X.AuthenticationError,
                    storage.load, OTHER)
        # root record, blob records moved onto MAPPING
        for oid in (ROOT, SMALL, LARGE):
            self.store_raw(fs, {MAPPING: self.raw_record('one', oid)[0]})
            cases.check('MAPPING <- %s' % oid.hex(), X.AuthenticationError,
                        storage.load, MAPPING)
        # same oid of a database under another KEK of this vault
        self.store_raw(fs, {MAPPING: other})
        cases.check('other KEK', X.WrongKeyError, storage.load, MAPPING)
        # same oid of a database whose vault is another one
        self.store_raw(fs, {MAPPING: foreign})
        cases.check('other vault', X.UnknownKeyError, storage.load, MAPPING)
        # same oid of another database under the same DEK: accepted, the
        # binding is DEK and oid (docs/security.rst, "What is not
        # protected"); asserted so that a change shows
        self.store_raw(fs, {MAPPING: same})
        state = storage.load(MAPPING)[0]
        self.assertIn(CANARY + b' mapping of same', state)
        cases.done(6)

    def test_dek_id_replayed(self):
        # The 16 byte DEK id of a record replaced by another one.
        fs, storage = self.open_copy('one')
        record = fs.load(MAPPING)[0]
        cases = Cases(self)
        for label, dek_id, exp in (
                ('retired DEK of the same KEK', self.w.dek_a_old,
                 X.AuthenticationError),
                ('DEK of another KEK', self.w.dek_b, X.WrongKeyError),
                ('DEK of another vault', self.w.dek_c, X.UnknownKeyError),
                ('unknown DEK', os.urandom(16).hex(), X.UnknownKeyError)):
            forged = record[:6] + bytes.fromhex(dek_id) + record[22:]
            self.store_raw(fs, {MAPPING: forged})
            cases.check(label, exp, storage.load, MAPPING)
        # the other way round: a record of another database keeps its body
        # and takes our DEK id
        other = self.raw_record('other', MAPPING)[0]
        self.store_raw(fs, {MAPPING: other[:6] + bytes.fromhex(
            self.w.dek_a) + other[22:]})
        cases.check('body of KEK b under DEK a', X.AuthenticationError,
                    storage.load, MAPPING)
        # a data envelope (context 0x00) is not a storage record
        env = self.w.facility.encrypt(self.w.kek_a, b'x' * 40)
        self.store_raw(fs, {MAPPING: env})
        cases.check('data envelope', X.UnsupportedFormatError,
                    storage.load, MAPPING)
        cases.done(6)

    def test_connection_sees_the_same_errors(self):
        # Through ZODB: Connection.get and attribute access.
        fs, storage = self.open_copy('one')
        record = fs.load(MAPPING)[0]
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        cases = Cases(self)
        for label, data, exp in (
                ('flipped tag', flip(record, len(record) - 1, 0),
                 X.AuthenticationError),
                ('cut', record[:40], X.TruncatedDataError),
                ('other oid', fs.load(OTHER)[0], X.AuthenticationError),
                ('plaintext', b'(cpersistent.mapping\nPersistentMapping\n'
                 b'q\x01.}q\x02.', X.NotEncryptedError)):
            self.store_raw(fs, {MAPPING: data})
            conn = db.open()
            try:
                conn.cacheMinimize()

                def read():
                    return dict(conn.get(MAPPING))
                cases.check(label, exp, read)
            finally:
                conn.close()
        cases.done(4)


# -- EncryptedPersistent states (record envelope, context 0x00) ---------------

def replace_bytes_in_pickle(record, old, new):
    """Return ``record`` (a ZODB record: two pickles) with the bytes object
    ``old`` replaced by ``new`` (BINBYTES / SHORT_BINBYTES opcodes)."""
    at = record.find(old)
    assert at > 0
    if record[at - 2] == ord('C') and record[at - 1] == len(old):
        start = at - 2
    elif record[at - 5] == ord('B') and record[at - 4:at] == struct.pack(
            '<I', len(old)):
        start = at - 5
    else:   # pragma: no cover
        raise AssertionError('bytes opcode not found')
    if len(new) < 256:
        op = b'C' + bytes([len(new)])
    else:
        op = b'B' + struct.pack('<I', len(new))
    return record[:start] + op + new + record[at + len(old):]


def state_envelope(record):
    """The envelope inside an EncryptedPersistent record (version 2,
    object state context)."""
    at = record.find(b'.km\x02\x01\x02')
    assert at > 0
    if record[at - 2] == ord('C'):
        return record[at:at + record[at - 1]]
    return record[at:at + struct.unpack('<I', record[at - 4:at])[0]]


class ObjectStateTests(AdversarialBase):
    """States of EncryptedPersistent objects, read with Connection.get."""

    def setUp(self):
        super().setUp()
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        zope.component.provideUtility(self.w.facility)
        zope.component.provideUtility(Holder(self.w.kek_a))

    def open_objects(self):
        d = self.copy_db('objects')
        fs = ZODB.FileStorage.FileStorage(os.path.join(d, 'Data.fs'))
        db = ZODB.DB(fs)
        self.addCleanup(db.close)
        return fs, db

    def _value(self, db, oid):
        conn = db.open()
        try:
            conn.cacheMinimize()
            return conn.get(oid).value
        finally:
            conn.close()

    def test_every_bit_flip_of_the_envelope_in_data_fs(self):
        fs, db = self.open_objects()
        cases = Cases(self)
        for name, oid in sorted(self.w.object_oids.items()):
            record = fs.load(oid)[0]
            env = state_envelope(record)
            with open(fs._file_name, 'rb') as f:
                at = f.read().find(env)
            with open(fs._file_name, 'r+b') as f:
                for i in range(len(env)):
                    for bit in range(8):
                        f.seek(at + i)
                        f.write(bytes([env[i] ^ (1 << bit)]))
                        f.flush()
                        drop_buffers(fs)
                        cases.check('%s byte %d bit %d' % (name, i, bit),
                                    envelope_expected(i, bit),
                                    self._value, db, oid)
                    f.seek(at + i)
                    f.write(env[i:i + 1])
            drop_buffers(fs)
            self.assertEqual(self._value(db, oid), CANARY + b' ' +
                             name.encode())
        cases.done(2 * 8 * 50)

    def test_truncated_extended_spliced_and_dek_id_replayed(self):
        # Variants of the state of "friend" (a tuple state: envelope and a
        # reference), each stored as an object of its own (states are not
        # bound to an oid), read through Connection.get.
        fs, db = self.open_objects()
        oid = self.w.object_oids['friend']
        record = fs.load(oid)[0]
        env = state_envelope(record)
        alone = state_envelope(fs.load(self.w.object_oids['alone'])[0])
        variants = [('cut to %d' % n, env[:n],
                     envelope_truncated_expected(n))
                    for n in range(len(env))]
        variants += [('%d bytes appended' % len(t), env + t,
                      X.AuthenticationError)
                     for t in (b'\0', os.urandom(16), env)]
        for label, dek_id, exp in (
                ('retired DEK', self.w.dek_a_old, X.AuthenticationError),
                ('DEK of KEK b', self.w.dek_b, X.WrongKeyError),
                ('DEK of another vault', self.w.dek_c, X.UnknownKeyError),
                ('unknown DEK', os.urandom(16).hex(), X.UnknownKeyError)):
            variants.append((label, env[:6] + bytes.fromhex(dek_id)
                             + env[22:], exp))
        # a storage record envelope (context 0x01) is not a state
        record_env = self.w.facility.encrypt(self.w.kek_a, b'x' * 40,
                                             oid=oid)
        variants.append(('storage record', record_env,
                         X.UnsupportedFormatError))
        # a state whose reference list is altered: more, fewer references
        stored = {}
        for label, data, exp in variants:
            new = fs.new_oid()
            stored[new] = (label, exp)
            self.store_raw(fs, {new: replace_bytes_in_pickle(
                record, env, data)})
        fs._files.flush()
        cases = Cases(self)
        for new, (label, exp) in stored.items():
            cases.check(label, exp, self._value, db, new)
        # states moved between objects: the reference count is inside the
        # ciphertext, so a state moved to an object with another number of
        # references fails ...
        twin_record = fs.load(self.w.object_oids['twin'])[0]
        twin = state_envelope(twin_record)
        new = fs.new_oid()
        self.store_raw(fs, {new: replace_bytes_in_pickle(record, env,
                                                         alone)})
        cases.check('state without references to friend',
                    X.AuthenticationError, self._value, db, new)
        new = fs.new_oid()
        self.store_raw(fs, {new: replace_bytes_in_pickle(twin_record, twin,
                                                         env)})
        cases.check('state with a reference to twin',
                    X.AuthenticationError, self._value, db, new)
        # ... but a state moved to another object of the same class and
        # shape is accepted (docs/format.rst: context 0x00 binds no oid, so
        # that export and import work; docs/security.rst says so)
        new = fs.new_oid()
        self.store_raw(fs, {new: replace_bytes_in_pickle(twin_record, twin,
                                                         alone)})
        self.assertEqual(self._value(db, new), CANARY + b' alone')
        cases.done(len(env))

    def test_facility_decrypt_every_bit_and_byte(self):
        # The same envelope through facility.decrypt, exhaustively.
        env = self.w.data_envelope
        f = self.w.facility
        cases = Cases(self)
        for i in range(len(env)):
            for bit in range(8):
                cases.check('byte %d bit %d' % (i, bit),
                            envelope_expected(i, bit), f.decrypt,
                            self.w.kek_a, flip(env, i, bit))
        for n in range(len(env)):
            cases.check('cut to %d' % n, envelope_truncated_expected(n),
                        f.decrypt, self.w.kek_a, env[:n])
        cases.check('wrong KEK', X.WrongKeyError, f.decrypt,
                    self.w.kek_b, env)
        cases.check('as storage record', X.UnsupportedFormatError,
                    f.decrypt, self.w.kek_a, env, OIDS[1])
        cases.done(9 * len(env))


# -- the stream format: blob files and encrypted files ------------------------

def stream_expected(i, bit, e, strict_storage=False):
    """The exception of a flipped bit in a stream named by DEK id with the
    chunk size exponent ``e`` (docs/format.rst, "Stream header")."""
    if i < 3:
        return X.NotEncryptedError if strict_storage else \
            X.UnsupportedFormatError
    if i in (3, 4, 6):
        return X.UnsupportedFormatError   # version, suite, key kind
    if i == 5:
        # another valid exponent is another header: another payload key
        return X.AuthenticationError if 6 <= e ^ (1 << bit) <= 24 else \
            X.UnsupportedFormatError
    if 23 <= i < 39:
        return X.UnknownKeyError          # the DEK id
    return X.AuthenticationError          # salt, chunks


def stream_truncated_expected(n, chunk, strict_storage=False):
    """The exception of a stream (DEK id kind) cut to ``n`` bytes."""
    if strict_storage and n < 3:
        return X.NotEncryptedError
    if n <= 39:
        return X.TruncatedDataError
    rest = (n - 39) % (chunk + 16)
    if rest == 0 or rest < 16:
        return X.TruncatedDataError       # at a chunk boundary, in a tag
    return X.AuthenticationError


def chunks(stream, chunk, header=39):
    body = stream[header:]
    size = chunk + 16
    return stream[:header], [body[i:i + size]
                             for i in range(0, len(body), size)]


class BlobFileTests(AdversarialBase):
    """Blob files of EncryptingStorage (streams bound to their oid)."""

    def blob_file(self, fs, oid):
        name = fs.loadBlob(oid, fs.load(oid)[1])
        os.chmod(name, 0o600)
        return name

    def read_blob(self, storage, oid, how):
        serial = storage.base.load(oid)[1]
        try:
            if how:
                with open(storage.loadBlob(oid, serial), 'rb') as f:
                    return f.read()
            with storage.openCommittedBlobFile(oid, serial) as f:
                return f.read()
        finally:
            transaction.abort()

    def test_every_bit_flip_of_a_small_blob_file(self):
        fs, storage = self.open_copy('one')
        name = self.blob_file(fs, SMALL)
        with open(name, 'rb') as f:
            good = f.read()
        cases = Cases(self)
        # every bit of the header and of the tag, one bit of every other
        # byte (every bit of every byte: FileStreamTests, through
        # decrypt_file; a blob read costs a temporary file)
        for i in range(len(good)):
            bits = range(8) if i < 39 or i >= len(good) - 16 else [i % 8]
            for bit in bits:
                with open(name, 'wb') as f:
                    f.write(flip(good, i, bit))
                cases.check('byte %d bit %d' % (i, bit),
                            stream_expected(i, bit, 16, True),
                            self.read_blob, storage, SMALL, bit % 2)
        with open(name, 'wb') as f:
            f.write(good)
        self.assertEqual(self.read_blob(storage, SMALL, 1), SMALL_BLOB)
        cases.done(len(SMALL_BLOB) + 55 * 7)

    def test_small_blob_truncated_and_extended(self):
        fs, storage = self.open_copy('one')
        name = self.blob_file(fs, SMALL)
        with open(name, 'rb') as f:
            good = f.read()
        cases = Cases(self)
        variants = [(n, good[:n]) for n in range(len(good))]
        variants += [(None, good + t) for t in (b'\0', os.urandom(16),
                                                good[39:])]
        for n, data in variants:
            with open(name, 'wb') as f:
                f.write(data)
            exp = (X.AuthenticationError if n is None
                   else stream_truncated_expected(n, 65536, True))
            cases.check('%s bytes' % len(data), exp, self.read_blob,
                        storage, SMALL, len(data) % 2)
        cases.done(len(good))

    def test_large_blob_chunks_and_sampled_bits(self):
        fs, storage = self.open_copy('one')
        name = self.blob_file(fs, LARGE)
        with open(name, 'rb') as f:
            good = f.read()
        header, parts = chunks(good, 65536)
        self.assertEqual(len(parts), 3)
        other = self.blob_file(fs, SMALL)
        with open(other, 'rb') as f:
            other_parts = chunks(f.read(), 65536)[1]
        cases = Cases(self)

        def attempt(label, data, exp):
            with open(name, 'wb') as f:
                f.write(data)
            cases.check(label, exp, self.read_blob, storage, LARGE,
                        cases.count % 2)

        a, b, c = parts
        for label, body, exp in (
                ('chunk 0 dropped', b + c, X.AuthenticationError),
                ('chunk 1 dropped', a + c, X.AuthenticationError),
                ('last chunk dropped', a + b, X.TruncatedDataError),
                ('chunk 0 twice', a + a + b + c, X.AuthenticationError),
                ('chunk 1 twice', a + b + b + c, X.AuthenticationError),
                ('last chunk twice', a + b + c + c, X.AuthenticationError),
                ('chunks 0 and 1 swapped', b + a + c, X.AuthenticationError),
                ('chunks 1 and 2 swapped', a + c + b, X.AuthenticationError),
                ('last chunk of another blob', a + b + other_parts[-1],
                 X.AuthenticationError),
                ('only the last chunk', c, X.AuthenticationError),
                ('cut inside chunk 1', a + b[:1000], X.AuthenticationError),
                ('cut in the last tag', a + b + c[:10],
                 X.TruncatedDataError)):
            attempt(label, header + body, exp)
        # bits: the whole header, both ends of every chunk, and a sample
        rng = random.Random(9)
        positions = set(range(80))
        for k in range(3):
            start = 39 + k * (65536 + 16)
            positions.update(range(start, start + 24))
            positions.update(range(min(start + 65552, len(good)) - 24,
                                   min(start + 65552, len(good))))
        positions.update(rng.sample(range(len(good)), 120))
        for i in sorted(positions):
            bit = rng.randrange(8)
            attempt('byte %d bit %d' % (i, bit), flip(good, i, bit),
                    stream_expected(i, bit, 16, True))
        attempt('restored', good, LARGE_BLOB)
        cases.done(200)

    def test_blob_files_spliced_between_oids_and_databases(self):
        fs, storage = self.open_copy('one')
        name = self.blob_file(fs, SMALL)
        cases = Cases(self)

        def source(db, oid):
            f = self.w.open_fs(db, read_only=True)
            try:
                with open(f.loadBlob(oid, f.load(oid)[1]), 'rb') as g:
                    return g.read()
            finally:
                f.close()

        for label, data, exp in (
                ('large blob of the same database', source('one', LARGE),
                 X.AuthenticationError),
                ('same oid, database under KEK b', source('other', SMALL),
                 X.WrongKeyError),
                ('same oid, database of another vault',
                 source('foreign', SMALL), X.UnknownKeyError),
                ('an encrypted file (not bound to an oid)',
                 self.w.file_stream, X.AuthenticationError),
                ('plaintext', SMALL_BLOB, X.NotEncryptedError)):
            with open(name, 'wb') as f:
                f.write(data)
            cases.check(label, exp, self.read_blob, storage, SMALL, 1)
        # same oid of a database under the same DEK: accepted (documented)
        with open(name, 'wb') as f:
            f.write(source('same', SMALL))
        self.assertEqual(self.read_blob(storage, SMALL, 0), SMALL_BLOB)
        cases.done(5)

    def test_failed_blob_reads_leave_no_plaintext(self):
        fs, storage = self.open_copy('one')
        name = self.blob_file(fs, SMALL)
        with open(name, 'rb') as f:
            good = f.read()
        with open(name, 'wb') as f:
            f.write(flip(good, len(good) - 1, 0))
        serial = fs.load(SMALL)[1]
        for _ in range(2):
            with self.assertRaises(X.AuthenticationError):
                storage.loadBlob(SMALL, serial)
            with self.assertRaises(X.AuthenticationError):
                storage.openCommittedBlobFile(SMALL, serial)
        private = storage._copies.path
        self.assertEqual(os.listdir(private) if private else [], [])


class FileStreamTests(AdversarialBase):
    """Files encrypted by facility.encrypt_file, 64 byte chunks."""

    def decrypt(self, data, key=None, out=None):
        out = io.BytesIO() if out is None else out
        self.w.facility.decrypt_file(key or self.w.kek_a, io.BytesIO(data),
                                     out)
        return out.getvalue()

    def test_every_bit_flip(self):
        good = self.w.file_stream
        self.assertEqual(self.decrypt(good), FILE_PLAIN)
        cases = Cases(self)
        size = FILE_CHUNK + 16
        for i in range(len(good)):
            for bit in range(8):
                out = io.BytesIO()
                cases.check('byte %d bit %d' % (i, bit),
                            stream_expected(i, bit, 6), self.decrypt,
                            flip(good, i, bit), out=out)
                # what a streaming reader released before the failure:
                # only whole chunks before the altered one
                released = out.getvalue()
                limit = max(0, (i - 39) // size) * FILE_CHUNK
                if (released != FILE_PLAIN[:len(released)]
                        or len(released) % FILE_CHUNK
                        or len(released) > limit):
                    cases.bad.append('byte %d bit %d: released %d bytes'
                                     % (i, bit, len(released)))
        cases.done(8 * len(good))

    def test_truncated_appended_and_chunks_moved(self):
        good = self.w.file_stream
        header, parts = chunks(good, FILE_CHUNK)
        self.assertEqual(len(parts), 5)
        other = chunks(self.w.file_stream2, FILE_CHUNK)[1]
        cases = Cases(self)
        for n in range(len(good)):
            cases.check('cut to %d' % n,
                        stream_truncated_expected(n, FILE_CHUNK),
                        self.decrypt, good[:n])
        for t in (b'\0', os.urandom(20), parts[-1], parts[0]):
            cases.check('%d bytes appended' % len(t),
                        X.AuthenticationError, self.decrypt, good + t)
        for k in range(len(parts)):
            rest = parts[:k] + parts[k + 1:]
            cases.check('chunk %d dropped' % k,
                        X.TruncatedDataError if k == len(parts) - 1
                        else X.AuthenticationError,
                        self.decrypt, header + b''.join(rest))
            dup = parts[:k + 1] + parts[k:]
            cases.check('chunk %d twice' % k, X.AuthenticationError,
                        self.decrypt, header + b''.join(dup))
            swapped = list(parts)
            j = (k + 1) % len(parts)
            swapped[k], swapped[j] = swapped[j], swapped[k]
            cases.check('chunks %d and %d swapped' % (k, j),
                        X.AuthenticationError, self.decrypt,
                        header + b''.join(swapped))
            mixed = list(parts)
            mixed[k] = other[k]
            cases.check('chunk %d of another stream' % k,
                        X.AuthenticationError, self.decrypt,
                        header + b''.join(mixed))
        # the header of the other stream (other salt) on these chunks
        cases.check('other header', X.AuthenticationError, self.decrypt,
                    self.w.file_stream2[:39] + b''.join(parts))
        # DEK id replayed in the header
        for label, dek_id, exp in (
                ('retired DEK', self.w.dek_a_old, X.AuthenticationError),
                ('DEK of KEK b', self.w.dek_b, X.WrongKeyError),
                ('unknown DEK', self.w.dek_c, X.UnknownKeyError)):
            cases.check(label, exp, self.decrypt,
                        good[:23] + bytes.fromhex(dek_id) + good[39:])
        cases.check('wrong KEK', X.WrongKeyError, self.decrypt, good,
                    self.w.kek_b)
        cases.done(len(good) + 20)

    def test_atomic_output_leaves_no_file(self):
        # zodbkmi.files (the CLI's decrypt-file) writes all or nothing.
        from zodbkmi.files import transform
        good = self.w.file_stream
        source = os.path.join(self.tmp, 'in.zks')
        target = os.path.join(self.tmp, 'out')
        rng = random.Random(3)
        for i in sorted(rng.sample(range(39, len(good)), 40)):
            with open(source, 'wb') as f:
                f.write(flip(good, i, rng.randrange(8)))
            with self.assertRaises(X.AuthenticationError):
                with transform(lambda s, d: self.w.facility.decrypt_file(
                        self.w.kek_a, s, d), source, target):
                    pass
            self.assertEqual(sorted(os.listdir(self.tmp)), ['in.zks'])


# -- wrapped DEKs in vault entries -------------------------------------------

def _wrapped_header_size(data):
    """The size of the header of the wrapped DEK ``data`` (any version)."""
    from zodbkmi.format import wrapped
    return len(wrapped.parse(data).header)


class KeyStoreEntryTests(AdversarialBase):
    """Vault entries (JSON files) and the wrapped DEKs inside them, read
    by a fresh facility on a copy of the key directory."""

    def setUp(self):
        super().setUp()
        self.keys = os.path.join(self.tmp, 'keys')
        shutil.copytree(self.w.keys, self.keys)
        self.entry_path = os.path.join(self.keys, self.w.dek_a + '.dek')
        with open(self.entry_path, 'rb') as f:
            self.entry = f.read()
        self.doc = json.loads(self.entry)
        self.wrapped = base64.b64decode(self.doc['wrapped'])
        self.envelope = self.w.data_envelope

    def write_entry(self, data, name=None):
        path = os.path.join(self.keys, (name or self.w.dek_a) + '.dek')
        tmp = path + '.new'
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)

    def write_doc(self, **changes):
        doc = dict(self.doc, **changes)
        self.write_entry(json.dumps(doc, sort_keys=True).encode('ascii'))

    def decrypt(self, key=None):
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(self.keys)
        return facility.decrypt(key or self.w.kek_a, self.envelope)

    def plain(self):
        return self.w.facility.decrypt(self.w.kek_a, self.envelope)

    def test_every_bit_flip_of_the_wrapped_dek(self):
        w = self.wrapped
        header = _wrapped_header_size(w)
        cases = Cases(self)
        for i in range(len(w)):
            for bit in range(8):
                if i < 4 or 5 <= i < header:
                    exp = X.KeyStoreError     # rules 1-7 of Unwrapping, 10
                elif i == 4:
                    exp = (X.WrongKeyError
                           if w[4] ^ (1 << bit) in wrappedmod.SUITES
                           else X.KeyStoreError)   # another known suite
                else:
                    exp = X.AuthenticationError    # the AES-GCM wrapping
                self.write_doc(wrapped=base64.b64encode(
                    flip(w, i, bit)).decode())
                cases.check('byte %d bit %d' % (i, bit), exp, self.decrypt)
        cases.done(8 * len(w))

    def test_wrapped_dek_truncated_and_extended(self):
        w = self.wrapped
        header = _wrapped_header_size(w)
        cases = Cases(self)
        for n in range(len(w)):
            self.write_doc(wrapped=base64.b64encode(w[:n]).decode())
            cases.check('cut to %d' % n, X.KeyStoreError if n <= header
                        else X.TruncatedDataError, self.decrypt)
        for t in (b'\0', os.urandom(16)):
            self.write_doc(wrapped=base64.b64encode(w + t).decode())
            cases.check('%d appended' % len(t), X.AuthenticationError,
                        self.decrypt)
        cases.done(len(w))

    def test_every_bit_flip_of_the_entry_file(self):
        # Any change to the JSON is refused (KeyStoreError), except changes
        # that leave the wrapped DEK as it was (white space, the unused
        # bits of the base64): those decrypt correctly.  (The state is not
        # authenticated but a flipped bit makes it an unknown state.)  A
        # change of the wrapped DEK is judged by the rules of the previous
        # test.
        e = self.entry
        plain = self.plain()
        cases = Cases(self)
        for i in range(len(e)):
            for bit in range(8):
                data = flip(e, i, bit)
                exp = self.entry_expected(data, plain)
                if exp is None:
                    continue   # a header change: previous test
                self.write_entry(data)
                cases.check('byte %d bit %d' % (i, bit), exp, self.decrypt)
        cases.done(4 * len(e))

    def entry_expected(self, data, plain):
        try:
            doc = json.loads(data)
        except ValueError:
            return X.KeyStoreError
        if not isinstance(doc, dict):
            return X.KeyStoreError
        changed = {k for k in set(doc) | set(self.doc)
                   if doc.get(k, KeyError) != self.doc.get(k, KeyError)}
        if not changed:
            return plain
        if changed == {'created'}:
            # version 2: the wrapped DEK authenticates the creation time,
            # and the entry's must be the same
            return X.KeyStoreError
        if changed != {'wrapped'}:
            return X.KeyStoreError
        try:
            decoded = base64.b64decode(doc['wrapped'], validate=True)
        except (ValueError, TypeError):
            return X.KeyStoreError
        if decoded == self.wrapped:
            return plain
        if len(decoded) != len(self.wrapped):
            return None
        first = min(k for k in range(len(decoded))
                    if decoded[k] != self.wrapped[k])
        if first >= _wrapped_header_size(self.wrapped):
            return X.AuthenticationError
        return None

    def test_entries_spliced(self):
        with open(os.path.join(self.keys, self.w.dek_b + '.dek'),
                  'rb') as f:
            b_entry = json.loads(f.read())
        b_wrapped = base64.b64decode(b_entry['wrapped'])
        cases = Cases(self)
        for label, changes, key, exp in (
                ('wrapped DEK of key b in entry a',
                 {'wrapped': b_entry['wrapped']}, None, X.KeyStoreError),
                ('kek_id of b', {'kek_id': b_entry['kek_id']}, None,
                 X.KeyStoreError),
                ('dek_id of b', {'dek_id': self.w.dek_b}, None,
                 X.KeyStoreError),
                ('entry b under the name of a', b_entry, None,
                 X.KeyStoreError),
                ('unknown state', {'state': 'destroyed'}, None,
                 X.KeyStoreError),
                ('version 1', {'version': 1}, None, X.KeyStoreError),
                ('version 3', {'version': 3}, None, X.KeyStoreError),
                ('other format', {'format': 'x'}, None, X.KeyStoreError),
                ('created not a number', {'created': 'now'}, None,
                 X.KeyStoreError),
                ('wrapped not base64', {'wrapped': '*'}, None,
                 X.KeyStoreError),
                ('retired: still decrypts', {'state': 'retired'}, None,
                 self.plain())):
            self.write_doc(**changes)
            cases.check(label, exp, self.decrypt)
        # the wrapping of DEK b under a header naming DEK a (consistent
        # entry): to KEK a it is KEK b's work; to KEK b it was moved
        forged = (b_wrapped[:5] + bytes.fromhex(self.w.dek_a)
                  + b_wrapped[21:])
        self.write_doc(wrapped=base64.b64encode(forged).decode(),
                       kek_id=b_entry['kek_id'], created=b_entry['created'])
        cases.check('b moved to DEK a, KEK a', X.WrongKeyError, self.decrypt)
        cases.check('b moved to DEK a, KEK b', X.AuthenticationError,
                    self.decrypt, self.w.kek_b)
        # the wrapping of DEK a under a header naming KEK b
        kb = b_entry['kek_id'].encode()
        forged = (self.wrapped[:29] + bytes([len(kb)]) + kb
                  + self.wrapped[_wrapped_header_size(self.wrapped):])
        self.write_doc(wrapped=base64.b64encode(forged).decode(),
                       kek_id=b_entry['kek_id'])
        cases.check('a relabelled KEK b, KEK b', X.AuthenticationError,
                    self.decrypt, self.w.kek_b)
        cases.check('a relabelled KEK b, KEK a', X.WrongKeyError,
                    self.decrypt)
        # the entry removed: the key is unknown
        os.remove(self.entry_path)
        cases.check('entry removed', X.UnknownKeyError, self.decrypt)
        cases.done(15)


# -- key files ----------------------------------------------------------------

class KeyFileTests(AdversarialBase):
    """KEK files (KeyHolder) and key source files, altered on disk: a key
    file is not authenticated, so an altered file is either refused or is
    another key, which opens nothing."""

    def setUp(self):
        super().setUp()
        from zodbkmi.keyholder import write_key_file
        self.path = os.path.join(self.tmp, 'kek')
        write_key_file(self.path, self.w.kek_a)
        with open(self.path, 'rb') as f:
            self.good = f.read()
        self.plain = self.w.facility.decrypt(self.w.kek_a,
                                             self.w.data_envelope)

    def write(self, data):
        with open(self.path, 'wb') as f:
            f.write(data)
        os.chmod(self.path, 0o600)

    def use_holder(self):
        from zodbkmi.keyholder import KeyHolder
        return self.w.facility.decrypt(KeyHolder(self.path).key,
                                       self.w.data_envelope)

    def use_source(self):
        from zodbkmi.sources.local import file_key
        return self.w.facility.decrypt(file_key({'path': self.path}),
                                       self.w.data_envelope)

    def expected(self, data, canonical):
        """The outcome of a key file holding ``data``."""
        text = data.strip()
        try:
            key = base64.b64decode(text, validate=True)
        except ValueError:
            return X.InvalidKeyError
        if len(key) != 32:
            return X.InvalidKeyError
        if canonical and base64.b64encode(key) != text:
            return X.InvalidKeyError
        return self.plain if key == self.w.kek_a else X.WrongKeyError

    def test_every_bit_flip_and_truncation_of_a_kek_file(self):
        cases = Cases(self)
        for use, canonical in ((self.use_holder, False),
                               (self.use_source, True)):
            for i in range(len(self.good)):
                for bit in range(8):
                    data = flip(self.good, i, bit)
                    self.write(data)
                    cases.check('%s byte %d bit %d' % (use.__name__, i, bit),
                                self.expected(data, canonical), use)
            for n in range(len(self.good)):
                self.write(self.good[:n])
                cases.check('%s cut to %d' % (use.__name__, n),
                            self.expected(self.good[:n], canonical), use)
        cases.done(2 * 9 * 44)

    def test_key_file_readable_by_others_is_refused(self):
        self.write(self.good)
        cases = Cases(self)
        # SecretFileError: the one secret file reader's error, both a
        # KeyStoreError (key holders) and a KeySourceError (key sources)
        self.assertTrue(issubclass(X.SecretFileError, X.KeyStoreError))
        self.assertTrue(issubclass(X.SecretFileError, X.KeySourceError))
        for mode in (0o640, 0o604, 0o620, 0o610, 0o602):
            os.chmod(self.path, mode)
            cases.check('holder %o' % mode, X.SecretFileError,
                        self.use_holder)
            cases.check('source %o' % mode, X.SecretFileError,
                        self.use_source)
        cases.done(10)

    def test_check_value_refuses_another_key(self):
        from zodbkmi.sources.local import file_key, key_check_value
        kcv = key_check_value(self.w.kek_a)
        cases = Cases(self)
        for i in range(43):   # the base64 characters of the key
            data = flip(self.good, i, 0)
            self.write(data)
            exp = self.expected(data, True)
            if exp is X.WrongKeyError:
                exp = X.InvalidKeyError   # refused at once
            cases.check('byte %d' % i, exp, file_key,
                        {'path': self.path, 'checkValue': kcv})
        cases.done(43)

    def test_sampled_bit_flips_of_an_rsa_pem_key_file(self):
        from tests.test_wrapped import rsa_kek
        from zodbkmi.keyholder import KeyHolder
        from zodbkmi.kek import as_kek
        pem = rsa_kek().private_pem()
        kek_id = as_kek(pem).key_id
        rng = random.Random(5)
        cases = Cases(self)   # few: loading an RSA key checks it (slow)
        for i in sorted(rng.sample(range(len(pem)), 16)):
            self.write(flip(pem, i, rng.randrange(8)))

            try:
                holder = KeyHolder(self.path)
            except Exception as e:
                if rejected_as(e) is not X.InvalidKeyError:
                    cases.bad.append('byte %d: %s' % (i, type(e).__name__))
            else:
                # an accepted file must hold the same key
                if holder.key_id != kek_id:
                    cases.bad.append('byte %d: another key accepted' % i)
            cases.count += 1
        cases.done(16)


# -- the hybrid KEK (ML-KEM-768 + X25519 through HPKE) ------------------------

def _hybrid_kek_id_expected(data, at):
    """The error of a wrapped DEK whose KEK id length byte sits at ``at``
    and whose KEK id differs from the KEK's."""
    n = data[at]
    if n == 0:
        return X.UnsupportedFormatError
    if len(data) <= at + 1 + n:
        return X.TruncatedDataError
    try:
        data[at + 1:at + 1 + n].decode('ascii')
    except UnicodeDecodeError:
        return X.UnsupportedFormatError
    return X.WrongKeyError


class _HybridBase(unittest.TestCase):
    """A hybrid KEK and a DEK it wrapped in both versions."""

    def setUp(self):
        from zodbkmi.format import wrapped
        from zodbkmi.kek import HybridKeyEncryptingKey
        self.kek = HybridKeyEncryptingKey.generate()
        self.dek_id, self.dek = os.urandom(16), os.urandom(32)
        self.v2 = wrapped.wrap(self.kek, self.dek_id, self.dek)
        self.v1 = wrapped.wrap(self.kek.public(), self.dek_id, self.dek,
                               version=wrapped.VERSION_1)
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-adv-hybrid-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def unwrap(self, data):
        from zodbkmi.format import wrapped
        return wrapped.unwrap(self.kek, data)[1]

    def flip_expected(self, w, i, bit):
        """The error of ``w`` with bit ``bit`` of byte ``i`` flipped."""
        header = _wrapped_header_size(w)
        at = 29 if w[3] == 2 else 21
        if i < 3:
            return X.UnsupportedFormatError       # magic
        if i == 3:
            return X.UnsupportedFormatError       # no version 0, 3, 5, 6...
        if i == 4:                                # another suite: 1 or 4
            return (X.WrongKeyError if w[4] ^ (1 << bit) in (1, 4)
                    else X.UnsupportedFormatError)
        if at <= i < header:
            return _hybrid_kek_id_expected(flip(w, i, bit), at)
        return X.AuthenticationError  # DEK id, created, HPKE, MAC

    def sweep(self, name, w, bits=range(8), cases=None):
        cases = cases or Cases(self)
        self.assertEqual(self.unwrap(w), self.dek)
        for i in range(len(w)):
            for bit in (bits if bits is not None else (i % 8,)):
                cases.check('%s byte %d bit %d' % (name, i, bit),
                            self.flip_expected(w, i, bit), self.unwrap,
                            flip(w, i, bit))
        return cases


class HybridTests(_HybridBase):
    """The hybrid KEK's wrapped DEKs (both versions), its key store entry
    on disk and its key files: every bit flip and every truncation is
    rejected with the error docs/format.rst names, never opened as another
    DEK or read as another key."""

    def test_every_bit_flip_of_version_2(self):
        # the MAC is checked first: cheap, so every bit here
        self.sweep('v2', self.v2).done(8 * len(self.v2))

    def test_a_bit_flip_in_every_byte_of_version_1(self):
        # one HPKE decapsulation per case: every byte here, every bit at
        # level 2 (HybridSweepTests)
        self.sweep('v1', self.v1, None).done(len(self.v1))

    def test_truncated_and_extended(self):
        from zodbkmi.format import wrapped
        cases = Cases(self)
        for name, w in (('v2', self.v2), ('v1', self.v1)):
            for n in range(len(w)):
                cases.check('%s cut to %d' % (name, n), X.TruncatedDataError,
                            self.unwrap, w[:n])
            for t in (b'\0', os.urandom(32)):
                cases.check('%s + %d' % (name, len(t)),
                            X.AuthenticationError, self.unwrap, w + t)
        # a version 2 header on the public key's version 1 wrapping: the
        # MAC is missing (what a holder of the public key alone could make)
        hv1 = _wrapped_header_size(self.v1)
        forged = wrapped.build_header(5, self.dek_id, self.kek.key_id)
        cases.check('v1 wrapping under a v2 header', X.TruncatedDataError,
                    self.unwrap, forged + self.v1[hv1:])
        cases.check('v1 wrapping + 32 bytes under a v2 header',
                    X.AuthenticationError, self.unwrap,
                    forged + self.v1[hv1:] + os.urandom(32))
        cases.done(len(self.v1) + len(self.v2))

    def test_key_store_entry_on_disk_truncated_and_flipped(self):
        from zodbkmi.facility import KeyManagementFacility
        keys = os.path.join(self.tmp, 'keys')
        facility = KeyManagementFacility(keys)
        dek_id = facility.create_key(self.kek)
        envelope = facility.encrypt(self.kek, CANARY)
        path = os.path.join(keys, dek_id + '.dek')
        with open(path, 'rb') as f:
            doc = json.loads(f.read())
        w = base64.b64decode(doc['wrapped'])
        header = _wrapped_header_size(w)

        def write(data):
            with open(path + '.new', 'w') as f:
                f.write(json.dumps(dict(doc, wrapped=base64.b64encode(
                    data).decode()), sort_keys=True))
            os.replace(path + '.new', path)

        def decrypt():
            return KeyManagementFacility(keys).decrypt(self.kek, envelope)

        cases = Cases(self)
        cases.check('as written', CANARY, decrypt)
        for n in range(0, len(w), 7):
            write(w[:n])
            cases.check('cut to %d' % n, X.KeyStoreError if n <= header
                        else X.TruncatedDataError, decrypt)
        for i in range(header, len(w), 5):
            write(flip(w, i, i % 8))
            cases.check('byte %d' % i, X.AuthenticationError, decrypt)
        cases.done(len(range(0, len(w), 7)) + len(range(header, len(w), 5)))

    def _key_file_cases(self, good, read, cases, name, cut=None):
        canonical = good.strip()
        cut = cut or read
        for i in range(len(good)):
            for bit in range(8):
                data = flip(good, i, bit)
                same = data.replace(b'\r\n', b'\n').strip() == canonical
                # the same key (white space only), or refused: never
                # another key
                cases.check('%s byte %d bit %d' % (name, i, bit),
                            self.kek.key_id.encode() if same
                            else X.InvalidKeyError, read, data)
        for n in range(len(good)):
            same = good[:n].strip() == canonical
            cases.check('%s cut to %d' % (name, n),
                        self.kek.key_id.encode() if same
                        else X.InvalidKeyError, cut, good[:n])

    def test_every_bit_flip_and_truncation_of_the_key_files(self):
        from zodbkmi.kek import HybridPublicKeyEncryptingKey
        from zodbkmi.kek import as_kek
        from zodbkmi.keyholder import KeyHolder
        path = os.path.join(self.tmp, 'kek')

        def holder(data):
            with open(path, 'wb') as f:
                f.write(data)
            os.chmod(path, 0o600)
            return KeyHolder(path).key_id.encode()

        def public(data):
            return HybridPublicKeyEncryptingKey.from_pem(data).key_id.encode()

        def private(data):
            return as_kek(data).key_id.encode()

        cases = Cases(self)
        private_pem, public_pem = self.kek.private_pem(), self.kek.public_pem()
        # the bit flips through as_kek (the key holder's parser, without
        # writing 2000 files), every truncation through a file on disk
        self._key_file_cases(private_pem, private, cases, 'private', holder)
        self._key_file_cases(public_pem, public, cases, 'public')
        cases.done(9 * (len(private_pem) + len(public_pem)))
        # never a key byte in an error
        secret = base64.b64encode(self.kek._secret()[:24])
        for data in (private_pem[:150], flip(private_pem, 100, 1)):
            try:
                holder(data)
            except X.InvalidKeyError as e:
                self.assertNotIn(secret[:16].decode(), str(e))
                self.assertEqual(len(str(e).splitlines()), 1)


class HybridSweepTests(_HybridBase):
    """Every bit of a version 1 hybrid wrapped DEK (the HPKE ciphertext a
    ``--recipient`` stream embeds): ~10000 decapsulations, level 2."""

    level = 2

    def test_every_bit_flip_of_version_1(self):
        self.sweep('v1', self.v1).done(8 * len(self.v1))
