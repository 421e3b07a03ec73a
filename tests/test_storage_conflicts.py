"""Conflict resolution through EncryptingStorage in every documented
configuration (defect 3 of issue #17), with concurrent writers.

Eight writer threads, each with its own transaction manager and
connection, change one OOBTree (values of keys of their own, in shared
buckets) and one ``BTrees.Length.Length`` in every transaction, and retry
on ``ConflictError``.  These conflicts are all resolvable: the plain
(unencrypted) configuration resolves every one of them, and so must the
encrypted one.  Each configuration runs plain, then encrypted, and is
compared: one conflict made on purpose first (it is resolved in both or in
neither), then the writers (no ConflictError where plain has none), then
the counts.  Nothing is timed.

The configurations: FileStorage with a blob directory, ZODB's BlobStorage
proxy around a FileStorage (what ``<blobstorage>`` and zodburi's
``blobstorage_dir`` give: resolution read ciphertext before), each zodburi
form and ZConfig section of docs/storage.rst, ZEO with a server that holds
no keys and lets its clients resolve conflicts (``client-conflict-resolution
true``), ZEO with a server holding the keys (``<serverencryptingstorage>``),
and RelStorage on PostgreSQL.
"""
import logging
import os
import shutil
import tempfile
import threading
import unittest
import uuid

import transaction
import ZODB
import ZODB.blob
import ZODB.config
import ZODB.FileStorage
import ZODB.MappingStorage
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres
from tests.zeoserver import KEYLESS_STORAGE
from tests.zeoserver import KEYLESS_ZEO
from tests.zeoserver import PLAIN_ZEO
from tests.zeoserver import ZEOServer
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.keyholder import write_key_file
from zodbkmi.storage import EncryptingStorage
from zodbkmi.storage.common import is_sealed

WRITERS = 8
COMMITS = 10            # per writer
KEYS = 4                # per writer: changed in turn
#: retries of one commit before a writer gives up (never reached when
#: conflicts are resolved; bounds a run where they are not)
MAX_RETRIES = 500


def key(writer, n):
    return 'writer-%d-key-%d' % (writer, n)


def populate(db):
    """The tree (every writer's keys, at 0) and the Length, committed."""
    with db.transaction() as conn:
        root = conn.root()
        root['tree'] = OOBTree({key(w, n): 0 for w in range(WRITERS)
                                for n in range(KEYS)})
        root['length'] = Length()


def conflict_on_purpose(db):
    """Two connections change the Length and two keys of one bucket from
    the same state; return whether the second commit was resolved (True)
    or raised ConflictError (False)."""
    tm1 = transaction.TransactionManager()
    tm2 = transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    try:
        for tm, conn, writer in ((tm1, c1, 0), (tm2, c2, 1)):
            tm.begin()
            root = conn.root()
            root['tree'][key(writer, 0)] += 1
            root['length'].change(1)
        tm1.commit()
        try:
            tm2.commit()
        except ConflictError:
            tm2.abort()
            return False
        return True
    finally:
        tm1.abort()
        tm2.abort()
        c1.close()
        c2.close()


def concurrent_writers(db):
    """Run the writers; return the number of ConflictErrors they met.
    Any other error fails the caller."""
    conflicts = []
    errors = []
    start = threading.Barrier(WRITERS)

    def write(writer):
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            start.wait()
            for commit in range(COMMITS):
                for _ in range(MAX_RETRIES):
                    try:
                        tm.begin()
                        root = conn.root()
                        root['tree'][key(writer, commit % KEYS)] += 1
                        root['length'].change(1)
                        tm.commit()
                        break
                    except ConflictError:
                        tm.abort()
                        conflicts.append(writer)
                else:
                    raise AssertionError('writer %d gave up' % writer)
        except BaseException as e:
            errors.append(e)
            tm.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=write, args=(w,))
               for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(conflicts)


def counts(db):
    """(sum of the tree's values, the Length), read by a new connection."""
    with db.transaction() as conn:
        root = conn.root()
        return sum(root['tree'].values()), root['length']()


