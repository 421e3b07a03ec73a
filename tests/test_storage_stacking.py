"""EncryptingStorage stacked with what ZODB users deploy (issue #17).

Each stack is configured as docs/storage.rst shows it (ZConfig), with the
real component: zodb-s3blobs on moto's S3 server, zc.zlibstorage,
RelStorage on PostgreSQL with blobs in the database, ZEO with a shared and
a non-shared blob directory, and repozo backups of a FileStorage.  The
checks look at every byte the component keeps (objects in the bucket,
large objects in PostgreSQL, files in blob directories, caches and
backups): only ciphertext in zodbkmi's formats, which the keys open to the
plaintext that was committed, bound to its oid; and everything reads back
through a new database.
"""
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import uuid
import zlib

import transaction
import ZODB
import ZODB.blob
import ZODB.config
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.utils import p64
from ZODB.utils import u64

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres
from tests.s3server import S3Layer
from tests.s3server import needs_s3
from tests.test_leaks import load_leakscan
from zodbkmi.exceptions import DatabaseKeyError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.format import envelope
from zodbkmi.format import stream
from zodbkmi.keyholder import write_key_file
from zodbkmi.storage import EncryptingStorage

#: The marker the leak scan of tests/run.sh looks for, in every plaintext.
CANARY = load_leakscan().CANARY
SMALL = CANARY + b' small stacked blob ' + bytes(range(256))
# more than one chunk of the stream format (64 KiB), and a partial last one
LARGE = (CANARY + b' large stacked blob ' + bytes(range(256))) * 700
UPDATED = CANARY + b' updated stacked blob'
RECORD = CANARY.decode() + ' record of a stacked storage'
ROOT = p64(0)


def files_under(*tops, skip=()):
    """``{path: bytes}`` of every regular file under ``tops``."""
    found = {}
    for top in tops:
        for dirpath, _, names in os.walk(top):
            if any(dirpath == s or dirpath.startswith(s + os.sep)
                   for s in skip):
                continue
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, 'rb') as f:
                        found[path] = f.read()
    return found


