"""Tests of zodbkmi.format.envelope."""
import os
import threading
import unittest

from zodbkmi import exceptions

DEK_ID = bytes(range(16))
DEK = bytes(range(32, 64))
OID = b'\x00' * 7 + b'\x2a'


class SealerTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.format.envelope import Sealer
        return Sealer

    def _makeOne(self, dek_id=DEK_ID, dek=DEK):
        return self._getTargetClass()(dek_id, dek)

    def test_roundtrip(self):
        s = self._makeOne()
        self.assertEqual(s.open(s.seal(b'data')), b'data')

    def test_roundtrip_empty(self):
        s = self._makeOne()
        self.assertEqual(s.open(s.seal(b'')), b'')

    def test_roundtrip_record(self):
        from zodbkmi.format.envelope import CONTEXT_RECORD
        s = self._makeOne()
        data = s.seal(b'state', CONTEXT_RECORD, OID)
        self.assertEqual(data[5], CONTEXT_RECORD)
        self.assertEqual(s.open(data, CONTEXT_RECORD, OID), b'state')

    def test_layout(self):
        # version 2, what is written
        from zodbkmi.format import envelope
        s = self._makeOne()
        data = s.seal(b'abc')
        self.assertEqual(data[:3], b'.km')
        self.assertEqual(data[3:6], b'\x02\x01\x00')
        self.assertEqual(data[6:22], DEK_ID)
        self.assertEqual(data[22:26], s.current_salt)
        self.assertEqual(len(data), 3 + envelope.OVERHEAD)
        self.assertEqual(envelope.OVERHEAD, 54)
        self.assertEqual(envelope.HEADER_SIZE, 38)
        self.assertEqual(envelope.KEYED_PREFIX_SIZE, 26)
        fixed = s.seal(b'abc', _salt=b'SALT', _nonce=b'N' * 12)
        self.assertEqual(fixed[:38], b'.km\x02\x01\x00' + DEK_ID + b'SALT'
                         + b'N' * 12)
        self.assertEqual(s.open(fixed), b'abc')
        self.assertEqual(s.seal(b'abc', 2)[5], envelope.CONTEXT_STATE)

    def test_layout_version_1(self):
        # the private seam that reproduces the released version 1 vectors
        from zodbkmi.format import envelope
        s = self._makeOne()
        data = s.seal(b'abc', _nonce=b'N' * 12)
        self.assertEqual(data[:3], b'.km')
        self.assertEqual(data[3:6], b'\x01\x01\x00')
        self.assertEqual(data[6:22], DEK_ID)
        self.assertEqual(data[22:34], b'N' * 12)
        self.assertEqual(len(data), 3 + envelope.V1_OVERHEAD)
        self.assertEqual(envelope.V1_OVERHEAD, 50)
        self.assertEqual(envelope.V1_HEADER_SIZE, 34)
        self.assertEqual(s.open(data), b'abc')
        with self.assertRaises(ValueError):     # version 1 had no states
            s.seal(b'abc', 2, _nonce=b'N' * 12)

    def test_seal_w_fixed_nonce_is_deterministic(self):
        s = self._makeOne()
        self.assertEqual(s.seal(b'x', _nonce=b'n' * 12),
                         s.seal(b'x', _nonce=b'n' * 12))
        self.assertEqual(s.seal(b'x', _salt=b'salt', _nonce=b'n' * 12),
                         s.seal(b'x', _salt=b'salt', _nonce=b'n' * 12))

    def test_seal_w_bad_seams(self):
        s = self._makeOne()
        for kw in ({'_nonce': b'n' * 11}, {'_salt': b'salt'},
                   {'_salt': b'sal', '_nonce': b'n' * 12}):
            with self.assertRaises(ValueError):
                s.seal(b'x', **kw)

    def test_two_seals_differ(self):
        from zodbkmi.format.envelope import unique_part
        s = self._makeOne()
        a, b = s.seal(b'same'), s.seal(b'same')
        self.assertEqual(a[22:26], b[22:26])        # the same subkey
        self.assertNotEqual(unique_part(a), unique_part(b))
        self.assertNotEqual(a[38:], b[38:])

    def test_unique_part(self):
        from zodbkmi.format.envelope import unique_part
        s = self._makeOne()
        v2 = s.seal(b'x', _salt=b'SALT', _nonce=b'N' * 12)
        self.assertEqual(unique_part(v2), b'SALT' + b'N' * 12)
        v1 = s.seal(b'x', _nonce=b'N' * 12)
        self.assertEqual(unique_part(v1), b'N' * 12)
        self.assertIs(type(unique_part(memoryview(v2))), bytes)

    def test_ctor_w_bad_dek_id(self):
        for dek_id in (b'', b'x' * 15, b'x' * 17, 'x' * 16, None):
            with self.assertRaises(ValueError):
                self._makeOne(dek_id=dek_id)

    def test_ctor_w_bad_dek(self):
        for dek in (b'', b'k' * 16, b'k' * 31, b'k' * 33, 'k' * 32, None):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._makeOne(dek=dek)

    def test_seal_record_wo_oid(self):
        from zodbkmi.format.envelope import CONTEXT_RECORD
        s = self._makeOne()
        for oid in (None, b'', b'1234567', b'123456789', '12345678'):
            with self.assertRaises(ValueError):
                s.seal(b'x', CONTEXT_RECORD, oid)

    def test_seal_data_w_oid(self):
        with self.assertRaises(ValueError):
            self._makeOne().seal(b'x', 0, OID)

    def test_seal_w_unknown_context(self):
        s = self._makeOne()
        for context in (2, 255, -1):
            with self.assertRaises(ValueError):
                s.seal(b'x', context, OID)

    def test_seal_w_non_bytes(self):
        with self.assertRaises(TypeError):
            self._makeOne().seal('text')

    def test_open_w_altered_data(self):
        s = self._makeOne()
        data = bytearray(s.seal(b'payload'))
        data[-1] ^= 1
        with self.assertRaises(exceptions.AuthenticationError) as cm:
            s.open(bytes(data))
        self.assertIn(DEK_ID.hex(), str(cm.exception))
        self.assertNotIn(DEK.hex(), str(cm.exception))

    def test_open_w_wrong_key(self):
        data = self._makeOne().seal(b'payload')
        with self.assertRaises(exceptions.AuthenticationError):
            self._makeOne(dek=b'\x00' * 32).open(data)

    def test_open_w_wrong_oid(self):
        from zodbkmi.format.envelope import CONTEXT_RECORD
        s = self._makeOne()
        data = s.seal(b'state', CONTEXT_RECORD, OID)
        with self.assertRaises(exceptions.AuthenticationError) as cm:
            s.open(data, CONTEXT_RECORD, b'\x00' * 8)
        self.assertIn('0x' + bytes(8).hex(), str(cm.exception))
        self.assertIn(DEK_ID.hex(), str(cm.exception))

    def test_open_record_as_data_fails(self):
        # the context byte is authenticated: opening a record without its
        # oid fails even when the caller skipped read_dek_id
        from zodbkmi.format.envelope import CONTEXT_RECORD
        s = self._makeOne()
        data = s.seal(b'state', CONTEXT_RECORD, OID)
        with self.assertRaises(exceptions.AuthenticationError):
            s.open(data)

    def test_repr_shows_no_key(self):
        s = self._makeOne()
        self.assertEqual(repr(s), '<Sealer for DEK %s>' % DEK_ID.hex())
        self.assertFalse(hasattr(s, '__dict__'))
        for name in self._getTargetClass().__slots__:
            value = getattr(s, name)
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, bytes):
                    self.assertNotIn(DEK, part)


