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

    def _decrypt(self, sealed, key=None, **kw):
        out = io.BytesIO()
        n = self.facility.decrypt_file(key or self.kek, io.BytesIO(sealed),
                                       out, **kw)
        self.assertEqual(n, len(out.getvalue()))
        return out.getvalue()

    def test_roundtrip(self):
        for size in (0, 1, 65535, 65536, 65537, 200000):
            data = os.urandom(size)
            sealed = self._encrypt(data)
            self.assertEqual(self._decrypt(sealed), data)

    def test_encrypt_file_in_place(self):
        data = os.urandom(200000)
        with open(self.path('blob'), 'wb') as f:
            f.write(data)
        fd = os.open(self.path('blob'), os.O_RDWR)
        try:
            n = self.facility.encrypt_file_in_place(self.kek, fd,
                                                    oid=b'\0' * 8)
        finally:
            os.close(fd)
        self.assertEqual(n, len(data))
        with open(self.path('blob'), 'rb') as f:
            sealed = f.read()
        self.assertEqual(stream.parse_header(sealed).dek_id.hex(),
                         self.dek_id)
        out = io.BytesIO()
        self.facility.decrypt_file(self.kek, io.BytesIO(sealed), out,
                                   oid=b'\0' * 8)
        self.assertEqual(out.getvalue(), data)
        with self.assertRaises(exceptions.AuthenticationError):
            self.facility.decrypt_file(self.kek, io.BytesIO(sealed),
                                       io.BytesIO(), oid=b'\0' * 7 + b'1')

    def test_stream_names_the_active_dek(self):
        sealed = self._encrypt(b'data')
        self.assertEqual(sealed[:3], b'zks')
        self.assertEqual(stream.parse_header(sealed).dek_id.hex(),
                         self.dek_id)

    def test_encrypt_file_has_no_use_limit(self):
        # every stream has a key of its own (random 16 byte salt): files
        # are not counted, and use_limit is ignored
        facility = self._makeOne(use_limit=2)
        self.facility = facility
        for data in (b'1', b'2' * 300000, b'3'):
            self.assertEqual(self._decrypt(self._encrypt(data)), data)

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
        # refused unless asked for (see tests.test_review_storage)
        with self.assertRaises(exceptions.SelfContainedStreamError):
            self._decrypt(out.getvalue())
        self.assertEqual(self._decrypt(out.getvalue(), self_contained=True),
                         b'self-contained')
        self.assertEqual(self._decrypt(out.getvalue(),
                                       key=[os.urandom(32), self.kek],
                                       self_contained=True),
                         b'self-contained')
        with self.assertRaises(exceptions.WrongKeyError):
            self._decrypt(out.getvalue(), key=os.urandom(32),
                          self_contained=True)

    def _range(self, sealed, offset, length=None, key=None, oid=None,
               **kw):
        out = io.BytesIO()
        n = self.facility.decrypt_file_range(
            key or self.kek, io.BytesIO(sealed), out, offset, length,
            oid=oid, **kw)
        self.assertEqual(n, len(out.getvalue()))
        return out.getvalue()

    def test_decrypt_file_range(self):
        data = os.urandom(3 * 1024 + 5)
        out = io.BytesIO()
        self.facility.encrypt_file(self.kek, io.BytesIO(data), out,
                                   chunk_size=1024)
        sealed = out.getvalue()
        for offset in (0, 1, 1023, 1024, 1025, 2048, 3072, 3076, 3077, 5000):
            for length in (None, 0, 1, 1024, 1025, 10000):
                expected = data[offset:] if length is None else \
                    data[offset:offset + length]
                self.assertEqual(self._range(sealed, offset, length),
                                 expected, (offset, length))

    def test_decrypt_file_range_reads_only_its_chunks(self):
        data = os.urandom(4 * 1024)
        out = io.BytesIO()
        self.facility.encrypt_file(self.kek, io.BytesIO(data), out,
                                   chunk_size=1024)
        sealed = bytearray(out.getvalue())
        sealed[-1] ^= 1     # the last chunk is altered
        sealed = bytes(sealed)
        self.assertEqual(self._range(sealed, 1000, 100), data[1000:1100])
        with self.assertRaises(exceptions.AuthenticationError):
            self._range(sealed, 3000, 100)
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(sealed)

    def test_decrypt_file_range_w_bad_input(self):
        sealed = self._encrypt(b'x' * 100)
        for offset, length in ((-1, None), (0, -1)):
            with self.assertRaises(ValueError):
                self._range(sealed, offset, length)
        with self.assertRaises(exceptions.WrongKeyError):
            self._range(sealed, 0, key=os.urandom(32))
        hsize = stream.read_header(io.BytesIO(sealed)).size
        with self.assertRaises(exceptions.TruncatedDataError):
            self._range(sealed[:hsize + 10], 0)     # inside the only tag
        with self.assertRaises(exceptions.AuthenticationError):
            self._range(sealed[:-20], 0)            # inside the only chunk
        with self.assertRaises(exceptions.UnsupportedFormatError):
            self._range(self.facility.encrypt(self.kek, b'record'), 0)
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        with os.fdopen(r, 'rb') as pipe, self.assertRaises(ValueError):
            self.facility.decrypt_file_range(self.kek, pipe, io.BytesIO(), 0)

    def test_decrypt_file_range_w_oid_and_embedded_dek(self):
        from zodbkmi.format import wrapped
        oid = b'\0' * 7 + b'\x07'
        out = io.BytesIO()
        self.facility.encrypt_file(self.kek, io.BytesIO(b'blob data'), out,
                                   oid=oid)
        self.assertEqual(self._range(out.getvalue(), 5, oid=oid), b'data')
        with self.assertRaises(exceptions.AuthenticationError):
            self._range(out.getvalue(), 5)          # the oid is missing
        dek, dek_id = os.urandom(32), os.urandom(16)
        blob = wrapped.wrap(AESKeyEncryptingKey(self.kek), dek_id, dek)
        out = io.BytesIO()
        stream.encrypt(io.BytesIO(b'self-contained'), out, dek,
                       stream.build_header(wrapped=blob))
        with self.assertRaises(exceptions.SelfContainedStreamError):
            self._range(out.getvalue(), 5)
        self.assertEqual(self._range(out.getvalue(), 5, self_contained=True),
                         b'contained')

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


