"""Tests of zodbkmi.sources.local and of the key holders in zodbkmi.sources."""
import base64
import os
import shutil
import tempfile
import unittest

import zope.component
import zope.component.testing
from zope.interface.verify import verifyObject

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import SettingsError


def b64(key):
    return base64.b64encode(key).decode()


class TempDirMixin:

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def write(self, name, text, mode=0o600):
        path = os.path.join(self.tmp, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, mode)
        return path


class KeyCheckValueTests(unittest.TestCase):

    def test_depends_on_key_and_algorithm(self):
        from zodbkmi.sources.local import key_check_value
        k1, k2 = os.urandom(32), os.urandom(32)
        self.assertEqual(len(key_check_value(k1)), 32)
        self.assertEqual(key_check_value(k1), key_check_value(k1))
        self.assertNotEqual(key_check_value(k1), key_check_value(k2))
        self.assertNotEqual(key_check_value(k1, 'aes256-gcm'),
                            key_check_value(k1, 'other'))

    def test_known_answer(self):
        # HMAC-SHA256(key, "zodbkmi/key-check/v1\0aes256-gcm"), first 16
        # bytes, for the key 00 01 02 ... 1f.
        import hashlib
        import hmac
        from zodbkmi.sources.local import key_check_value
        key = bytes(range(32))
        expected = hmac.new(key, b'zodbkmi/key-check/v1\x00aes256-gcm',
                            hashlib.sha256).hexdigest()[:32]
        self.assertEqual(key_check_value(key), expected)


class DecodeKeyTests(unittest.TestCase):

    def _callFUT(self, text):
        from zodbkmi.sources.local import decode_key
        return decode_key(text, 'key source raw')

    def test_ok(self):
        key = os.urandom(32)
        self.assertEqual(self._callFUT(b64(key)), key)
        self.assertEqual(self._callFUT(b64(key).encode()), key)

    def test_w_bad_base64(self):
        with self.assertRaisesRegex(InvalidKeyError,
                                    '^key source raw: the key is not base64'):
            self._callFUT('not*base64!')

    def test_w_short_key(self):
        with self.assertRaisesRegex(InvalidKeyError,
                                    'has 32 bytes, not 16'):
            self._callFUT(b64(os.urandom(16)))

    def test_w_long_key(self):
        with self.assertRaisesRegex(InvalidKeyError, 'not 33'):
            self._callFUT(b64(os.urandom(33)))

    def test_w_non_canonical_base64(self):
        text = b64(bytes(32))   # ends in "=": change the unused bits
        self.assertTrue(text.endswith('A='))
        with self.assertRaisesRegex(InvalidKeyError, 'not canonical base64'):
            self._callFUT(text[:-2] + 'B=')

    def test_w_whitespace(self):
        with self.assertRaises(InvalidKeyError):
            self._callFUT(' ' + b64(os.urandom(32)))

    def test_w_non_ascii(self):
        with self.assertRaisesRegex(InvalidKeyError, 'not base64'):
            self._callFUT('\xe9'.encode('latin-1'))


class MasterKeyTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.sources.local import MasterKey
        return MasterKey

    def test_verifyObject(self):
        from zodbkmi.interfaces import IKeyEncryptingKey
        verifyObject(IKeyEncryptingKey,
                     self._getTargetClass()(os.urandom(32)))

    def test_default_key_id_is_aes_key_id(self):
        from zodbkmi.kek import aes_key_id
        key = os.urandom(32)
        self.assertEqual(self._getTargetClass()(key).key_id, aes_key_id(key))

    def test_repr_shows_id_only(self):
        key = os.urandom(32)
        kek = self._getTargetClass()(key, 'my-kek')
        self.assertEqual(repr(kek), '<MasterKey my-kek>')

    def test_w_matching_check_value(self):
        from zodbkmi.sources.local import key_check_value
        key = os.urandom(32)
        kek = self._getTargetClass()(
            key, expected_check_value=key_check_value(key).upper())
        self.assertEqual(kek.check_value, key_check_value(key))

    def test_w_wrong_check_value(self):
        from zodbkmi.sources.local import key_check_value
        with self.assertRaisesRegex(InvalidKeyError,
                                    'raw: the key does not match its key '
                                    'check value .*wrong key'):
            self._getTargetClass()(
                os.urandom(32),
                expected_check_value=key_check_value(os.urandom(32)))


