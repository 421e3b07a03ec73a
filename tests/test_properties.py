"""Property-based tests (hypothesis) of every parser in zodbkmi.format.

For any input, a parser either returns what was sealed or raises one of its
documented exceptions; it never returns other bytes and never raises
anything else.
"""
import base64
import os
import unittest

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from zodbkmi import exceptions
from zodbkmi.format import envelope
from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DEK_ID = bytes(range(16))
DEK = bytes(range(32, 64))
SEALER = envelope.Sealer(DEK_ID, DEK)
PARSE_ERRORS = (exceptions.UnsupportedFormatError,
                exceptions.TruncatedDataError)
OPEN_ERRORS = PARSE_ERRORS + (exceptions.AuthenticationError,)
oids = st.binary(min_size=8, max_size=8)


def open_any(data, oid=None):
    """Open ``data`` the way the facility does; return the plaintext."""
    context = envelope.CONTEXT_DATA if oid is None else \
        envelope.CONTEXT_RECORD
    raw_id = envelope.read_dek_id(data, context)
    if raw_id != DEK_ID:
        raise exceptions.UnknownKeyError('other DEK', raw_id.hex())
    return SEALER.open(data, context, oid)


class EnvelopeProperties(unittest.TestCase):

    @SETTINGS
    @given(st.binary(max_size=2000), st.one_of(st.none(), oids))
    def test_roundtrip(self, plaintext, oid):
        context = envelope.CONTEXT_DATA if oid is None else \
            envelope.CONTEXT_RECORD
        sealed = SEALER.seal(plaintext, context, oid)
        self.assertEqual(len(sealed), len(plaintext) + envelope.OVERHEAD)
        self.assertEqual(open_any(sealed, oid), plaintext)

    @SETTINGS
    @given(st.binary(max_size=300), st.one_of(st.none(), oids),
           st.data())
    def test_any_bit_flip_is_rejected(self, plaintext, oid, data):
        context = envelope.CONTEXT_DATA if oid is None else \
            envelope.CONTEXT_RECORD
        sealed = bytearray(SEALER.seal(plaintext, context, oid))
        bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
        sealed[bit // 8] ^= 1 << (bit % 8)
        with self.assertRaises(OPEN_ERRORS + (exceptions.UnknownKeyError,)):
            open_any(bytes(sealed), oid)

    @SETTINGS
    @given(st.binary(max_size=300), st.one_of(st.none(), oids),
           st.data())
    def test_any_truncation_is_rejected(self, plaintext, oid, data):
        context = envelope.CONTEXT_DATA if oid is None else \
            envelope.CONTEXT_RECORD
        sealed = SEALER.seal(plaintext, context, oid)
        cut = data.draw(st.integers(0, len(sealed) - 1))
        with self.assertRaises(OPEN_ERRORS):
            open_any(sealed[:cut], oid)

    @SETTINGS
    @given(st.binary(max_size=200), oids, oids)
    def test_record_moved_to_another_oid_is_rejected(self, plaintext, a, b):
        if a == b:
            return
        sealed = SEALER.seal(plaintext, envelope.CONTEXT_RECORD, a)
        with self.assertRaises(exceptions.AuthenticationError):
            open_any(sealed, b)

    @SETTINGS
    @given(st.binary(max_size=400), st.one_of(st.none(), oids))
    def test_arbitrary_bytes(self, data, oid):
        try:
            open_any(data, oid)
        except OPEN_ERRORS + (exceptions.UnknownKeyError,):
            pass
        else:   # pragma: no cover
            self.fail('arbitrary bytes were accepted')

    @SETTINGS
    @given(st.binary(max_size=100))
    def test_arbitrary_bytes_after_valid_prefix(self, tail):
        data = envelope.MAGIC + bytes([1, 1, 0]) + DEK_ID + tail
        with self.assertRaises(OPEN_ERRORS):
            open_any(data)


class WrappedProperties(unittest.TestCase):

    kek = AESKeyEncryptingKey(bytes(32))

    @SETTINGS
    @given(st.binary(min_size=16, max_size=16),
           st.binary(min_size=32, max_size=32))
    def test_roundtrip(self, dek_id, dek):
        blob = wrapped.wrap(self.kek, dek_id, dek)
        self.assertEqual(wrapped.unwrap(self.kek, blob), (dek_id, dek))

    @SETTINGS
    @given(st.data())
    def test_any_bit_flip_is_rejected(self, data):
        blob = bytearray(wrapped.wrap(self.kek, DEK_ID, DEK))
        bit = data.draw(st.integers(0, len(blob) * 8 - 1))
        blob[bit // 8] ^= 1 << (bit % 8)
        with self.assertRaises(PARSE_ERRORS + (
                exceptions.AuthenticationError,)):
            wrapped.unwrap(self.kek, bytes(blob))

    @SETTINGS
    @given(st.binary(max_size=300))
    def test_parse_arbitrary_bytes(self, data):
        try:
            parsed = wrapped.parse(data)
        except PARSE_ERRORS:
            return
        self.assertEqual(parsed.header + parsed.blob, data)
        with self.assertRaises(PARSE_ERRORS + (
                exceptions.AuthenticationError,)):
            wrapped.unwrap(self.kek, data)


class KeyStoreEntryProperties(unittest.TestCase):

    @SETTINGS
    @given(st.binary(max_size=500))
    def test_arbitrary_entry_bytes(self, data):
        from zodbkmi.keystore import KeyStoreEntry
        try:
            KeyStoreEntry.from_json(data)
        except exceptions.KeyStoreError:
            pass

    @SETTINGS
    @given(st.dictionaries(
        st.sampled_from(['format', 'version', 'dek_id', 'kek_id', 'state',
                         'created', 'wrapped']),
        st.one_of(st.none(), st.integers(), st.text(max_size=40),
                  st.just('zodbkmi-vault-entry'), st.just(1),
                  st.just(base64.b64encode(os.urandom(60)).decode()))))
    def test_arbitrary_entry_documents(self, doc):
        import json
        from zodbkmi.keystore import KeyStoreEntry
        try:
            KeyStoreEntry.from_json(json.dumps(doc).encode())
        except exceptions.KeyStoreError:
            pass


class StreamProperties(unittest.TestCase):
    """zodbkmi.format.stream, with 64 byte chunks so that small inputs
    have many chunks."""

    CS = 64

    def _seal(self, plaintext):
        from zodbkmi.format import stream
        return stream.encrypt_bytes(DEK_ID, DEK, plaintext, self.CS)

    def _open(self, data):
        from zodbkmi.format import stream
        return stream.decrypt_bytes(DEK_ID, DEK, data)

    @SETTINGS
    @given(st.binary(max_size=700))
    def test_roundtrip(self, plaintext):
        sealed = self._seal(plaintext)
        chunks = max(1, -(-len(plaintext) // self.CS))
        self.assertEqual(len(sealed), 39 + len(plaintext) + 16 * chunks)
        self.assertEqual(self._open(sealed), plaintext)

    @SETTINGS
    @given(st.binary(max_size=300), st.data())
    def test_any_bit_flip_is_rejected(self, plaintext, data):
        sealed = bytearray(self._seal(plaintext))
        bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
        sealed[bit // 8] ^= 1 << (bit % 8)
        with self.assertRaises(OPEN_ERRORS + (exceptions.UnknownKeyError,)):
            self._open(bytes(sealed))

    @SETTINGS
    @given(st.binary(max_size=300), st.data())
    def test_any_truncation_is_rejected(self, plaintext, data):
        sealed = self._seal(plaintext)
        cut = data.draw(st.integers(0, len(sealed) - 1))
        with self.assertRaises(OPEN_ERRORS):
            self._open(sealed[:cut])

    @SETTINGS
    @given(st.binary(max_size=300), st.binary(min_size=1, max_size=100))
    def test_any_appended_bytes_are_rejected(self, plaintext, tail):
        with self.assertRaises(exceptions.AuthenticationError):
            self._open(self._seal(plaintext) + tail)

    @SETTINGS
    @given(st.binary(min_size=129, max_size=400), st.data())
    def test_any_chunk_permutation_is_rejected(self, plaintext, data):
        sealed = self._seal(plaintext)
        body = sealed[39:]
        size = self.CS + 16
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        order = data.draw(st.permutations(range(len(chunks))))
        if list(order) == sorted(order):
            return
        with self.assertRaises(OPEN_ERRORS):
            self._open(sealed[:39] + b''.join(chunks[i] for i in order))

    @SETTINGS
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes(self, data):
        try:
            self._open(data)
        except OPEN_ERRORS + (exceptions.UnknownKeyError,):
            pass
        else:   # pragma: no cover
            self.fail('arbitrary bytes were accepted')

    @SETTINGS
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_after_valid_header(self, tail):
        from zodbkmi.format import stream
        header = stream.build_header(DEK_ID, chunk_size=self.CS)
        with self.assertRaises(OPEN_ERRORS):
            self._open(header.raw + tail)
