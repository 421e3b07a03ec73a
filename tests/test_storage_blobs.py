"""Blobs through EncryptingStorage behave as on plain ZODB (issue #17).

Defect 1: a blob read in one transaction of a pooled connection, then
opened ``'a'`` or ``'r+'`` in a later one, failed with FileNotFoundError
(the plaintext copy its ``_p_blob_committed`` names was removed at the end
of the first transaction).  :class:`MatrixTests` runs every sequence of
blob operations of the matrix (each open mode and ``committed()``, in the
first and in a later transaction, savepoints, abort, a pooled connection
reused, historical connections, the default and explicit transaction
managers) on the plain storage and through the wrapper, and compares what
they give: FileStorage with a blob directory, ZODB's ``BlobStorage`` proxy
around a FileStorage, ZEO (shared blob directory or not) and RelStorage on
PostgreSQL.

Defect 2: a blob being written lived in plaintext in the base storage's
``blob_dir/tmp``.  :class:`UncommittedTests` checks that it lives in the
wrapper's private directory only, and that what a killed process leaves
there is swept when the next storage opens.

:class:`CacheTests` checks the cache of plaintext copies of repeated loads
(:mod:`zodbkmi.storage.blobcache`).
"""
import os
import signal
import stat
import subprocess
import sys
import unittest
import uuid

import transaction
import ZODB.blob
import ZODB.interfaces
import ZODB.MappingStorage
from ZODB.POSException import POSError
from ZODB.utils import p64
from ZODB.utils import u64

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres
from tests.storage_support import read_blob
from tests.test_storage_stacking import CANARY
from tests.test_storage_stacking import _Stack
from tests.test_storage_stacking import files_under
from zodbkmi.storage import PRIVATE_PREFIX
from zodbkmi.storage import EncryptingStorage
from zodbkmi.storage import blobcache

FIRST = CANARY + b' first revision'
SECOND = CANARY + b' second revision'

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the sequences of the matrix ---------------------------------------------
#
# Each sequence works on a database whose root holds a blob 'b' (FIRST)
# and returns what it observed: bytes read, and the names of exceptions.

def _do(blob, op):
    """One operation on ``blob``: what it gives."""
    try:
        if op == 'r':
            with blob.open('r') as f:
                return f.read()
        if op == 'c':
            with blob.open('c') as f:
                return f.read()
        if op == 'committed':
            with open(blob.committed(), 'rb') as f:
                return f.read()
        if op == 'w':
            with blob.open('w') as f:
                f.write(b'written')
            return 'ok'
        if op == 'a':
            with blob.open('a') as f:
                f.write(b' appended')
            return 'ok'
        if op == 'r+':
            with blob.open('r+') as f:
                data = f.read()
                f.seek(0)
                f.write(b'R')
            return data
    except (POSError, ZODB.interfaces.BlobError, OSError) as e:
        return type(e).__name__
    raise AssertionError(op)


def _read_back(db, key='b'):
    with db.transaction() as conn:
        with conn.root()[key].open() as f:
            return f.read()


def _outcome(tm):
    try:
        tm.commit()
        return 'committed'
    except Exception as e:
        tm.abort()
        return type(e).__name__


OPS = ('r', 'c', 'committed', 'w', 'a', 'r+')


def seq_first(db, key, op, explicit):
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm)
    seen = [_do(conn.root()[key], op), _outcome(tm)]
    conn.close()
    return seen + [_read_back(db, key)]


def seq_later(db, key, op, explicit):
    # defect 1: read in one transaction, op in a later one
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm)
    seen = [_do(conn.root()[key], 'r'), _outcome(tm)]
    tm.begin()
    seen += [_do(conn.root()[key], op), _outcome(tm)]
    tm.begin()
    seen += [_do(conn.root()[key], 'committed'), _do(conn.root()[key], op),
             _outcome(tm)]
    conn.close()
    return seen + [_read_back(db, key)]


def seq_pooled(db, key, op, explicit):
    # read, close (to the pool), open again: the same connection
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm)
    seen = [_do(conn.root()[key], 'committed'), _do(conn.root()[key], 'r')]
    tm.commit()
    conn.close()
    tm.begin()
    again = db.open(tm)
    seen += [again is conn, _do(again.root()[key], op), _outcome(tm)]
    again.close()
    return seen + [_read_back(db, key)]


