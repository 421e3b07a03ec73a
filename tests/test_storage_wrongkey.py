"""Opening a database with keys (defect 4 of issue #17).

A wrong KEK file or a mistyped key directory used to create a new data
key (in a new directory) before failing on the root record with a
traceback that began with an internal KeyError.  Now the storage checks
its keys when it is opened: DatabaseKeyError, naming the KEK ids given
and the data key the database needs, before anything is created; a data
key is created only for a database without encrypted records, or when
asked.
"""
import io
import os
import shutil
import tempfile
import traceback
import unittest
from contextlib import redirect_stderr
from contextlib import redirect_stdout

import transaction
import ZODB
import ZODB.config
import ZODB.FileStorage
from ZODB.utils import z64

from zodbkmi.exceptions import DatabaseKeyError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.kek import as_kek
from zodbkmi.keyholder import write_key_file
from zodbkmi.storage import EncryptingStorage
from zodbkmi.storage import MIGRATE
from zodbkmi.storage.common import is_sealed

CONFIG = '''\
%%import zodbkmi
<zodb>
  <encryptingstorage>
    key-file %(key_file)s
    key-dir %(key_dir)s
    %(extra)s
    <filestorage>
      path %(here)s/Data.fs
      blob-dir %(here)s/blobs
    </filestorage>
  </encryptingstorage>
</zodb>
'''


def tree(top):
    """Every path under ``top`` (relative), with the size of files."""
    found = {}
    for dirpath, dirnames, names in os.walk(top):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), top)] = 'dir'
        for name in names:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, top)] = os.path.getsize(path)
    return found


class _WrongKey(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-wrongkey-')
        self.kek = os.urandom(32)
        self.wrong = os.urandom(32)
        self.key_file = self.path('kek.key')
        self.wrong_file = self.path('wrong.key')
        write_key_file(self.key_file, self.kek)
        write_key_file(self.wrong_file, self.wrong)
        self.key_dir = self.path('keys')
        self.opened = []

    def tearDown(self):
        transaction.abort()
        for db in self.opened:
            db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def config(self, key_file=None, key_dir=None, extra=''):
        return CONFIG % dict(key_file=key_file or self.key_file,
                             key_dir=key_dir or self.key_dir,
                             here=self.tmp, extra=extra)

    def open_config(self, **kw):
        db = ZODB.config.databaseFromString(self.config(**kw))
        self.opened.append(db)
        return db

    def close(self, db):
        self.opened.remove(db)
        db.close()

    def make_database(self, **kw):
        """An encrypted database with one object, made through ZConfig
        (its data key created on first open)."""
        db = self.open_config(**kw)
        with db.transaction() as conn:
            conn.root()['secret'] = 'the value'
        self.close(db)

    def assertRefused(self, error, kek, dek_ids=None):
        """``error`` is the documented one: names the KEK id given and the
        data key needed, holds no key bytes, and its traceback starts with
        it (no internal KeyError before it)."""
        self.assertIsInstance(error, DatabaseKeyError)
        self.assertIsInstance(error, UnknownKeyError)
        self.assertNotIsInstance(error, KeyError)
        message = str(error)
        kek_id = as_kek(kek).key_id
        self.assertIn(kek_id, message)
        self.assertEqual(error.kek_ids, (kek_id,))
        self.assertEqual(error.oid, z64)
        if dek_ids is not None:
            self.assertIn(error.key_id, dek_ids)
            self.assertIn(error.key_id, message)
        for secret in (self.kek, self.wrong):
            for text in (secret.hex(), secret.hex().upper(),
                         __import__('base64').b64encode(secret).decode()):
                self.assertNotIn(text, message)
        formatted = ''.join(traceback.format_exception(error))
        self.assertNotIn('KeyError:', formatted.replace(
            'DatabaseKeyError:', ''))
        self.assertNotIn('During handling', formatted)


class ZConfigTests(_WrongKey):

    def test_wrong_kek_file(self):
        self.make_database()
        before = tree(self.tmp)
        dek_ids = os.listdir(self.key_dir)
        with self.assertRaises(DatabaseKeyError) as cm:
            self.open_config(key_file=self.wrong_file)
        self.assertRefused(cm.exception, self.wrong,
                           [n[:-4] for n in dek_ids])
        self.assertIn('wrapped by KEK %s' % as_kek(self.kek).key_id,
                      str(cm.exception))
        # no data key created for the wrong KEK
        self.assertEqual(os.listdir(self.key_dir), dek_ids)
        self.assertEqual(sorted(tree(self.tmp)), sorted(before))

    def test_mistyped_key_directory(self):
        self.make_database()
        before = tree(self.tmp)
        with self.assertRaises(DatabaseKeyError) as cm:
            self.open_config(key_dir=self.path('kyes'))
        self.assertRefused(cm.exception, self.kek)
        self.assertIn('not in the key store given', str(cm.exception))
        # nothing created: no directory, no key
        self.assertFalse(os.path.exists(self.path('kyes')))
        self.assertEqual(sorted(tree(self.tmp)), sorted(before))

    def test_empty_key_directory(self):
        self.make_database()
        os.mkdir(self.path('empty'), 0o700)
        with self.assertRaises(DatabaseKeyError):
            self.open_config(key_dir=self.path('empty'))
        self.assertEqual(os.listdir(self.path('empty')), [])

    def test_right_key_opens_and_creates_nothing(self):
        self.make_database()
        dek_ids = os.listdir(self.key_dir)
        db = self.open_config()
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], 'the value')
        self.assertEqual(os.listdir(self.key_dir), dek_ids)

    def test_empty_database_creates_its_key(self):
        # a new database: the key directory and the data key are made
        self.assertFalse(os.path.exists(self.key_dir))
        self.make_database()
        self.assertEqual(len(os.listdir(self.key_dir)), 1)
        self.assertEqual(os.stat(self.key_dir).st_mode & 0o777, 0o700)
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'),
                                          read_only=True)
        try:
            self.assertTrue(is_sealed(fs.load(z64)[0]))
        finally:
            fs.close()

    def test_create_key_false_creates_nothing(self):
        with self.assertRaises(UnknownKeyError):
            self.open_config(extra='create-key false')
        self.assertFalse(os.path.exists(self.key_dir))

    def test_create_key_true_for_a_second_kek(self):
        # asked: a KEK without a data key gets one, when the database
        # opens with the keys given (here as a previous key)
        self.make_database()
        db = self.open_config(
            key_file=self.wrong_file,
            extra='previous-key-file %s\n    create-key true'
            % self.key_file)
        with db.transaction() as conn:
            conn.root()['more'] = 1
        self.assertEqual(len(os.listdir(self.key_dir)), 2)

    def test_create_key_values(self):
        import ZConfig
        with self.assertRaises(ZConfig.DataConversionError):
            self.open_config(extra='create-key sometimes')

    def test_migrate_mode_plaintext_database_creates_its_key(self):
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'),
                                          blob_dir=self.path('blobs'))
        db = ZODB.DB(fs)
        with db.transaction() as conn:
            conn.root()['plain'] = 1
        db.close()
        db = self.open_config(extra='mode migrate')
        with db.transaction() as conn:
            conn.root()['new'] = 2
        self.assertEqual(len(os.listdir(self.key_dir)), 1)


