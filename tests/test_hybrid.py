"""The hybrid post-quantum KEK (ML-KEM-768 + X25519 through HPKE) in use:
its classes, records under it, the upgrade of an RSA KEK to it with
``zodbkmi migrate rotate-kek`` on a database with blobs, and the key
server and ``LocalKeyManagementFacility`` with it."""
import base64
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from zodbkmi import exceptions as X
from zodbkmi.testing import child_environ

from tests.test_server import ServerLayer
from tests.test_wrapped import rsa_kek

ZODBKMI = [sys.executable, '-m', 'zodbkmi.cli']


class _Tmp(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-hybrid-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)


class HybridKeyTests(_Tmp):

    def _makeOne(self):
        from zodbkmi.kek import HybridKeyEncryptingKey
        return HybridKeyEncryptingKey.generate()

    def test_round_trip_and_sizes(self):
        from zodbkmi.format import wrapped
        from zodbkmi.kek import as_kek
        kek = self._makeOne()
        dek_id, dek = os.urandom(16), os.urandom(32)
        w = wrapped.wrap(kek, dek_id, dek)
        header = len(wrapped.parse(w).header)
        self.assertEqual(len(w) - header, 1120 + 48 + 32)
        self.assertEqual(wrapped.unwrap(as_kek(kek.private_pem()), w),
                         (dek_id, dek))
        # randomized: two wrappings of one DEK differ
        self.assertNotEqual(wrapped.wrap(kek, dek_id, dek, created=1),
                            wrapped.wrap(kek, dek_id, dek, created=1))

    def test_key_id_is_of_the_public_key_only(self):
        from zodbkmi.kek import HybridPublicKeyEncryptingKey
        kek = self._makeOne()
        pub = HybridPublicKeyEncryptingKey.from_pem(kek.public_pem())
        self.assertEqual(pub.key_id, kek.key_id)
        self.assertRegex(kek.key_id, r'^hyb-[0-9a-f]{32}$')
        self.assertNotEqual(self._makeOne().key_id, kek.key_id)

    def test_repr_and_errors_hold_no_key_bytes(self):
        from zodbkmi.kek import HybridKeyEncryptingKey
        kek = self._makeOne()
        secret = kek._secret()
        texts = [repr(kek), repr(kek.public())]
        pem = kek.private_pem()
        for bad in (pem[:-60], pem.replace(b'PRIVATE', b'PUBLIC'),
                    kek.public_pem()):
            with self.assertRaises(X.InvalidKeyError) as cm:
                HybridKeyEncryptingKey.from_pem(bad)
            texts.append(str(cm.exception))
        for text in texts:
            self.assertEqual(len(text.splitlines()), 1)
            for part in (secret.hex()[:16], base64.b64encode(secret[:12])
                         .decode(), pem.splitlines()[1][:16].decode()):
                self.assertNotIn(part, text)

    def test_public_where_private_needed_and_reverse(self):
        from zodbkmi.format import wrapped
        from zodbkmi.kek import HybridPublicKeyEncryptingKey
        from zodbkmi.kek import as_kek
        kek = self._makeOne()
        with self.assertRaises(X.InvalidKeyError) as cm:
            as_kek(kek.public_pem())
        self.assertEqual(str(cm.exception), 'KEK %s: a public key where the '
                         'private key is needed' % kek.key_id)
        with self.assertRaises(X.InvalidKeyError) as cm:
            HybridPublicKeyEncryptingKey.from_pem(kek.private_pem())
        self.assertIn('KEK %s: a private key where a public key is expected'
                      % kek.key_id, str(cm.exception))
        w = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        for call in (lambda: wrapped.unwrap(kek.public(), w),
                     lambda: wrapped.wrap(kek.public(), os.urandom(16),
                                          os.urandom(32))):
            with self.assertRaises(X.InvalidKeyError) as cm:
                call()
            self.assertIn('KEK %s is a public key' % kek.key_id,
                          str(cm.exception))

    def test_a_key_of_the_wrong_kind(self):
        from zodbkmi.format import wrapped
        from zodbkmi.kek import HybridKeyEncryptingKey
        from zodbkmi.kek import RSAKeyEncryptingKey
        kek, rsa = self._makeOne(), rsa_kek()
        with self.assertRaises(X.InvalidKeyError):
            HybridKeyEncryptingKey.from_pem(rsa.private_pem())
        with self.assertRaises(X.InvalidKeyError):
            RSAKeyEncryptingKey.from_pem(kek.private_pem())
        w = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        for other in (rsa, self._makeOne()):
            with self.assertRaises(X.WrongKeyError) as cm:
                wrapped.unwrap(other, w)
            self.assertIn('by KEK %s, not by KEK %s'
                          % (kek.key_id, other.key_id), str(cm.exception))

    def test_key_file_written_0600_and_read_by_the_key_holder(self):
        from zodbkmi.keyholder import KeyHolder
        from zodbkmi.keyholder import write_key_file
        kek = self._makeOne()
        write_key_file(self.path('kek.pem'), kek.private_pem())
        self.assertEqual(os.stat(self.path('kek.pem')).st_mode & 0o777,
                         0o600)
        self.assertEqual(KeyHolder(self.path('kek.pem')).key_id, kek.key_id)
        os.chmod(self.path('kek.pem'), 0o644)
        with self.assertRaises(X.SecretFileError):
            KeyHolder(self.path('kek.pem'))

    def test_kek_file_command(self):
        from zodbkmi.cli import main
        from zodbkmi.kek import as_kek
        from zodbkmi.keyholder import read_key_file
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(main(['kek-file', '--kind', 'hybrid',
                                   self.path('k')]), 0)
        self.assertEqual(out.getvalue().strip(),
                         as_kek(read_key_file(self.path('k'))).key_id)
        self.assertTrue(out.getvalue().startswith('hyb-'))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(main(['kek-file', '--rsa', '--kind', 'hybrid',
                                   self.path('k2')]), 2)
        self.assertIn('--rsa contradicts --kind hybrid', err.getvalue())

    def test_records_of_rsa_and_hybrid_keks_in_one_facility(self):
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(self.path('keys'))
        rsa = facility.generate(kind='rsa')
        hyb = facility.generate()
        sealed = {k: facility.encrypt(k, b'record of ' + k[:30])
                  for k in (rsa, hyb)}
        fresh = KeyManagementFacility(self.path('keys'))
        for k, data in sealed.items():
            self.assertEqual(fresh.decrypt(k, data), b'record of ' + k[:30])
        with self.assertRaises(X.WrongKeyError):
            fresh.decrypt(rsa, sealed[hyb])