def seq_savepoint(db, key, op, explicit):
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm)
    blob = conn.root()[key]
    seen = [_do(blob, 'r'), _outcome(tm)]
    tm.begin()
    seen.append(_do(blob, 'a'))
    sp = tm.savepoint()
    seen += [_do(blob, 'r'), _do(blob, op)]
    sp2 = tm.savepoint()
    seen.append(_do(blob, 'r'))
    sp2.rollback()
    seen.append(_do(blob, 'r'))
    sp.rollback()
    seen += [_do(blob, 'r'), _do(blob, op), _outcome(tm)]
    tm.begin()
    seen += [_do(blob, 'r'), _do(blob, 'a'), _outcome(tm)]
    conn.close()
    return seen + [_read_back(db, key)]


def seq_abort(db, key, op, explicit):
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm)
    blob = conn.root()[key]
    seen = [_do(blob, 'r'), _do(blob, op)]
    tm.abort()
    tm.begin()
    seen += [_do(blob, 'r'), _do(blob, op)]
    tm.abort()
    tm.begin()
    seen += [_do(blob, op), _outcome(tm)]
    conn.close()
    return seen + [_read_back(db, key)]


def seq_open_reader(db, key, op, explicit):
    # a file opened for reading in one transaction, read after it ends
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm)
    blob = conn.root()[key]
    f = blob.open('r')
    seen = [f.read(5), _outcome(tm)]
    tm.begin()
    seen += [f.read(), _outcome(tm)]
    tm.begin()
    seen.append(f.read())
    f.close()
    seen += [_outcome(tm)]
    tm.begin()
    seen += [_do(blob, op), _outcome(tm)]
    conn.close()
    return seen + [_read_back(db, key)]


def seq_default_manager(db, key, op, explicit):
    # the thread's default transaction manager, as most applications
    conn = db.open()
    blob = conn.root()[key]
    seen = [_do(blob, 'r')]
    transaction.commit()
    seen += [_do(blob, op)]
    transaction.commit()
    seen += [_do(blob, 'committed')]
    transaction.abort()
    seen += [_do(blob, op)]
    transaction.commit()
    conn.close()
    return seen + [_read_back(db, key)]


def seq_historical(db, key, op, explicit):
    with db.transaction() as conn:
        with conn.root()[key].open('w') as f:
            f.write(SECOND)
    with db.transaction() as conn:
        # just after the second revision (RelStorage's lastTransaction()
        # may lag behind)
        before = p64(u64(conn.root()[key]._p_serial) + 1)
        with conn.root()[key].open('a') as f:
            f.write(b' third')
    _up_to_date(db)
    tm = transaction.TransactionManager(explicit=explicit)
    tm.begin()
    conn = db.open(tm, before=before)
    seen = [_do(conn.root()[key], 'r'), _outcome(tm)]
    tm.begin()
    seen += [_do(conn.root()[key], 'committed'), _do(conn.root()[key], 'c')]
    tm.abort()
    tm.begin()
    seen += [_do(conn.root()[key], op), _outcome(tm)]
    conn.close()
    tm.begin()
    again = db.open(tm, before=before)
    seen += [again is conn, _do(again.root()[key], 'r')]
    tm.abort()
    again.close()
    return seen + [_read_back(db, key)]


def _read_text(path):
    with open(path) as f:
        return f.read()


def _up_to_date(db):
    # RelStorage's own lastTransaction() (which DB.open checks ``before``
    # against) moves on when it polls
    storage = db.storage
    while storage is not None:
        if type(storage).__name__ == 'RelStorage':
            storage.poll_invalidations()
        storage = getattr(storage, 'base', None)


SEQUENCES = (seq_first, seq_later, seq_pooled, seq_savepoint, seq_abort,
             seq_open_reader, seq_default_manager, seq_historical)


