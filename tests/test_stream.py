"""Tests of zodbkmi.format.stream: the chunked stream format."""
import io
import json
import os
import threading
import unittest

from zodbkmi import exceptions
from zodbkmi.format import stream
from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, 'vectors', 'stream.json')
DEK_ID = bytes(range(16))
DEK = bytes(range(32, 64))
SMALL = 64       # the smallest chunk size: many chunks in few bytes
T = stream.TAG_SIZE


def seal(data, chunk_size=SMALL, dek=DEK, dek_id=DEK_ID):
    return stream.encrypt_bytes(dek_id, dek, data, chunk_size)


def chunks(sealed):
    """Split ``sealed`` into (header bytes, [chunk bytes])."""
    header = stream.parse_header(sealed)
    body = sealed[header.size:]
    size = header.chunk_size + T
    return header.raw, [body[i:i + size] for i in range(0, len(body), size)]


class _NoReadinto:
    """A file object with read() only (like some socket wrappers)."""

    def __init__(self, data, piece=7):
        self._f = io.BytesIO(data)
        self._piece = piece

    def read(self, n=-1):
        return self._f.read(min(n, self._piece))


class _Trickle(io.RawIOBase):
    """A raw stream returning at most 5 bytes per read (like a pipe)."""

    def __init__(self, data):
        self._f = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buf):
        data = self._f.read(min(len(buf), 5))
        buf[:len(data)] = data
        return len(data)


