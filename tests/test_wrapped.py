"""Tests of zodbkmi.format.wrapped."""
import unittest

from zodbkmi import exceptions

DEK_ID = bytes(range(16))
DEK = bytes(range(100, 132))


def aes_kek(key=b'K' * 32, key_id=None):
    from zodbkmi.kek import AESKeyEncryptingKey
    return AESKeyEncryptingKey(key, key_id)


def rsa_kek():
    """The public RSA test key of the vectors (no slow key generation)."""
    from tests.test_format_vectors import load
    from zodbkmi.kek import RSAKeyEncryptingKey
    pem = load('wrapped.json')['keys']['rsa']['private_pem']
    return RSAKeyEncryptingKey.from_pem(pem.encode())


class ExplodingKEK:
    """A KEK whose cryptographic operations must not be reached."""

    suite = 2

    def __init__(self, key_id):
        self.key_id = key_id

    def wrap(self, dek, aad):
        raise AssertionError('wrap called')

    def unwrap(self, blob, aad):
        raise AssertionError('unwrap called')


class BuildHeaderTests(unittest.TestCase):

    def _callFUT(self, suite, dek_id, kek_id, version=2, created=None):
        from zodbkmi.format.wrapped import build_header
        return build_header(suite, dek_id, kek_id, version, created)

    def test_layout(self):
        header = self._callFUT(2, DEK_ID, 'aes-x', created=0x0102)
        self.assertEqual(header, b'zkw\x02\x02' + DEK_ID
                         + bytes(6) + b'\x01\x02' + b'\x05aes-x')

    def test_layout_version_1(self):
        header = self._callFUT(2, DEK_ID, 'aes-x', 1)
        self.assertEqual(header, b'zkw\x01\x02' + DEK_ID + b'\x05aes-x')

    def test_created_defaults_to_now(self):
        import time
        before = time.time_ns()
        header = self._callFUT(2, DEK_ID, 'aes-x')
        self.assertLessEqual(before, int.from_bytes(header[21:29], 'big'))

    def test_w_bad_created(self):
        for version, created in ((2, -1), (2, 2 ** 64), (2, 1.5), (1, 5)):
            with self.assertRaises(ValueError):
                self._callFUT(2, DEK_ID, 'k', version, created)

    def test_longest_kek_id(self):
        header = self._callFUT(1, DEK_ID, 'k' * 255)
        self.assertEqual(len(header), 30 + 255)

    def test_w_unknown_suite(self):
        for suite in (0, 7, 255):
            with self.assertRaises(ValueError):
                self._callFUT(suite, DEK_ID, 'k')

    def test_w_bad_dek_id(self):
        for dek_id in (b'', b'x' * 15, b'x' * 17, DEK_ID.hex()):
            with self.assertRaises(ValueError):
                self._callFUT(2, dek_id, 'k')

    def test_w_bad_kek_id(self):
        for kek_id in ('', 'k' * 256, 'clé'):
            with self.assertRaises(ValueError):
                self._callFUT(2, DEK_ID, kek_id)


class WrapTests(unittest.TestCase):

    def _callFUT(self, kek, dek_id=DEK_ID, dek=DEK):
        from zodbkmi.format.wrapped import wrap
        return wrap(kek, dek_id, dek)

    def test_aes_layout(self):
        from zodbkmi.format.wrapped import build_header
        kek = aes_kek()
        data = self._callFUT(kek)
        header = build_header(2, DEK_ID, kek.key_id,
                              created=int.from_bytes(data[21:29], 'big'))
        self.assertTrue(data.startswith(header))
        self.assertEqual(len(data), len(header) + 12 + 32 + 16)

    def test_rsa_layout(self):
        kek = rsa_kek()
        data = self._callFUT(kek)
        self.assertEqual(data[3:5], b'\x02\x01')
        # OAEP ciphertext and RSA-PSS signature, 384 bytes each
        self.assertEqual(len(data), 30 + len(kek.key_id) + 2 * 384)

    def test_rsa_public_half_cannot_make_version_2(self):
        # only the private key signs: a public key cannot make a DEK
        with self.assertRaises(exceptions.InvalidKeyError):
            self._callFUT(rsa_kek().public())

    def test_randomized(self):
        kek = aes_kek()
        self.assertNotEqual(self._callFUT(kek), self._callFUT(kek))

    def test_w_bad_dek(self):
        for dek in (b'', b'd' * 31, b'd' * 33, 'd' * 32):
            with self.assertRaises(ValueError):
                self._callFUT(ExplodingKEK('k'), dek=dek)

    def test_no_dek_in_output(self):
        for kek in (aes_kek(), rsa_kek()):
            self.assertNotIn(DEK, self._callFUT(kek))


