"""Tests of zodbkmi.files and of encrypt_file / decrypt_file on facilities."""
import io
import os
import shutil
import tempfile
import unittest

from zodbkmi import exceptions
from zodbkmi.format import stream
from zodbkmi.kek import AESKeyEncryptingKey


class _TempDir(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-files-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)


class FacilityFileTests(_TempDir):

    def _getTargetClass(self):
        from zodbkmi.facility import KeyManagementFacility
        return KeyManagementFacility

    def _makeOne(self, **kw):
        return self._getTargetClass()(self.path('keys'), **kw)

    def setUp(self):
        super().setUp()
        self.facility = self._makeOne()
        self.kek = os.urandom(32)
        self.dek_id = self.facility.create_key(self.kek)

    def _encrypt(self, data, key=None):
        out = io.BytesIO()
        n = self.facility.encrypt_file(key or self.kek, io.BytesIO(data), out)
        self.assertEqual(n, len(data))
        return out.getvalue()

    def _decrypt(self, sealed, key=None):
        out = io.BytesIO()
        n = self.facility.decrypt_file(key or self.kek, io.BytesIO(sealed),
                                       out)
        self.assertEqual(n, len(out.getvalue()))
        return out.getvalue()

    def test_roundtrip(self):
        for size in (0, 1, 65535, 65536, 65537, 200000):
            data = os.urandom(size)
            sealed = self._encrypt(data)
            self.assertEqual(self._decrypt(sealed), data)

    def test_stream_names_the_active_dek(self):
        sealed = self._encrypt(b'data')
        self.assertEqual(sealed[:3], b'zks')
        self.assertEqual(stream.parse_header(sealed).dek_id.hex(),
                         self.dek_id)

    def test_encrypt_file_counts_one_use(self):
        facility = self._makeOne(use_limit=2)
        self.facility = facility
        self._encrypt(b'1')
        self._encrypt(b'2' * 300000)
        with self.assertRaises(exceptions.KeyStateError):
            self._encrypt(b'3')

    def test_encrypt_file_w_chunk_size(self):
        out = io.BytesIO()
        self.facility.encrypt_file(self.kek, io.BytesIO(b'x' * 200), out,
                                   chunk_size=64)
        self.assertEqual(stream.parse_header(out.getvalue()).chunk_size, 64)
        self.assertEqual(self._decrypt(out.getvalue()), b'x' * 200)

    def test_decrypt_file_after_rotation(self):
        sealed = self._encrypt(b'old')
        self.facility.rotate(self.kek)
        self.assertEqual(self._decrypt(sealed), b'old')
        self.assertNotEqual(stream.parse_header(self._encrypt(b'new')).dek_id,
                            stream.parse_header(sealed).dek_id)

    def test_decrypt_file_w_wrong_key(self):
        sealed = self._encrypt(b'secret')
        other = os.urandom(32)
        self.facility.create_key(other)
        with self.assertRaises(exceptions.WrongKeyError):
            self._decrypt(sealed, key=other)

    def test_decrypt_file_w_deleted_dek(self):
        sealed = self._encrypt(b'secret')
        self.facility.delete(self.dek_id)
        with self.assertRaises(exceptions.UnknownKeyError):
            self._decrypt(sealed)

    def test_decrypt_file_w_tampered_data(self):
        sealed = bytearray(self._encrypt(b'secret' * 10))
        sealed[-1] ^= 1
        out = io.BytesIO()
        with self.assertRaises(exceptions.AuthenticationError):
            self.facility.decrypt_file(self.kek, io.BytesIO(bytes(sealed)),
                                       out)
        self.assertEqual(out.getvalue(), b'')

    def test_decrypt_file_w_record_envelope(self):
        with self.assertRaises(exceptions.UnsupportedFormatError):
            self._decrypt(self.facility.encrypt(self.kek, b'record'))

    def test_decrypt_file_w_embedded_wrapped_dek(self):
        from zodbkmi.format import wrapped
        dek, dek_id = os.urandom(32), os.urandom(16)
        blob = wrapped.wrap(AESKeyEncryptingKey(self.kek), dek_id, dek)
        out = io.BytesIO()
        stream.encrypt(io.BytesIO(b'self-contained'), out, dek,
                       stream.build_header(wrapped=blob))
        self.assertEqual(self._decrypt(out.getvalue()), b'self-contained')
        self.assertEqual(self._decrypt(out.getvalue(),
                                       key=[os.urandom(32), self.kek]),
                         b'self-contained')
        with self.assertRaises(exceptions.WrongKeyError):
            self._decrypt(out.getvalue(), key=os.urandom(32))

    def test_testing_facility(self):
        from zodbkmi.testing import KeyEncryptingKey
        from zodbkmi.testing import TestingKeyManagementFacility
        facility = TestingKeyManagementFacility(self.path('testing'))
        out = io.BytesIO()
        facility.encrypt_file(KeyEncryptingKey, io.BytesIO(b'blob'), out)
        plain = io.BytesIO()
        TestingKeyManagementFacility(self.path('other')).decrypt_file(
            KeyEncryptingKey, io.BytesIO(out.getvalue()), plain)
        self.assertEqual(plain.getvalue(), b'blob')