def _rsa_kek():
    from zodbkmi.kek import RSAKeyEncryptingKey
    global _RSA
    if _RSA is None:
        _RSA = RSAKeyEncryptingKey.generate()
    return _RSA


_RSA = None


class RecipientTests(_TempDir):

    def test_roundtrip_w_public_pem(self):
        from zodbkmi import files
        kek = _rsa_kek()
        public = files.public_key_pem(kek.private_pem())
        self.assertIn(b'PUBLIC KEY', public)
        self.assertNotIn(b'PRIVATE', public)
        for size in (0, 1, 65536, 100000):
            data = os.urandom(size)
            out = io.BytesIO()
            n = files.encrypt_to_recipient(public, io.BytesIO(data), out)
            self.assertEqual(n, size)
            sealed = out.getvalue()
            header = stream.parse_header(sealed)
            self.assertIsNotNone(header.wrapped)
            plain = io.BytesIO()
            files.decrypt_with_private_key(kek.private_pem(),
                                           io.BytesIO(sealed), plain)
            self.assertEqual(plain.getvalue(), data)

    def test_each_file_has_its_own_dek(self):
        from zodbkmi import files
        public = _rsa_kek().public()
        ids = set()
        for i in range(3):
            out = io.BytesIO()
            files.encrypt_to_recipient(public, io.BytesIO(b'x'), out)
            ids.add(stream.parse_header(out.getvalue()).dek_id)
        self.assertEqual(len(ids), 3)

    def test_public_key_cannot_decrypt(self):
        from zodbkmi import files
        kek = _rsa_kek()
        out = io.BytesIO()
        files.encrypt_to_recipient(kek.public_pem(), io.BytesIO(b'x'), out)
        with self.assertRaises(exceptions.InvalidKeyError):
            files.decrypt_with_private_key(kek.public(),
                                           io.BytesIO(out.getvalue()),
                                           io.BytesIO())

    def test_decrypt_w_other_private_key(self):
        from zodbkmi import files
        out = io.BytesIO()
        files.encrypt_to_recipient(_rsa_kek(), io.BytesIO(b'x'), out)
        with self.assertRaises(exceptions.WrongKeyError):
            files.decrypt_with_private_key(os.urandom(32),
                                           io.BytesIO(out.getvalue()),
                                           io.BytesIO())

    def test_decrypt_w_list_of_keys(self):
        from zodbkmi import files
        out = io.BytesIO()
        files.encrypt_to_recipient(_rsa_kek(), io.BytesIO(b'x'), out)
        plain = io.BytesIO()
        files.decrypt_with_private_key([os.urandom(32), _rsa_kek()],
                                       io.BytesIO(out.getvalue()), plain)
        self.assertEqual(plain.getvalue(), b'x')

    def test_aes_recipient(self):
        from zodbkmi import files
        key = os.urandom(32)
        out = io.BytesIO()
        files.encrypt_to_recipient(key, io.BytesIO(b'sym'), out, 64)
        plain = io.BytesIO()
        files.decrypt_with_private_key(key, io.BytesIO(out.getvalue()),
                                       plain)
        self.assertEqual(plain.getvalue(), b'sym')

    def test_stream_naming_a_dek_needs_a_facility(self):
        from zodbkmi import files
        sealed = stream.encrypt_bytes(bytes(16), bytes(32), b'x')
        with self.assertRaisesRegex(exceptions.UnknownKeyError, 'by id'):
            files.decrypt_with_private_key(os.urandom(32),
                                           io.BytesIO(sealed), io.BytesIO())

    def test_altered_wrapped_dek(self):
        from zodbkmi import files
        kek = _rsa_kek()
        out = io.BytesIO()
        files.encrypt_to_recipient(kek, io.BytesIO(b'x'), out)
        bad = bytearray(out.getvalue())
        bad[100] ^= 1            # inside the RSA wrapping
        with self.assertRaises(exceptions.AuthenticationError):
            files.decrypt_with_private_key(kek, io.BytesIO(bytes(bad)),
                                           io.BytesIO())

    def test_public_key_pem_w_aes_key(self):
        from zodbkmi import files
        with self.assertRaises(exceptions.InvalidKeyError):
            files.public_key_pem(os.urandom(32))

    def test_recipient_kek(self):
        from zodbkmi import files
        kek = _rsa_kek()
        self.assertIs(files.recipient_kek(kek), kek)
        self.assertEqual(files.recipient_kek(kek.private_pem()).key_id,
                         kek.key_id)
        self.assertEqual(
            files.recipient_kek(kek.public_pem().decode()).key_id,
            kek.key_id)