class _Conflicts:
    """Subclasses open a database plain (``encrypted=False``) or
    encrypted in ``open_db``, in ``self.tmp``."""

    #: whether the plain configuration resolves conflicts (MappingStorage
    #: does not)
    resolves = True

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-conflicts-')
        self.kek = os.urandom(32)
        self.key_file = self.path('kek.key')
        write_key_file(self.key_file, self.kek)
        self.key_dir = self.path('keys')
        os.mkdir(self.key_dir, 0o700)
        self.facility = KeyManagementFacility(self.key_dir)
        self.facility.ensure_key(self.kek)
        self.opened = []

    def tearDown(self):
        transaction.abort()
        for db in self.opened:
            db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def keys_query(self):
        return 'key_file=%s&key_dir=%s' % (self.key_file, self.key_dir)

    def keys_section(self):
        return 'key-file %s\n    key-dir %s' % (self.key_file, self.key_dir)

    def wrap(self, base):
        return EncryptingStorage(base, self.facility, self.kek)

    def db(self, storage, **kw):
        kw.setdefault('pool_size', WRITERS + 2)
        db = ZODB.DB(storage, **kw)
        self.opened.append(db)
        return db

    def from_config(self, text):
        db = ZODB.config.databaseFromString(text)
        self.opened.append(db)
        return db

    def from_uri(self, uri):
        import zodburi
        factory, dbkw = zodburi.resolve_uri(uri)
        return self.db(factory(), **dbkw)

    def run_config(self, encrypted):
        """(resolved on purpose, ConflictErrors, counts) of one run."""
        name = 'encrypted' if encrypted else 'plain'
        os.mkdir(self.path(name))
        db = self.open_db(encrypted, self.path(name))
        if encrypted:
            self.assertIsInstance(db.storage, EncryptingStorage)
        populate(db)
        resolved = conflict_on_purpose(db)
        conflicts = concurrent_writers(db)
        result = resolved, conflicts, counts(db)
        if encrypted:
            root = self.raw_root(db)
            if root is not None:
                self.assertTrue(is_sealed(root))
        self.opened.remove(db)
        db.close()
        return result

    def raw_root(self, db):
        """The root record as the storage below the wrapper keeps it."""
        storage = db.storage.base
        if ZODB.interfaces.IMVCCStorage.providedBy(storage):
            return None     # RelStorage: its instances read
        return storage.load(z64)[0]

    def test_conflicts_resolved_as_in_plain(self):
        plain = self.run_config(False)
        encrypted = self.run_config(True)
        done = WRITERS * COMMITS + (2 if plain[0] else 1)
        self.assertEqual(plain[0], self.resolves)
        # the conflict made on purpose: resolved in both, or in neither
        self.assertEqual(encrypted[0], plain[0])
        if self.resolves:
            self.assertEqual(plain[1], 0)
            self.assertEqual(encrypted[1], 0)
        self.assertEqual(plain[2], (done, done))
        self.assertEqual(encrypted[2], (done, done))


# -- FileStorage, Python API ----------------------------------------------

class FileStorageBlobDirTests(_Conflicts, unittest.TestCase):
    """``FileStorage(blob_dir=...)``: the storage resolves conflicts
    itself."""

    def open_db(self, encrypted, d):
        base = ZODB.FileStorage.FileStorage(
            os.path.join(d, 'Data.fs'), blob_dir=os.path.join(d, 'blobs'))
        return self.db(self.wrap(base) if encrypted else base)


class FileStorageTests(_Conflicts, unittest.TestCase):

    def open_db(self, encrypted, d):
        base = ZODB.FileStorage.FileStorage(os.path.join(d, 'Data.fs'))
        return self.db(self.wrap(base) if encrypted else base)