class PythonAPITests(_WrongKey):

    def storage(self, key, create_key=False, **kw):
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        try:
            return EncryptingStorage(fs, KeyManagementFacility(self.key_dir),
                                     key, create_key=create_key, **kw)
        except BaseException:
            fs.close()
            raise

    def test_default_creates_no_key(self):
        storage = self.storage(self.kek)
        storage.close()
        self.assertFalse(os.path.exists(self.key_dir))

    def test_wrong_key(self):
        db = ZODB.DB(self.storage(self.kek, create_key=True))
        db.close()
        with self.assertRaises(DatabaseKeyError) as cm:
            self.storage(self.wrong, create_key=True)
        self.assertRefused(cm.exception, self.wrong)
        self.assertEqual(len(os.listdir(self.key_dir)), 1)

    def test_previous_key_opens(self):
        db = ZODB.DB(self.storage(self.kek, create_key=True))
        db.close()
        storage = self.storage(self.wrong, previous_keys=(self.kek,))
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            self.assertIn('_p_jar', dir(conn.root()))
        db.close()

    def test_auto(self):
        storage = self.storage(self.kek, create_key='auto')
        self.assertEqual(len(os.listdir(self.key_dir)), 1)
        db = ZODB.DB(storage)
        db.close()
        # the database has encrypted records now: auto creates nothing
        # for another KEK, and the check refuses it first
        with self.assertRaises(DatabaseKeyError):
            self.storage(self.wrong, create_key='auto')
        self.assertEqual(len(os.listdir(self.key_dir)), 1)

    def test_create_key_values(self):
        with self.assertRaises(ValueError):
            self.storage(self.kek, create_key='sometimes')

    def test_migrate_mode_without_sealed_records(self):
        fs = ZODB.FileStorage.FileStorage(self.path('Data.fs'))
        db = ZODB.DB(fs)
        db.close()
        storage = self.storage(self.wrong, mode=MIGRATE, create_key='auto')
        self.assertEqual(len(os.listdir(self.key_dir)), 1)
        storage.close()


class URITests(_WrongKey):

    def uri(self, key_file, key_dir):
        return ('zodbkmi+file://%s/Data.fs?key_file=%s&key_dir=%s'
                % (self.tmp, key_file, key_dir))

    def open_uri(self, key_file, key_dir):
        import zodburi
        factory, dbkw = zodburi.resolve_uri(self.uri(key_file, key_dir))
        db = ZODB.DB(factory(), **dbkw)
        self.opened.append(db)
        return db

    def test_wrong_kek_and_key_dir(self):
        db = self.open_uri(self.key_file, self.key_dir)
        with db.transaction() as conn:
            conn.root()['x'] = 1
        self.close(db)
        before = tree(self.tmp)
        with self.assertRaises(DatabaseKeyError) as cm:
            self.open_uri(self.wrong_file, self.key_dir)
        self.assertRefused(cm.exception, self.wrong)
        with self.assertRaises(DatabaseKeyError):
            self.open_uri(self.key_file, self.path('kyes'))
        self.assertEqual(sorted(tree(self.tmp)), sorted(before))
        # the FileStorage was closed: it opens again
        db = self.open_uri(self.key_file, self.key_dir)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['x'], 1)