class _Matrix:
    """Runs the matrix on ``inner`` (a ZConfig storage section), plain and
    wrapped (the private copies, and the cache of repeated loads)."""

    inner = None

    def plain_config(self, name):
        return ('%%import zodbkmi\n%%import relstorage\n'
                '<zodb>\n%s\n</zodb>\n' % self.inner(name))

    def wrapped_config(self, name, settings=''):
        return ('%%import zodbkmi\n%%import relstorage\n<zodb>\n'
                '<encryptingstorage>\n%s\n%s\n%s\n</encryptingstorage>\n'
                '</zodb>\n' % (self.keys_section(), settings,
                               self.inner(name)))

    def run_sequence(self, db, sequence, key, op, explicit):
        with db.transaction() as conn:
            conn.root()[key] = ZODB.blob.Blob(FIRST)
        try:
            return sequence(db, key, op, explicit)
        finally:
            transaction.abort()

    def test_matrix(self):
        plain = self.open_config(self.plain_config('plain'))
        private = self.open_config(self.wrapped_config(
            'private', 'blob-cache-size 0'))
        cached = self.open_config(self.wrapped_config('cached'))
        self.assertIsNone(private.storage._blob_cache)
        if blobcache.default_directory() is not None:
            self.assertIsNotNone(cached.storage._blob_cache)
        for sequence in SEQUENCES:
            for op in OPS:
                for explicit in (False, True):
                    key = '%s-%s-%s' % (sequence.__name__, op, explicit)
                    with self.subTest(sequence=sequence.__name__, op=op,
                                      explicit=explicit):
                        expected = self.run_sequence(
                            plain, sequence, key, op, explicit)
                        self.assertNotIn('FileNotFoundError', expected)
                        for db in (private, cached):
                            got = self.run_sequence(
                                db, sequence, key, op, explicit)
                            self.assertEqual(got, expected, db.storage)

    def test_defect_1(self):
        # the case of the issue, on its own: with the cache of repeated
        # loads (on by default where /dev/shm is a tmpfs), then without
        for settings in ('', 'blob-cache-size 0'):
            db = self.open_config(self.wrapped_config(
                'defect-%d' % len(settings), settings))
            self.assertIsInstance(db.storage, EncryptingStorage)
            with db.transaction() as conn:
                conn.root()['b'] = ZODB.blob.Blob(FIRST)
            conn = db.open()
            with conn.root()['b'].open() as f:
                self.assertEqual(f.read(), FIRST)
            transaction.commit()
            with conn.root()['b'].open('a') as f:
                f.write(b'+')
            transaction.commit()
            with conn.root()['b'].open('r+') as f:
                self.assertEqual(f.read(), FIRST + b'+')
                f.write(b'!')
            transaction.commit()
            conn.close()
            self.assertEqual(_read_back(db), FIRST + b'+!')
            self.close(db)


class FileStorageMatrixTests(_Matrix, _Stack):

    def inner(self, name):
        return ('<filestorage>\n path %s\n blob-dir %s\n</filestorage>'
                % (self.path(name + '.fs'), self.path(name + '-blobs')))


class BlobStorageProxyMatrixTests(_Matrix, _Stack):
    """ZODB's ``BlobStorage`` proxy around a FileStorage without blobs."""

    def inner(self, name):
        return ('<blobstorage>\n blob-dir %s\n <filestorage>\n  path %s\n'
                ' </filestorage>\n</blobstorage>'
                % (self.path(name + '-blobs'), self.path(name + '.fs')))


class ZEOMatrixTests(_Matrix, _Stack):
    """A ZEO client with a blob cache of its own."""

    shared = False

    def setUp(self):
        super().setUp()
        self.servers = {}

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            for _, stop in self.servers.values():
                stop()

    def inner(self, name):
        import ZEO
        server = self.path(name + '-server')
        os.mkdir(server)
        addr, stop = ZEO.server(path=os.path.join(server, 'Data.fs'),
                                blob_dir=os.path.join(server, 'blobs'),
                                threaded=False)
        self.servers[name] = addr, stop
        blob_dir = (os.path.join(server, 'blobs') if self.shared
                    else self.path(name + '-cache'))
        return ('<zeoclient>\n server 127.0.0.1:%d\n blob-dir %s\n'
                ' shared-blob-dir %s\n</zeoclient>'
                % (addr[1], blob_dir, 'true' if self.shared else 'false'))


class ZEOSharedMatrixTests(ZEOMatrixTests):
    """ZEO clients sharing the server's blob directory."""
    shared = True


class RelStorageMatrixTests(_Matrix, _Stack):
    """RelStorage on PostgreSQL, blobs in the database."""

    layer = PostgresLayer

    def setUp(self):
        needs_postgres(self)
        super().setUp()

    def inner(self, name):
        dsn = PostgresLayer.server.createdb('m_' + uuid.uuid4().hex[:12])
        return ('<relstorage>\n keep-history true\n blob-dir %s\n'
                ' shared-blob-dir false\n <postgresql>\n  driver psycopg2\n'
                '  dsn %s\n </postgresql>\n</relstorage>'
                % (self.path(name + '-cache'), dsn))


