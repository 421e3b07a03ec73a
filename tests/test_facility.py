"""Tests of zodbkmi.facility."""
import os
import shutil
import tempfile
import threading
import unittest

from zodbkmi import exceptions
from zodbkmi.format import envelope

_RSA_KEK = None


def shared_rsa_kek():
    """One RSA KEK for the module (generating 3072-bit keys is slow)."""
    global _RSA_KEK
    if _RSA_KEK is None:
        from zodbkmi.kek import RSAKeyEncryptingKey
        _RSA_KEK = RSAKeyEncryptingKey.generate().private_pem()
    return _RSA_KEK


class KeyManagementFacilityTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _getTargetClass(self):
        from zodbkmi.facility import KeyManagementFacility
        return KeyManagementFacility

    def _makeOne(self, **kw):
        return self._getTargetClass()(os.path.join(self.tmp, 'keys'), **kw)

    def _makeWithKey(self, **kw):
        facility = self._makeOne(**kw)
        kek = shared_rsa_kek()
        dek_id = facility.create_key(kek)
        return facility, kek, dek_id

    def test_mapping_api(self):
        facility, kek, dek_id = self._makeWithKey()
        self.assertEqual(list(facility), [dek_id])
        self.assertEqual(facility.keys(), [dek_id])
        self.assertEqual(len(facility), 1)
        self.assertIn(dek_id, facility)
        self.assertNotIn('0' * 32, facility)
        self.assertNotIn('not an id', facility)
        self.assertEqual(facility.items(), [(dek_id, facility[dek_id])])
        self.assertEqual(facility.values(), [facility[dek_id]])
        self.assertIsNone(facility.get('f' * 32))
        with self.assertRaises(KeyError):
            facility['f' * 32]
        self.assertEqual(repr(facility), '<KeyManagementFacility (1)>')

    def test_generate_returns_rsa_3072_pem(self):
        from zodbkmi.kek import as_kek
        facility = self._makeOne()
        facility.rsa_bits = 3072
        kek = facility.generate(kind='rsa')
        self.assertTrue(kek.startswith(b'-----BEGIN PRIVATE KEY-----'))
        self.assertEqual(as_kek(kek)._private.key_size, 3072)
        self.assertEqual(len(facility), 1)
        self.assertEqual(facility.decrypt(kek, facility.encrypt(kek, b'x')),
                         b'x')

    def test_generate_returns_hybrid_pem_by_default(self):
        from zodbkmi.exceptions import InvalidKeyError
        from zodbkmi.format import wrapped
        from zodbkmi.kek import as_kek
        facility = self._makeOne()
        kek = facility.generate()
        self.assertTrue(kek.startswith(
            b'-----BEGIN ZODBKMI HYBRID PRIVATE KEY-----\n'))
        kek_id = as_kek(kek).key_id
        self.assertTrue(kek_id.startswith('hyb-'))
        (entry,) = facility.key_store.entries()
        self.assertEqual(entry.kek_id, kek_id)
        wk = wrapped.parse(entry.wrapped)
        self.assertEqual((wk.version, wk.suite), (2, 5))
        self.assertEqual(facility.decrypt(kek, facility.encrypt(kek, b'x')),
                         b'x')
        with self.assertRaises(InvalidKeyError) as e:
            facility.generate(kind='dsa')
        self.assertIn("unknown KEK kind 'dsa'", str(e.exception))

    def test_encrypt_decrypt_roundtrip(self):
        facility, kek, _ = self._makeWithKey()
        for size in (0, 1, 300, 70000):
            data = os.urandom(size)
            sealed = facility.encrypt(kek, data)
            self.assertEqual(facility.decrypt(kek, sealed), data)

    def test_two_encryptions_differ(self):
        facility, kek, _ = self._makeWithKey()
        self.assertNotEqual(facility.encrypt(kek, b'same'),
                            facility.encrypt(kek, b'same'))

    def test_encrypt_w_oid_binds_record(self):
        facility, kek, _ = self._makeWithKey()
        oid = b'\0' * 7 + b'\x05'
        record = facility.encrypt(kek, b'state', oid=oid)
        self.assertEqual(facility.decrypt(kek, record, oid=oid), b'state')
        with self.assertRaises(exceptions.AuthenticationError):
            facility.decrypt(kek, record, oid=b'\0' * 7 + b'\x06')
        with self.assertRaises(exceptions.UnsupportedFormatError):
            facility.decrypt(kek, record)
        with self.assertRaises(exceptions.UnsupportedFormatError):
            facility.decrypt(kek, facility.encrypt(kek, b'x'), oid=oid)

    def test_encrypt_decrypt_w_bad_oid(self):
        facility, kek, _ = self._makeWithKey()
        oid = b'\0' * 7 + b'\x05'
        record = facility.encrypt(kek, b'state', oid=oid)
        facility.decrypt(kek, record, oid=oid)      # now on the fast path
        for bad in (b'\0' * 7, b'\0' * 9, '\0' * 8, bytearray(8), 5):
            with self.assertRaises(ValueError):
                facility.encrypt(kek, b'state', oid=bad)
            with self.assertRaises(ValueError):
                facility.decrypt(kek, record, oid=bad)

    def test_encrypt_w_non_bytes(self):
        facility, kek, _ = self._makeWithKey()
        with self.assertRaises(TypeError):
            facility.encrypt(kek, 'text')
        with self.assertRaises(TypeError):
            facility.decrypt(kek, 'text')

    def test_encrypt_w_invalid_key(self):
        facility = self._makeOne()
        for key in (b'', b'short', b'-----BEGIN PRIVATE KEY-----\ngarbage\n',
                    12, None):
            with self.assertRaises(exceptions.InvalidKeyError):
                facility.encrypt(key, b'data')

    def test_encrypt_w_kek_without_dek(self):
        facility = self._makeOne()
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.encrypt(os.urandom(32), b'data')

    def test_decrypt_w_wrong_key(self):
        facility, kek, _ = self._makeWithKey()
        data = facility.encrypt(kek, b'data')
        other = os.urandom(32)
        facility.ensure_key(other)
        with self.assertRaises(exceptions.WrongKeyError):
            facility.decrypt(other, data)
        # the same from a cold cache
        fresh = self._makeOne()
        with self.assertRaises(exceptions.WrongKeyError):
            fresh.decrypt(other, data)

    def test_decrypt_w_unknown_dek(self):
        facility, kek, _ = self._makeWithKey()
        data = facility.encrypt(kek, b'data')
        empty = self._getTargetClass()(os.path.join(self.tmp, 'empty'))
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            empty.decrypt(kek, data)
        self.assertEqual(cm.exception.key_id, facility.key_id_of(data))

    def test_decrypt_w_every_flipped_bit_fails(self):
        facility, kek, _ = self._makeWithKey()
        data = facility.encrypt(kek, b'sixteen byte msg')
        for i in range(len(data) * 8):
            bad = bytearray(data)
            bad[i // 8] ^= 1 << (i % 8)
            # a flipped bit in the DEK id names a key that does not exist
            with self.assertRaises((exceptions.DecryptionError,
                                    exceptions.UnknownKeyError)):
                facility.decrypt(kek, bytes(bad))

    def test_decrypt_w_every_truncation_fails(self):
        facility, kek, _ = self._makeWithKey()
        data = facility.encrypt(kek, b'sixteen byte msg')
        for warm in (False, True):
            if warm:    # the DEK is now remembered for kek: the fast path
                self.assertEqual(facility.decrypt(kek, data),
                                 b'sixteen byte msg')
            for n in range(len(data)):
                expected = (exceptions.TruncatedDataError
                            if n < envelope.OVERHEAD
                            else exceptions.AuthenticationError)
                with self.assertRaises(expected):
                    facility.decrypt(kek, data[:n])

    def test_decrypt_w_plaintext(self):
        facility, kek, _ = self._makeWithKey()
        with self.assertRaises(exceptions.UnsupportedFormatError):
            facility.decrypt(kek, b'(dp0\nS"name"\np1\n.')

    def test_decrypt_w_list_of_keys(self):
        facility, kek, _ = self._makeWithKey()
        other = os.urandom(32)
        facility.ensure_key(other)
        a = facility.encrypt(kek, b'a')
        b = facility.encrypt(other, b'b')
        self.assertEqual(facility.decrypt([other, kek], a), b'a')
        self.assertEqual(facility.decrypt((other, kek), b), b'b')

    def test_no_unwrapped_dek_in_storage_dir(self):
        facility, kek, dek_id = self._makeWithKey()
        facility.encrypt(kek, b'x')
        entry = facility._cache.get(bytes.fromhex(dek_id))
        dek = entry._dek
        for name in os.listdir(facility.storage_dir):
            with open(os.path.join(facility.storage_dir, name), 'rb') as f:
                content = f.read()
            self.assertNotIn(dek, content)
            self.assertNotIn(dek.hex().encode(), content)
            import base64
            self.assertNotIn(base64.b64encode(dek), content)
            self.assertNotIn(kek, content)

    def test_permissions(self):
        facility, kek, dek_id = self._makeWithKey()
        self.assertEqual(os.stat(facility.storage_dir).st_mode & 0o777,
                         0o700)
        path = os.path.join(facility.storage_dir, dek_id + '.dek')
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(facility.storage_dir),
                         [dek_id + '.dek'])

    def test_storage_dir_not_writable(self):
        blocker = os.path.join(self.tmp, 'file')
        with open(blocker, 'w') as f:
            f.write('x')
        with self.assertRaises(exceptions.KeyStoreError):
            self._getTargetClass()(os.path.join(blocker, 'keys'))

    def test_storage_dir_removed_under_facility(self):
        facility = self._makeOne()
        facility.create_key(os.urandom(32))   # the directory is made
        shutil.rmtree(facility.storage_dir)
        with self.assertRaises(exceptions.KeyStoreError):
            facility.create_key(os.urandom(32))

    def test_rotate_retires_previous(self):
        facility, kek, first = self._makeWithKey()
        old = facility.encrypt(kek, b'old')
        second = facility.rotate(kek)
        self.assertEqual(facility.entry(first).state, 'retired')
        self.assertEqual(facility.entry(second).state, 'active')
        self.assertEqual(facility.key_id_of(facility.encrypt(kek, b'new')),
                         second)
        self.assertEqual(facility.decrypt(kek, old), b'old')

    def test_retire_active_key_stops_encryption(self):
        facility, kek, dek_id = self._makeWithKey()
        data = facility.encrypt(kek, b'x')
        facility.retire(dek_id)
        facility.retire(dek_id)  # no-op
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.encrypt(kek, b'y')
        self.assertEqual(facility.decrypt(kek, data), b'x')

    def test_delete_evicts_from_every_cache(self):
        facility, kek, dek_id = self._makeWithKey()
        other = self._makeOne()
        data = facility.encrypt(kek, b'x')
        self.assertEqual(other.decrypt(kek, data), b'x')   # cached there
        facility.delete(dek_id)
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.decrypt(kek, data)
        with self.assertRaises(exceptions.UnknownKeyError):
            other.decrypt(kek, data)
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.delete(dek_id)

    def test_record_fast_path_hits_only_what_decrypt_checked(self):
        facility, kek, dek_id = self._makeWithKey()
        oid, other_oid = b'\0' * 7 + b'\x05', b'\0' * 7 + b'\x06'
        record = facility.encrypt(kek, b'state', oid)
        open_fast = facility.record_fast_path(kek)
        self.assertIsNone(open_fast(record, oid))    # decrypt() not run yet
        self.assertEqual(facility.decrypt(kek, record, oid), b'state')
        self.assertEqual(open_fast(record, oid), b'state')
        # what it leaves to decrypt(), which raises
        self.assertIsNone(open_fast(record, other_oid))
        flipped = record[:-1] + bytes([record[-1] ^ 1])
        self.assertIsNone(open_fast(flipped, oid))
        self.assertIsNone(open_fast(record[:40], oid))
        self.assertIsNone(open_fast(memoryview(record), oid))
        self.assertIsNone(open_fast(facility.encrypt(kek, b'state'), oid))
        # another key's table is not this one's
        other_kek = self._makeOne().generate()
        self.assertIsNone(facility.record_fast_path(other_kek)(record, oid))
        # a table replaced by clear_cache() is found again after decrypt()
        facility.clear_cache()
        self.assertIsNone(open_fast(record, oid))
        self.assertEqual(facility.decrypt(kek, record, oid), b'state')
        self.assertEqual(open_fast(record, oid), b'state')
        # deleting the DEK evicts it: no more hits, decrypt() raises
        facility.delete(dek_id)
        self.assertIsNone(open_fast(record, oid))
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.decrypt(kek, record, oid)

    def test_record_fast_path_after_expiry_and_w_key_lists(self):
        facility, kek, _ = self._makeWithKey(timeout=0)
        oid = b'\0' * 8
        record = facility.encrypt(kek, b'state', oid)
        open_fast = facility.record_fast_path(kek)
        self.assertEqual(facility.decrypt(kek, record, oid), b'state')
        self.assertIsNone(open_fast(record, oid))     # expired at once
        self.assertEqual(facility.decrypt([kek], record, oid), b'state')
        self.assertIsNone(facility.record_fast_path([kek])(record, oid))
        keys = (kek,)
        self.assertEqual(facility.decrypt(keys, record, oid), b'state')
        facility.timeout = 60
        self.assertEqual(facility.decrypt(keys, record, oid), b'state')
        self.assertEqual(facility.record_fast_path(keys)(record, oid),
                         b'state')

    def test_entry_w_unknown_id(self):
        facility = self._makeOne()
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.entry('0' * 32)
        with self.assertRaises(exceptions.UnknownKeyError):
            facility.entry('../../etc/passwd')

    def test_rewrap(self):
        facility, kek, dek_id = self._makeWithKey()
        data = facility.encrypt(kek, b'x')
        new = os.urandom(32)
        self.assertEqual(facility.rewrap(kek, new), 1)
        self.assertEqual(facility.entry(dek_id).state, 'active')
        self.assertEqual(facility.decrypt(new, data), b'x')
        with self.assertRaises(exceptions.WrongKeyError):
            facility.decrypt(kek, data)
        # the new KEK now encrypts with the rewrapped DEK
        self.assertEqual(facility.key_id_of(facility.encrypt(new, b'y')),
                         dek_id)
        # running it again is harmless
        self.assertEqual(facility.rewrap(kek, new), 0)
        with self.assertRaises(exceptions.KeyStateError):
            facility.rewrap(new, new)

    def test_corrupt_entry(self):
        facility, kek, dek_id = self._makeWithKey()
        path = os.path.join(facility.storage_dir, dek_id + '.dek')
        with open(path, 'wb') as f:
            f.write(b'{"format": "zodbkmi-vault-entry", "version": 1}')
        fresh = self._makeOne()
        with self.assertRaises(exceptions.KeyStoreError):
            fresh.entry(dek_id)

    def test_timeout_expires_cache(self):
        facility, kek, dek_id = self._makeWithKey(timeout=0)
        data = facility.encrypt(kek, b'x')
        self.assertEqual(len(facility._cache), 1)
        self.assertIsNone(facility._cache.get(bytes.fromhex(dek_id)))
        self.assertEqual(facility.decrypt(kek, data), b'x')

    def test_use_limit_is_accepted_and_ignored(self):
        # No write fails for a number of uses any more (envelope version 2
        # draws subkeys: tests/test_review_nonce.py); the argument stays.
        facility, kek, _ = self._makeWithKey(use_limit=3)
        sealed = [facility.encrypt(kek, b'x') for _ in range(10)]
        self.assertEqual({facility.decrypt(kek, d) for d in sealed}, {b'x'})
        with self.assertRaises(ValueError):
            self._makeOne(use_limit=0)

    def test_shared_directory_between_instances(self):
        a = self._makeOne()
        b = self._makeOne()
        self.assertEqual(len(b), 0)
        kek = os.urandom(32)
        a.create_key(kek)
        self.assertEqual(len(b), 1)
        self.assertEqual(b.decrypt(kek, a.encrypt(kek, b'x')), b'x')

    def test_concurrent_use_from_8_threads(self):
        from zodbkmi.format.envelope import unique_part
        facility, kek, _ = self._makeWithKey()
        aes = os.urandom(32)
        facility.ensure_key(aes)
        errors = []
        seen = set()
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def work(n):
            try:
                barrier.wait()
                key = kek if n % 2 else aes
                for i in range(300):
                    data = b'%d-%d' % (n, i)
                    ct = facility.encrypt(key, data)
                    if facility.decrypt(key, ct) != data:
                        errors.append('wrong plaintext')
                    with lock:
                        seen.add(unique_part(ct))     # salt and nonce
                    if n == 0 and i % 100 == 50:
                        facility.rotate(aes)
            except Exception as e:   # pragma: no cover
                errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(n,))
                   for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(seen), 8 * 300)    # no nonce twice