class ReadDekIdTests(unittest.TestCase):

    def _callFUT(self, data, context=0):
        from zodbkmi.format.envelope import read_dek_id
        return read_dek_id(data, context)

    def _sealed(self, context=0, oid=None):
        from zodbkmi.format.envelope import Sealer
        return Sealer(DEK_ID, DEK).seal(b'payload', context, oid)

    def test_returns_raw_dek_id(self):
        self.assertEqual(self._callFUT(self._sealed()), DEK_ID)
        self.assertEqual(self._callFUT(self._sealed(1, OID), 1), DEK_ID)

    def test_accepts_bytearray_and_memoryview(self):
        data = self._sealed()
        for value in (bytearray(data), memoryview(data)):
            self.assertEqual(self._callFUT(value), DEK_ID)
            self.assertIs(type(self._callFUT(value)), bytes)

    def test_w_text(self):
        with self.assertRaises(TypeError):
            self._callFUT('.km' + 'x' * 60)

    def test_w_unknown_context(self):
        with self.assertRaises(ValueError):
            self._callFUT(self._sealed(), 4)

    def test_w_version_3_names_version(self):
        data = bytearray(self._sealed())
        data[3] = 3
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._callFUT(bytes(data))
        self.assertIn('version 3', str(cm.exception))
        self.assertIn('reads versions 1 and 2', str(cm.exception))

    def test_w_suite_7_names_suite(self):
        data = bytearray(self._sealed())
        data[4] = 7
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._callFUT(bytes(data))
        self.assertIn('suite 7', str(cm.exception))

    def test_w_wrong_context_names_both(self):
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._callFUT(self._sealed(1, OID), 0)
        self.assertIn('storage record envelope where a data envelope',
                      str(cm.exception))

    def test_contexts_of_version_2(self):
        from zodbkmi.format.envelope import CONTEXT_STATE
        state = self._sealed(CONTEXT_STATE)
        self.assertEqual(self._callFUT(state, CONTEXT_STATE), DEK_ID)
        for data, context, message in (
                (state, 0, 'an object state envelope where a data envelope'),
                (state, 1, 'an object state envelope where a storage record'),
                (self._sealed(), CONTEXT_STATE,
                 'a data envelope where an object state envelope'),
                (self._sealed(1, OID), CONTEXT_STATE,
                 'a storage record envelope where an object state')):
            with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
                self._callFUT(data, context)
            self.assertIn(message, str(cm.exception))

    def test_version_1_data_is_accepted_as_data_and_state(self):
        from zodbkmi.format.envelope import CONTEXT_STATE
        from zodbkmi.format.envelope import Sealer
        s = Sealer(DEK_ID, DEK)
        v1 = s.seal(b'legacy', _nonce=b'n' * 12)
        self.assertEqual(self._callFUT(v1, 0), DEK_ID)
        self.assertEqual(self._callFUT(v1, CONTEXT_STATE), DEK_ID)
        self.assertEqual(s.open_state(v1), b'legacy')
        record = s.seal(b'legacy', 1, OID, _nonce=b'n' * 12)
        with self.assertRaises(exceptions.UnsupportedFormatError):
            self._callFUT(record, CONTEXT_STATE)
        # version 1 had no context 2
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._callFUT(v1[:5] + b'\x02' + v1[6:], CONTEXT_STATE)
        self.assertIn('unknown envelope context 2', str(cm.exception))

    def test_length_depends_on_the_version(self):
        from zodbkmi.format.envelope import Sealer
        s = Sealer(DEK_ID, DEK)
        v1 = s.seal(b'', _nonce=b'n' * 12)
        v2 = s.seal(b'')
        self.assertEqual((len(v1), len(v2)), (50, 54))
        self.assertEqual(self._callFUT(v1), DEK_ID)
        for data, size in ((v1, 50), (v2, 54)):
            with self.assertRaises(exceptions.TruncatedDataError) as cm:
                self._callFUT(data[:-1])
            self.assertIn('at least %d required' % size, str(cm.exception))

    def test_every_truncation(self):
        from zodbkmi.format.envelope import OVERHEAD
        data = self._sealed()
        for n in range(OVERHEAD):
            with self.assertRaises(exceptions.TruncatedDataError):
                self._callFUT(data[:n])

    def test_checks_version_before_length(self):
        for data in (b'.km\x03', b'.km\x00\x01', b'.km\x01\x09',
                     b'.km\x02\x09'):
            with self.assertRaises(exceptions.UnsupportedFormatError):
                self._callFUT(data)

    def test_plaintext_is_not_an_envelope(self):
        for data in (b'\x80\x04\x95', b'(dp0\n.', b'xyz' * 20, b'.z' * 30):
            with self.assertRaises(exceptions.UnsupportedFormatError):
                self._callFUT(data)


