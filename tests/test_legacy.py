"""Tests of zodbkmi.migrate.legacy and of imports from keas.kmi 3.3.0 and
cipher.encryptingstorage, on data written by keas.kmi itself.

The layer installs keas.kmi 3.3.0 (with ZODB and zope.component) from PyPI
into a virtual environment of its own and runs
``tests/legacy/make_keas_db.py`` there.  cipher.encryptingstorage 1.1 is
Python 2 only (``ConfigParser``, ``zope.interface.implements``, ZODB3): its
records are made by that script with keas.kmi's real facility, composed as
its ``encrypt()`` does (see the script).  Set ``ZODBKMI_KEAS_VENV`` to an
existing virtual environment with keas.kmi 3.3.0 to skip the install.
"""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from tests import foreign_environ

HERE = os.path.dirname(os.path.abspath(__file__))

SECRET_MODULE = '''\
"""Classes of the application whose database is imported."""
import persistent
try:
    from keas.kmi.persistent import EncryptedPersistent
except ImportError:          # in zodbkmi's environment: leaving keas.kmi
    EncryptedPersistent = persistent.Persistent


class Secret(EncryptedPersistent):
    pass


class Plain(persistent.Persistent):
    pass
'''


class KeasLayer:
    """A keas.kmi 3.3.0 database, made by keas.kmi in its own venv."""

    __bases__ = ()
    __name__ = 'KeasLayer'
    __module__ = __name__

    @classmethod
    def setUp(cls):
        cls.tmp = tempfile.mkdtemp(prefix='zodbkmi-keas-')
        venv = os.environ.get('ZODBKMI_KEAS_VENV')
        if not venv:
            venv = os.path.join(cls.tmp, 'venv')
            subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
            proc = subprocess.run(
                [os.path.join(venv, 'bin', 'pip'), 'install', '-q',
                 'keas.kmi==3.3.0', 'ZODB', 'zope.component'],
                capture_output=True, text=True, timeout=900,
                env=foreign_environ())
            if proc.returncode:
                raise RuntimeError('cannot install keas.kmi 3.3.0 from PyPI:'
                                   ' %s' % proc.stderr[-2000:])
        cls.data = os.path.join(cls.tmp, 'data')
        os.mkdir(cls.data)
        with open(os.path.join(cls.data, 'keasdata.py'), 'w') as f:
            f.write(SECRET_MODULE)
        proc = subprocess.run(
            [os.path.join(venv, 'bin', 'python'),
             os.path.join(HERE, 'legacy', 'make_keas_db.py'), cls.data],
            capture_output=True, text=True, timeout=300,
            env=foreign_environ())
        if proc.returncode:
            raise RuntimeError('keas.kmi could not make its database: %s'
                               % proc.stderr[-2000:])
        with open(os.path.join(cls.data, 'expected.json')) as f:
            cls.expected = json.load(f)

    @classmethod
    def tearDown(cls):
        shutil.rmtree(cls.tmp, True)


class _KeasTest:

    layer = KeasLayer

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        for name in ('kek.pem', 'keas.fs', 'plain.fs', 'ces.fs',
                     'keasdata.py'):
            shutil.copy(os.path.join(KeasLayer.data, name), self.tmp)
        shutil.copytree(os.path.join(KeasLayer.data, 'keys'),
                        self.path('keas-keys'))
        # a key file: read only when group and others have no access
        os.chmod(self.path('kek.pem'), 0o600)
        sys.path.insert(0, self.tmp)
        self.addCleanup(self._unimport)

    def _unimport(self):
        sys.path.remove(self.tmp)
        sys.modules.pop('keasdata', None)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def keas_keys(self):
        from zodbkmi.migrate.legacy import KeasKMIKeys
        return KeasKMIKeys.from_files(self.path('kek.pem'),
                                      self.path('keas-keys'))

    def records(self, name):
        from tests.test_migrate import current_records
        return current_records(self.path(name))