class LocalSourcesTests(TempDirMixin, unittest.TestCase):

    def _callFUT(self, params, environ=None):
        from zodbkmi.sources import kek_from_params
        return kek_from_params(params, environ=environ)

    def test_raw(self):
        key = os.urandom(32)
        kek = self._callFUT({'source': 'raw', 'key': b64(key)})
        self.assertEqual(kek.source, 'raw')
        self.assertEqual(kek.wrap.__self__, kek)
        blob = kek.wrap(b'd' * 32, b'aad')
        from zodbkmi.kek import AESKeyEncryptingKey
        self.assertEqual(AESKeyEncryptingKey(key).unwrap(blob, b'aad'),
                         b'd' * 32)

    def test_raw_w_key_id(self):
        kek = self._callFUT({'source': 'raw', 'key': b64(os.urandom(32)),
                             'keyId': 'master-2026'})
        self.assertEqual(kek.key_id, 'master-2026')

    def test_raw_w_wrong_length(self):
        with self.assertRaisesRegex(InvalidKeyError, 'key source raw: an '
                                    'AES-256 key has 32 bytes, not 31'):
            self._callFUT({'source': 'raw', 'key': b64(os.urandom(31))})

    def test_raw_w_wrong_check_value(self):
        with self.assertRaisesRegex(InvalidKeyError, 'check value'):
            self._callFUT({'source': 'raw', 'key': b64(os.urandom(32)),
                           'checkValue': '0' * 32})

    def test_file(self):
        key = os.urandom(32)
        path = self.write('master.key', b64(key) + '\n')
        kek = self._callFUT({'source': 'file', 'path': path})
        self.assertEqual(kek.source, 'file %s' % path)
        from zodbkmi.kek import aes_key_id
        self.assertEqual(kek.key_id, aes_key_id(key))

    def test_file_readable_by_others(self):
        path = self.write('master.key', b64(os.urandom(32)), 0o644)
        with self.assertRaisesRegex(KeySourceError,
                                    'accessible by group or others'):
            self._callFUT({'source': 'file', 'path': path})

    def test_file_missing(self):
        path = os.path.join(self.tmp, 'nope.key')
        with self.assertRaisesRegex(KeySourceError,
                                    'key file %s cannot be read' % path):
            self._callFUT({'source': 'file', 'path': path})

    def test_file_w_bad_base64_names_file_not_key(self):
        path = self.write('master.key', 'secret-but-not-base64!')
        with self.assertRaises(InvalidKeyError) as cm:
            self._callFUT({'source': 'file', 'path': path})
        self.assertIn(path, str(cm.exception))
        self.assertNotIn('secret', str(cm.exception).replace(path, ''))

    def test_env(self):
        key = os.urandom(32)
        kek = self._callFUT({'source': 'env', 'variable': 'MK'},
                            {'MK': b64(key)})
        self.assertEqual(kek.source, 'env MK')

    def test_env_missing(self):
        with self.assertRaisesRegex(KeySourceError,
                                    'variable MK is not set'):
            self._callFUT({'source': 'env', 'variable': 'MK'}, {})

    def test_env_w_bad_key(self):
        with self.assertRaisesRegex(InvalidKeyError, 'env MK: the key is not '
                                    'base64'):
            self._callFUT({'source': 'env', 'variable': 'MK'}, {'MK': '%%'})

    def test_kek_from_params_validates(self):
        with self.assertRaises(SettingsError):
            self._callFUT({'source': 'raw'})


