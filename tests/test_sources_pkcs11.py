"""Tests of zodbkmi.sources.pkcs11 against a real SoftHSM2 token."""
import os
import shutil
import tempfile
import unittest

from zope.interface.verify import verifyObject

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.format import wrapped
from tests.softhsm import KEY_LABEL
from tests.softhsm import LIBRARY
from tests.softhsm import PIN
from tests.softhsm import TOKEN_LABEL
from tests.softhsm import SoftHSMTestCase


class PKCS11KeyEncryptingKeyTests(SoftHSMTestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _getTargetClass(self):
        from zodbkmi.sources.pkcs11 import PKCS11KeyEncryptingKey
        return PKCS11KeyEncryptingKey

    def _makeOne(self, token=TOKEN_LABEL, key=KEY_LABEL, pin=PIN):
        kek = self._getTargetClass()(LIBRARY, token, key, pin)
        self.addCleanup(kek.close)
        return kek

    def test_verifyObject(self):
        from zodbkmi.interfaces import IKeyEncryptingKey
        verifyObject(IKeyEncryptingKey, self._makeOne())

    def test_key_id_and_repr(self):
        kek = self._makeOne()
        self.assertEqual(kek.key_id,
                         'pkcs11:%s:%s' % (TOKEN_LABEL, KEY_LABEL))
        self.assertEqual(repr(kek), '<PKCS11KeyEncryptingKey %s>'
                         % kek.key_id)
        self.assertNotIn(PIN, repr(vars(kek).get('source')))

    def test_wrap_unwrap(self):
        kek = self._makeOne()
        self.assertEqual(kek.suite, wrapped.SUITE_PKCS11_AES_GCM)
        dek, dek_id = os.urandom(32), os.urandom(16)
        data = wrapped.wrap(kek, dek_id, dek)
        wk = wrapped.parse(data)
        self.assertEqual(len(wk.blob), 60)
        self.assertNotIn(dek, data)
        self.assertEqual(wrapped.unwrap(kek, data), (dek_id, dek))
        # Two wrappings differ (fresh nonce).
        self.assertNotEqual(wrapped.wrap(kek, dek_id, dek), data)

    def test_two_keks_share_the_login(self):
        from zodbkmi.sources.pkcs11 import create_key
        create_key(LIBRARY, TOKEN_LABEL, 'kek-shared', PIN)
        k1, k2 = self._makeOne(), self._makeOne(key='kek-shared')
        data = wrapped.wrap(k2, os.urandom(16), os.urandom(32))
        self.assertEqual(len(wrapped.unwrap(k2, data)[1]), 32)
        self.assertEqual(len(wrapped.unwrap(
            k1, wrapped.wrap(k1, os.urandom(16), os.urandom(32)))[1]), 32)

    def test_header_is_bound(self):
        kek = self._makeOne()
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        with self.assertRaisesRegex(AuthenticationError,
                                    'did not authenticate under KEK pkcs11:'):
            kek.unwrap(wk.blob, wk.header + b'x')

    def test_tampered_and_wrong_size(self):
        kek = self._makeOne()
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        bad = wk.blob[:-1] + bytes([wk.blob[-1] ^ 1])
        with self.assertRaises(AuthenticationError):
            kek.unwrap(bad, wk.header)
        with self.assertRaisesRegex(AuthenticationError, 'wrong size'):
            kek.unwrap(wk.blob[:-1], wk.header)

    def test_other_key_cannot_unwrap(self):
        from zodbkmi.sources.pkcs11 import create_key
        create_key(LIBRARY, TOKEN_LABEL, 'kek-other', PIN)
        kek, other = self._makeOne(), self._makeOne(key='kek-other')
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        with self.assertRaises(AuthenticationError):
            other.unwrap(wk.blob, wk.header)

    def test_key_is_not_extractable(self):
        import pkcs11
        kek = self._makeOne()
        with self.assertRaises(pkcs11.exceptions.AttributeSensitive):
            kek._key[pkcs11.Attribute.VALUE]
        self.assertFalse(kek._key[pkcs11.Attribute.EXTRACTABLE])

    def test_wrong_pin(self):
        with self.assertRaises(KeySourceError) as cm:
            self._makeOne(pin='0000')
        self.assertEqual(str(cm.exception),
                         'pkcs11 token %s: login failed: wrong PIN'
                         % TOKEN_LABEL)

    def test_wrong_pin_while_logged_in(self):
        self._makeOne()
        with self.assertRaisesRegex(KeySourceError, 'wrong PIN'):
            self._makeOne(pin='0000')

    def test_missing_token(self):
        with self.assertRaisesRegex(KeySourceError,
                                    'pkcs11 token no-such-token: no such '
                                    'token'):
            self._makeOne(token='no-such-token')

    def test_missing_key(self):
        with self.assertRaisesRegex(KeySourceError,
                                    'key no-such-key: no such AES key'):
            self._makeOne(key='no-such-key')

    def test_label_not_fit_for_key_id(self):
        with self.assertRaisesRegex(KeySourceError, 'labels go into the key '
                                    'id'):
            self._makeOne(key='my key/1')

    def test_missing_library(self):
        from zodbkmi.sources.pkcs11 import PKCS11KeyEncryptingKey
        with self.assertRaisesRegex(KeySourceError, 'no PKCS#11 library'):
            PKCS11KeyEncryptingKey(os.path.join(self.tmp, 'nope.so'),
                                   TOKEN_LABEL, KEY_LABEL, PIN)

    def test_create_key_refuses_existing_label(self):
        from zodbkmi.sources.pkcs11 import create_key
        with self.assertRaisesRegex(KeySourceError, 'exists already'):
            create_key(LIBRARY, TOKEN_LABEL, KEY_LABEL, PIN)

    def test_closed(self):
        kek = self._makeOne()
        kek.close()
        with self.assertRaisesRegex(KeySourceError, 'session closed'):
            kek.wrap(os.urandom(32), b'h')

    def test_from_settings_pin_file_and_env(self):
        from zodbkmi.sources import kek_from_params
        params = {'source': 'pkcs11', 'library': LIBRARY,
                  'tokenLabel': TOKEN_LABEL, 'keyLabel': KEY_LABEL}
        kek = kek_from_params(dict(params, pinFile=self.hsm.pin_file(
            self.tmp)))
        self.addCleanup(kek.close)
        kek2 = kek_from_params(dict(params, pinEnv='PIN'), environ={
            'PIN': PIN})
        self.addCleanup(kek2.close)
        self.assertEqual(kek.key_id, kek2.key_id)
        with self.assertRaisesRegex(KeySourceError, 'PIN variable PIN'):
            kek_from_params(dict(params, pinEnv='PIN'), environ={})
        os.chmod(os.path.join(self.tmp, 'pin'), 0o644)
        with self.assertRaisesRegex(KeySourceError, 'PIN file .* group'):
            kek_from_params(dict(params, pinFile=os.path.join(self.tmp,
                                                              'pin')))

    def test_with_facility_and_rotation(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.sources.pkcs11 import create_key
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        kek = self._makeOne()
        facility.create_key(kek)
        data = facility.encrypt(kek, b'in the HSM')
        create_key(LIBRARY, TOKEN_LABEL, 'kek-2', PIN)
        kek2 = self._makeOne(key='kek-2')
        self.assertEqual(facility.rewrap(kek, kek2), 1)
        facility.clear_cache()
        self.assertEqual(facility.decrypt(kek2, data), b'in the HSM')


VECTORS = os.path.join(os.path.dirname(__file__), 'vectors',
                       'wrapped-suites-3-4.json')


def load_vectors():
    import json
    with open(VECTORS) as f:
        return json.load(f)


class Suite4VectorTests(SoftHSMTestCase):
    """The suite 4 vectors, opened inside the token with the vector KEK
    imported under the label the vector names."""

    def _import(self, kek_hex, label):
        import pkcs11
        from pkcs11 import Attribute as A
        from zodbkmi.sources.pkcs11 import _session
        with _session(LIBRARY, TOKEN_LABEL, PIN, rw=True) as s:
            try:
                s.get_key(label=label)
                return
            except pkcs11.exceptions.NoSuchKey:
                pass
            s.create_object({
                A.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                A.KEY_TYPE: pkcs11.KeyType.AES, A.VALUE: bytes.fromhex(
                    kek_hex), A.LABEL: label, A.TOKEN: True,
                A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                A.ENCRYPT: True, A.DECRYPT: True})

    def _kek(self, vector):
        from zodbkmi.sources.pkcs11 import PKCS11KeyEncryptingKey
        token, label = vector['kek_id'][len('pkcs11:'):].split(':')
        self.assertEqual(token, TOKEN_LABEL)
        self._import(vector['kek'], label)
        kek = PKCS11KeyEncryptingKey(LIBRARY, token, label, PIN)
        self.addCleanup(kek.close)
        return kek

    def test_valid(self):
        vectors = load_vectors()['suite4_valid']
        self.assertTrue(vectors)
        for v in vectors:
            kek = self._kek(v)
            data = bytes.fromhex(v['wrapped'])
            wk = wrapped.parse(data)
            self.assertEqual(wk.header.hex(), v['header'])
            self.assertEqual(wk.blob[:12].hex(), v['nonce'])
            self.assertEqual(wrapped.unwrap(kek, data),
                             (bytes.fromhex(v['dek_id']),
                              bytes.fromhex(v['dek'])))

    def test_invalid(self):
        from zodbkmi import exceptions
        vectors = load_vectors()['suite4_invalid']
        self.assertTrue(vectors)
        for v in vectors:
            kek = self._kek(v)
            with self.assertRaises(getattr(exceptions, v['error']),
                                   msg=v['reason']):
                wrapped.unwrap(kek, bytes.fromhex(v['wrapped']))


class Suite34HeaderVectorTests(unittest.TestCase):
    """Headers and Transit contexts are pinned without any server."""

    def test_suite3_headers_and_contexts(self):
        import base64
        for v in load_vectors()['suite3']:
            header = wrapped.build_header(
                wrapped.SUITE_VAULT_TRANSIT, bytes.fromhex(v['dek_id']),
                v['kek_id'], wrapped.VERSION_1)
            self.assertEqual(header.hex(), v['header'])
            self.assertEqual(base64.b64encode(header).decode(), v['context'])

    def test_suite4_software_aes_gcm_agrees(self):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        for v in load_vectors()['suite4_valid']:
            data = bytes.fromhex(v['wrapped'])
            wk = wrapped.parse(data)
            self.assertEqual(wk.suite, wrapped.SUITE_PKCS11_AES_GCM)
            self.assertEqual(len(wk.blob), 60)
            dek = AESGCM(bytes.fromhex(v['kek'])).decrypt(
                wk.blob[:12], wk.blob[12:], wk.header)
            self.assertEqual(dek.hex(), v['dek'])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
