"""The key findings of the security review of 2026-12-04, performed as
attacks through the public API and the files on disk (docs/security.rst,
"Review of 2026-12-04"):

- 4, planted DEKs: whoever holds the public half of an RSA KEK, or can
  write the key directory, or holds an admin token of the key server,
  cannot make the application seal under (or open with) a data key of
  theirs, nor alter the authenticated metadata of a key;
- 5, cached DEKs handed out by KEK id alone;
- 9, key material kept after eviction.

Also the migration of key stores written before wrapped-DEK format 2
(``tests/legacy/vault-v1``, written by the code of 2026-12-01).
"""
import base64
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from zodbkmi import exceptions
from zodbkmi.format import envelope
from zodbkmi.format import wrapped

HERE = os.path.dirname(os.path.abspath(__file__))
LEGACY = os.path.join(HERE, 'legacy', 'vault-v1')
FAR_FUTURE = 2 ** 63     # a creation time that would win any comparison


def rsa_kek():
    """The RSA test KEK of the vectors (no slow key generation)."""
    from tests.test_wrapped import rsa_kek
    return rsa_kek()


def write_entry(key_dir, entry):
    """Put ``entry`` in ``key_dir`` as an attacker with write access does:
    a file, no facility involved."""
    path = os.path.join(key_dir, entry.dek_id + '.dek')
    with open(path, 'wb') as f:
        f.write(entry.to_json())
    os.chmod(path, 0o600)


def planted_v2_entry(public, dek, created=FAR_FUTURE):
    """A version 2 entry made with the public key only: OAEP is public,
    the signature cannot be made, so it is random bytes."""
    from zodbkmi.keystore import KeyStoreEntry
    raw_id = os.urandom(16)
    header = wrapped.build_header(public.suite, raw_id, public.key_id,
                                  created=created)
    blob = public.wrap(dek, header) + os.urandom(public._size)
    return KeyStoreEntry(raw_id.hex(), public.key_id, header + blob)


def planted_v1_entry(public, dek):
    """A version 1 entry made with the public key: a genuine OAEP
    wrapping, exactly what the code before 2026-12-04 accepted."""
    from zodbkmi.keystore import KeyStoreEntry
    raw_id = os.urandom(16)
    return KeyStoreEntry(raw_id.hex(), public.key_id,
                         wrapped.wrap(public, raw_id, dek, version=1),
                         created=FAR_FUTURE)