class ParseTests(unittest.TestCase):

    def _callFUT(self, data):
        from zodbkmi.format.wrapped import parse
        return parse(data)

    def test_fields(self):
        from zodbkmi.format.wrapped import wrap
        kek = aes_kek()
        data = wrap(kek, DEK_ID, DEK)
        wk = self._callFUT(data)
        self.assertEqual(wk.suite, 2)
        self.assertEqual(wk.dek_id, DEK_ID)
        self.assertEqual(wk.kek_id, kek.key_id)
        self.assertEqual(wk.version, 2)
        self.assertEqual(wk.created, int.from_bytes(data[21:29], 'big'))
        self.assertEqual(wk.header, data[:30 + len(kek.key_id)])
        self.assertEqual(wk.blob, data[30 + len(kek.key_id):])

    def test_repr_names_ids_only(self):
        from zodbkmi.format.wrapped import wrap
        kek = aes_kek()
        wk = self._callFUT(wrap(kek, DEK_ID, DEK))
        self.assertEqual(repr(wk), '<WrappedKey v2 DEK %s by KEK %s '
                         '(AES-256-GCM)>' % (DEK_ID.hex(), kek.key_id))

    def test_reserved_suites_parse(self):
        from zodbkmi.format.wrapped import build_header
        for suite in (3, 4):
            wk = self._callFUT(build_header(suite, DEK_ID, 'kms') + b'b')
            self.assertEqual((wk.suite, wk.kek_id, wk.blob),
                             (suite, 'kms', b'b'))

    def test_w_non_bytes(self):
        from zodbkmi.format.wrapped import wrap
        data = wrap(aes_kek(), DEK_ID, DEK)
        for value in (data.decode('latin-1'), bytearray(data), None):
            with self.assertRaises(TypeError):
                self._callFUT(value)

    def test_every_truncation_of_the_header(self):
        from zodbkmi.format.wrapped import wrap
        kek = aes_kek()
        data = wrap(kek, DEK_ID, DEK)
        for n in range(30 + len(kek.key_id) + 1):
            with self.assertRaises(exceptions.TruncatedDataError):
                self._callFUT(data[:n])

    def test_version_before_length(self):
        for data in (b'zkw\x03', b'zkw\x00\x02', b'zkw\x01\x00',
                     b'zkw\x02\x09'):
            with self.assertRaises(exceptions.UnsupportedFormatError):
                self._callFUT(data)

    def test_w_unknown_version_names_it(self):
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._callFUT(b'zkw\x07' + bytes(40))
        self.assertIn('version 7', str(cm.exception))


class UnwrapTests(unittest.TestCase):

    def _callFUT(self, kek, data):
        from zodbkmi.format.wrapped import unwrap
        return unwrap(kek, data)

    def _wrap(self, kek):
        from zodbkmi.format.wrapped import wrap
        return wrap(kek, DEK_ID, DEK)

    def test_roundtrip_aes(self):
        kek = aes_kek()
        self.assertEqual(self._callFUT(kek, self._wrap(kek)), (DEK_ID, DEK))

    def test_roundtrip_rsa(self):
        kek = rsa_kek()
        self.assertEqual(self._callFUT(kek, self._wrap(kek)), (DEK_ID, DEK))

    def test_rsa_public_half_wraps_for_the_private_half(self):
        # version 1 only (self-contained streams)
        from zodbkmi.format.wrapped import wrap
        kek = rsa_kek()
        data = wrap(kek.public(), DEK_ID, DEK, version=1)
        self.assertEqual(self._callFUT(kek, data), (DEK_ID, DEK))
        with self.assertRaises(exceptions.InvalidKeyError):
            self._callFUT(kek.public(), data)

    def test_w_other_kek_raises_before_any_crypto(self):
        data = self._wrap(aes_kek())
        with self.assertRaises(exceptions.WrongKeyError) as cm:
            self._callFUT(ExplodingKEK('aes-other'), data)
        message = str(cm.exception)
        self.assertIn(DEK_ID.hex(), message)
        self.assertIn('aes-other', message)
        self.assertIn(aes_kek().key_id, message)

    def test_w_same_id_other_suite(self):
        kek = aes_kek()
        impostor = ExplodingKEK(kek.key_id)
        impostor.suite = 1
        with self.assertRaises(exceptions.WrongKeyError):
            self._callFUT(impostor, self._wrap(kek))

    def test_w_same_id_other_key(self):
        kek = aes_kek()
        impostor = aes_kek(b'I' * 32, kek.key_id)
        with self.assertRaises(exceptions.AuthenticationError) as cm:
            self._callFUT(impostor, self._wrap(kek))
        self.assertIs(type(cm.exception), exceptions.AuthenticationError)

    def test_moved_to_other_dek_id(self):
        for kek in (aes_kek(), rsa_kek()):
            data = self._wrap(kek)
            moved = data[:5] + b'\xee' * 16 + data[21:]
            with self.assertRaises(exceptions.AuthenticationError):
                self._callFUT(kek, moved)

    def test_created_changed(self):
        for kek in (aes_kek(), rsa_kek()):
            data = self._wrap(kek)
            moved = data[:21] + b'\x7f' + data[22:]
            with self.assertRaises(exceptions.AuthenticationError):
                self._callFUT(kek, moved)

    def test_truncated_wrapping(self):
        for kek in (aes_kek(), rsa_kek()):
            data = self._wrap(kek)
            for cut in (1, 16, len(data) - 31 - len(kek.key_id)):
                with self.assertRaises(exceptions.TruncatedDataError):
                    self._callFUT(kek, data[:-cut])

    def test_every_flipped_bit_of_aes_wrapping(self):
        kek = aes_kek()
        data = self._wrap(kek)
        for i in range(len(data) * 8):
            bad = bytearray(data)
            bad[i // 8] ^= 1 << (i % 8)
            with self.assertRaises((exceptions.UnsupportedFormatError,
                                    exceptions.TruncatedDataError,
                                    exceptions.AuthenticationError)):
                self._callFUT(kek, bytes(bad))