def _write_blob_db(path, key, facility, payloads):
    import transaction
    import ZODB
    import ZODB.blob
    import ZODB.FileStorage
    from persistent.mapping import PersistentMapping
    from zodbkmi.storage import EncryptingStorage
    storage = EncryptingStorage(ZODB.FileStorage.FileStorage(
        os.path.join(path, 'Data.fs'), blob_dir=os.path.join(path, 'blobs')),
        facility, key)
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for name, payload in payloads.items():
            root[name] = ZODB.blob.Blob(payload)
            root[name + '-record'] = PersistentMapping({'text': payload[:40]})
        tm.commit()
    finally:
        db.close()


def _read_blob_db(path, key, facility, names):
    import ZODB
    import ZODB.FileStorage
    from zodbkmi.storage import EncryptingStorage
    fs = ZODB.FileStorage.FileStorage(
        os.path.join(path, 'Data.fs'), blob_dir=os.path.join(path, 'blobs'),
        read_only=True)
    try:
        db = ZODB.DB(EncryptingStorage(fs, facility, key))
    except BaseException:
        fs.close()
        raise
    try:
        root = db.open().root()
        out = {}
        for name in names:
            with root[name].open() as f:
                out[name] = f.read()
            assert root[name + '-record']['text'] == out[name][:40]
        return out
    finally:
        db.close()


def _digests(top):
    """{relative path: SHA-256} of every file under ``top``."""
    out = {}
    for dirpath, _, names in os.walk(top):
        for name in names:
            p = os.path.join(dirpath, name)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, top)] = hashlib.sha256(
                    f.read()).hexdigest()
    return out