class _Stack(unittest.TestCase):
    """A temporary directory with a KEK file and a key vault."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-stack-')
        self.here = self.tmp
        self.kek = os.urandom(32)
        self.key_file = self.path('kek.key')
        write_key_file(self.key_file, self.kek)
        self.key_dir = self.path('keys')
        os.mkdir(self.key_dir, 0o700)
        self.opened = []
        # blob oid -> plaintext of each revision committed
        self.blobs = {}

    def tearDown(self):
        transaction.abort()
        for db in self.opened:
            db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def keys_section(self):
        return ('key-file %s\n    key-dir %s' % (self.key_file,
                                                 self.key_dir))

    def open_config(self, text):
        db = ZODB.config.databaseFromString(text)
        self.opened.append(db)
        return db

    def close(self, db):
        self.opened.remove(db)
        db.close()

    def facility(self):
        return KeyManagementFacility(self.key_dir)

    # -- writing and reading back -------------------------------------

    def commit_blobs(self, db):
        """Commit two blobs, then a new revision of the first; remember
        every revision's plaintext by oid."""
        with db.transaction() as conn:
            root = conn.root()
            root['record'] = PersistentMapping(text=RECORD)
            root['small'] = ZODB.blob.Blob(SMALL)
            root['large'] = ZODB.blob.Blob(LARGE)
        with db.transaction() as conn:
            root = conn.root()
            with root['small'].open('w') as f:
                f.write(UPDATED)
            small, large = root['small']._p_oid, root['large']._p_oid
        self.blobs = {small: [SMALL, UPDATED], large: [LARGE]}

    def check_read_back(self, db):
        with db.transaction() as conn:
            root = conn.root()
            self.assertEqual(root['record']['text'], RECORD)
            with root['small'].open() as f:
                self.assertEqual(f.read(), UPDATED)
            with root['large'].open() as f:
                self.assertEqual(f.read(), LARGE)

    # -- what the components keep ---------------------------------------

    def assertSealedBlob(self, data, oid=None, where=''):
        """``data`` is a blob file in the stream format that the keys open
        to a plaintext committed for its oid (``oid`` when known, else one
        of the blobs'), bound to that oid."""
        self.assertNotIn(CANARY, data, where)
        self.assertEqual(data[:len(stream.MAGIC)], stream.MAGIC, where)
        stream.read_header(io.BytesIO(data))       # a well-formed header
        candidates = [oid] if oid is not None else list(self.blobs)
        facility = self.facility()
        opened = []
        for candidate in candidates:
            out = io.BytesIO()
            try:
                facility.decrypt_file(self.kek, io.BytesIO(data), out,
                                      oid=candidate)
            except Exception:
                continue
            opened.append(candidate)
            self.assertIn(out.getvalue(), self.blobs[candidate], where)
        # the oid is bound: exactly one of the blobs' oids opens it
        self.assertEqual(len(opened), 1, where)
        return opened[0]

    def assertOnlyCiphertext(self, files):
        """No file holds the marker; each ``.blob`` file is a sealed blob.
        Return the oids of the blob files."""
        oids = []
        for path, data in sorted(files.items()):
            self.assertNotIn(CANARY, data, path)
            if path.endswith('.blob'):
                oids.append(self.assertSealedBlob(data, where=path))
        return oids

    def write_uncommitted(self, db, extra_dirs=()):
        """While a transaction writes a blob (and after a savepoint), no
        file of the stack (under the test's directory, outside the
        wrapper's ``plaintext-dir``, and ``extra_dirs``) holds its
        plaintext."""
        with db.transaction() as conn:
            conn.root()['blob'] = ZODB.blob.Blob(b'committed')
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            with conn.root()['blob'].open('w') as f:
                f.write(CANARY + b' being written')
                f.flush()
                leaked = [path for path, data in files_under(
                    self.tmp, *extra_dirs,
                    skip=[self.path('plain')]).items() if CANARY in data]
            tm.savepoint()
            leaked += [path for path, data in files_under(
                self.tmp, *extra_dirs,
                skip=[self.path('plain')]).items() if CANARY in data]
            self.assertEqual(leaked, [])
        finally:
            tm.abort()
            conn.close()

    def check_conflict_resolution(self, db):
        """Two connections change one PCounter at once: the second commit
        is resolved (through the wrapper, with the keys), not refused."""
        from ZODB.tests.ConflictResolution import PCounter
        tm1 = transaction.TransactionManager()
        tm2 = transaction.TransactionManager()
        c1 = db.open(transaction_manager=tm1)
        c2 = db.open(transaction_manager=tm2)
        try:
            c1.root()['counter'] = PCounter()
            c1.root()['counter'].inc()
            tm1.commit()
            tm2.begin()
            c2.root()['counter']._p_activate()
            c1.root()['counter'].inc()
            c2.root()['counter'].inc()
            tm1.commit()
            tm2.commit()
            tm1.begin()
            self.assertEqual(c1.root()['counter']._value, 3)
        finally:
            tm1.abort()
            tm2.abort()
            c1.close()
            c2.close()

    def assertEveryRevision(self, oids):
        """``oids`` (one per blob file found) names every blob revision."""
        self.assertEqual(sorted(oids), sorted(
            oid for oid, revisions in self.blobs.items()
            for _ in revisions))


def _with_plaintext_dir(config, here):
    os.makedirs(os.path.join(here, 'plain'), exist_ok=True)
    return config.replace('<encryptingstorage>\n',
                          '<encryptingstorage>\n    plaintext-dir %s\n'
                          % os.path.join(here, 'plain'), 1)


# -- zodb-s3blobs -----------------------------------------------------------