class BlobStorageProxyTests(_Conflicts, unittest.TestCase):
    """ZODB's ``BlobStorage`` proxy around a FileStorage without blob_dir:
    the proxy keeps ``registerDB`` for itself (defect 3)."""

    def open_db(self, encrypted, d):
        base = ZODB.blob.BlobStorage(
            os.path.join(d, 'blobs'),
            ZODB.FileStorage.FileStorage(os.path.join(d, 'Data.fs')))
        return self.db(self.wrap(base) if encrypted else base)

    def test_registered_with_the_proxied_storage(self):
        from zodbkmi.storage.registration import BLOBSTORAGE_INNER
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        proxy = ZODB.blob.BlobStorage(self.path('blobs'), fs)
        # ZODB's private attribute the wrapper relies on (fails loudly
        # when ZODB renames it)
        self.assertIs(vars(proxy)[BLOBSTORAGE_INNER], fs)
        storage = self.wrap(proxy)
        try:
            self.assertEqual(fs._crs_untransform_record_data,
                             storage.untransform_record_data)
            self.assertEqual(fs._crs_transform_record_data,
                             storage.transform_record_data)
        finally:
            storage.close()

    def test_proxy_without_the_attribute_is_refused(self):
        from zodbkmi.storage.registration import BLOBSTORAGE_INNER
        from zodbkmi.storage.registration import proxied
        proxy = ZODB.blob.BlobStorage(
            self.path('blobs'), ZODB.MappingStorage.MappingStorage())
        del vars(proxy)[BLOBSTORAGE_INNER]
        with self.assertRaisesRegex(TypeError, BLOBSTORAGE_INNER):
            proxied(proxy)


class DemoStorageTests(_Conflicts, unittest.TestCase):
    """DemoStorage resolves the conflicts of its changes itself."""

    def open_db(self, encrypted, d):
        from ZODB.DemoStorage import DemoStorage
        base = DemoStorage(base=ZODB.FileStorage.FileStorage(
            os.path.join(d, 'Data.fs')))
        return self.db(self.wrap(base) if encrypted else base)


# -- zodburi (docs/storage.rst, zodburi) ----------------------------------

class URIFileTests(_Conflicts, unittest.TestCase):

    def open_db(self, encrypted, d):
        uri = 'file://%s/Data.fs' % d
        if encrypted:
            return self.from_uri('zodbkmi+%s?%s' % (uri, self.keys_query()))
        return self.from_uri(uri)


class URIFileBlobStorageTests(_Conflicts, unittest.TestCase):
    """The form docs/storage.rst shows: ZODB's BlobStorage proxy."""

    def open_db(self, encrypted, d):
        uri = 'file://%s/Data.fs?blobstorage_dir=%s/blobs' % (d, d)
        if encrypted:
            return self.from_uri('zodbkmi+%s&%s' % (uri, self.keys_query()))
        return self.from_uri(uri)


class URIMemoryTests(_Conflicts, unittest.TestCase):
    """MappingStorage resolves no conflict, plain or encrypted."""

    resolves = False

    def open_db(self, encrypted, d):
        if encrypted:
            return self.from_uri('zodbkmi+memory://?' + self.keys_query())
        return self.from_uri('memory://')


class URIDemoTests(_Conflicts, unittest.TestCase):

    def open_db(self, encrypted, d):
        uri = 'demo:(file://%s/Data.fs)/(memory://)' % d
        if encrypted:
            return self.from_uri('zodbkmi+%s?%s' % (uri, self.keys_query()))
        return self.from_uri(uri)


class URIZConfigTests(_Conflicts, unittest.TestCase):

    def open_db(self, encrypted, d):
        conf = os.path.join(d, 'storage.conf')
        with open(conf, 'w') as f:
            f.write('<blobstorage main>\n  blob-dir %s/blobs\n'
                    '  <filestorage>\n    path %s/Data.fs\n'
                    '  </filestorage>\n</blobstorage>\n' % (d, d))
        uri = 'zconfig://%s' % conf
        if encrypted:
            return self.from_uri('zodbkmi+%s?%s' % (uri, self.keys_query()))
        return self.from_uri(uri)


# -- ZConfig (docs/storage.rst, ZConfig) ----------------------------------

class _ZConfig(_Conflicts):

    #: the storage section, formatted with ``d``
    storage = None
    imports = ''

    def open_db(self, encrypted, d):
        storage = self.storage % dict(d=d)
        if encrypted:
            storage = ('<encryptingstorage>\n    %s\n%s\n'
                       '</encryptingstorage>' % (self.keys_section(),
                                                 storage))
        return self.from_config(
            '%%import zodbkmi\n%s\n<zodb>\n  pool-size %d\n%s\n</zodb>\n'
            % (self.imports, WRITERS + 2, storage))


class ZConfigFileStorageBlobDirTests(_ZConfig, unittest.TestCase):
    storage = ('<filestorage>\n  path %(d)s/Data.fs\n'
               '  blob-dir %(d)s/blobs\n</filestorage>')


