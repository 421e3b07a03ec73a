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
import textwrap
import unittest
import uuid

import transaction
import ZODB.blob
import ZODB.interfaces
from ZODB.POSException import POSError

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres
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
    before = db.lastTransaction()
    with db.transaction() as conn:
        with conn.root()[key].open('a') as f:
            f.write(b' third')
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


SEQUENCES = (seq_first, seq_later, seq_pooled, seq_savepoint, seq_abort,
             seq_open_reader, seq_default_manager, seq_historical)


class _Matrix(_Stack):
    """Runs the matrix on ``inner`` (a ZConfig storage section), plain and
    wrapped (the private copies, and the cache of repeated loads)."""

    inner = None

    def plain_config(self, name):
        return '%%import zodbkmi\n%%import relstorage\n<zodb>\n%s\n</zodb>\n' % (
            self.inner(name))

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
        # the case of the issue, on its own
        for settings in ('blob-cache-size 0', ''):
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


class FileStorageMatrixTests(_Matrix):

    def inner(self, name):
        return ('<filestorage>\n path %s\n blob-dir %s\n</filestorage>'
                % (self.path(name + '.fs'), self.path(name + '-blobs')))


class BlobStorageProxyMatrixTests(_Matrix):
    """ZODB's ``BlobStorage`` proxy around a FileStorage without blobs."""

    def inner(self, name):
        return ('<blobstorage>\n blob-dir %s\n <filestorage>\n  path %s\n'
                ' </filestorage>\n</blobstorage>'
                % (self.path(name + '-blobs'), self.path(name + '.fs')))


class _ZEOMatrix(_Matrix):

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


class ZEOMatrixTests(_ZEOMatrix):
    """A ZEO client with a blob cache of its own."""


class ZEOSharedMatrixTests(_ZEOMatrix):
    """ZEO clients sharing the server's blob directory."""
    shared = True


class RelStorageMatrixTests(_Matrix):
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
    f.write(%(data)r * 1000)
transaction.savepoint()
f = blob.open('a')
f.write(%(data)r)
f.flush()
sys.stdout.write('written\\n')
sys.stdout.flush()
sys.stdin.read()        # killed here
'''


class _Uncommitted(_Matrix):

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
        db = self.open_config(open(config).read())
        with db.transaction() as conn:
            conn.root()['b'] = ZODB.blob.Blob(b'committed')
        self.close(db)
        script = self.path('child.py')
        with open(script, 'w') as f:
            f.write(CHILD % dict(data=CANARY + b' killed writer'))
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
        db = self.open_config(open(config).read())   # sweeps at open
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