# -- defect 2: uncommitted blob files -----------------------------------------

CHILD = '''
import sys, signal, ZODB.config, ZODB.blob, transaction
db = ZODB.config.databaseFromString(open(sys.argv[1]).read())
conn = db.open()
blob = conn.root()['b']
with blob.open('w') as f:
    f.write(bytes.fromhex(%(data)r) * 1000)
transaction.savepoint()
f = blob.open('a')
f.write(bytes.fromhex(%(data)r))
f.flush()
sys.stdout.write('written\\n')
sys.stdout.flush()
sys.stdin.read()        # killed here
'''


class _Uncommitted:

    def private(self):
        return self.path('plain')

    def settings(self):
        os.makedirs(self.private(), exist_ok=True)
        return 'plaintext-dir %s\n blob-cache-size 0' % self.private()

    def test_uncommitted_blob_only_in_private_directory(self):
        db = self.open_config(self.wrapped_config('s', self.settings()))
        with db.transaction() as conn:
            conn.root()['b'] = ZODB.blob.Blob(b'committed')
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        blob = conn.root()['b']
        with blob.open('w') as f:
            f.write(CANARY + b' being written')
            f.flush()
            where = blob._p_blob_uncommitted
            leaked = [p for p, data in files_under(
                self.tmp, skip=[self.private()]).items() if CANARY in data]
        tm.savepoint()
        with blob.open('a') as f:
            f.write(b' more')
        leaked += [p for p, data in files_under(
            self.tmp, skip=[self.private()]).items() if CANARY in data]
        self.assertEqual(leaked, [])
        tmp = os.path.dirname(where)
        self.assertEqual(os.path.basename(tmp), 'tmp')
        private = os.path.dirname(tmp)
        self.assertEqual(os.path.dirname(private), self.private())
        self.assertTrue(os.path.basename(private).startswith(
            '%s%d-' % (PRIVATE_PREFIX, os.getpid())))
        for path in (tmp, private):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        tm.commit()
        conn.close()
        # committed: nothing in plaintext outside the private directory,
        # nothing left in it but the directory of the connection
        self.assertEqual(_read_back(db), b'written' * 0 + CANARY +
                         b' being written more')
        self.assertEqual([p for p, data in files_under(self.tmp).items()
                          if CANARY in data], [])

    def test_killed_writer_is_swept(self):
        config = self.path('child.conf')
        with open(config, 'w') as f:
            f.write(self.wrapped_config('k', self.settings()))
        db = self.open_config(_read_text(config))
        with db.transaction() as conn:
            conn.root()['b'] = ZODB.blob.Blob(b'committed')
        self.close(db)
        script = self.path('child.py')
        with open(script, 'w') as f:
            f.write(CHILD % dict(data=(CANARY + b' killed writer').hex()))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in sys.path if p))
        child = subprocess.Popen([sys.executable, script, config],
                                 stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, cwd=HERE)
        try:
            self.assertEqual(child.stdout.readline(), b'written\n')
            # the plaintext being written: in the private directory only
            found = [p for p, data in files_under(self.tmp).items()
                     if CANARY in data]
            self.assertTrue(found)
            self.assertTrue(all(p.startswith(self.private() + os.sep)
                                for p in found), found)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stdin.close()
        self.assertTrue(os.listdir(self.private()))
        db = self.open_config(_read_text(config))   # sweeps at open
        self.assertEqual([p for p, data in files_under(self.tmp).items()
                          if CANARY in data], [])
        self.assertFalse([n for n in os.listdir(self.private())
                          if not n.startswith('%s%d-' % (PRIVATE_PREFIX,
                                                         os.getpid()))])
        self.close(db)


class FileStorageUncommittedTests(_Uncommitted, FileStorageMatrixTests):
    test_matrix = test_defect_1 = None


class BlobStorageProxyUncommittedTests(_Uncommitted,
                                       BlobStorageProxyMatrixTests):
    test_matrix = test_defect_1 = None


class ZEOUncommittedTests(_Uncommitted, ZEOMatrixTests):
    test_matrix = test_defect_1 = None