class ZConfigFileStorageTests(_ZConfig, unittest.TestCase):
    storage = '<filestorage>\n  path %(d)s/Data.fs\n</filestorage>'


class ZConfigBlobStorageTests(_ZConfig, unittest.TestCase):
    """``<blobstorage>`` around ``<filestorage>``: the BlobStorage proxy
    (defect 3)."""
    storage = ('<blobstorage>\n  blob-dir %(d)s/blobs\n'
               '  <filestorage>\n    path %(d)s/Data.fs\n  </filestorage>\n'
               '</blobstorage>')


# -- ZEO ------------------------------------------------------------------

class _ZEO(_Conflicts):
    """A real ZEO server (runzeo) per run; the clients are the
    application."""

    zeo = KEYLESS_ZEO
    server_storage = KEYLESS_STORAGE
    #: the server's storage in the encrypted run (default: the same)
    encrypted_server_storage = None

    def setUp(self):
        super().setUp()
        self.servers = []

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            for server in self.servers:
                server.stop()

    def server(self, d, encrypted=False):
        storage = self.server_storage
        if encrypted and self.encrypted_server_storage:
            storage = self.encrypted_server_storage % dict(
                keys=self.keys_section(), directory='%(directory)s')
        server = ZEOServer(os.path.join(d, 'server'), self.zeo, storage)
        self.servers.append(server)
        return server

    def client(self, server, d):
        import ZEO
        return ZEO.client(server.addr, wait_timeout=30,
                          blob_dir=os.path.join(d, 'cache'))

    def open_db(self, encrypted, d):
        server = self.server(d, encrypted)
        base = self.client(server, d)
        return self.db(self.wrap(base) if encrypted else base)


class ZEOKeylessClientResolutionTests(_ZEO, unittest.TestCase):
    """The recommended keyless deployment: the server holds ciphertext and
    no key, and returns conflicts to the clients, which resolve them
    through the wrapper."""

    def open_two(self, d):
        server = self.server(d)
        return (self.db(self.wrap(self.client(server, d + '-1'))),
                self.db(self.wrap(self.client(server, d + '-2'))))

    def test_resolved_state_that_conflicts_again(self):
        # The server finds the resolved state in conflict again (another
        # client committed meanwhile) and hands it back without its oid;
        # the thread's last conflict was on another object.
        db, other = self.open_two(self.path('again'))
        with db.transaction() as conn:
            conn.root()['a'] = Length()
            conn.root()['b'] = Length()
        client = db.storage.base
        # the other client has seen that transaction (ZEO sends it
        # asynchronously)
        last = client.lastTransaction()
        _poll(lambda: other.storage.base.lastTransaction() >= last)
        resolve = type(client).tryToResolveConflict
        calls = []

        def commit_on(oid):
            with other.transaction() as conn:
                for name in ('a', 'b'):
                    if conn.root()[name]._p_oid == oid:
                        conn.root()[name].change(100)

        def hook(oid, *args, **kw):
            calls.append(oid)
            if len(calls) == 2:
                # both objects are in conflict: before the second is
                # resolved, the first changes again on the server
                commit_on(calls[0])
            return resolve(client, oid, *args, **kw)
        client.tryToResolveConflict = hook
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['a'].change(1)
        conn.root()['b'].change(1)
        with other.transaction() as c:
            c.root()['a'].change(10)
            c.root()['b'].change(10)
        tm.commit()         # resolved twice for one object, not refused
        conn.close()
        self.assertEqual(len(calls), 3)
        self.assertEqual(calls[2], calls[0])
        with db.transaction() as c:
            self.assertEqual(c.root()['a']() + c.root()['b'](), 122)

    def test_invalidations_before_a_database_is_registered(self):
        # A ZEO client passes invalidations to the wrapper from the time
        # it is wrapped; the wrapper has no database yet
        d = self.path('early')
        server = self.server(d)
        writer = self.db(self.wrap(self.client(server, d + '-w')))
        with writer.transaction() as conn:
            conn.root()['n'] = 1
        handler = _Records()
        logging.getLogger().addHandler(handler)
        try:
            early = self.wrap(self.client(server, d + '-e'))
            self.assertIsNone(early.db)
            with writer.transaction() as conn:
                conn.root()['n'] = 2
            tid = writer.storage.lastTransaction()
            _poll(lambda: early.base.lastTransaction() == tid)
            early.invalidate(tid, [z64])
            early.invalidateCache()
        finally:
            logging.getLogger().removeHandler(handler)
        self.assertEqual([r.getMessage() for r in handler.records
                          if r.levelno >= logging.ERROR], [])
        db = self.db(early)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['n'], 2)


