"""Tests of zodbkmi.kek."""
import hashlib
import hmac
import unittest

from cryptography.hazmat.primitives import serialization

from zodbkmi import exceptions

AAD = b'zkw\x01 header as associated data'
DEK = bytes(range(32))


def vector_key(name):
    from tests.test_format_vectors import load
    return load('wrapped.json')['keys'][name]


def rsa_pem():
    """The public RSA-3072 test key of the vectors."""
    return vector_key('rsa')['private_pem'].encode()


def weak_rsa_pem():
    """An RSA-2048 test key from the key file vectors."""
    from tests.test_format_vectors import load
    for v in load('key-file.json')['invalid']:
        if v['name'] == 'rsa-2048':
            return v['content'].encode()
    raise AssertionError('no rsa-2048 vector')   # pragma: no cover


def pem_body(pem):
    return b''.join(pem.strip().splitlines()[1:-1]).decode()


class RSAKeyEncryptingKeyTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.kek import RSAKeyEncryptingKey
        return RSAKeyEncryptingKey

    def _makeOne(self, pem=None):
        return self._getTargetClass().from_pem(
            rsa_pem() if pem is None else pem)

    def test_provides_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyEncryptingKey
        self.assertTrue(verifyObject(IKeyEncryptingKey, self._makeOne()))

    def test_key_id_is_sha256_of_spki(self):
        kek = self._makeOne()
        key = serialization.load_pem_private_key(rsa_pem(), None)
        der = key.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(kek.key_id,
                         'rsa-' + hashlib.sha256(der).hexdigest()[:32])
        self.assertEqual(kek.key_id, vector_key('rsa')['kek_id'])
        self.assertEqual(kek.suite, 1)

    def test_roundtrip(self):
        kek = self._makeOne()
        blob = kek.wrap(DEK, AAD)
        self.assertEqual(len(blob), 384)
        self.assertEqual(kek.unwrap(blob, AAD), DEK)

    def test_unwrap_w_other_label(self):
        kek = self._makeOne()
        with self.assertRaises(exceptions.AuthenticationError):
            kek.unwrap(kek.wrap(DEK, AAD), AAD + b'!')

    def test_unwrap_truncated(self):
        kek = self._makeOne()
        blob = kek.wrap(DEK, AAD)
        for n in (0, 1, 383):
            with self.assertRaises(exceptions.TruncatedDataError):
                kek.unwrap(blob[:n], AAD)

    def test_unwrap_too_long(self):
        kek = self._makeOne()
        with self.assertRaises(exceptions.AuthenticationError):
            kek.unwrap(kek.wrap(DEK, AAD) + b'\x00', AAD)

    def test_rsa_below_3072_bits_refused(self):
        with self.assertRaises(exceptions.InvalidKeyError) as cm:
            self._makeOne(weak_rsa_pem())
        self.assertIn('2048', str(cm.exception))
        with self.assertRaises(exceptions.InvalidKeyError):
            self._getTargetClass().generate(2048)

    def test_not_a_key(self):
        for value in (None, b'x' * 32, 'key', object()):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._getTargetClass()(value)

    def test_pem_garbage(self):
        for pem in (b'', b'garbage', b'-----BEGIN PRIVATE KEY-----\nAAAA\n'
                    b'-----END PRIVATE KEY-----\n', rsa_pem()[:300],
                    rsa_pem().decode()):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._makeOne(pem)

    def test_pem_of_other_key_types(self):
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        with self.assertRaises(exceptions.InvalidKeyError):
            self._makeOne(pem)
        with self.assertRaises(exceptions.InvalidKeyError):
            self._makeOne(vector_key('rsa-public')['public_pem'].encode())

    def test_encrypted_pem(self):
        key = serialization.load_pem_private_key(rsa_pem(), None)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b'secret'))
        kek = self._getTargetClass().from_pem(pem, b'secret')
        self.assertEqual(kek.key_id, vector_key('rsa')['kek_id'])
        for password in (None, b'wrong'):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._getTargetClass().from_pem(pem, password)

    def test_pkcs1_pem(self):
        key = serialization.load_pem_private_key(rsa_pem(), None)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
        self.assertTrue(pem.startswith(b'-----BEGIN RSA PRIVATE KEY-----'))
        self.assertEqual(self._makeOne(pem).key_id,
                         vector_key('rsa')['kek_id'])

    def test_private_pem_roundtrip(self):
        kek = self._makeOne()
        pem = kek.private_pem()
        self.assertTrue(pem.startswith(b'-----BEGIN PRIVATE KEY-----'))
        self.assertEqual(self._makeOne(pem).key_id, kek.key_id)

    def test_public_key_cannot_unwrap(self):
        kek = self._makeOne()
        public = kek.public()
        self.assertEqual(public.key_id, kek.key_id)
        blob = public.wrap(DEK, AAD)
        self.assertEqual(kek.unwrap(blob, AAD), DEK)
        with self.assertRaises(exceptions.InvalidKeyError) as cm:
            public.unwrap(blob, AAD)
        self.assertIn(kek.key_id, str(cm.exception))

    def test_repr_shows_no_key_material(self):
        kek = self._makeOne()
        for obj in (kek, kek.public()):
            text = repr(obj)
            self.assertIn(kek.key_id, text)
            self.assertNotIn(pem_body(rsa_pem())[:40], text)
            self.assertNotIn('PRIVATE', text)
        self.assertEqual(repr(kek), '<RSAKeyEncryptingKey %s>' % kek.key_id)


class RSAPublicKeyEncryptingKeyTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.kek import RSAPublicKeyEncryptingKey
        return RSAPublicKeyEncryptingKey

    def test_provides_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyEncryptingKey
        kek = self._getTargetClass().from_pem(
            vector_key('rsa-public')['public_pem'].encode())
        self.assertTrue(verifyObject(IKeyEncryptingKey, kek))
        self.assertEqual(kek.key_id, vector_key('rsa')['kek_id'])
        self.assertEqual(kek.public_pem().decode(),
                         vector_key('rsa-public')['public_pem'])

    def test_pem_garbage(self):
        for pem in (b'', b'-----BEGIN PUBLIC KEY-----\nAAAA\n'
                    b'-----END PUBLIC KEY-----\n', rsa_pem()):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._getTargetClass().from_pem(pem)

    def test_weak_public_key_refused(self):
        key = serialization.load_pem_private_key(weak_rsa_pem(), None)
        with self.assertRaises(exceptions.InvalidKeyError):
            self._getTargetClass()(key.public_key())

    def test_private_key_object_refused(self):
        key = serialization.load_pem_private_key(rsa_pem(), None)
        with self.assertRaises(exceptions.InvalidKeyError):
            self._getTargetClass()(key)


class AESKeyEncryptingKeyTests(unittest.TestCase):

    key = bytes(range(64, 96))

    def _getTargetClass(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        return AESKeyEncryptingKey

    def _makeOne(self, key=None, key_id=None):
        return self._getTargetClass()(key or self.key, key_id)

    def test_provides_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyEncryptingKey
        self.assertTrue(verifyObject(IKeyEncryptingKey, self._makeOne()))

    def test_key_id_is_a_key_check_value(self):
        kek = self._makeOne()
        expected = hmac.new(self.key, b'zodbkmi/kek-id/v1',
                            hashlib.sha256).hexdigest()[:32]
        self.assertEqual(kek.key_id, 'aes-' + expected)
        self.assertEqual(kek.suite, 2)
        for digest in (hashlib.md5, hashlib.sha1, hashlib.sha256):
            self.assertNotIn(digest(self.key).hexdigest()[:16], kek.key_id)

    def test_key_id_of_vector(self):
        v = vector_key('aes')
        self.assertEqual(self._makeOne(bytes.fromhex(v['key'])).key_id,
                         v['kek_id'])

    def test_explicit_key_id(self):
        self.assertEqual(self._makeOne(key_id='master-1').key_id, 'master-1')

    def test_bad_key(self):
        for key in (b'', b'k' * 16, b'k' * 31, b'k' * 33, 'k' * 32, None):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._getTargetClass()(key)

    def test_roundtrip(self):
        kek = self._makeOne()
        blob = kek.wrap(DEK, AAD)
        self.assertEqual(len(blob), 60)
        self.assertEqual(kek.unwrap(blob, AAD), DEK)

    def test_wrap_is_randomized(self):
        kek = self._makeOne()
        self.assertNotEqual(kek.wrap(DEK, AAD)[:12], kek.wrap(DEK, AAD)[:12])

    def test_wrap_w_fixed_nonce(self):
        kek = self._makeOne()
        blob = kek.wrap(DEK, AAD, _nonce=b'n' * 12)
        self.assertEqual(blob[:12], b'n' * 12)
        self.assertEqual(blob, kek.wrap(DEK, AAD, _nonce=b'n' * 12))

    def test_unwrap_w_other_aad(self):
        kek = self._makeOne()
        with self.assertRaises(exceptions.AuthenticationError):
            kek.unwrap(kek.wrap(DEK, AAD), AAD[:-1])

    def test_unwrap_w_other_key(self):
        blob = self._makeOne().wrap(DEK, AAD)
        with self.assertRaises(exceptions.AuthenticationError):
            self._makeOne(b'\x00' * 32).unwrap(blob, AAD)

    def test_unwrap_truncated(self):
        kek = self._makeOne()
        blob = kek.wrap(DEK, AAD)
        for n in (0, 11, 12, 44, 59):
            with self.assertRaises(exceptions.TruncatedDataError):
                kek.unwrap(blob[:n], AAD)

    def test_unwrap_too_long(self):
        kek = self._makeOne()
        with self.assertRaises(exceptions.AuthenticationError):
            kek.unwrap(kek.wrap(DEK, AAD) + b'\x00', AAD)

    def test_generate(self):
        a = self._getTargetClass().generate()
        b = self._getTargetClass().generate()
        self.assertNotEqual(a.key_id, b.key_id)

    def test_repr_shows_no_key_material(self):
        import base64
        kek = self._makeOne()
        text = repr(kek)
        self.assertEqual(text, '<AESKeyEncryptingKey %s>' % kek.key_id)
        self.assertNotIn(self.key.hex()[:16], text)
        self.assertNotIn(base64.b64encode(self.key).decode()[:16], text)
        self.assertFalse(any(self.key in v for v in vars(kek).values()
                             if isinstance(v, bytes)))


class AsKekTests(unittest.TestCase):

    def _callFUT(self, key):
        from zodbkmi.kek import as_kek
        return as_kek(key)

    def test_kek_returned_as_is(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        kek = AESKeyEncryptingKey(b'a' * 32)
        self.assertIs(self._callFUT(kek), kek)

    def test_pem(self):
        from zodbkmi.kek import RSAKeyEncryptingKey
        kek = self._callFUT(rsa_pem())
        self.assertIsInstance(kek, RSAKeyEncryptingKey)
        self.assertEqual(kek.key_id, vector_key('rsa')['kek_id'])
        self.assertEqual(self._callFUT(b'\n  ' + rsa_pem()).key_id,
                         kek.key_id)

    def test_pem_as_text_refused(self):
        # text is no key (review of issue 16, finding 7): the caller
        # encodes PEM text itself
        from zodbkmi.exceptions import InvalidKeyError
        with self.assertRaisesRegex(InvalidKeyError, 'pass bytes'):
            self._callFUT(rsa_pem().decode('ascii'))
        self.assertEqual(
            self._callFUT(rsa_pem().decode('ascii').encode('ascii')).key_id,
            vector_key('rsa')['kek_id'])

    def test_aes_bytes(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        v = vector_key('aes')
        kek = self._callFUT(bytes.fromhex(v['key']))
        self.assertIsInstance(kek, AESKeyEncryptingKey)
        self.assertEqual(kek.key_id, v['kek_id'])

    def test_caching(self):
        key = bytes(range(7, 39))
        kek = self._callFUT(key)
        self.assertIs(self._callFUT(key), kek)
        self.assertIs(self._callFUT(bytes(bytearray(key))), kek)
        pem = rsa_pem()
        self.assertIs(self._callFUT(pem), self._callFUT(pem))

    def test_cache_is_bounded(self):
        from zodbkmi import kek as kekmod
        for i in range(1100):
            self._callFUT(i.to_bytes(32, 'big'))
        self.assertLessEqual(len(kekmod._kek_cache), 1024)

    def test_not_a_key(self):
        for key in (b'', b'k' * 31, b'k' * 33, 42, None, [b'k' * 32],
                    bytearray(32)):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._callFUT(key)

    def test_pem_garbage_and_weak_keys(self):
        for key in (b'-----BEGIN PRIVATE KEY-----\nAAAA\n'
                    b'-----END PRIVATE KEY-----\n', weak_rsa_pem(),
                    vector_key('rsa-public')['public_pem'].encode()):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._callFUT(key)

    def test_errors_show_no_key(self):
        key = b'\x13' * 31
        with self.assertRaises(exceptions.InvalidKeyError) as cm:
            self._callFUT(key)
        self.assertNotIn(key.hex()[:8], str(cm.exception))
        self.assertIn('31 bytes', str(cm.exception))