class KeasKMIKeysTests(_KeasTest, unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.migrate.legacy import KeasKMIKeys
        return KeasKMIKeys

    def test_key_id_is_keas_md5_name(self):
        keys = self.keas_keys()
        self.assertEqual(os.listdir(self.path('keas-keys')),
                         [keys.key_id + '.dek'])
        self.assertNotIn('PRIVATE', repr(keys))

    def test_decrypt_ces_records(self):
        from zodbkmi.migrate.legacy import EncryptingStorageReader
        reader = EncryptingStorageReader(self.keas_keys())
        plain = self.records('plain.fs')
        ces = self.records('ces.fs')
        self.assertEqual(sorted(ces), sorted(plain))
        for oid, data in ces.items():
            self.assertTrue(reader.recognizes(data))
            self.assertEqual(reader.decrypt_record(data), plain[oid])
        # some records were compressed by cipher.encryptingstorage
        keys = self.keas_keys()
        self.assertTrue(any(keys.decrypt(d[2:])[:2] == b'.z'
                            for d in ces.values()))

    def test_missing_dek(self):
        from zodbkmi.exceptions import UnknownKeyError
        keys = self.keas_keys()
        os.rename(self.path('keas-keys', keys.key_id + '.dek'),
                  self.path('keas-keys', 'other.dek'))
        with self.assertRaises(UnknownKeyError) as cm:
            self.keas_keys()
        self.assertIn(keys.key_id, str(cm.exception))

    def test_not_a_keas_kek(self):
        from zodbkmi.exceptions import InvalidKeyError
        from zodbkmi.migrate.legacy import keas_key_id
        bogus = b'-----BEGIN RSA PRIVATE KEY-----\nAAAA\n'
        shutil.copy(self.path('keas-keys', self.keas_keys().key_id + '.dek'),
                    self.path('keas-keys', keas_key_id(bogus) + '.dek'))
        with self.assertRaises(InvalidKeyError):
            self._getTargetClass()(bogus, self.path('keas-keys'))

    def test_decrypt_w_truncated_data(self):
        from zodbkmi.exceptions import TruncatedDataError
        keys = self.keas_keys()
        data = next(iter(self.records('ces.fs').values()))[2:]
        with self.assertRaises(TruncatedDataError):
            keys.decrypt(data[:-1])
        with self.assertRaises(TruncatedDataError):
            keys.decrypt(b'')

    def test_decrypt_w_bad_padding(self):
        from zodbkmi.exceptions import DecryptionError
        keys = self.keas_keys()
        encryptor = keys._cipher.encryptor()
        for block in (b'x' * 15 + b'\x00', b'x' * 14 + b'\x01\x02',
                      b'x' * 15 + b'\x11'):
            data = encryptor.update(block)
            with self.assertRaises(DecryptionError):
                keys.decrypt(data)
            encryptor = keys._cipher.encryptor()


class EncryptingStorageImportTests(_KeasTest, unittest.TestCase):

    def setUp(self):
        super().setUp()
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        self.facility = KeyManagementFacility(self.path('keys'))
        self.kek = AESKeyEncryptingKey.generate()

    def _run(self, mode, new=None, old=(), legacy=True):
        import ZODB.FileStorage
        from zodbkmi.migrate.legacy import EncryptingStorageReader
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import RecordTransformer
        reader = EncryptingStorageReader(self.keas_keys()) if legacy else None
        storage = ZODB.FileStorage.FileStorage(self.path('ces.fs'))
        try:
            return Migration(storage, RecordTransformer(
                MigrationKeys(self.facility, new, old), reader), mode,
                chunk_size=16).run()
        finally:
            storage.close()

    def test_scan(self):
        report = self._run('scan')
        self.assertEqual(report.kinds['legacy'], 51)
        self.assertEqual(report.failed, 0)

    def test_encrypt_imports(self):
        report = self._run('encrypt', self.kek)
        self.assertEqual(report.rewritten, 51)
        plain = self.records('plain.fs')
        for oid, data in self.records('ces.fs').items():
            self.assertEqual(self.facility.decrypt(self.kek, data, oid=oid),
                             plain[oid])
        self.assertEqual(self._run('encrypt', self.kek).rewritten, 0)

    def test_decrypt_imports_to_plaintext(self):
        report = self._run('decrypt')
        self.assertEqual(report.rewritten, 51)
        self.assertEqual(self.records('ces.fs'), self.records('plain.fs'))

    def test_command(self):
        from zodbkmi.cli import main
        environ = dict(os.environ)
        self.addCleanup(lambda: (os.environ.clear(),
                                 os.environ.update(environ)))
        key = base64.b64encode(os.urandom(32)).decode()
        os.environ.update(ENCRYPTION_ALGORITHM='aes256-gcm',
                          NEW_ENCRYPTION_KEY=key, OLD_ENCRYPTION_KEY='')
        out = io.StringIO()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, io.StringIO()
        try:
            code = main(['migrate', 'encrypt', self.path('ces.fs'),
                         '--key-dir', self.path('keys'),
                         '--keas-kek', self.path('kek.pem'),
                         '--keas-dek-dir', self.path('keas-keys')])
        finally:
            sys.stdout, sys.stderr = stdout, stderr
        self.assertEqual(code, 0)
        self.assertIn('legacy     51', out.getvalue())
        self.assertIn('rewritten 51', out.getvalue())


class KeasObjectImportTests(_KeasTest, unittest.TestCase):
    """keas.kmi ``EncryptedPersistent`` objects, read through ZODB."""

    def _open(self, name='keas.fs'):
        import ZODB
        import ZODB.FileStorage
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.path(name)))
        self.addCleanup(db.close)
        return db

    def _migrate(self, db, mode, **kw):
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import ObjectTransformer
        transformer = ObjectTransformer(db, legacy=self.keas_keys(), **kw)
        return Migration(db.storage, transformer, mode, chunk_size=32).run()

    def _check(self, db):
        import transaction
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            secrets = conn.root()['secrets']
            self.assertEqual(len(secrets), len(KeasLayer.expected['secrets']))
            for secret in secrets.values():
                want = KeasLayer.expected['secrets'][secret._p_oid.hex()]
                self.assertEqual(secret.name, want['name'])
                self.assertEqual(secret.number, want['number'])
                self.assertEqual(secret.data.hex(), want['data'])
                self.assertEqual(secret.note.text, want['note'])
                self.assertEqual(type(secret.note).__name__, 'Plain')
                self.assertEqual(secret.kind.__name__, 'Plain')
                self.assertEqual(
                    secret.previous._p_oid.hex()
                    if secret.previous is not None else None,
                    want['previous'])
        finally:
            conn.close()

    def test_legacy_state_reads(self):
        from zodbkmi.migrate.legacy import decrypt_keas_state
        from zodbkmi.migrate.legacy import is_keas_state
        db = self._open()
        conn = db.open()
        oid_hex, want = next(iter(KeasLayer.expected['secrets'].items()))
        state = conn._reader.getState(db.storage.load(
            bytes.fromhex(oid_hex))[0])
        self.assertTrue(is_keas_state(state))
        plain = decrypt_keas_state(self.keas_keys(), state)
        self.assertEqual(plain['name'], want['name'])
        self.assertIs(plain['note'], state[1][0])
        conn.close()

    def test_scan(self):
        report = self._migrate(self._open(), 'scan')
        n = len(KeasLayer.expected['secrets'])
        self.assertEqual(report.kinds['legacy'], n)
        self.assertEqual(report.failed, 0)

    def test_decrypt_leaves_keas_for_plain_persistent(self):
        db = self._open()
        report = self._migrate(db, 'decrypt')
        n = len(KeasLayer.expected['secrets'])
        self.assertEqual(report.rewritten, n)
        self.assertEqual(report.failed, 0)
        self._check(db)
        again = self._migrate(db, 'decrypt')
        self.assertEqual(again.rewritten, 0)
        self.assertEqual(again.kinds['legacy'], 0)
        # no secret is left in the ciphertext of keas.kmi
        for data in self.records_of(db).values():
            self.assertFalse(data[:2] == b'.e')

    def records_of(self, db):
        from zodbkmi.migrate import iter_records
        return {o: d for o, _, d in iter_records(db.storage)}

    def test_encrypt_refuses_a_class_that_does_not_encrypt(self):
        # Secret is still a plain Persistent in this environment: encrypt
        # must not write the keas.kmi objects in plaintext.
        db = self._open()
        before = self.records_of(db)
        report = self._migrate(db, 'encrypt')
        n = len(KeasLayer.expected['secrets'])
        self.assertEqual(report.failed, n)
        self.assertIn('does not encrypt its state', report.failed_oids[0][1])
        self.assertEqual(self.records_of(db), before)

    def test_command_object_level(self):
        from zodbkmi.cli import main
        out, err = io.StringIO(), io.StringIO()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            code = main(['migrate', 'decrypt', self.path('keas.fs'),
                         '--level', 'object', '--python-path', self.tmp,
                         '--keas-kek', self.path('kek.pem'),
                         '--keas-dek-dir', self.path('keas-keys')])
        finally:
            sys.stdout, sys.stderr = stdout, stderr
        self.assertEqual(code, 0, err.getvalue())
        n = len(KeasLayer.expected['secrets'])
        self.assertIn('legacy     %d' % n, out.getvalue())
        self.assertIn('rewritten %d' % n, out.getvalue())
        self._check(self._open())

    def test_encrypt_imports_into_an_encrypting_class(self):
        # the application switched Secret to a class that encrypts (here
        # the test's own, see tests/test_migrate_object.py)
        from tests.test_migrate_object import V2
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        with open(self.path('keasdata.py'), 'w') as f:
            f.write(V2.replace('class Note(', 'class Plain('))
        sys.modules.pop('keasdata', None)
        import keasdata
        keasdata.FACILITY = KeyManagementFacility(self.path('keys'))
        keasdata.KEY = keasdata.DECRYPT_KEYS = AESKeyEncryptingKey.generate()
        keasdata.FACILITY.ensure_key(keasdata.KEY)
        db = self._open()
        n = len(KeasLayer.expected['secrets'])
        report = self._migrate(db, 'encrypt', encrypting=(keasdata.Secret,))
        self.assertEqual(report.rewritten, n)
        self.assertEqual(report.failed, 0)
        again = self._migrate(db, 'encrypt', encrypting=(keasdata.Secret,))
        self.assertEqual(again.kinds['legacy'], 0)
        self.assertEqual(again.kinds['encrypted'], n)
        self.assertEqual(again.rewritten, 0)
        self._check(db)

    def test_encrypt_imports_into_encrypted_persistent(self):
        # keas.kmi users switch Secret to zodbkmi's EncryptedPersistent
        # and run: zodbkmi migrate encrypt --level object --keas-kek ...
        from zodbkmi.cli import main
        with open(self.path('keasdata.py'), 'w') as f:
            f.write(SECRET_MODULE.replace(
                'from keas.kmi.persistent import EncryptedPersistent',
                'from zodbkmi.persistent import EncryptedPersistent'))
        sys.modules.pop('keasdata', None)
        environ = dict(os.environ)
        self.addCleanup(lambda: (os.environ.clear(),
                                 os.environ.update(environ)))
        key = base64.b64encode(os.urandom(32)).decode()
        os.environ.update(ENCRYPTION_ALGORITHM='aes256-gcm',
                          NEW_ENCRYPTION_KEY=key, OLD_ENCRYPTION_KEY='')
        import zope.component.testing
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        n = len(KeasLayer.expected['secrets'])
        out, err = io.StringIO(), io.StringIO()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            code = main(['migrate', 'encrypt', self.path('keas.fs'),
                         '--level', 'object', '--python-path', self.tmp,
                         '--key-dir', self.path('keys'),
                         '--keas-kek', self.path('kek.pem'),
                         '--keas-dek-dir', self.path('keas-keys')])
            self.assertEqual(code, 0, err.getvalue())
            self.assertIn('legacy     %d' % n, out.getvalue())
            self.assertIn('rewritten %d' % n, out.getvalue())
            # again: everything is under zodbkmi's key now
            out.truncate(0)
            code = main(['migrate', 'scan', self.path('keas.fs'),
                         '--level', 'object', '--python-path', self.tmp,
                         '--key-dir', self.path('keys')])
        finally:
            sys.stdout, sys.stderr = stdout, stderr
        self.assertEqual(code, 0, err.getvalue())
        self.assertIn('encrypted  %d' % n, out.getvalue())
        self.assertIn('legacy     0', out.getvalue())
        # the application reads them with its key holder
        import keasdata
        from zodbkmi.persistent import EncryptedPersistent
        self.assertTrue(issubclass(keasdata.Secret, EncryptedPersistent))
        self._check(self._open())