class _ShortWriter(io.RawIOBase):
    """A raw stream accepting at most 3 bytes per write."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data[:3])
        self.data += data
        return len(data)


class HeaderTests(unittest.TestCase):

    def test_build_header_w_dek_id(self):
        header = stream.build_header(DEK_ID, _salt=b's' * 16)
        self.assertEqual(header.raw, b'zks\x01\x01\x10\x01' + b's' * 16
                         + DEK_ID)
        self.assertEqual(header.size, 39)
        self.assertEqual(header.chunk_size, 65536)
        self.assertEqual(header.dek_id, DEK_ID)
        self.assertIsNone(header.wrapped)
        self.assertEqual(stream.parse_header(header.raw + b'rest').raw,
                         header.raw)
        self.assertIn(DEK_ID.hex(), repr(header))

    def test_build_header_w_wrapped(self):
        kek = AESKeyEncryptingKey(bytes(32))
        blob = wrapped.wrap(kek, DEK_ID, DEK)
        header = stream.build_header(wrapped=blob, chunk_size=1 << 20)
        self.assertEqual(header.raw[:7], b'zks\x01\x01\x14\x02')
        self.assertEqual(header.raw[23:25], len(blob).to_bytes(2, 'big'))
        self.assertEqual(header.dek_id, DEK_ID)
        parsed = stream.parse_header(header.raw)
        self.assertEqual(parsed.wrapped, blob)
        self.assertEqual(parsed.dek_id, DEK_ID)
        self.assertIn('embedded', repr(parsed))

    def test_build_header_w_bad_arguments(self):
        for kw in ({}, {'dek_id': DEK_ID, 'wrapped': b'zkw'},
                   {'dek_id': b'short'},
                   {'dek_id': DEK_ID, 'chunk_size': 1000},
                   {'dek_id': DEK_ID, 'chunk_size': 32},
                   {'dek_id': DEK_ID, 'chunk_size': 1 << 25},
                   {'dek_id': DEK_ID, '_salt': b'x' * 15},
                   {'wrapped': b''}):
            self.assertRaises(ValueError, stream.build_header, **kw)

    def test_two_headers_have_different_salts(self):
        self.assertNotEqual(stream.build_header(DEK_ID).salt,
                            stream.build_header(DEK_ID).salt)

    def test_read_header_w_bad_magic(self):
        for data in (b'', b'PK\x03\x04' * 20, b'.km\x01' + bytes(60),
                     b'zkw\x01' + bytes(60)):
            if not data:
                continue
            with self.assertRaisesRegex(exceptions.UnsupportedFormatError,
                                        'bad magic'):
                stream.parse_header(data)

    def test_read_header_w_truncated_header(self):
        raw = stream.build_header(DEK_ID).raw
        for cut in range(len(raw)):
            with self.assertRaises(exceptions.TruncatedDataError):
                stream.parse_header(raw[:cut])

    def test_read_header_w_truncated_wrapped(self):
        blob = wrapped.wrap(AESKeyEncryptingKey(bytes(32)), DEK_ID, DEK)
        raw = stream.build_header(wrapped=blob).raw
        for cut in range(len(raw)):
            with self.assertRaises(exceptions.TruncatedDataError):
                stream.parse_header(raw[:cut])

    def test_read_header_w_newer_version(self):
        raw = bytearray(stream.build_header(DEK_ID).raw)
        raw[3] = 2
        with self.assertRaisesRegex(exceptions.UnsupportedFormatError,
                                    'unsupported stream version 2'):
            stream.parse_header(bytes(raw))
        # the version is checked before anything else is required
        with self.assertRaisesRegex(exceptions.UnsupportedFormatError,
                                    'version 2'):
            stream.parse_header(bytes(raw[:4]))

    def test_read_header_w_bad_fields(self):
        raw = stream.build_header(DEK_ID).raw
        for offset, value, message in ((4, 2, 'suite 2'),
                                       (5, 5, 'chunk size 2\\*\\*5'),
                                       (5, 25, 'chunk size 2\\*\\*25'),
                                       (6, 3, 'key kind 3')):
            bad = bytearray(raw)
            bad[offset] = value
            with self.assertRaisesRegex(exceptions.UnsupportedFormatError,
                                        message):
                stream.parse_header(bytes(bad))

    def test_read_header_w_empty_wrapped(self):
        raw = stream.build_header(DEK_ID).raw[:6] + b'\x02' + bytes(16)
        with self.assertRaisesRegex(exceptions.UnsupportedFormatError,
                                    'empty wrapped DEK'):
            stream.parse_header(raw + b'\x00\x00')

    def test_read_header_w_bad_embedded_wrapped(self):
        raw = stream.build_header(DEK_ID).raw[:6] + b'\x02' + bytes(16)
        with self.assertRaisesRegex(exceptions.UnsupportedFormatError,
                                    'wrapped DEK'):
            stream.parse_header(raw + b'\x00\x20' + b'x' * 32)

    def test_read_header_reads_only_the_header(self):
        sealed = seal(b'data')
        f = io.BytesIO(sealed)
        header = stream.read_header(f)
        self.assertEqual(f.tell(), header.size)

    def test_payload_key_w_bad_dek(self):
        header = stream.build_header(DEK_ID)
        self.assertRaises(exceptions.InvalidKeyError, stream.payload_key,
                          header, b'short')


class RoundTripTests(unittest.TestCase):

    def test_sizes_around_chunk_boundaries(self):
        for size in (0, 1, SMALL - 1, SMALL, SMALL + 1, 2 * SMALL - 1,
                     2 * SMALL, 2 * SMALL + 1, 10 * SMALL, 1000):
            data = os.urandom(size)
            sealed = seal(data)
            nchunks = max(1, -(-size // SMALL))
            self.assertEqual(len(sealed), 39 + size + T * nchunks, size)
            self.assertEqual(stream.decrypt_bytes(DEK_ID, DEK, sealed),
                             data)

    def test_reused_buffers_hold_no_plaintext(self):
        # encrypt and decrypt keep their buffers for the next call of the
        # thread, with the plaintext they held overwritten
        marker = b'plaintext marker ' * 5000
        sealed = stream.encrypt_bytes(DEK_ID, DEK, marker)
        self.assertEqual(stream.decrypt_bytes(DEK_ID, DEK, sealed), marker)
        with self.assertRaises(exceptions.AuthenticationError):
            stream.decrypt_bytes(DEK_ID, DEK,
                                 sealed[:-1] + bytes([sealed[-1] ^ 1]))
        pool = stream._pool.buffers
        self.assertTrue(pool)
        for buf in pool:
            self.assertEqual(buf.find(b'plaintext marker'), -1)
        # and they are reused: no new buffer for the same sizes
        before = [id(b) for b in pool]
        stream.decrypt_bytes(DEK_ID, DEK, sealed)
        self.assertEqual(sorted(id(b) for b in stream._pool.buffers),
                         sorted(before))

    def test_empty_file_has_one_empty_final_chunk(self):
        sealed = seal(b'')
        header, parts = chunks(sealed)
        self.assertEqual([len(p) for p in parts], [T])

    def test_exactly_one_chunk(self):
        data = os.urandom(stream.DEFAULT_CHUNK_SIZE)
        sealed = stream.encrypt_bytes(DEK_ID, DEK, data)
        self.assertEqual(len(sealed), 39 + len(data) + T)
        self.assertEqual(stream.decrypt_bytes(DEK_ID, DEK, sealed), data)

    def test_default_chunk_size_around_boundaries(self):
        cs = stream.DEFAULT_CHUNK_SIZE
        for size in (cs - 1, cs + 1, 2 * cs, 3 * cs - 1):
            data = os.urandom(size)
            sealed = stream.encrypt_bytes(DEK_ID, DEK, data)
            self.assertEqual(stream.decrypt_bytes(DEK_ID, DEK, sealed),
                             data)

    def test_encrypt_returns_plaintext_size(self):
        out = io.BytesIO()
        n = stream.encrypt(io.BytesIO(b'x' * 300), out, DEK,
                           stream.build_header(DEK_ID, chunk_size=SMALL))
        self.assertEqual(n, 300)
        src = io.BytesIO(out.getvalue())
        header = stream.read_header(src)
        self.assertEqual(stream.decrypt(src, io.BytesIO(), DEK, header),
                         300)

    def test_two_encryptions_differ(self):
        self.assertNotEqual(seal(b'same'), seal(b'same'))

    def test_plaintext_not_in_ciphertext(self):
        data = b'Stephan Richter' * 100
        self.assertNotIn(b'Stephan', seal(data))

    def test_short_reads_and_writes(self):
        data = os.urandom(1000)
        out = _ShortWriter()
        stream.encrypt(_Trickle(data), out, DEK,
                       stream.build_header(DEK_ID, chunk_size=SMALL))
        src = _NoReadinto(bytes(out.data))
        header = stream.read_header(src)
        plain = _ShortWriter()
        stream.decrypt(src, plain, DEK, header)
        self.assertEqual(bytes(plain.data), data)

    def test_through_a_pipe(self):
        data = os.urandom(300000)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        result = []

        def produce():
            with open(w1, 'wb') as f:
                f.write(data)

        def encrypt():
            with open(r1, 'rb') as src, open(w2, 'wb') as dst:
                stream.encrypt(src, dst, DEK, stream.build_header(DEK_ID))

        def decrypt():
            with open(r2, 'rb') as src:
                out = io.BytesIO()
                header = stream.read_header(src)
                stream.decrypt(src, out, DEK, header)
                result.append(out.getvalue())
        threads = [threading.Thread(target=f)
                   for f in (produce, encrypt, decrypt)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(result, [data])


class DecryptRangeTests(unittest.TestCase):

    def _range(self, sealed, offset, length=None):
        src = io.BytesIO(sealed)
        header = stream.read_header(src)
        out = io.BytesIO()
        n = stream.decrypt_range(src, out, DEK, header, offset, length)
        self.assertEqual(n, len(out.getvalue()))
        return out.getvalue()

    def test_ranges(self):
        for size in (0, 1, SMALL, SMALL + 1, 5 * SMALL, 5 * SMALL + 7):
            data = os.urandom(size)
            sealed = seal(data)
            for offset in (0, 1, SMALL - 1, SMALL, SMALL + 3, size - 1,
                           size, size + 10):
                offset = max(offset, 0)
                for length in (None, 0, 1, SMALL, 3 * SMALL + 5):
                    end = None if length is None else offset + length
                    self.assertEqual(self._range(sealed, offset, length),
                                     data[offset:end], (size, offset))

    def test_range_reads_only_needed_chunks(self):
        data = os.urandom(10 * SMALL)
        sealed = bytearray(seal(data))
        sealed[39 + 2] ^= 1        # chunk 0 altered
        self.assertEqual(self._range(bytes(sealed), 5 * SMALL, 10),
                         data[5 * SMALL:5 * SMALL + 10])
        with self.assertRaises(exceptions.AuthenticationError):
            self._range(bytes(sealed), 0, 10)

    def test_range_w_truncated_stream(self):
        sealed = seal(os.urandom(3 * SMALL))
        header, parts = chunks(sealed)
        with self.assertRaises(exceptions.TruncatedDataError):
            self._range(header + parts[0] + parts[1], 2 * SMALL - 1)
        with self.assertRaises(exceptions.TruncatedDataError):
            self._range(header + parts[0] + parts[1][:5], SMALL)
        with self.assertRaises(exceptions.TruncatedDataError):
            self._range(header + b'x', 0)

    def test_range_w_bad_arguments(self):
        self.assertRaises(ValueError, self._range, seal(b'x'), -1)
        self.assertRaises(ValueError, self._range, seal(b'x'), 0, -1)


class _Recorder(io.BytesIO):
    """Records every write, to check what reaches the output."""


class BadInputTests(unittest.TestCase):

    data = bytes(range(256)) * 2          # 8 chunks of 64 bytes

    def _decrypt(self, sealed, dek=DEK):
        self.written = b''
        out = io.BytesIO()
        src = io.BytesIO(sealed)
        header = stream.read_header(src)
        try:
            stream.decrypt(src, out, dek, header)
        finally:
            self.written = out.getvalue()
        return self.written

    def assertOnlyAuthenticatedWritten(self, good_chunks):
        self.assertEqual(self.written, self.data[:good_chunks * SMALL])

    def test_truncation_at_every_byte(self):
        sealed = seal(self.data)
        for cut in range(len(sealed)):
            with self.assertRaises(exceptions.DecryptionError) as cm:
                self._decrypt(sealed[:cut]) if cut >= 39 else \
                    stream.parse_header(sealed[:cut])
            self.assertIsInstance(
                cm.exception, (exceptions.TruncatedDataError,
                               exceptions.AuthenticationError), cut)
            if cut >= 39:
                # the chunks written are whole, authenticated ones
                self.assertEqual(len(self.written) % SMALL, 0)
                self.assertEqual(self.written,
                                 self.data[:len(self.written)])

    def test_truncation_at_chunk_boundary(self):
        sealed = seal(self.data)
        header, parts = chunks(sealed)
        for k in range(0, 8):
            with self.assertRaisesRegex(
                    exceptions.TruncatedDataError,
                    'truncated' if k else 'after its header'):
                self._decrypt(header + b''.join(parts[:k]))
            self.assertOnlyAuthenticatedWritten(max(k - 1, 0))

    def test_truncation_inside_tag(self):
        sealed = seal(self.data)
        header, parts = chunks(sealed)
        with self.assertRaisesRegex(exceptions.TruncatedDataError,
                                    'inside the tag of chunk 3'):
            self._decrypt(header + b''.join(parts[:3]) + parts[3][:15])

    def test_dropped_chunk(self):
        header, parts = chunks(seal(self.data))
        del parts[2]
        with self.assertRaisesRegex(exceptions.AuthenticationError,
                                    'at chunk 2'):
            self._decrypt(header + b''.join(parts))
        self.assertOnlyAuthenticatedWritten(2)

    def test_dropped_last_chunk(self):
        header, parts = chunks(seal(self.data + b'tail'))
        with self.assertRaisesRegex(exceptions.TruncatedDataError,
                                    'without its final chunk'):
            self._decrypt(header + b''.join(parts[:-1]))
        self.assertOnlyAuthenticatedWritten(7)

    def test_duplicated_chunk(self):
        header, parts = chunks(seal(self.data))
        parts.insert(3, parts[3])
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(header + b''.join(parts))
        self.assertOnlyAuthenticatedWritten(4)

    def test_reordered_chunks(self):
        header, parts = chunks(seal(self.data))
        parts[4], parts[5] = parts[5], parts[4]
        with self.assertRaisesRegex(exceptions.AuthenticationError,
                                    'at chunk 4'):
            self._decrypt(header + b''.join(parts))
        self.assertOnlyAuthenticatedWritten(4)

    def test_chunk_from_another_stream(self):
        h1, p1 = chunks(seal(self.data))
        h2, p2 = chunks(seal(self.data))
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(h1 + p1[0] + p2[1] + b''.join(p1[2:]))
        self.assertOnlyAuthenticatedWritten(1)

    def test_trailing_data_after_full_final_chunk(self):
        sealed = seal(self.data)
        for extra in (b'x', bytes(T), os.urandom(SMALL + T),
                      chunks(sealed)[1][-1]):
            with self.assertRaisesRegex(exceptions.AuthenticationError,
                                        'data after its final chunk 7'):
                self._decrypt(sealed + extra)
            self.assertOnlyAuthenticatedWritten(7)

    def test_trailing_data_after_short_final_chunk(self):
        sealed = seal(self.data + b'tail')
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(sealed + b'x')
        self.assertOnlyAuthenticatedWritten(8)

    def test_trailing_data_after_empty_stream(self):
        sealed = seal(b'')
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(sealed + b'x')
        self.assertEqual(self.written, b'')

    def test_empty_final_chunk_after_full_ones(self):
        # a writer that does not read ahead would produce this
        header = stream.build_header(DEK_ID, chunk_size=SMALL)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        aead = AESGCM(stream.payload_key(header, DEK))
        sealed = (header.raw + aead.encrypt(stream._nonce(0, False),
                                            bytes(SMALL), None)
                  + aead.encrypt(stream._nonce(1, True), b'', None))
        with self.assertRaisesRegex(exceptions.AuthenticationError,
                                    'empty chunk 1'):
            self._decrypt(sealed)

    def test_every_flipped_bit(self):
        data = b'0123456789' * 13        # 3 chunks, the last short
        sealed = seal(data)
        for i in range(len(sealed) * 8):
            bad = bytearray(sealed)
            bad[i // 8] ^= 1 << (i % 8)
            with self.assertRaises(exceptions.DecryptionError):
                self._decrypt(bytes(bad))
            self.assertEqual(len(self.written) % SMALL, 0)
            self.assertEqual(self.written, data[:len(self.written)])

    def test_wrong_key(self):
        sealed = seal(self.data)
        with self.assertRaisesRegex(exceptions.AuthenticationError,
                                    'first chunk'):
            self._decrypt(sealed, dek=bytes(32))
        self.assertEqual(self.written, b'')

    def test_wrong_dek_id(self):
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            stream.decrypt_bytes(bytes(16), DEK, seal(b'x'))
        self.assertEqual(cm.exception.key_id, DEK_ID.hex())

    def test_altered_header(self):
        sealed = bytearray(seal(self.data))
        sealed[10] ^= 1          # the salt
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(bytes(sealed))
        self.assertEqual(self.written, b'')

    def test_changed_chunk_size(self):
        sealed = bytearray(seal(self.data))
        sealed[5] = 7
        with self.assertRaises(exceptions.AuthenticationError):
            self._decrypt(bytes(sealed))
        self.assertEqual(self.written, b'')


class VectorTests(unittest.TestCase):
    """The JSON test vectors of tests/vectors/stream.json."""

    def _vectors(self):
        with open(VECTORS) as f:
            return json.load(f)

    def test_valid_vectors(self):
        doc = self._vectors()
        valid = [v for v in doc['vectors'] if 'plaintext' in v]
        self.assertGreaterEqual(len(valid), 5)
        for v in valid:
            dek = bytes.fromhex(v['dek'])
            dek_id = bytes.fromhex(v['dek_id'])
            plaintext = bytes.fromhex(v['plaintext'])
            sealed = bytes.fromhex(v['stream'])
            salt = bytes.fromhex(v['salt'])
            if 'wrapped' in v:
                blob = bytes.fromhex(v['wrapped'])
                header = stream.build_header(wrapped=blob, _salt=salt,
                                             chunk_size=v['chunk_size'])
                out = io.BytesIO()
                stream.encrypt(io.BytesIO(plaintext), out, dek, header)
                self.assertEqual(out.getvalue(), sealed, v['name'])
                kek = AESKeyEncryptingKey(bytes.fromhex(v['kek']))
                self.assertEqual(wrapped.unwrap(kek, blob), (dek_id, dek))
            else:
                self.assertEqual(
                    stream.encrypt_bytes(dek_id, dek, plaintext,
                                         v['chunk_size'], _salt=salt),
                    sealed, v['name'])
            self.assertEqual(stream.decrypt_bytes(dek_id, dek, sealed),
                             plaintext, v['name'])

    def test_invalid_vectors(self):
        doc = self._vectors()
        invalid = [v for v in doc['vectors'] if 'error' in v]
        self.assertGreaterEqual(len(invalid), 8)
        for v in invalid:
            error = getattr(exceptions, v['error'])
            with self.assertRaises(error, msg=v['name']) as cm:
                stream.decrypt_bytes(bytes.fromhex(v['dek_id']),
                                     bytes.fromhex(v['dek']),
                                     bytes.fromhex(v['stream']))
            self.assertIs(type(cm.exception), error, v['name'])


class InPlaceTests(unittest.TestCase):
    """encrypt_in_place writes, over the file, what encrypt writes."""

    def setUp(self):
        import tempfile
        fd, self.name = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.remove, self.name)

    def _in_place(self, data, header, aad=b''):
        with open(self.name, 'wb') as f:
            f.write(data)
        fd = os.open(self.name, os.O_RDWR)
        try:
            self.assertEqual(stream.encrypt_in_place(fd, DEK, header, aad),
                             len(data))
        finally:
            os.close(fd)
        with open(self.name, 'rb') as f:
            return f.read()

    def test_same_bytes_as_encrypt(self):
        for cs in (SMALL, stream.DEFAULT_CHUNK_SIZE):
            per = stream._per_batch(cs)
            for size in (0, 1, cs - 1, cs, cs + 1, per * cs - 1, per * cs,
                         per * cs + 1, 3 * per * cs + 7, 1 << 20):
                data = os.urandom(size)
                header = stream.build_header(DEK_ID, chunk_size=cs)
                out = io.BytesIO()
                stream.encrypt(io.BytesIO(data), out, DEK, header, b'aad')
                self.assertEqual(self._in_place(data, header, b'aad'),
                                 out.getvalue(), (cs, size))
                self.assertEqual(stream.decrypt_bytes(
                    DEK_ID, DEK, self._in_place(data, header)), data)

    def test_vectors(self):
        with open(VECTORS) as f:
            doc = json.load(f)
        valid = [v for v in doc['vectors']
                 if 'plaintext' in v and 'wrapped' not in v]
        self.assertGreaterEqual(len(valid), 3)
        for v in valid:
            header = stream.build_header(
                bytes.fromhex(v['dek_id']), chunk_size=v['chunk_size'],
                _salt=bytes.fromhex(v['salt']))
            with open(self.name, 'wb') as f:
                f.write(bytes.fromhex(v['plaintext']))
            fd = os.open(self.name, os.O_RDWR)
            try:
                stream.encrypt_in_place(fd, bytes.fromhex(v['dek']), header)
            finally:
                os.close(fd)
            with open(self.name, 'rb') as f:
                self.assertEqual(f.read().hex(), v['stream'], v['name'])

    def test_buffers_hold_no_plaintext_after(self):
        marker = b'plaintext marker ' * 5000
        self._in_place(marker, stream.build_header(DEK_ID))
        for buf in stream._pool.buffers:
            self.assertEqual(buf.find(b'plaintext marker'), -1)

    def test_file_shrinking_meanwhile_is_an_error(self):
        import unittest.mock
        with open(self.name, 'wb') as f:
            f.write(os.urandom(5000))
        fd = os.open(self.name, os.O_RDWR)
        self.addCleanup(os.close, fd)
        with unittest.mock.patch('os.preadv', return_value=0):
            with self.assertRaisesRegex(OSError, 'shrank'):
                stream.encrypt_in_place(fd, DEK, stream.build_header(DEK_ID))


class _SmallBatches:
    """Run a test class with batches of ``batch`` bytes, so that small
    inputs cross many batch boundaries."""

    batch = 256

    def setUp(self):
        super().setUp()
        old = stream.BATCH_SIZE
        stream.BATCH_SIZE = self.batch
        self.addCleanup(setattr, stream, 'BATCH_SIZE', old)


class _FailingWriter(io.RawIOBase):
    """Accepts ``limit`` bytes, then raises OSError (a full disk)."""

    def __init__(self, limit):
        self.limit = limit
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        if len(self.data) + len(b) > self.limit:
            raise OSError(28, 'No space left on device')
        self.data += b
        return len(b)


class _Overlapped(_SmallBatches):
    """Writes overlapped from the third batch on, whatever the
    destination."""

    def setUp(self):
        super().setUp()
        self.addCleanup(setattr, stream, 'OVERLAP_WRITES',
                        stream.OVERLAP_WRITES)
        self.addCleanup(setattr, stream, 'OVERLAP_AFTER',
                        stream.OVERLAP_AFTER)
        stream.OVERLAP_WRITES = True
        stream.OVERLAP_AFTER = 2 * self.batch


class OverlappedWriteTests(_Overlapped, unittest.TestCase):
    """A stream longer than ``OVERLAP_AFTER`` is written by a thread of its
    own from then on, while the next batch is read and sealed or opened
    (forced here: the destinations are in memory)."""

    def test_overlap_decided_by_the_destination(self):
        import tempfile
        stream.OVERLAP_WRITES = None
        self.assertFalse(stream._overlaps(io.BytesIO()))
        with open(os.devnull, 'wb') as f:
            self.assertFalse(stream._overlaps(f))
        with tempfile.TemporaryFile() as f:
            self.assertTrue(stream._overlaps(f))
        r, w = os.pipe()
        with os.fdopen(r, 'rb'), os.fdopen(w, 'wb') as fw:
            self.assertTrue(stream._overlaps(fw))

    def test_only_streams_longer_than_overlap_after_use_the_thread(self):
        class Threads(io.BytesIO):
            def write(self, b):
                self.names = getattr(self, 'names', set())
                self.names.add(threading.current_thread().name)
                return super().write(b)
        both = {'MainThread', 'zodbkmi stream writer'}
        for size, expected in ((100, {'MainThread'}),
                               (self.batch * 3, {'MainThread'}),
                               (self.batch * 3 + 1, both),
                               (self.batch * 5, both)):
            data = os.urandom(size)
            out = Threads()
            stream.encrypt(io.BytesIO(data), out, DEK,
                           stream.build_header(DEK_ID, chunk_size=SMALL))
            self.assertEqual(out.names, expected)   # the header: main
            src = io.BytesIO(out.getvalue())
            header = stream.read_header(src)
            plain = Threads()
            stream.decrypt(src, plain, DEK, header)
            self.assertEqual(plain.getvalue(), data)
            self.assertEqual(plain.names, expected)

    def test_roundtrip_many_batches(self):
        for size in (self.batch * 3, self.batch * 40 + 17):
            data = os.urandom(size)
            sealed = seal(data)
            self.assertEqual(stream.decrypt_bytes(DEK_ID, DEK, sealed),
                             data)
        # the writer threads are gone
        self.assertFalse([t for t in threading.enumerate()
                          if t.name == 'zodbkmi stream writer'])

    def test_write_error_is_raised_and_stops_the_stream(self):
        data = os.urandom(self.batch * 40)
        sealed = seal(data)
        header = stream.parse_header(sealed)
        for limit in (0, self.batch, self.batch * 7 + 5):
            out = _FailingWriter(limit)
            src = io.BytesIO(sealed)
            stream.read_header(src)
            with self.assertRaises(OSError) as cm:
                stream.decrypt(src, out, DEK, header)
            self.assertEqual(cm.exception.errno, 28)
            self.assertTrue(data.startswith(bytes(out.data)))
            out = _FailingWriter(limit)
            with self.assertRaises(OSError):
                stream.encrypt(io.BytesIO(data), out, DEK,
                               stream.build_header(DEK_ID, chunk_size=SMALL))
            self.assertTrue(len(out.data) <= limit)
        self.assertFalse([t for t in threading.enumerate()
                          if t.name == 'zodbkmi stream writer'])

    def test_failure_late_in_the_stream_keeps_what_authenticated(self):
        data = os.urandom(self.batch * 20)
        sealed = bytearray(seal(data))
        sealed[-200] ^= 1
        out = io.BytesIO()
        src = io.BytesIO(bytes(sealed))
        header = stream.read_header(src)
        with self.assertRaises(exceptions.AuthenticationError):
            stream.decrypt(src, out, DEK, header)
        written = out.getvalue()
        self.assertTrue(written)
        self.assertTrue(data.startswith(written))
        self.assertEqual(len(written) % SMALL, 0)   # whole chunks only


class BadInputSmallBatchTests(_Overlapped, BadInputTests):
    """Four chunks per batch, written by a thread of their own from the
    third batch on."""


class BadInputChunkBatchTests(_SmallBatches, BadInputTests):
    """One chunk per batch."""

    batch = SMALL


class RoundTripSmallBatchTests(_SmallBatches, RoundTripTests):
    """Four chunks per batch."""


class BatchBoundaryTests(unittest.TestCase):

    def test_sizes_around_batch_boundaries(self):
        b = stream.BATCH_SIZE
        for size in (b - 1, b, b + 1, 2 * b, 2 * b + 65537):
            data = os.urandom(size)
            sealed = stream.encrypt_bytes(DEK_ID, DEK, data)
            self.assertEqual(stream.decrypt_bytes(DEK_ID, DEK, sealed),
                             data, size)

    def test_truncation_at_batch_boundary(self):
        data = os.urandom(2 * stream.BATCH_SIZE)
        sealed = stream.encrypt_bytes(DEK_ID, DEK, data)
        cut = 39 + (stream.BATCH_SIZE // 65536) * (65536 + T)
        out = io.BytesIO()
        src = io.BytesIO(sealed[:cut])
        header = stream.read_header(src)
        with self.assertRaisesRegex(exceptions.TruncatedDataError,
                                    'without its final chunk'):
            stream.decrypt(src, out, DEK, header)
        self.assertEqual(out.getvalue(), data[:stream.BATCH_SIZE - 65536])


class AssociatedDataTests(unittest.TestCase):

    def _seal(self, data, aad):
        out = io.BytesIO()
        stream.encrypt(io.BytesIO(data), out, bytes(32),
                       stream.build_header(bytes(16), chunk_size=64), aad)
        return out.getvalue()

    def _open(self, sealed, aad):
        src = io.BytesIO(sealed)
        header = stream.read_header(src)
        out = io.BytesIO()
        stream.decrypt(src, out, bytes(32), header, aad)
        return out.getvalue()

    def test_roundtrip_w_aad(self):
        oid = b'\0' * 7 + b'\x07'
        self.assertEqual(self._open(self._seal(b'x' * 200, oid), oid),
                         b'x' * 200)

    def test_decrypt_w_other_aad(self):
        sealed = self._seal(b'x' * 200, b'\0' * 7 + b'\x07')
        for other in (b'', b'\0' * 7 + b'\x08'):
            with self.assertRaises(exceptions.AuthenticationError):
                self._open(sealed, other)

    def test_unbound_stream_refused_where_aad_expected(self):
        sealed = self._seal(b'x' * 10, b'')
        with self.assertRaises(exceptions.AuthenticationError):
            self._open(sealed, b'\0' * 8)

    def test_empty_aad_is_the_unbound_derivation(self):
        header = stream.build_header(bytes(16), chunk_size=64)
        self.assertEqual(stream.payload_key(header, bytes(32)),
                         stream.payload_key(header, bytes(32), b''))
        self.assertNotEqual(stream.payload_key(header, bytes(32)),
                            stream.payload_key(header, bytes(32), b'\0'))