class AtomicOutputTests(_TempDir):

    def _callFUT(self, *args, **kw):
        from zodbkmi.files import atomic_output
        return atomic_output(*args, **kw)

    def test_file_appears_when_complete(self):
        target = self.path('out')
        with self._callFUT(target) as f:
            f.write(b'data')
            self.assertFalse(os.path.exists(target))
            parts = [n for n in os.listdir(self.tmp) if n.endswith('.part')]
            self.assertEqual(len(parts), 1)
            self.assertTrue(parts[0].startswith('.out.'))
        with open(target, 'rb') as f:
            self.assertEqual(f.read(), b'data')
        self.assertEqual(os.listdir(self.tmp), ['out'])
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o600)

    def test_failure_leaves_nothing(self):
        target = self.path('out')
        for exc in (ValueError, KeyboardInterrupt):
            with self.assertRaises(exc):
                with self._callFUT(target) as f:
                    f.write(b'partial')
                    raise exc()
            self.assertEqual(os.listdir(self.tmp), [])

    def test_existing_file(self):
        target = self.path('out')
        with open(target, 'wb') as f:
            f.write(b'old')
        with self.assertRaises(FileExistsError):
            with self._callFUT(target):
                pass
        with self._callFUT(target, overwrite=True) as f:
            f.write(b'new')
        with open(target, 'rb') as f:
            self.assertEqual(f.read(), b'new')

    def test_symlink_is_followed(self):
        real = self.path('real')
        with open(real, 'wb') as f:
            f.write(b'old')
        os.symlink(real, self.path('link'))
        with self._callFUT(self.path('link'), overwrite=True) as f:
            f.write(b'new')
        self.assertTrue(os.path.islink(self.path('link')))
        with open(real, 'rb') as f:
            self.assertEqual(f.read(), b'new')

    def test_never_replaces_a_device(self):
        with self.assertRaises(ValueError):
            with self._callFUT('/dev/null', overwrite=True):
                pass
        self.assertFalse(os.path.isfile('/dev/null'))