class ZEOSharedUncommittedTests(_Uncommitted, ZEOSharedMatrixTests):
    test_matrix = test_defect_1 = None


class RelStorageUncommittedTests(_Uncommitted, RelStorageMatrixTests):
    test_matrix = test_defect_1 = None


# -- the cache of repeated loads ---------------------------------------------

def ram_directory(test):
    """A new directory on a RAM-backed file system (removed at the end
    of ``test``); the test is skipped when there is none."""
    import shutil
    import tempfile
    parent = blobcache.default_directory()
    if parent is None:
        raise unittest.SkipTest('no RAM-backed file system at %s'
                                % blobcache.DEFAULT_DIR)
    path = tempfile.mkdtemp(prefix='zodbkmi-test-', dir=parent)
    test.addCleanup(shutil.rmtree, path, True)
    return path


def _writer(data):
    def fill(name):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with open(fd, 'wb') as f:
            f.write(data)
    return fill


def _oid(n):
    return n.to_bytes(8, 'big')


class BlobCacheTests(_Stack):
    """:class:`zodbkmi.storage.blobcache.BlobCache` on its own."""

    def setUp(self):
        super().setUp()
        self.ram = ram_directory(self)

    def test_lru_eviction_by_bytes(self):
        cache = blobcache.BlobCache(self.ram, size=100)
        self.addCleanup(cache.close)
        names = {}
        for n in (1, 2):
            names[n] = cache.acquire(_oid(n), _oid(9), _writer(b'x' * 40))
            cache.release(_oid(n), _oid(9))
        self.assertEqual(cache.used, 80)
        # 1 used again: 2 is now the least recently used
        self.assertEqual(cache.acquire(_oid(1), _oid(9), None), names[1])
        cache.release(_oid(1), _oid(9))
        names[3] = cache.acquire(_oid(3), _oid(9), _writer(b'y' * 40))
        cache.release(_oid(3), _oid(9))
        self.assertEqual(cache.used, 80)
        self.assertIn((_oid(1), _oid(9)), cache)
        self.assertNotIn((_oid(2), _oid(9)), cache)
        self.assertFalse(os.path.exists(names[2]))
        # larger than the whole cache: not kept
        self.assertIsNone(cache.acquire(_oid(4), _oid(9),
                                        _writer(b'z' * 101)))
        self.assertEqual(sorted(os.listdir(cache.path)),
                         sorted(os.path.basename(names[n]) for n in (1, 3)))
        cache.close()
        self.assertFalse(os.path.exists(os.path.dirname(names[1])))

    def test_pinned_copies_are_not_evicted(self):
        cache = blobcache.BlobCache(self.ram, size=100)
        self.addCleanup(cache.close)
        one = cache.acquire(_oid(1), _oid(9), _writer(b'x' * 60))
        self.assertEqual(cache.pins(_oid(1), _oid(9)), 1)
        # no room without evicting the pinned copy: not cached
        self.assertIsNone(cache.acquire(_oid(2), _oid(9),
                                        _writer(b'y' * 60)))
        self.assertTrue(os.path.exists(one))
        self.assertEqual(os.listdir(cache.path), [os.path.basename(one)])
        cache.release(_oid(1), _oid(9))
        two = cache.acquire(_oid(2), _oid(9), _writer(b'y' * 60))
        self.assertIsNotNone(two)
        self.assertFalse(os.path.exists(one))

    def test_modes(self):
        cache = blobcache.BlobCache(self.ram, size=100)
        self.addCleanup(cache.close)
        name = cache.acquire(_oid(1), _oid(9), _writer(b'x'))
        self.assertEqual(stat.S_IMODE(os.stat(cache.path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o400)
        self.assertTrue(os.path.basename(cache.path).startswith(
            '%s%d-cache-' % (PRIVATE_PREFIX, os.getpid())))

    def test_cache_of_a_killed_process_is_swept(self):
        child = subprocess.Popen([sys.executable, '-c', 'pass'])
        child.wait()
        dead = os.path.join(self.ram, '%s%d-cache-abc' % (PRIVATE_PREFIX,
                                                          child.pid))
        os.mkdir(dead, 0o700)
        with open(os.path.join(dead, 'x.blob'), 'wb') as f:
            f.write(CANARY)
        cache = blobcache.BlobCache(self.ram, size=100)    # at start
        self.addCleanup(cache.close)
        self.assertFalse(os.path.exists(dead))

    def test_refuses_a_directory_not_in_ram(self):
        from zodbkmi.storage.blobcache import NotRAMBackedError
        if blobcache.is_ram_backed(self.tmp):
            self.skipTest('the test directory is RAM-backed')
        with self.assertRaisesRegex(NotRAMBackedError,
                                    'not on a RAM-backed file system'):
            blobcache.BlobCache(self.tmp)
        with self.assertRaises(NotRAMBackedError):
            EncryptingStorage(ZODB.MappingStorage.MappingStorage(),
                              self.facility(), self.kek,
                              blob_cache_dir=self.tmp)
        self.assertEqual(sorted(os.listdir(self.tmp)), ['kek.key', 'keys'])

    def test_file_system_type(self):
        mounts = self.path('mounts')
        with open(mounts, 'w') as f:
            f.write('/dev/sda1 / ext4 rw 0 0\n'
                    'tmpfs /dev/shm tmpfs rw 0 0\n'
                    'tmpfs /srv/with\\040space tmpfs rw 0 0\n'
                    '/dev/sdb1 /dev/shm/disk ext4 rw 0 0\n')
        kind = blobcache.file_system_type
        self.assertEqual(kind('/dev/shm', mounts), 'tmpfs')
        self.assertEqual(kind('/dev/shm/a/b', mounts), 'tmpfs')
        self.assertEqual(kind('/dev/shmx', mounts), 'ext4')
        self.assertEqual(kind('/dev/shm/disk/a', mounts), 'ext4')
        self.assertEqual(kind('/srv/with space/x', mounts), 'tmpfs')
        self.assertIsNone(kind('/x', self.path('no-mounts')))

    def test_make_cache(self):
        self.assertIsNone(blobcache.make_cache(0, self.ram))
        cache = blobcache.make_cache(None, self.ram)
        self.assertEqual(cache.size, blobcache.DEFAULT_SIZE)
        with self.assertRaises(ValueError):
            blobcache.make_cache(-1, self.ram)


class CacheThroughStorageTests(_Stack):
    """The cache serves repeated loads, in later transactions and other
    connections, and never a wrong or stale revision."""

    def setUp(self):
        super().setUp()
        self.ram = ram_directory(self)

    def open(self, settings='', name='Data'):
        return self.open_config(
            '%%import zodbkmi\n<zodb>\n<encryptingstorage>\n%s\n'
            'blob-cache-dir %s\n%s\n<filestorage>\npath %s\nblob-dir %s\n'
            '</filestorage>\n</encryptingstorage>\n</zodb>\n'
            % (self.keys_section(), self.ram, settings,
               self.path(name + '.fs'), self.path(name + '-blobs')))

    def test_settings(self):
        db = self.open('blob-cache-size 1MB')
        cache = db.storage._blob_cache
        self.assertEqual(cache.size, 1024 * 1024)
        self.assertEqual(cache.parent, self.ram)
        self.close(db)
        db = self.open('blob-cache-size 0', name='off')
        self.assertIsNone(db.storage._blob_cache)

    def test_zodburi_settings(self):
        import zodburi
        uri = ('zodbkmi+file://%s/Data.fs?key_file=%s&key_dir=%s'
               '&blob_cache_size=%%s&blob_cache_dir=%s'
               % (self.tmp, self.key_file, self.key_dir, self.ram))
        storage = zodburi.resolve_uri(uri % 4096)[0]()
        self.assertEqual(storage._blob_cache.size, 4096)
        self.assertEqual(storage._blob_cache.parent, self.ram)
        storage.close()
        storage = zodburi.resolve_uri(uri % 0)[0]()
        self.assertIsNone(storage._blob_cache)
        storage.close()
        with self.assertRaisesRegex(ValueError, 'blob_cache_size'):
            zodburi.resolve_uri(uri % 'lots')

    def test_repeat_load_served_from_cache(self):
        db = self.open()
        cache = db.storage._blob_cache
        with db.transaction() as conn:
            conn.root()['b'] = ZODB.blob.Blob(FIRST)
        tm1 = transaction.TransactionManager()
        tm2 = transaction.TransactionManager()
        c1 = db.open(tm1)
        c2 = db.open(tm2)
        name = c1.root()['b'].committed()
        key = self._key(c1)
        self.assertEqual(os.path.dirname(name), cache.path)
        self.assertEqual((cache.hits, cache.misses), (0, 1))
        with c1.root()['b'].open() as f:
            self.assertEqual(f.read(), FIRST)
        tm1.commit()
        # the cache is not crowded: the blob object keeps its file, pinned
        self.assertEqual(cache.pins(*key), 1)
        self.assertEqual(c1.root()['b']._p_blob_committed, name)
        with c1.root()['b'].open() as f:       # a later transaction
            self.assertEqual(f.read(), FIRST)
        with c1.root()['b'].open('a') as f:
            f.write(b'+')
        tm1.abort()
        self.assertEqual(c1.root()['b'].committed(), name)
        with c2.root()['b'].open() as f:       # another connection
            self.assertEqual(f.read(), FIRST)
        self.assertEqual(c2.root()['b'].committed(), name)
        self.assertEqual((cache.misses, cache.hits), (1, 1))
        self.assertEqual(cache.pins(*key), 2)
        tm1.abort()
        tm2.abort()
        self.assertEqual(cache.pins(*key), 2)
        c1.close()
        c2.close()
        self.close(db)
        self.assertFalse(os.path.exists(os.path.dirname(name)))

    def test_pins_released_when_crowded(self):
        # pinned files above half the size: the connections release those
        # their blob objects kept, and invalidate the blob objects
        db = self.open('blob-cache-size 100KB')
        cache = db.storage._blob_cache
        with db.transaction() as conn:
            conn.root()['b'] = ZODB.blob.Blob(b'x' * (60 * 1024))
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        name = conn.root()['b'].committed()
        key = self._key(conn)
        self.assertTrue(cache.crowded())
        tm.commit()
        self.assertEqual(cache.pins(*key), 0)
        self.assertIsNone(conn.root()['b']._p_changed)     # a ghost
        self.assertTrue(os.path.exists(name))       # in the cache still
        self.assertEqual(conn.root()['b'].committed(), name)
        self.assertEqual(cache.hits, 1)
        tm.abort()
        conn.close()

    def _key(self, conn):
        blob = conn.root()['b']
        blob._p_activate()
        return blob._p_oid, blob._p_serial

    def test_never_a_stale_or_wrong_revision(self):
        db = self.open()
        with db.transaction() as conn:
            conn.root()['b'] = ZODB.blob.Blob(FIRST)
            conn.root()['c'] = ZODB.blob.Blob(SECOND)   # same serial
        before = p64(u64(db.lastTransaction()) + 1)
        tm1 = transaction.TransactionManager()
        c1 = db.open(tm1)
        self.assertEqual(read_blob(c1.root()['b']), FIRST)
        self.assertEqual(read_blob(c1.root()['c']), SECOND)
        tm1.commit()
        with db.transaction() as conn:
            with conn.root()['b'].open('w') as f:
                f.write(b'third revision')
        tm1.begin()
        self.assertEqual(read_blob(c1.root()['b']), b'third revision')
        with open(c1.root()['b'].committed(), 'rb') as f:
            self.assertEqual(f.read(), b'third revision')
        tm1.abort()
        tm = transaction.TransactionManager()
        old = db.open(tm, before=before)
        self.assertEqual(read_blob(old.root()['b']), FIRST)
        with open(old.root()['b'].committed(), 'rb') as f:
            self.assertEqual(f.read(), FIRST)
        tm.abort()
        old.close()
        c1.close()

    def test_cache_holds_only_what_it_may(self):
        # every cached copy is the plaintext of its revision, mode 0400;
        # the size limit holds
        db = self.open('blob-cache-size 100KB')
        cache = db.storage._blob_cache
        with db.transaction() as conn:
            for i in range(5):
                conn.root()[i] = ZODB.blob.Blob(CANARY * (1000 * (i + 1)))
        for _ in range(2):
            for i in range(5):
                with db.transaction() as conn:
                    with conn.root()[i].open() as f:
                        self.assertEqual(f.read(), CANARY * (1000 * (i + 1)))
                self.assertLessEqual(cache.used, 100 * 1024)
        total = 0
        for name in os.listdir(cache.path):
            path = os.path.join(cache.path, name)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o400)
            total += os.path.getsize(path)
        self.assertEqual(total, cache.used)
