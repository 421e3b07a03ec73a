"""Leak scan of an end-to-end scenario: no key or plaintext where it must
not be.

One private directory holds everything the scenario writes, its temporary
directory (``TMPDIR``) included: a FileStorage of ``EncryptedPersistent``
objects, an ``EncryptingStorage`` with blobs whose keys live on a real key
server (``zodbkmi serve``, with its access log, audit log, TLS material and
tokens) reached through a ``LocalKeyManagementFacility``, a database
encrypted by ``zodbkmi migrate``, and files encrypted by ``zodbkmi
encrypt-file``.  Every plaintext holds a canary; every key is the
scenario's own.  Then ``scripts/leakscan.py`` scans every file for each
canary and each KEK, DEK and token (raw, hex, base64, URL-safe base64,
PEM), and the key files must have mode 0600 in 0700 directories.
"""
import base64
import importlib.util
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

import transaction
import ZODB
import ZODB.FileStorage
import zope.component
import zope.component.testing
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

from zodbkmi.testing import StaticKeyHolder as Holder

HERE = os.path.dirname(os.path.abspath(__file__))
ZODBKMI = [sys.executable, '-m', 'zodbkmi.cli']


def load_leakscan():
    spec = importlib.util.spec_from_file_location(
        'leakscan', os.path.join(os.path.dirname(HERE), 'scripts',
                                 'leakscan.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


leakscan = load_leakscan()


def canary(what):
    return leakscan.CANARY + b'-' + what + b'-' + os.urandom(6).hex().encode()


class Scenario:
    """A layer: the scenario runs once; the tests check what it left."""

    __name__ = 'LeakScenario'
    __bases__ = ()
    __module__ = __name__

    @classmethod
    def setUp(cls):
        cls.root = tempfile.mkdtemp(prefix='zodbkmi-leaks-')
        # plaintext inputs and outputs of the file commands: the user's,
        # not the product's, so outside the scanned directory
        cls.outside = tempfile.mkdtemp(prefix='zodbkmi-leaks-user-')
        cls.private = os.path.join(cls.root, 'scanned')
        cls.tmpdir = os.path.join(cls.private, 'tmp')
        os.makedirs(cls.tmpdir, mode=0o700)
        saved = tempfile.tempdir, os.environ.get('TMPDIR')
        tempfile.tempdir = cls.tmpdir
        os.environ['TMPDIR'] = cls.tmpdir
        cls.server = None
        try:
            cls._scenario()
        except BaseException:
            cls._cleanup()
            raise
        finally:
            tempfile.tempdir = saved[0]
            if saved[1] is None:
                os.environ.pop('TMPDIR', None)
            else:
                os.environ['TMPDIR'] = saved[1]

    @classmethod
    def tearDown(cls):
        cls._cleanup()

    @classmethod
    def _cleanup(cls):
        if cls.server is not None:
            cls.server.stop()
        shutil.rmtree(cls.root, ignore_errors=True)
        shutil.rmtree(cls.outside, ignore_errors=True)

    # -- the scenario ----------------------------------------------------

    @classmethod
    def _path(cls, *parts):
        return os.path.join(cls.private, *parts)

    @classmethod
    def _run(cls, name, args, **kw):
        """Run the CLI; keep its output in logs/<name>.txt (scanned)."""
        env = dict(os.environ, TMPDIR=cls.tmpdir,
                   PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run(ZODBKMI + args, capture_output=True,
                              env=env, timeout=120, **kw)
        os.makedirs(cls._path('logs'), exist_ok=True)
        with open(cls._path('logs', name + '.txt'), 'wb') as f:
            f.write(proc.stdout + b'\n' + proc.stderr)
        if proc.returncode:
            raise AssertionError('%s failed: %s' % (args[0], proc.stderr))
        return proc

    @classmethod
    def _scenario(cls):
        from tests.test_persistent import Secret
        from zodbkmi.testing import ServerProcess
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.kek import RSAKeyEncryptingKey
        from zodbkmi.keyholder import write_key_file
        from zodbkmi.storage import EncryptingStorage

        cls.canaries = {}
        cls.keks = {}
        cls.key_files = {}      # path -> label of the secret it holds
        os.makedirs(cls._path('kek'), mode=0o700)

        # 1. EncryptedPersistent objects, master facility, AES KEK file
        kek_a = os.urandom(32)
        cls.keks['AES KEK'] = kek_a
        path = cls._path('kek', 'aes.key')
        write_key_file(path, kek_a)
        cls.key_files[path] = 'AES KEK'
        master = KeyManagementFacility(cls._path('keys'))
        master.create_key(kek_a)
        zope.component.testing.setUp()
        try:
            zope.component.provideUtility(master)
            zope.component.provideUtility(Holder(kek_a))
            c = cls.canaries['object'] = canary(b'object')
            os.mkdir(cls._path('objects'))
            db = ZODB.DB(ZODB.FileStorage.FileStorage(
                cls._path('objects', 'Data.fs')))
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()['s'] = Secret('s', c)
            tm.commit()
            conn.cacheMinimize()
            assert conn.root()['s'].value == c
            conn.close()
            db.close()
        finally:
            zope.component.testing.tearDown()

        # 2. the key server, and a storage whose keys live there
        cls.server = ServerProcess()
        kek_r = RSAKeyEncryptingKey.generate(3072)
        pem = kek_r.private_pem()
        cls.keks['RSA KEK'] = pem
        path = cls._path('kek', 'rsa.pem')
        write_key_file(path, pem)
        cls.key_files[path] = 'RSA KEK'
        local = LocalKeyManagementFacility(
            cls.server.url, token=cls.server.admin, ca_file=cls.server.ca)
        local.create_key(pem)
        os.mkdir(cls._path('storage'))
        storage = EncryptingStorage(ZODB.FileStorage.FileStorage(
            cls._path('storage', 'Data.fs'),
            blob_dir=cls._path('storage', 'blobs')), local, key=pem)
        db = ZODB.DB(storage)
        c = cls.canaries['record'] = canary(b'record')
        b = cls.canaries['blob'] = canary(b'blob')
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['m'] = PersistentMapping({'text': c})
        conn.root()['b'] = Blob(b * 1000)
        tm.commit()
        conn.cacheMinimize()
        with conn.root()['b'].open() as f:       # openCommittedBlobFile
            assert f.read() == b * 1000
        with open(conn.root()['b'].committed(), 'rb') as f:  # loadBlob
            assert f.read() == b * 1000
        tm.abort()
        conn.close()
        db.close()
        cls.remote_deks = [
            wrapped_dek(kek_r, e.wrapped) for e in
            (local.entry(d) for d in local.keys())]
        local.close()

        # 3. a plaintext database encrypted by zodbkmi migrate (--pack)
        os.mkdir(cls._path('migrated'))
        c = cls.canaries['migrated'] = canary(b'migrated')
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            cls._path('migrated', 'Data.fs')))
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['m'] = PersistentMapping({'text': c})
        tm.commit()
        conn.close()
        db.close()
        cls._run('migrate', [
            'migrate', 'encrypt', cls._path('migrated', 'Data.fs'),
            '--key-dir', cls._path('keys'),
            '--key-file', cls._path('kek', 'aes.key'), '--pack',
            '--no-progress'])

        # 4. files, encrypted and decrypted with the CLI
        c = cls.canaries['file'] = canary(b'file')
        plain = os.path.join(cls.outside, 'plain.txt')
        with open(plain, 'wb') as f:
            f.write(c * 5000)
        os.mkdir(cls._path('files'))
        cls._run('encrypt-file', [
            'encrypt-file', plain, '-o', cls._path('files', 'plain.zks'),
            '--key-file', cls._path('kek', 'aes.key'),
            '--key-dir', cls._path('keys')])
        cls._run('decrypt-file', [
            'decrypt-file', cls._path('files', 'plain.zks'),
            '-o', os.path.join(cls.outside, 'back.txt'),
            '--key-file', cls._path('kek', 'aes.key'),
            '--key-dir', cls._path('keys')])
        with open(os.path.join(cls.outside, 'back.txt'), 'rb') as f:
            assert f.read() == c * 5000
        out = io.BytesIO()
        master.encrypt_file(kek_a, io.BytesIO(c), out)
        with open(cls._path('files', 'api.zks'), 'wb') as f:
            f.write(out.getvalue())

        master = KeyManagementFacility(cls._path('keys'))
        cls.local_deks = [wrapped_dek(kek_a, master[d]) for d in master]

        # 5. the server stops; its logs and output stay
        cls.server.stop()
        cls.server_dir = cls.server.dir
        cls.server = None
        # the documented step after a migration with --pack: the old file
        # holds the plaintext (docs/migration.rst); remove it after the
        # positive control of test_scanner_finds_what_is_planted
        cls.old_file = cls._path('migrated', 'Data.fs.old')
        cls.old_copy = os.path.join(cls.outside, 'Data.fs.old')
        shutil.move(cls.old_file, cls.old_copy)

        server_var = os.path.join(cls.server_dir, 'var')
        cls.tokens = {}
        for role in ('admin', 'client'):
            path = os.path.join(server_var, role + '.token')
            with open(path, 'rb') as f:
                cls.tokens[role] = f.read().strip()
            cls.key_files[path] = role + ' token'
        cls.key_files[os.path.join(server_var, 'tls', 'key.pem')] = \
            'TLS key'
        with open(os.path.join(server_var, 'tls', 'key.pem'), 'rb') as f:
            cls.tls_key = f.read()


class LeakScanTests(unittest.TestCase):
    """Each test checks one property of what the scenario left on disk."""

    layer = Scenario

    def __getattr__(self, name):
        # the scenario's results
        if name.startswith('__'):
            raise AttributeError(name)
        return getattr(Scenario, name)

    def _path(self, *parts):
        return os.path.join(Scenario.private, *parts)

    def secrets(self):
        S = leakscan.Secret
        found = [S('canary ' + k, v) for k, v in self.canaries.items()]
        found += [S(k, v) for k, v in self.keks.items()]
        found += [S('DEK %d' % i, v) for i, v in enumerate(
            self.local_deks + self.remote_deks)]
        found += [S(k + ' token', v) for k, v in self.tokens.items()]
        found.append(S('TLS key', self.tls_key))
        return found

    def test_the_scenario_wrote_what_is_scanned(self):
        files = list(leakscan.iter_files([self.private]))
        names = {os.path.basename(f) for f in files}
        for name in ('Data.fs', 'Data.fs.index', 'Data.fs.lock', 'out.txt',
                     'err.txt', 'audit.log', 'cert.pem', 'plain.zks',
                     'migrate.txt', 'aes.key', 'rsa.pem'):
            self.assertIn(name, names)
        self.assertTrue(any(n.endswith('.dek') for n in names))
        self.assertTrue(any(n.endswith('.blob') for n in names))
        self.assertEqual(len(self.local_deks), 1)    # objects, migration
        self.assertEqual(len(self.remote_deks), 1)
        with open(os.path.join(self.server_dir, 'out.txt'), 'rb') as f:
            self.assertIn(b'/v1/keys', f.read())      # the access log
        with open(os.path.join(self.server_dir, 'var', 'audit.log'),
                  'rb') as f:
            self.assertIn(b'create', f.read())

    def test_no_secret_outside_its_key_file(self):
        findings = []
        for secret in self.secrets():
            own = {p for p, label in self.key_files.items()
                   if label == secret.label}
            for finding in leakscan.scan_paths([self.private], [secret]):
                if finding.path not in own:
                    findings.append(str(finding))
        self.assertEqual(findings, [])

    def test_key_files_hold_their_key_and_nothing_else(self):
        # positive control: the scanner sees each key in its own file (the
        # AES KEK as base64, the RSA KEK as PEM), and no other secret
        for path, label in sorted(self.key_files.items()):
            found = {f.label for f in leakscan.scan_paths(
                [path], self.secrets())}
            self.assertEqual(found, {label}, path)

    def test_scanner_finds_what_is_planted(self):
        # positive controls: the plaintext database kept by --pack (moved
        # out by the scenario), and each form of a key
        findings = leakscan.scan_paths(
            [self.old_copy], [leakscan.Secret('m', self.canaries['migrated'])])
        self.assertEqual([f.form for f in findings], ['raw'])
        key = self.local_deks[0]
        planted = os.path.join(self.outside, 'planted')
        forms = {
            'raw': key, 'hex': key.hex().encode(),
            'HEX': key.hex().upper().encode(),
            'base64': base64.b64encode(key),
            'urlsafe base64': base64.urlsafe_b64encode(key),
            'base64+1': base64.b64encode(b'x' + key + b'y'),
            'base64+2': base64.b64encode(b'xy' + key)}
        for form, data in forms.items():
            with open(planted, 'wb') as f:
                f.write(os.urandom(5000) + data + os.urandom(5000))
            found = leakscan.scan_paths([planted],
                                        [leakscan.Secret('k', key)])
            self.assertTrue(found, form)
        with open(planted, 'wb') as f:
            f.write(b'log line\n' + self.keks['RSA KEK'].splitlines()[5])
        self.assertEqual(
            [f.form for f in leakscan.scan_paths(
                [planted], [leakscan.Secret('r', self.keks['RSA KEK'])])],
            ['pem line'])

    def test_no_plaintext_left_in_temporary_directories(self):
        # every temporary file of the scenario went to its TMPDIR; what is
        # left there holds no canary (checked above) and no blob copy
        left = [f for f in leakscan.iter_files([self.tmpdir])
                if not f.startswith(self.server_dir)]
        self.assertEqual([f for f in left if f.endswith('.blob')], [])

    def test_key_files_0600_and_key_directories_0700(self):
        loose = []
        for path in self.key_files:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode != 0o600:
                loose.append('%s %o' % (path, mode))
        server_var = os.path.join(self.server_dir, 'var')
        entries = [os.path.join(d, n) for d in (
            self._path('keys'), os.path.join(server_var, 'keys'))
            for n in os.listdir(d)]
        self.assertTrue(entries)
        for path in entries + [os.path.join(server_var, 'tokens.json')]:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode != 0o600:
                loose.append('%s %o' % (path, mode))
        for d in (self._path('keys'), self._path('kek'),
                  os.path.join(server_var, 'keys')):
            mode = stat.S_IMODE(os.stat(d).st_mode)
            if mode != 0o700:
                loose.append('%s %o' % (d, mode))
        self.assertEqual(loose, [])

    def test_command_line(self):
        secret_file = os.path.join(self.outside, 'secrets')
        with open(secret_file, 'w') as f:
            f.write('# the scenario\'s canaries and data keys\n')
            for k, v in self.canaries.items():
                f.write('%s=hex:%s\n' % (k, v.hex()))
            for v in self.local_deks:
                f.write('base64:%s\n' % base64.b64encode(v).decode())
        script = os.path.join(os.path.dirname(HERE), 'scripts',
                              'leakscan.py')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run(
            [sys.executable, script, '--secret-file', secret_file,
             self.private], capture_output=True, text=True, env=env)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('no leak', proc.stdout)
        proc = subprocess.run(
            [sys.executable, script, '--secret-file', secret_file,
             self.private, self.old_copy], capture_output=True, text=True,
            env=env)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('LEAK %s: migrated (raw)' % self.old_copy, proc.stdout)
        self.assertNotIn(self.canaries['migrated'].decode(), proc.stdout)


def wrapped_dek(kek, data):
    """The DEK inside the wrapped DEK ``data`` (to look for it)."""
    from zodbkmi.format import wrapped
    from zodbkmi.kek import as_kek
    return wrapped.unwrap(as_kek(kek), data)[1]