class _Terminal(io.StringIO):

    def isatty(self):
        return True


class TransformTests(_TempDir):

    def _callFUT(self, *args, **kw):
        from zodbkmi.files import transform
        return transform(*args, **kw)

    def _copy(self, fsrc, fdst):
        n = 0
        while True:
            data = fsrc.read(1000)
            if not data:
                return n
            fdst.write(data)
            n += len(data)

    def test_path_to_path_w_progress_on_terminal(self):
        src = self.path('in')
        with open(src, 'wb') as f:
            f.write(b'x' * 5000)
        err = _Terminal()
        n = self._callFUT(self._copy, src, self.path('out'), stderr=err)
        self.assertEqual(n, 5000)
        self.assertIn('in: 100% 4.9 KiB of 4.9 KiB', err.getvalue())
        self.assertTrue(err.getvalue().endswith('\n'))

    def test_no_progress_off_terminal(self):
        src = self.path('in')
        with open(src, 'wb') as f:
            f.write(b'x' * 10)
        err = io.StringIO()
        self._callFUT(self._copy, src, self.path('out'), stderr=err)
        self.assertEqual(err.getvalue(), '')
        self._callFUT(self._copy, src, self.path('out2'), stderr=_Terminal(),
                      progress=False)

    def test_forced_progress_on_stream(self):
        err = io.StringIO()
        out = io.BytesIO()
        self._callFUT(self._copy, '-', '-', stdin=io.BytesIO(b'y' * 3000),
                      stdout=out, stderr=err, progress=True)
        self.assertEqual(out.getvalue(), b'y' * 3000)
        self.assertIn('stdin: 2.9 KiB', err.getvalue())

    def test_failure_leaves_no_output(self):
        def fail(fsrc, fdst):
            fdst.write(b'half')
            raise exceptions.AuthenticationError('no')
        with self.assertRaises(exceptions.AuthenticationError):
            self._callFUT(fail, '-', self.path('out'),
                          stdin=io.BytesIO(b'x'))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_device_target(self):
        self.assertEqual(
            self._callFUT(self._copy, '-', '/dev/null',
                          stdin=io.BytesIO(b'z' * 10)), 10)
        self.assertFalse(os.path.isfile('/dev/null'))

    def test_format_size(self):
        from zodbkmi.files import format_size
        self.assertEqual([format_size(n) for n in (0, 1023, 1536, 1 << 20,
                                                   5 << 30, 5 << 40)],
                         ['0 bytes', '1023 bytes', '1.5 KiB', '1.0 MiB',
                          '5.0 GiB', '5120.0 GiB'])


class ConstantMemoryTests(unittest.TestCase):
    """Python allocations while streaming do not grow with the size (the
    mmap buffers are not traced: test_cli_files checks the RSS)."""

    class _Zeros:
        def __init__(self, size):
            self.left = size

        def readinto(self, buf):
            n = min(len(buf), self.left)
            self.left -= n
            return n

    class _Sink:
        def __init__(self):
            self.size = 0

        def write(self, data):
            self.size += len(data)
            return len(data)

    def _peak(self, size):
        import tracemalloc
        header = stream.build_header(bytes(16))
        tracemalloc.start()
        try:
            sink = self._Sink()
            stream.encrypt(self._Zeros(size), sink, bytes(32), header)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(sink.size, header.size + size + 16 * (
            -(-size // stream.DEFAULT_CHUNK_SIZE)))
        return peak

    def test_encrypt_memory_independent_of_size(self):
        small, large = self._peak(1 << 20), self._peak(64 << 20)
        self.assertLess(large, 4 * stream.BATCH_SIZE)
        self.assertLess(large, small + 64 * 1024)