class CLITests(_WrongKey):
    """``zodbkmi migrate`` with a wrong key: one line, exit 2."""

    def run_cli(self, *argv):
        from zodbkmi.cli import main
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def check_one_line(self, code, err):
        self.assertEqual(code, 2)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn('cannot open this database', lines[0])
        self.assertNotIn('Traceback', err)

    def test_config_with_wrong_key(self):
        self.make_database()
        before = tree(self.tmp)
        conf = self.path('wrong.conf')
        with open(conf, 'w') as f:
            f.write(self.config(key_file=self.wrong_file).replace(
                '<zodb>\n', '').replace('</zodb>\n', ''))
        code, out, err = self.run_cli('migrate', 'scan', conf,
                                      '--no-progress')
        self.check_one_line(code, err)
        self.assertIn(as_kek(self.wrong).key_id, err)
        after = tree(self.tmp)
        del after['wrong.conf']
        self.assertEqual(sorted(after), sorted(before))

    def test_filestorage_with_wrong_keys(self):
        self.make_database()
        before = tree(self.tmp)
        for key_dir in (self.key_dir, self.path('kyes')):
            code, out, err = self.run_cli(
                'migrate', 'rekey', self.path('Data.fs'), '--blob-dir',
                self.path('blobs'), '--key-file', self.wrong_file,
                '--old-key-file', self.wrong_file, '--key-dir', key_dir,
                '--no-progress')
            self.check_one_line(code, err)
            self.assertEqual(sorted(tree(self.tmp)), sorted(before))


class ZEOTests(_WrongKey):
    """A ZEO client opened with the wrong key, on a keyless server."""

    def test_wrong_key(self):
        from tests.zeoserver import ZEOServer
        import ZEO
        server = ZEOServer(self.path('server'))
        self.addCleanup(server.stop)
        facility = KeyManagementFacility(self.key_dir)
        db = ZODB.DB(EncryptingStorage(ZEO.client(server.addr,
                                                  wait_timeout=30),
                                       facility, self.kek, create_key=True))
        with db.transaction() as conn:
            conn.root()['x'] = 1
        db.close()
        dek_ids = os.listdir(self.key_dir)
        for kek, key_dir in ((self.wrong, self.key_dir),
                             (self.kek, self.path('kyes'))):
            client = ZEO.client(server.addr, wait_timeout=30)
            try:
                with self.assertRaises(DatabaseKeyError) as cm:
                    EncryptingStorage(client, KeyManagementFacility(key_dir),
                                      kek, create_key=True)
            finally:
                client.close()
            self.assertRefused(cm.exception, kek)
        self.assertEqual(os.listdir(self.key_dir), dek_ids)
        self.assertFalse(os.path.exists(self.path('kyes')))


class VaultTests(unittest.TestCase):
    """The key directory is made with its first key."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-keystore-')

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_opening_creates_nothing(self):
        path = os.path.join(self.tmp, 'a', 'keys')
        facility = KeyManagementFacility(path)
        self.assertEqual(len(facility), 0)
        self.assertEqual(facility.keys(), [])
        self.assertIsNone(facility.get('0' * 32))
        self.assertIsNone(facility.active_key_id(os.urandom(32)))
        with self.assertRaises(UnknownKeyError):
            facility.entry('0' * 32)
        self.assertEqual(os.listdir(self.tmp), [])
        kek = os.urandom(32)
        dek_id = facility.ensure_key(kek)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)
        self.assertEqual(os.listdir(path), [dek_id + '.dek'])
        self.assertEqual(facility.active_key_id(kek), dek_id)

    def test_made_by_another_process(self):
        path = os.path.join(self.tmp, 'keys')
        reader = KeyManagementFacility(path)
        kek = os.urandom(32)
        dek_id = KeyManagementFacility(path).ensure_key(kek)
        self.assertEqual(reader.keys(), [dek_id])

    def test_data_key_creation_is_an_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.interfaces import IDataKeyCreation
        from zodbkmi.interfaces import IExtendedKeyManagementFacility
        from zodbkmi.testing import TestingKeyManagementFacility
        self.assertTrue(IExtendedKeyManagementFacility.isOrExtends(
            IDataKeyCreation))
        for klass in (KeyManagementFacility, TestingKeyManagementFacility,
                      LocalKeyManagementFacility):
            self.assertTrue(IDataKeyCreation.implementedBy(klass), klass)
        verifyObject(IDataKeyCreation, KeyManagementFacility(self.tmp))