class SettingsKeyHolderTests(TempDirMixin, unittest.TestCase):

    def setUp(self):
        super().setUp()
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)

    def _getTargetClass(self):
        from zodbkmi.sources import SettingsKeyHolder
        return SettingsKeyHolder

    def _makeOne(self, settings, environ=None):
        return self._getTargetClass()(settings, environ)

    def _settings(self, current, *previous):
        return {'enabled': True, 'algorithm': 'aes256-gcm',
                'params': {'source': 'raw', 'key': b64(current)},
                'previous': [{'source': 'raw', 'key': b64(p)}
                             for p in previous]}

    def test_verifyObject(self):
        from zodbkmi.interfaces import IKeyHolder
        verifyObject(IKeyHolder, self._makeOne(self._settings(os.urandom(32))))

    def test_current_and_previous(self):
        from zodbkmi.kek import aes_key_id
        k1, k2, k3 = os.urandom(32), os.urandom(32), os.urandom(32)
        holder = self._makeOne(self._settings(k3, k2, k1))
        self.assertEqual(holder.key.key_id, aes_key_id(k3))
        self.assertEqual([k.key_id for k in holder.previous_keys],
                         [aes_key_id(k2), aes_key_id(k1)])
        self.assertEqual(len(holder.keys), 3)
        self.assertEqual(repr(holder), '<SettingsKeyHolder %s (+2 previous)>'
                         % aes_key_id(k3))

    def test_w_duplicate_key(self):
        k = os.urandom(32)
        with self.assertRaisesRegex(SettingsError, 'listed twice'):
            self._makeOne(self._settings(k, k))

    def test_w_disabled(self):
        with self.assertRaisesRegex(SettingsError, 'disabled'):
            self._makeOne({'enabled': False})

    def test_rotation_with_facility(self):
        # Data written under k1, then the settings move to k2 with k1 as a
        # previous key: old data stays readable, new data goes to k2, and
        # rewrap moves the DEKs of k1 to k2.
        from zodbkmi.exceptions import WrongKeyError
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        k1, k2 = os.urandom(32), os.urandom(32)
        old = self._makeOne(self._settings(k1))
        facility.create_key(old.key)
        data = facility.encrypt(old.key, b'old data')
        new = self._makeOne(self._settings(k2, k1))
        facility.create_key(new.key)
        self.assertEqual(facility.decrypt(new.keys, data), b'old data')
        with self.assertRaises(WrongKeyError):
            facility.decrypt(new.key, data)
        self.assertEqual(facility.rewrap(new.previous_keys[0], new.key), 1)
        self.assertEqual(facility.decrypt(new.key, data), b'old data')
        fresh = facility.encrypt(new.key, b'new data')
        self.assertEqual(facility.decrypt(self._makeOne(
            self._settings(k2)).key, fresh), b'new data')

    def test_register_keyholder(self):
        from zodbkmi.interfaces import IKeyHolder
        from zodbkmi.sources import register_keyholder
        holder = register_keyholder(self._settings(os.urandom(32)))
        self.assertIs(zope.component.getUtility(IKeyHolder), holder)

    def test_register_keyholder_disabled(self):
        from zodbkmi.interfaces import IKeyHolder
        from zodbkmi.sources import register_keyholder
        self.assertIsNone(register_keyholder({'enabled': False}))
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_environment_keyholder(self):
        import json
        from zodbkmi.sources import EnvironmentKeyHolder
        from zodbkmi.kek import aes_key_id
        key = os.urandom(32)
        env = {'ZODBKMI_ENCRYPTION': json.dumps(
            {'params': {'source': 'env', 'variable': 'MK'}}),
            'MK': b64(key)}
        self.assertEqual(EnvironmentKeyHolder(env).key.key_id,
                         aes_key_id(key))

    def test_environment_keyholder_w_file(self):
        import json
        from zodbkmi.sources import EnvironmentKeyHolder
        path = self.write('enc.json', json.dumps(self._settings(
            os.urandom(32))))
        holder = EnvironmentKeyHolder({'ZODBKMI_ENCRYPTION_FILE': path})
        self.assertTrue(holder.key.key_id.startswith('aes-'))
        with self.assertRaisesRegex(SettingsError, 'neither'):
            EnvironmentKeyHolder({})