class _Base(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.keys = os.path.join(self.tmp, 'keys')

    def facility(self, **kw):
        from zodbkmi.facility import KeyManagementFacility
        return KeyManagementFacility(self.keys, **kw)


class PlantedKeyTests(_Base):
    """Finding 4: a wrapped DEK proves nothing about who made it."""

    def setUp(self):
        super().setUp()
        self.kek = rsa_kek()
        self.public = self.kek.public()
        self.app = self.facility()
        self.dek_id = self.app.create_key(self.kek)
        self.attacker_dek = os.urandom(32)

    def test_public_key_cannot_create_a_data_key(self):
        with self.assertRaises(exceptions.InvalidKeyError) as cm:
            self.app.create_key(self.public.public_pem())
        self.assertIn('private key', str(cm.exception))
        with self.assertRaises(exceptions.InvalidKeyError):
            wrapped.wrap(self.public, os.urandom(16), self.attacker_dek)

    def test_planted_version_2_entry_is_never_sealed_under(self):
        planted = planted_v2_entry(self.public, self.attacker_dek)
        write_entry(self.keys, planted)
        # the application restarts: the planted entry is the newest
        app = self.facility()
        self.assertEqual(app.key_store.active_for(self.kek.key_id).dek_id,
                         planted.dek_id)
        with self.assertRaises(exceptions.AuthenticationError) as cm:
            app.encrypt(self.kek, b'patient record')
        self.assertIn('not signed by KEK %s' % self.kek.key_id,
                      str(cm.exception))
        # nor does data sealed under it open
        forged = envelope.seal(bytes.fromhex(planted.dek_id),
                               self.attacker_dek, b'forged state')
        with self.assertRaises(exceptions.AuthenticationError):
            app.decrypt(self.kek, forged)

    def test_planted_version_1_entry_is_never_used(self):
        planted = planted_v1_entry(self.public, self.attacker_dek)
        write_entry(self.keys, planted)
        app = self.facility()
        # a version 1 entry never becomes active: sealing goes on under
        # the application's own key
        sealed = app.encrypt(self.kek, b'patient record')
        self.assertEqual(app.key_id_of(sealed), self.dek_id)
        # and data sealed under the planted key does not open
        forged = envelope.seal(bytes.fromhex(planted.dek_id),
                               self.attacker_dek, b'forged state')
        with self.assertRaises(exceptions.UnauthenticatedKeyError) as cm:
            app.decrypt(self.kek, forged)
        self.assertEqual(cm.exception.key_id, planted.dek_id)
        self.assertIn('upgrade-keys', str(cm.exception))

    def test_altered_creation_time_is_refused(self):
        path = os.path.join(self.keys, self.dek_id + '.dek')
        with open(path) as f:
            doc = json.load(f)
        doc['created'] = FAR_FUTURE
        with open(path, 'w') as f:
            json.dump(doc, f)
        with self.assertRaises(exceptions.KeyStoreError):
            self.facility().encrypt(self.kek, b'x')

    def test_reactivating_an_older_key_changes_nothing(self):
        # the attacker retires the newest key and marks an older one
        # active again: the application never seals under the older one
        from zodbkmi.keystore import RETIRED
        from zodbkmi.keystore import KeyStoreEntry
        new_id = self.app.rotate(self.kek)
        old = self.app.entry(self.dek_id)
        new = self.app.entry(new_id)
        write_entry(self.keys, KeyStoreEntry(old.dek_id, old.kek_id,
                                             old.wrapped, 'active',
                                             old.created))
        write_entry(self.keys, KeyStoreEntry(new.dek_id, new.kek_id,
                                             new.wrapped, RETIRED,
                                             new.created))
        app = self.facility()
        with self.assertRaises(exceptions.UnknownKeyError):
            app.encrypt(self.kek, b'x')
        # the application makes a new key (denial of service, nothing else)
        newest = app.ensure_key(self.kek)
        self.assertNotIn(newest, (old.dek_id, new.dek_id))

    def test_rotation_wins_over_a_clock_ahead(self):
        # a key made by a machine whose clock is ahead stays older than
        # the next key made here
        from zodbkmi.keystore import KeyStoreEntry
        raw_id = os.urandom(16)
        ahead = KeyStoreEntry(raw_id.hex(), self.kek.key_id, wrapped.wrap(
            self.kek, raw_id, os.urandom(32), created=FAR_FUTURE))
        write_entry(self.keys, ahead)
        app = self.facility()
        new_id = app.rotate(self.kek)
        self.assertEqual(app.entry(new_id).created, FAR_FUTURE + 1)
        self.assertEqual(app.key_id_of(app.encrypt(self.kek, b'x')), new_id)

    def test_aes_kek_entry_without_the_kek(self):
        # an attacker without the AES KEK cannot make a wrapping that
        # authenticates, whatever the version
        from zodbkmi.kek import AESKeyEncryptingKey
        from zodbkmi.keystore import KeyStoreEntry
        kek = AESKeyEncryptingKey.generate()
        app = self.facility()
        app.create_key(kek)
        for version in (1, 2):
            raw_id = os.urandom(16)
            header = wrapped.build_header(
                kek.suite, raw_id, kek.key_id, version,
                FAR_FUTURE if version == 2 else None)
            write_entry(self.keys, KeyStoreEntry(
                raw_id.hex(), kek.key_id, header + os.urandom(60),
                created=FAR_FUTURE))
            forged = envelope.seal(raw_id, self.attacker_dek, b'forged')
            with self.assertRaises(exceptions.AuthenticationError):
                self.facility().decrypt(kek, forged)
        with self.assertRaises(exceptions.AuthenticationError):
            self.facility().encrypt(kek, b'x')


class KeyServerPlantingTests(_Base):
    """Finding 4 through the key server, with an admin token."""

    def setUp(self):
        super().setUp()
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.testing import setupRestApi
        self.master = self.facility()
        self.local = LocalKeyManagementFacility('https://127.0.0.1:1')
        setupRestApi(self.local, self.master)
        self.kek = rsa_kek()
        self.public = self.kek.public()
        self.dek_id = self.local.create_key(self.kek)

    def upload(self, entry):
        return self.local._request('POST', '/v1/keys', {
            'wrapped': base64.b64encode(entry.wrapped).decode('ascii')})

    def test_version_1_upload_refused(self):
        planted = planted_v1_entry(self.public, os.urandom(32))
        with self.assertRaises(exceptions.KeyServerError) as cm:
            self.upload(planted)
        self.assertEqual(cm.exception.status, 400)
        self.assertIn('version 1', str(cm.exception))

    def test_forged_version_2_upload_is_never_sealed_under(self):
        # the server cannot check a signature (it holds no KEK): it stores
        # the entry, and every client refuses it
        planted = planted_v2_entry(self.public, os.urandom(32),
                                   created=time.time_ns())
        self.upload(planted)
        self.assertEqual(self.local._active_key_id(self.kek.key_id),
                         planted.dek_id)
        self.local.clear_cache()
        with self.assertRaises(exceptions.AuthenticationError):
            self.local.encrypt(self.kek, b'x')

    def test_upgrade_through_the_server(self):
        from zodbkmi.keystore import KeyStoreEntry
        raw_id = os.urandom(16)
        legacy = KeyStoreEntry(raw_id.hex(), self.kek.key_id, wrapped.wrap(
            self.kek, raw_id, os.urandom(32), version=1), created=1)
        self.master.key_store.add(legacy)      # as the old code stored it
        sealed = envelope.seal(raw_id, wrapped.unwrap(
            self.kek, legacy.wrapped)[1], b'old data')
        with self.assertRaises(exceptions.UnauthenticatedKeyError):
            self.local.decrypt(self.kek, sealed)
        self.assertEqual(self.local.upgrade(self.kek), 1)
        self.assertEqual(self.local.upgrade(self.kek), 0)
        self.assertEqual(self.local.decrypt(self.kek, sealed), b'old data')
        entry = self.master.entry(raw_id.hex())
        self.assertEqual((entry.version, entry.created), (2, 1))


class CachedKeyAuthorizationTests(_Base):
    """Finding 5: a cached DEK was handed to any object carrying the
    KEK's id."""

    def test_public_half_gets_nothing_from_the_cache(self):
        kek = rsa_kek()
        app = self.facility()
        app.create_key(kek)
        sealed = app.encrypt(kek, b'secret')
        self.assertEqual(app.decrypt(kek, sealed), b'secret')   # cached
        public = kek.public()
        self.assertEqual(public.key_id, kek.key_id)
        for key in (public, [public], public.public_pem()):
            with self.assertRaises(exceptions.InvalidKeyError):
                app.decrypt(key, sealed)
        with self.assertRaises(exceptions.InvalidKeyError):
            app.encrypt(public, b'forged')
        self.assertEqual(app.decrypt(kek, sealed), b'secret')

    def test_aes_impostor_with_the_same_id_gets_nothing(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        secret = os.urandom(32)
        app = self.facility()
        app.create_key(secret)
        sealed = app.encrypt(secret, b'secret')
        self.assertEqual(app.decrypt(secret, sealed), b'secret')
        impostor = AESKeyEncryptingKey(
            os.urandom(32), key_id=AESKeyEncryptingKey(secret).key_id)
        for key in (impostor, [impostor], (impostor,)):
            with self.assertRaises(exceptions.AuthenticationError):
                app.decrypt(key, sealed)
        with self.assertRaises(exceptions.AuthenticationError):
            app.encrypt(impostor, b'forged')
        # the real key, as another object, proves itself and gets it
        self.assertEqual(app.decrypt(AESKeyEncryptingKey(secret), sealed),
                         b'secret')
        self.assertEqual(app.decrypt(bytes(secret), sealed), b'secret')


def sealers_of(dek_id):
    """Every live Sealer of the DEK ``dek_id`` (hex) in this process."""
    gc.collect()
    raw = bytes.fromhex(dek_id)
    return [o for o in gc.get_objects()
            if isinstance(o, envelope.Sealer) and o.dek_id == raw]


class EvictionTests(_Base):
    """Finding 9: key material of deleted, retired, rewrapped and expired
    DEKs stayed referenced from the decrypt tables."""

    def use(self, app, kek, dek_id):
        sealed = app.encrypt(kek, b'data')
        record = app.encrypt(kek, b'record', b'\0' * 8)
        app.decrypt(kek, sealed)
        app.decrypt(kek, record, b'\0' * 8)
        self.assertEqual(len(sealers_of(dek_id)), 1)
        return app._cache.get(bytes.fromhex(dek_id))

    def assertDropped(self, entry, dek_id):
        self.assertIsNone(entry._dek)
        self.assertEqual(entry.authorized, ())
        self.assertEqual(sealers_of(dek_id), [])
        with self.assertRaises(exceptions.KeyStateError):
            entry.sealer.seal_data(b'x')

    def test_delete(self):
        kek = os.urandom(32)
        app = self.facility()
        dek_id = app.create_key(kek)
        entry = self.use(app, kek, dek_id)
        app.delete(dek_id)
        self.assertDropped(entry, dek_id)

    def test_retire_and_rewrap(self):
        kek, new = os.urandom(32), os.urandom(32)
        app = self.facility()
        dek_id = app.create_key(kek)
        entry = self.use(app, kek, dek_id)
        app.retire(dek_id)
        self.assertDropped(entry, dek_id)
        second = app.create_key(kek)
        entry = self.use(app, kek, second)
        app.rewrap(kek, new)
        self.assertDropped(entry, second)

    def test_expiry_drops_the_key_without_any_further_call(self):
        kek = os.urandom(32)
        # long enough for self.use to look at the key before it expires,
        # however loaded the machine
        app = self.facility(timeout=3)
        dek_id = app.create_key(kek)
        entry = self.use(app, kek, dek_id)
        # the reaper evicts it at its expiry time: nothing else is called
        deadline = time.monotonic() + 30
        while entry._dek is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertDropped(entry, dek_id)
        # and the key is fetched again when needed
        self.assertEqual(app.decrypt(kek, app.encrypt(kek, b'y')), b'y')

    @unittest.skipUnless(os.path.exists('/proc/self/task'), 'Linux /proc')
    def test_reaper_leaves_signals_to_the_main_thread(self):
        # a signal the kernel gave the reaper thread would not interrupt
        # a system call of the main thread (Ctrl-C in a blocking read)
        import signal
        import threading
        from zodbkmi.cache import _reaper
        _reaper.wake(float('inf'))

        def blocked():
            try:
                with open('/proc/self/task/%d/status'
                          % _reaper._thread.native_id) as f:
                    return int([line.split()[1] for line in f
                                if line.startswith('SigBlk:')][0], 16)
            except (OSError, TypeError):   # not started yet
                return 0

        deadline = time.monotonic() + 30    # the thread's first steps
        while not blocked() and time.monotonic() < deadline:
            time.sleep(0.01)
        blocked = blocked()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.assertTrue(blocked & (1 << (sig - 1)), sig)
        self.assertIsNot(_reaper._thread, threading.main_thread())


class LegacyKeyStoreTests(_Base):
    """Key stores written by the code of 2026-12-01 (wrapped-DEK format 1,
    record envelope version 1): tests/legacy/vault-v1."""

    def setUp(self):
        super().setUp()
        with open(os.path.join(LEGACY, 'data.json')) as f:
            self.doc = json.load(f)
        with open(os.path.join(LEGACY, 'kek-rsa.pem'), 'rb') as f:
            self.rsa = f.read()
        with open(os.path.join(LEGACY, 'kek-aes.b64'), 'rb') as f:
            self.aes = base64.b64decode(f.read())

    def store(self, name):
        shutil.copytree(os.path.join(LEGACY, 'keys-' + name), self.keys)
        os.chmod(self.keys, 0o700)
        for f in os.listdir(self.keys):
            os.chmod(os.path.join(self.keys, f), 0o600)
        return self.doc['stores'][name]

    def check_opens(self, app, kek, store):
        for r in store['records']:
            plaintext = bytes.fromhex(r['plaintext'])
            self.assertEqual(app.decrypt(kek, bytes.fromhex(r['data'])),
                             plaintext)
            self.assertEqual(app.decrypt(kek, bytes.fromhex(r['record']),
                                         bytes.fromhex(r['oid'])),
                             plaintext)

    def test_aes_store_opens_as_is_and_seals_after_upgrade(self):
        store = self.store('aes')
        app = self.facility()
        self.check_opens(app, self.aes, store)
        # a version 1 key is never sealed under
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            app.encrypt(self.aes, b'new')
        self.assertIn('upgrade-keys', str(cm.exception))
        self.assertEqual(app.upgrade(self.aes), 2)
        self.assertEqual(app.upgrade(self.aes), 0)
        self.check_opens(app, self.aes, store)
        self.assertEqual(app.key_id_of(app.encrypt(self.aes, b'new')),
                         store['active'])

    def test_rsa_store_opens_after_upgrade(self):
        store = self.store('rsa')
        app = self.facility()
        r = store['records'][0]
        with self.assertRaises(exceptions.UnauthenticatedKeyError):
            app.decrypt(self.rsa, bytes.fromhex(r['data']))
        self.assertEqual(app.upgrade(self.rsa), 2)
        self.check_opens(app, self.rsa, store)
        self.assertEqual(app.key_id_of(app.encrypt(self.rsa, b'new')),
                         store['active'])
        for entry in app.key_store.entries():
            self.assertEqual(entry.version, 2)

    def test_rotate_kek_upgrades(self):
        store = self.store('rsa')
        app = self.facility()
        new = os.urandom(32)
        self.assertEqual(app.rewrap(self.rsa, new), 2)
        self.check_opens(app, new, store)

    def test_upgrade_keys_command(self):
        store = self.store('rsa')
        kek_file = os.path.join(self.tmp, 'kek.pem')
        with open(kek_file, 'wb') as f:
            f.write(self.rsa)
        os.chmod(kek_file, 0o600)

        def run(*args):
            return subprocess.run(
                [sys.executable, '-m', 'zodbkmi.cli', 'upgrade-keys',
                 kek_file] + list(args), capture_output=True, text=True,
                cwd=self.tmp, timeout=120)

        p = run('--key-dir', self.keys)
        self.assertEqual((p.returncode, p.stdout, p.stderr),
                         (0, 'upgraded 2 data keys to wrapped-DEK format 2\n',
                          ''))
        p = run('--key-dir', self.keys)
        self.assertEqual(p.stdout,
                         'upgraded 0 data keys to wrapped-DEK format 2\n')
        self.check_opens(self.facility(), self.rsa, store)
        p = run('--key-dir', os.path.join(self.tmp, 'nope'))
        self.assertEqual(p.returncode, 2)
        self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)


def _transit_case():
    from tests.bao import ROOT_TOKEN
    from tests.bao import BaoTestCase

    class TransitPlanting(BaoTestCase):
        """Finding 4 for a Transit KEK: a planted entry (any bytes in the
        Transit ciphertext syntax) never authenticates."""

        def test_planted_entry(self):
            from zodbkmi.sources.vault import TransitKeyEncryptingKey
            from zodbkmi.sources.vault import VaultClient
            from zodbkmi.keystore import KeyStoreEntry
            tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
            self.addCleanup(shutil.rmtree, tmp, True)
            self.bao.api('POST', 'transit/keys/review-planted',
                         {'derived': True})
            client = VaultClient(self.bao.url, ROOT_TOKEN, self.bao.ca_file)
            self.addCleanup(client.close)
            kek = TransitKeyEncryptingKey(client, 'review-planted')
            from zodbkmi.facility import KeyManagementFacility
            keys = os.path.join(tmp, 'keys')
            app = KeyManagementFacility(keys)
            app.create_key(kek)
            raw_id = os.urandom(16)
            header = wrapped.build_header(kek.suite, raw_id, kek.key_id,
                                          created=FAR_FUTURE)
            blob = b'vault:v1:' + base64.b64encode(os.urandom(60))
            write_entry(keys, KeyStoreEntry(raw_id.hex(), kek.key_id,
                                            header + blob))
            with self.assertRaises(exceptions.AuthenticationError):
                KeyManagementFacility(keys).encrypt(kek, b'x')

    return TransitPlanting


def _pkcs11_case():
    from tests.softhsm import KEY_LABEL
    from tests.softhsm import LIBRARY
    from tests.softhsm import PIN
    from tests.softhsm import TOKEN_LABEL
    from tests.softhsm import SoftHSMTestCase

    class PKCS11Planting(SoftHSMTestCase):
        """Finding 4 for a KEK in an HSM: a planted entry never
        authenticates."""

        def test_planted_entry(self):
            from zodbkmi.facility import KeyManagementFacility
            from zodbkmi.sources.pkcs11 import PKCS11KeyEncryptingKey
            from zodbkmi.keystore import KeyStoreEntry
            tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
            self.addCleanup(shutil.rmtree, tmp, True)
            kek = PKCS11KeyEncryptingKey(LIBRARY, TOKEN_LABEL, KEY_LABEL, PIN)
            self.addCleanup(kek.close)
            keys = os.path.join(tmp, 'keys')
            KeyManagementFacility(keys).create_key(kek)
            raw_id = os.urandom(16)
            header = wrapped.build_header(kek.suite, raw_id, kek.key_id,
                                          created=FAR_FUTURE)
            write_entry(keys, KeyStoreEntry(raw_id.hex(), kek.key_id,
                                            header + os.urandom(60)))
            with self.assertRaises(exceptions.AuthenticationError):
                KeyManagementFacility(keys).encrypt(kek, b'x')

    return PKCS11Planting


def test_suite():
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite()
    for case in (PlantedKeyTests, KeyServerPlantingTests,
                 CachedKeyAuthorizationTests, EvictionTests,
                 LegacyKeyStoreTests, _transit_case(), _pkcs11_case()):
        suite.addTests(loader.loadTestsFromTestCase(case))
    return suite