S3_CONFIG = '''
%%import zodbkmi
%%import zodb_s3blobs
<zodb>
  <encryptingstorage>
    %(keys)s
    <s3blobstorage>
      bucket-name %(bucket)s
      s3-endpoint-url %(endpoint)s
      s3-region us-east-1
      s3-access-key %(access)s
      s3-secret-key %(secret)s
      s3-use-ssl false
      cache-dir %(cache)s
      <filestorage>
        path %(here)s/Data.fs
      </filestorage>
    </s3blobstorage>
  </encryptingstorage>
</zodb>
'''


class S3BlobsTests(_Stack):
    """``<encryptingstorage>`` around zodb-s3blobs' ``<s3blobstorage>``:
    blobs are encrypted in the application before they are uploaded."""

    layer = S3Layer

    def setUp(self):
        needs_s3(self)
        super().setUp()
        self.s3 = S3Layer.server
        self.bucket = self.s3.create_bucket()

    def config(self, cache='s3-cache'):
        from tests import s3server
        return S3_CONFIG % dict(
            keys=self.keys_section(), bucket=self.bucket,
            endpoint=self.s3.endpoint, access=s3server.ACCESS_KEY,
            secret=s3server.SECRET_KEY, cache=self.path(cache),
            here=self.tmp)

    def test_bucket_and_cache_hold_only_ciphertext(self):
        db = self.open_config(self.config())
        self.assertIsInstance(db.storage, EncryptingStorage)
        self.assertEqual(type(db.storage.base).__name__, 'S3BlobStorage')
        self.commit_blobs(db)
        staging = db.storage.base.temporaryDirectory()
        self.close(db)
        # a new database with an empty cache downloads every blob
        reader = self.open_config(self.config(cache='s3-cache-2'))
        self.check_read_back(reader)
        self.close(reader)
        self.assertFalse(os.path.exists(staging))   # removed at close

        objects = self.s3.objects(self.bucket)
        self.assertEqual(len(objects), 3)            # one per revision
        oids = []
        sizes = []
        for key, data in objects.items():
            # zodb-s3blobs' keys: blobs/<oid hex>/<tid hex>.blob
            oid = p64(int(key.split('/')[1], 16))
            oids.append(self.assertSealedBlob(data, oid, where=key))
            sizes.append(len(data))
        self.assertEveryRevision(oids)
        # what the object store sees of the sizes (docs/storage.rst): the
        # blob's, plus 39 bytes, plus 16 per 64 KiB chunk (at least one)
        self.assertEqual(sorted(sizes), sorted(
            len(plain) + 39 + 16 * max(1, -(-len(plain) // 65536))
            for revisions in self.blobs.values() for plain in revisions))

        # the local caches of both databases, and Data.fs
        for cache in ('s3-cache', 's3-cache-2'):
            oids = self.assertOnlyCiphertext(files_under(self.path(cache)))
            self.assertTrue(oids, cache)
        self.assertOnlyCiphertext(files_under(self.path('Data.fs')))

    def test_blob_bound_to_its_oid_in_the_bucket(self):
        # an object moved to another key of the bucket (another oid) is
        # refused: the stream is bound to its oid
        from zodbkmi.exceptions import DecryptionError
        db = self.open_config(self.config())
        self.commit_blobs(db)
        self.close(db)
        client = self.s3.client()
        objects = self.s3.objects(self.bucket)
        large_oid = [o for o, r in self.blobs.items() if r == [LARGE]][0]
        large_key = [k for k in objects
                     if int(k.split('/')[1], 16) == u64(large_oid)][0]
        small_key = sorted(k for k in objects if k != large_key)[-1]
        client.put_object(Bucket=self.bucket, Key=small_key,
                          Body=objects[large_key])
        reader = self.open_config(self.config(cache='s3-cache-2'))
        with reader.transaction() as conn:
            with self.assertRaises(DecryptionError):
                conn.root()['small'].open().read()

    def test_pack_removes_unreferenced_blob_objects(self):
        # zodb-s3blobs' pack reads references through the wrapper's
        # garbage collection, then deletes the objects of removed revisions
        db = self.open_config(self.config())
        self.commit_blobs(db)
        with db.transaction() as conn:
            del conn.root()['large']
        db.pack(time.time() + 1)
        self.close(db)
        objects = self.s3.objects(self.bucket)
        self.assertEqual(len(objects), 1)       # the current small blob
        small_oid = [o for o, r in self.blobs.items() if len(r) == 2][0]
        for key, data in objects.items():
            self.assertSealedBlob(data, small_oid, where=key)
        reader = self.open_config(self.config(cache='s3-cache-2'))
        with reader.transaction() as conn:
            with conn.root()['small'].open() as f:
                self.assertEqual(f.read(), UPDATED)

    def test_conflict_resolution(self):
        self.check_conflict_resolution(self.open_config(self.config()))

    def test_uncommitted_blob(self):
        db = self.open_config(_with_plaintext_dir(self.config(), self.tmp))
        self.write_uncommitted(
            db, extra_dirs=[db.storage.base.temporaryDirectory()])


# -- zc.zlibstorage ---------------------------------------------------------

ZLIB_OUTSIDE = '''
%%import zodbkmi
%%import zc.zlibstorage
<zodb>
  <zlibstorage>
    <encryptingstorage>
      %(keys)s
      <filestorage>
        path %(path)s
      </filestorage>
    </encryptingstorage>
  </zlibstorage>
</zodb>
'''

ZLIB_INSIDE = '''
%%import zodbkmi
%%import zc.zlibstorage
<zodb>
  <encryptingstorage>
    %(keys)s
    <zlibstorage>
      <filestorage>
        path %(path)s
      </filestorage>
    </zlibstorage>
  </encryptingstorage>
</zodb>
'''

# compressible: the same text many times
COMPRESSIBLE = (RECORD + ' ') * 200


class ZlibTests(_Stack):
    """The outer wrapper transforms first on the way down: with
    ``<zlibstorage>`` outside ``<encryptingstorage>`` records are
    compressed, then encrypted."""

    def config(self, template, name='Data.fs'):
        return template % dict(keys=self.keys_section(),
                               path=self.path(name))

    def fill(self, db):
        with db.transaction() as conn:
            conn.root()['text'] = PersistentMapping(text=COMPRESSIBLE)
        with db.transaction() as conn:
            return conn.root()['text']._p_oid

    def raw_records(self, name='Data.fs'):
        """``{oid: data}`` of the last revision of each record, as in the
        file, read with a plain FileStorage (no keys, no zlib)."""
        fs = ZODB.FileStorage.FileStorage(self.path(name), read_only=True)
        try:
            records = {}
            for txn in fs.iterator():
                for record in txn:
                    records[record.oid] = record.data
            return records
        finally:
            fs.close()

    def opened_records(self, name='Data.fs'):
        """``{oid: plaintext of the envelope}`` of the same records,
        opened with the keys only (no zlib)."""
        from zodbkmi.keyholder import read_key_file
        storage = EncryptingStorage(
            ZODB.FileStorage.FileStorage(self.path(name), read_only=True),
            self.facility(), read_key_file(self.key_file))
        try:
            return {oid: storage.load(oid)[0]
                    for oid in self.raw_records(name)}
        finally:
            storage.close()

    def test_zlib_outside_compresses_then_encrypts(self):
        db = self.open_config(self.config(ZLIB_OUTSIDE))
        self.assertEqual(type(db.storage).__name__, 'ZlibStorage')
        self.assertIsInstance(db.storage.base, EncryptingStorage)
        oid = self.fill(db)
        self.close(db)
        raw = self.raw_records()
        for data in raw.values():         # every record is an envelope
            self.assertTrue(envelope.is_envelope(data))
            self.assertNotIn(CANARY, data)
        opened = self.opened_records()
        # whose plaintext is zc.zlibstorage's compressed record
        self.assertEqual(opened[oid][:2], b'.z')
        state = zlib.decompress(opened[oid][2:])
        self.assertIn(CANARY, state)
        # compressed before encryption: the record is much smaller than
        # the state it holds
        self.assertLess(len(raw[oid]), len(state) // 10)
        db = self.open_config(self.config(ZLIB_OUTSIDE))
        with db.transaction() as conn:
            self.assertEqual(conn.root()['text']['text'], COMPRESSIBLE)

    def test_zlib_inside_stores_ciphertext_uncompressed(self):
        # the other order works, but compresses ciphertext: in vain, so
        # zc.zlibstorage keeps each record as it is (an envelope)
        db = self.open_config(self.config(ZLIB_INSIDE))
        self.assertIsInstance(db.storage, EncryptingStorage)
        self.assertEqual(type(db.storage.base).__name__, 'ZlibStorage')
        oid = self.fill(db)
        self.close(db)
        raw = self.raw_records()
        for data in raw.values():
            self.assertTrue(envelope.is_envelope(data))
            self.assertNotIn(CANARY, data)
        opened = self.opened_records()
        state = opened[oid]
        self.assertIn(CANARY, state)          # a pickle, not compressed
        self.assertGreater(len(raw[oid]), len(state))
        # the length of the ciphertext: the pickle's plus a constant
        self.assertEqual(len({len(raw[o]) - len(opened[o]) for o in raw}), 1)
        db = self.open_config(self.config(ZLIB_INSIDE))
        with db.transaction() as conn:
            self.assertEqual(conn.root()['text']['text'], COMPRESSIBLE)

    def test_conflict_resolution_zlib_outside(self):
        self.check_conflict_resolution(
            self.open_config(self.config(ZLIB_OUTSIDE)))

    def test_conflict_resolution_zlib_inside(self):
        self.check_conflict_resolution(
            self.open_config(self.config(ZLIB_INSIDE)))

    def _record_sizes(self, template, name):
        """The stored sizes of two records of the same length: one whose
        attacker-chosen part guesses the secret in it, one that does not."""
        secret = uuid.uuid4().hex
        wrong = uuid.uuid4().hex
        db = self.open_config(self.config(template, name))
        with db.transaction() as conn:
            root = conn.root()
            root['right'] = PersistentMapping(
                secret='token=' + secret, comment='token=' + secret)
            root['wrong'] = PersistentMapping(
                secret='token=' + secret, comment='token=' + wrong)
        with db.transaction() as conn:
            oids = conn.root()['right']._p_oid, conn.root()['wrong']._p_oid
        self.close(db)
        raw = self.raw_records(name)
        return [len(raw[oid]) for oid in oids]

    def test_compression_lets_lengths_reveal_content(self):
        # CRIME-like: compressed, a record whose attacker-controlled part
        # repeats the secret is shorter, and the ciphertext shows it
        right, wrong = self._record_sizes(ZLIB_OUTSIDE, 'Zlib.fs')
        self.assertLess(right, wrong)
        # without compression, records of states of the same length have
        # the same length whatever they hold
        right, wrong = self._record_sizes(ZLIB_INSIDE, 'Plain.fs')
        self.assertEqual(right, wrong)


# -- RelStorage on PostgreSQL, blobs in the database -----------------------

RELSTORAGE_CONFIG = '''
%%import zodbkmi
%%import relstorage
<zodb>
  <encryptingstorage>
    %(keys)s
    <relstorage>
      keep-history %(history)s
      blob-dir %(cache)s
      shared-blob-dir false
      <postgresql>
        driver psycopg2
        dsn %(dsn)s
      </postgresql>
    </relstorage>
  </encryptingstorage>
</zodb>
'''


class RelStorageBlobTests(_Stack):
    """Blobs in PostgreSQL (``shared-blob-dir false``): the large objects
    of ``blob_chunk`` and the local blob cache hold ciphertext."""

    layer = PostgresLayer

    def setUp(self):
        needs_postgres(self)
        super().setUp()
        self.dbname = 'stack_' + uuid.uuid4().hex[:12]
        self.dsn = PostgresLayer.server.createdb(self.dbname)

    def config(self, cache, history=False):
        return RELSTORAGE_CONFIG % dict(
            keys=self.keys_section(), cache=self.path(cache), dsn=self.dsn,
            history='true' if history else 'false')

    def blob_chunks(self):
        """``{(oid, tid): bytes}`` of every blob in the database, its
        chunks (large objects) read with psycopg2 and put together."""
        import psycopg2
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor() as cursor:
                cursor.execute('SELECT zoid, tid, chunk_num, lo_get(chunk) '
                               'FROM blob_chunk ORDER BY zoid, tid, '
                               'chunk_num')
                blobs = {}
                for zoid, tid, _, chunk in cursor.fetchall():
                    key = (p64(zoid), p64(tid))
                    blobs[key] = blobs.get(key, b'') + bytes(chunk)
                cursor.execute('SELECT state FROM object_state')
                states = [bytes(row[0]) for row in cursor.fetchall()
                          if row[0] is not None]
            return blobs, states
        finally:
            conn.close()

    def check_database(self, revisions):
        blobs, states = self.blob_chunks()
        self.assertEqual(len(blobs), revisions)
        oids = [self.assertSealedBlob(data, oid, where=repr((oid, tid)))
                for (oid, tid), data in blobs.items()]
        for state in states:
            self.assertTrue(envelope.is_envelope(state))
            self.assertNotIn(CANARY, state)
        return oids

    def test_history_free(self):
        db = self.open_config(self.config('cache-1'))
        self.assertIsInstance(db.storage, EncryptingStorage)
        self.commit_blobs(db)
        self.close(db)
        reader = self.open_config(self.config('cache-2'))
        self.check_read_back(reader)
        self.close(reader)
        # history free: the current revision of each blob
        self.assertEqual(len(self.check_database(2)), 2)
        for cache in ('cache-1', 'cache-2'):
            self.assertTrue(self.assertOnlyCiphertext(
                files_under(self.path(cache))), cache)

    def test_history_preserving(self):
        db = self.open_config(self.config('cache-1', history=True))
        self.commit_blobs(db)
        self.close(db)
        reader = self.open_config(self.config('cache-2', history=True))
        self.check_read_back(reader)
        self.close(reader)
        self.assertEveryRevision(self.check_database(3))
        for cache in ('cache-1', 'cache-2'):
            self.assertTrue(self.assertOnlyCiphertext(
                files_under(self.path(cache))), cache)

    def test_uncommitted_blob(self):
        self.write_uncommitted(self.open_config(_with_plaintext_dir(
            self.config('cache'), self.tmp)))


# -- ZEO ----------------------------------------------------------------------

ZEO_CONFIG = '''
%%import zodbkmi
<zodb>
  <encryptingstorage>
    %(keys)s
    <zeoclient>
      server 127.0.0.1:%(port)d
      blob-dir %(blob_dir)s
      shared-blob-dir %(shared)s
    </zeoclient>
  </encryptingstorage>
</zodb>
'''


class ZEOBlobTests(_Stack):
    """A ZEO server without keys; its blob directory shared with the
    clients or not (then each client has a blob cache of its own)."""

    def setUp(self):
        import ZEO
        super().setUp()
        self.server_blobs = self.path('server-blobs')
        self.addr, self.stop = ZEO.server(
            path=self.path('server.fs'), blob_dir=self.server_blobs,
            threaded=False)

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            self.stop()

    def config(self, blob_dir, shared):
        return ZEO_CONFIG % dict(
            keys=self.keys_section(), port=self.addr[1],
            blob_dir=blob_dir, shared='true' if shared else 'false')

    def check(self, shared):
        blob_dir = (lambda n: self.server_blobs) if shared else self.path
        writer = self.open_config(self.config(blob_dir('cache-1'), shared))
        self.assertIsInstance(writer.storage, EncryptingStorage)
        self.commit_blobs(writer)
        reader = self.open_config(self.config(blob_dir('cache-2'), shared))
        self.check_read_back(reader)
        self.close(reader)
        self.close(writer)
        # the server's blob directory holds every revision
        oids = self.assertOnlyCiphertext(files_under(self.server_blobs))
        self.assertEveryRevision(oids)
        self.assertOnlyCiphertext(files_under(self.path('server.fs')))
        if not shared:
            for cache in ('cache-1', 'cache-2'):
                self.assertTrue(self.assertOnlyCiphertext(
                    files_under(self.path(cache))), cache)
        # nothing anywhere (key files aside) holds the plaintext
        for path, data in files_under(self.tmp, skip=[self.key_dir]).items():
            self.assertNotIn(CANARY, data, path)

    def test_shared_blob_dir(self):
        self.check(shared=True)

    def test_blob_cache(self):
        self.check(shared=False)

    def test_uncommitted_blob_shared(self):
        self.write_uncommitted(self.open_config(_with_plaintext_dir(
            self.config(self.server_blobs, True), self.tmp)))

    def test_uncommitted_blob_cache(self):
        self.write_uncommitted(self.open_config(_with_plaintext_dir(
            self.config(self.path('cache'), False), self.tmp)))


# -- backups -----------------------------------------------------------------


class BackupTests(_Stack):
    """repozo backs up an encrypted FileStorage as it is: the backup, and
    a copy of the blob directory, hold ciphertext, and restore to a
    database that the same keys open."""

    def repozo(self, *args):
        # repozo names its files by the second: a second backup within the
        # same second would sort before the first one
        while int(time.time()) <= getattr(self, '_last_backup', -1):
            time.sleep(0.05)
        subprocess.run([sys.executable, '-m', 'ZODB.scripts.repozo']
                       + list(args), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self._last_backup = int(time.time())

    def open_db(self, path, blob_dir, key_dir=None):
        from zodbkmi.keyholder import read_key_file
        kek = read_key_file(self.key_file)
        facility = KeyManagementFacility(key_dir or self.key_dir)
        facility.ensure_key(kek)        # as <encryptingstorage> does
        storage = EncryptingStorage(
            ZODB.FileStorage.FileStorage(path, blob_dir=blob_dir),
            facility, kek)
        db = ZODB.DB(storage)
        self.opened.append(db)
        return db

    def test_repozo_full_and_incremental_restore(self):
        data_fs, blob_dir = self.path('Data.fs'), self.path('blobs')
        backups = self.path('backups')
        os.mkdir(backups)
        db = self.open_db(data_fs, blob_dir)
        with db.transaction() as conn:
            conn.root()['record'] = PersistentMapping(text=RECORD)
        self.repozo('-B', '-r', backups, '-f', data_fs)          # full
        self.commit_blobs(db)
        self.repozo('-B', '-z', '-r', backups, '-f', data_fs)    # gzipped
        with db.transaction() as conn:
            conn.root()['record']['more'] = RECORD + ' more'
        self.repozo('-B', '-r', backups, '-f', data_fs)          # delta
        blob_backup = self.path('blobs-backup')
        shutil.copytree(blob_dir, blob_backup)
        key_backup = self.path('keys-backup')
        shutil.copytree(self.key_dir, key_backup)
        self.close(db)

        names = sorted(os.listdir(backups))
        for suffix in '.fs', '.deltafsz', '.deltafs':
            self.assertTrue(any(n.endswith(suffix) for n in names), names)
        backup_files = {
            path: gzip.decompress(data) if path.endswith('z') else data
            for path, data in files_under(backups).items()}
        self.assertOnlyCiphertext(backup_files)
        self.assertEveryRevision(
            self.assertOnlyCiphertext(files_under(blob_backup)))

        restored = self.path('restored', 'Data.fs')
        os.mkdir(self.path('restored'))
        self.repozo('-R', '-r', backups, '-o', restored)
        self.assertOnlyCiphertext(files_under(self.path('restored')))
        # the restored Data.fs, the copy of the blob directory and the
        # copy of the key vault, with the KEK
        db = self.open_db(restored, blob_backup, key_backup)
        self.check_read_back(db)
        read = 0
        with db.transaction() as conn:
            self.assertEqual(conn.root()['record']['more'], RECORD + ' more')
            for oid, revisions in self.blobs.items():
                blob = conn.get(oid)
                with blob.open() as f:
                    self.assertEqual(f.read(), revisions[-1])
                read += 1
            # every object of the restored database opens
            storage = db.storage
            for txn in storage.iterator():
                for record in txn:
                    storage.loadSerial(record.oid, record.tid)
                    read += 1
        self.assertGreater(read, 5)
        with db.transaction() as conn:      # and takes new transactions
            conn.root()['after'] = 'restored'
        self.close(db)

    def test_backup_without_the_key_vault_is_useless(self):
        data_fs, blob_dir = self.path('Data.fs'), self.path('blobs')
        backups = self.path('backups')
        os.mkdir(backups)
        db = self.open_db(data_fs, blob_dir)
        self.commit_blobs(db)
        self.close(db)
        self.repozo('-B', '-r', backups, '-f', data_fs)
        restored = self.path('restored.fs')
        self.repozo('-R', '-r', backups, '-o', restored)
        empty = self.path('no-keys')
        os.mkdir(empty, 0o700)
        fs = ZODB.FileStorage.FileStorage(restored, blob_dir=blob_dir,
                                          read_only=True)
        try:
            # refused when the storage is opened (an UnknownKeyError)
            with self.assertRaises(DatabaseKeyError):
                EncryptingStorage(fs, KeyManagementFacility(empty), self.kek)
        finally:
            fs.close()
        self.assertEqual(os.listdir(empty), [])

    def test_vault_backup_older_than_a_rotation(self):
        # a data key made after the vault's backup (a DEK rotation) is not
        # in it: what was written with it does not open (docs/storage.rst:
        # back up the vault after every change of keys)
        data_fs, blob_dir = self.path('Data.fs'), self.path('blobs')
        db = self.open_db(data_fs, blob_dir)
        with db.transaction() as conn:
            conn.root()['old'] = PersistentMapping(text=RECORD)
        self.close(db)
        key_backup = self.path('keys-backup')
        shutil.copytree(self.key_dir, key_backup)
        self.facility().rotate(self.kek)
        db = self.open_db(data_fs, blob_dir)
        with db.transaction() as conn:
            conn.root()['new'] = PersistentMapping(text=RECORD)
        with db.transaction() as conn:
            old, new = conn.root()['old']._p_oid, conn.root()['new']._p_oid
        self.close(db)
        fs = ZODB.FileStorage.FileStorage(data_fs, read_only=True)
        facility = KeyManagementFacility(key_backup)
        try:
            # the root was written again with the new data key: the
            # storage refuses the backup's keys when it is opened
            with self.assertRaises(DatabaseKeyError) as cm:
                EncryptingStorage(fs, facility, self.kek)
            self.assertNotIn(cm.exception.key_id, facility)
            self.assertIn(RECORD.encode(),
                          facility.decrypt(self.kek, fs.load(old)[0], old))
            with self.assertRaises(UnknownKeyError):
                facility.decrypt(self.kek, fs.load(new)[0], new)
        finally:
            fs.close()