class OneShotTests(unittest.TestCase):

    def test_seal_and_open_envelope(self):
        from zodbkmi.format.envelope import open_envelope
        from zodbkmi.format.envelope import seal
        data = seal(DEK_ID, DEK, b'one shot', 1, OID)
        self.assertEqual(open_envelope(DEK_ID, DEK, data, 1, OID),
                         b'one shot')

    def test_open_envelope_w_other_dek_id(self):
        from zodbkmi.format.envelope import open_envelope
        from zodbkmi.format.envelope import seal
        other = b'\x01' * 16
        data = seal(other, DEK, b'x')
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            open_envelope(DEK_ID, DEK, data)
        self.assertEqual(cm.exception.key_id, other.hex())
        self.assertIn(other.hex(), str(cm.exception))

    def test_is_envelope(self):
        from zodbkmi.format.envelope import is_envelope
        from zodbkmi.format.envelope import seal
        self.assertTrue(is_envelope(seal(DEK_ID, DEK, b'x')))
        self.assertTrue(is_envelope(b'.km\x09'))   # any version
        self.assertFalse(is_envelope(b'.z'))
        self.assertFalse(is_envelope(b'\x80\x03.'))


class NonceTests(unittest.TestCase):

    def test_new_nonce_size_and_uniqueness(self):
        from zodbkmi.format.envelope import NONCE_SIZE
        from zodbkmi.format.envelope import new_nonce
        seen = set()

        def draw():
            local = [new_nonce() for _ in range(1500)]
            seen.update(local)   # set.update is atomic under the GIL
            sizes.update(len(n) for n in local)

        sizes = set()
        threads = [threading.Thread(target=draw) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sizes, {NONCE_SIZE})
        self.assertEqual(len(seen), 6000)

    def test_seal_uses_fresh_nonces(self):
        from zodbkmi.format.envelope import Sealer
        s = Sealer(DEK_ID, os.urandom(32))
        nonces = {s.seal(b'')[26:38] for _ in range(2100)}
        self.assertEqual(len(nonces), 2100)