class ZEOKeylessServerResolutionTests(_ZEO, unittest.TestCase):
    """A keyless server that resolves conflicts itself (ZEO's default)
    cannot open the records: every conflict that needs resolving reaches
    the client as a ConflictError (what client-conflict-resolution
    avoids)."""

    zeo = PLAIN_ZEO

    def test_conflicts_resolved_as_in_plain(self):
        plain = self.run_config(False)
        self.assertTrue(plain[0])
        os.mkdir(self.path('encrypted'))
        db = self.open_db(True, self.path('encrypted'))
        populate(db)
        self.assertFalse(conflict_on_purpose(db))


class ZEOServerKeysTests(_ZEO, unittest.TestCase):
    """The server holds the keys (``<serverencryptingstorage>``) and
    resolves conflicts, here with ZODB's BlobStorage proxy inside."""

    zeo = PLAIN_ZEO
    server_storage = ('<blobstorage>\n  blob-dir %(directory)s/blobs\n'
                      '  <filestorage>\n    path %(directory)s/Data.fs\n'
                      '  </filestorage>\n</blobstorage>\n')
    encrypted_server_storage = (
        '%%%%import zodbkmi\n<serverencryptingstorage>\n  %(keys)s\n'
        '  <blobstorage>\n    blob-dir %(directory)s/blobs\n'
        '    <filestorage>\n      path %(directory)s/Data.fs\n'
        '    </filestorage>\n  </blobstorage>\n</serverencryptingstorage>\n')


class ZEOConfigTests(_ZEO, unittest.TestCase):
    """``<encryptingstorage>`` around ``<zeoclient>``."""

    def open_db(self, encrypted, d):
        server = self.server(d)
        storage = ('<zeoclient>\n  server 127.0.0.1:%d\n  blob-dir %s\n'
                   '</zeoclient>'
                   % (server.port, os.path.join(d, 'cache')))
        if encrypted:
            storage = ('<encryptingstorage>\n  %s\n%s\n</encryptingstorage>'
                       % (self.keys_section(), storage))
        return self.from_config(
            '%%import zodbkmi\n<zodb>\n  pool-size %d\n%s\n</zodb>\n'
            % (WRITERS + 2, storage))


class ZEOURITests(_ZEO, unittest.TestCase):

    def open_db(self, encrypted, d):
        server = self.server(d)
        uri = 'zeo://127.0.0.1:%d?blob_dir=%s&wait_timeout=30' % (
            server.port, os.path.join(d, 'cache'))
        if encrypted:
            return self.from_uri('zodbkmi+%s&%s' % (uri, self.keys_query()))
        return self.from_uri(uri)


# -- RelStorage on PostgreSQL -----------------------------------------------

class _RelStorage(_Conflicts):

    layer = PostgresLayer
    keep_history = False

    def setUp(self):
        needs_postgres(self)
        super().setUp()

    def open_db(self, encrypted, d):
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        dsn = PostgresLayer.server.createdb('cr_' + uuid.uuid4().hex[:12])
        options = Options(keep_history=self.keep_history,
                          blob_dir=os.path.join(d, 'blobs'),
                          shared_blob_dir=False)
        base = RelStorage(PostgreSQLAdapter(dsn=dsn, options=options),
                          options=options)
        return self.db(self.wrap(base) if encrypted else base)


class RelStorageHistoryFreeTests(_RelStorage, unittest.TestCase):
    pass


class RelStorageHistoryPreservingTests(_RelStorage, unittest.TestCase):
    keep_history = True


# -- helpers ------------------------------------------------------------------

class _Records(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _poll(condition, timeout=60):
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError('condition not met in %d s' % timeout)
        time.sleep(0.02)