class NonceTests(unittest.TestCase):

    def test_no_nonce_twice_across_threads(self):
        from zodbkmi.format.envelope import Sealer
        from zodbkmi.format.envelope import unique_part
        sealer = Sealer(os.urandom(16), os.urandom(32))
        out = []

        def work():
            out.extend(unique_part(sealer.seal_data(b''))
                       for _ in range(500))

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(out), 4000)
        self.assertEqual(len(set(out)), 4000)
        self.assertTrue(all(len(n) == 16 for n in out))

    def test_child_after_fork_does_not_reuse_parent_nonces(self):
        from zodbkmi.format.envelope import new_nonce
        new_nonce()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # pragma: no cover (child)
            os.close(r)
            os.write(w, b''.join(new_nonce() for _ in range(8)))
            os._exit(0)
        os.close(w)
        child = os.read(r, 1000)
        os.close(r)
        os.waitpid(pid, 0)
        parent = b''.join(new_nonce() for _ in range(8))
        child_set = {child[i:i + 12] for i in range(0, 96, 12)}
        parent_set = {parent[i:i + 12] for i in range(0, 96, 12)}
        self.assertEqual(len(child_set), 8)
        self.assertFalse(child_set & parent_set)


class TestingFacilityTests(unittest.TestCase):

    def test_reusable_across_directories(self):
        from zodbkmi.testing import TestingKeyHolder
        from zodbkmi.testing import TestingKeyManagementFacility
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        a = TestingKeyManagementFacility(os.path.join(tmp, 'a'))
        b = TestingKeyManagementFacility(os.path.join(tmp, 'b'))
        key = TestingKeyHolder.key
        self.assertEqual(a.generate(), key)
        self.assertEqual(b.decrypt(key, a.encrypt(key, b'x')), b'x')
        # reopening an existing directory keeps the one key
        TestingKeyManagementFacility(os.path.join(tmp, 'a'))
        self.assertEqual(len(a), 1)

    def test_holder_provides_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyHolder
        from zodbkmi.testing import TestingKeyHolder
        self.assertTrue(verifyObject(IKeyHolder, TestingKeyHolder()))
        self.assertEqual(repr(TestingKeyHolder()), '<TestingKeyHolder>')