class UpgradeToHybridTests(_Tmp):
    """docs/keys.rst, "Upgrading an RSA KEK to a hybrid KEK": rotate-kek
    rewraps the data keys; no record and no blob file changes."""

    def test_rotate_kek_from_rsa_to_hybrid_on_a_database_with_blobs(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.format import wrapped
        from zodbkmi.kek import as_kek
        from zodbkmi.keyholder import read_key_file
        from zodbkmi.keyholder import write_key_file
        from zodbkmi.keystore import DirectoryKeyStore
        keys, db = self.path('keys'), self.path('db')
        os.mkdir(db)
        rsa_pem = rsa_kek().private_pem()
        write_key_file(self.path('rsa.pem'), rsa_pem)
        facility = KeyManagementFacility(keys)
        facility.create_key(rsa_pem)
        payloads = {'b%d' % i: os.urandom(100 + 70000 * i) for i in range(3)}
        _write_blob_db(db, rsa_pem, facility, payloads)
        before = _digests(db)
        self.assertEqual(len([p for p in before if p.endswith('.blob')]), 3)
        proc = subprocess.run(ZODBKMI + ['kek-file', '--kind', 'hybrid',
                                         'hybrid.pem'], cwd=self.tmp,
                              env=child_environ(), capture_output=True,
                              text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        hyb_id = proc.stdout.strip()
        proc = subprocess.run(
            ZODBKMI + ['migrate', 'rotate-kek', '--key-dir', keys,
                       '--key-file', 'hybrid.pem', '--old-key-file',
                       'rsa.pem'], cwd=self.tmp, env=child_environ(),
            capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        rsa_id = as_kek(rsa_pem).key_id
        self.assertIn('rotate-kek: 1 data keys rewrapped from KEK %s to KEK '
                      '%s' % (rsa_id, hyb_id), proc.stdout)
        # the data did not change, the key store holds hybrid wrappings only
        self.assertEqual(_digests(db), before)
        entries = list(DirectoryKeyStore(keys).entries())
        self.assertEqual({e.kek_id for e in entries}, {hyb_id})
        self.assertEqual({wrapped.parse(e.wrapped).suite for e in entries},
                         {wrapped.SUITE_HPKE_MLKEM768_X25519})
        hyb = read_key_file(self.path('hybrid.pem'))
        self.assertEqual(_read_blob_db(db, hyb, KeyManagementFacility(keys),
                                       payloads), payloads)
        # the RSA KEK opens nothing any more
        with self.assertRaises(X.DatabaseKeyError):
            _read_blob_db(db, rsa_pem, KeyManagementFacility(keys), payloads)


class HybridServerTests(unittest.TestCase):
    """The key server and LocalKeyManagementFacility, unchanged, with
    hybrid KEKs: the server stores wrapped DEKs and never sees the private
    KEK (nor the DEKs)."""

    layer = ServerLayer

    def setUp(self):
        self.server = ServerLayer.server
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-hybrid-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _local(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        local = LocalKeyManagementFacility(self.server.url,
                                           token=self.server.admin,
                                           ca_file=self.server.ca)
        self.addCleanup(local.close)
        return local

    def _server_bytes(self):
        data = b''
        for dirpath, _, names in os.walk(self.server.dir):
            for name in names:
                with open(os.path.join(dirpath, name), 'rb') as f:
                    data += f.read()
        return data

    def test_new_generate_encrypt_decrypt_rotate(self):
        from zodbkmi.format import wrapped
        from zodbkmi.kek import as_kek
        from zodbkmi.keyholder import read_key_file
        env = child_environ({'ZODBKMI_URL': self.server.url,
                             'ZODBKMI_CA_FILE': self.server.ca,
                             'ZODBKMI_TOKEN': self.server.admin})
        proc = subprocess.run(ZODBKMI + ['new', 'kek.pem'], cwd=self.tmp,
                              env=env, capture_output=True, text=True,
                              timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        dek_id = proc.stdout.strip()
        pem = read_key_file(os.path.join(self.tmp, 'kek.pem'))
        self.assertTrue(pem.startswith(
            b'-----BEGIN ZODBKMI HYBRID PRIVATE KEY-----'))
        kek = as_kek(pem)
        local = self._local()
        entry = local.entry(dek_id)
        self.assertEqual(entry.kek_id, kek.key_id)
        self.assertEqual(wrapped.parse(entry.wrapped).suite, 5)
        sealed = local.encrypt(pem, b'hybrid over TLS')
        self.assertEqual(self._local().decrypt(pem, sealed),
                         b'hybrid over TLS')
        # generate() here, rotate, and an RSA KEK beside it
        other = local.generate()
        self.assertTrue(as_kek(other).key_id.startswith('hyb-'))
        new_id = local.rotate(other)
        self.assertEqual(local.key_id_of(local.encrypt(other, b'x')), new_id)
        rsa = local.generate(kind='rsa')
        self.assertEqual(local.decrypt(rsa, local.encrypt(rsa, b'r')), b'r')
        proc = subprocess.run(ZODBKMI + ['new', '--kind', 'rsa', 'r.pem'],
                              cwd=self.tmp, env=env, capture_output=True,
                              text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(os.path.join(self.tmp, 'r.pem'), 'rb') as f:
            self.assertTrue(f.read().startswith(b'-----BEGIN PRIVATE KEY'))
        # nothing the server wrote holds a private KEK
        held = self._server_bytes()
        for key in (pem, other):
            secret = as_kek(key)._secret()
            for needle in (secret, secret[:32], base64.b64encode(secret),
                           key.splitlines()[1], secret.hex().encode()):
                self.assertNotIn(needle, held)
