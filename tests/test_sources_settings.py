"""Tests of zodbkmi.sources.settings."""
import json
import os
import shutil
import tempfile
import unittest

from zodbkmi.exceptions import SettingsError

KEY = 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8='


class ParseSettingsTests(unittest.TestCase):

    def _callFUT(self, settings):
        from zodbkmi.sources.settings import parse_settings
        return parse_settings(settings)

    def _assertError(self, settings, text):
        with self.assertRaises(SettingsError) as cm:
            self._callFUT(settings)
        msg = str(cm.exception)
        self.assertIn(text, msg)
        self.assertNotIn('\n', msg)
        return msg

    def test_minimal_raw(self):
        s = self._callFUT({'enabled': True, 'algorithm': 'aes256-gcm',
                           'params': {'source': 'raw', 'key': KEY}})
        self.assertTrue(s.enabled)
        self.assertEqual(s.algorithm, 'aes256-gcm')
        self.assertEqual(s.params, {'source': 'raw', 'key': KEY})
        self.assertEqual(s.previous, ())

    def test_defaults_filled_for_vault(self):
        s = self._callFUT({'params': {'source': 'vaultKV',
                                      'url': 'https://127.0.0.1:8200',
                                      'tokenEnv': 'T', 'path': 'app/kek'}})
        self.assertEqual(s.params['mount'], 'secret')
        self.assertEqual(s.params['timeout'], 5.0)
        self.assertFalse(s.params['allowHttp'])

    def test_json_string(self):
        s = self._callFUT(json.dumps({'params': {'source': 'env',
                                                 'variable': 'K'}}))
        self.assertEqual(s.params['variable'], 'K')

    def test_returns_settings_as_is(self):
        s = self._callFUT({'params': {'source': 'env', 'variable': 'K'}})
        self.assertIs(self._callFUT(s), s)

    def test_disabled_needs_no_params(self):
        s = self._callFUT({'enabled': False})
        self.assertFalse(s.enabled)
        self.assertEqual(repr(s), '<EncryptionSettings disabled>')

    def test_repr_hides_params(self):
        s = self._callFUT({'params': {'source': 'raw', 'key': KEY},
                           'previous': [{'source': 'raw', 'key': KEY}]})
        self.assertEqual(repr(s), '<EncryptionSettings aes256-gcm raw, '
                                  '1 previous>')
        self.assertNotIn(KEY, repr(s))

    def test_previous_is_validated_with_its_index(self):
        self._assertError({'params': {'source': 'env', 'variable': 'K'},
                           'previous': [{'source': 'env', 'variable': 'K'},
                                        {'source': 'file'}]},
                          'previous[1].path: missing')

    def test_w_bad_json(self):
        self._assertError('{"enabled": ', 'JSON: cannot be parsed')

    def test_w_not_an_object(self):
        self._assertError([1], 'settings: must be an object, not list')

    def test_w_unknown_top_setting(self):
        self._assertError({'enable': True}, 'enable: unknown setting')

    def test_w_enabled_not_bool(self):
        self._assertError({'enabled': 'yes'}, 'enabled: must be true or false')

    def test_w_unknown_algorithm(self):
        self._assertError({'algorithm': 'des', 'params': {}},
                          "algorithm: unsupported algorithm 'des'")

    def test_w_missing_params(self):
        self._assertError({'enabled': True}, 'params: missing')

    def test_w_unknown_source(self):
        self._assertError({'params': {'source': 'ftp'}},
                          "params.source: unknown key source 'ftp'")

    def test_w_missing_source(self):
        self._assertError({'params': {}}, 'params.source: missing')

    def test_w_unknown_param(self):
        self._assertError({'params': {'source': 'raw', 'key': KEY,
                                      'colour': 'red'}},
                          'params.colour: unknown setting for source raw')

    def test_w_wrong_type_does_not_echo_value(self):
        msg = self._assertError({'params': {'source': 'raw', 'key': 12345}},
                                'params.key: must be a string, not int')
        self.assertNotIn('12345', msg)

    def test_w_bool_for_number(self):
        self._assertError({'params': {'source': 'vaultTransit',
                                      'url': 'https://x', 'token': 't',
                                      'keyName': 'k', 'timeout': True}},
                          'params.timeout: must be')

    def test_w_empty_string(self):
        self._assertError({'params': {'source': 'file', 'path': ''}},
                          'params.path: must not be empty')

    def test_w_two_token_sources(self):
        self._assertError({'params': {'source': 'vaultKV', 'url': 'https://x',
                                      'token': 'a', 'tokenEnv': 'T',
                                      'path': 'p'}},
                          'needs exactly one of token, tokenFile, tokenEnv '
                          '(token, tokenEnv given)')

    def test_w_no_pin(self):
        self._assertError({'params': {'source': 'pkcs11', 'library': '/l.so',
                                      'tokenLabel': 't', 'keyLabel': 'k'}},
                          'needs exactly one of pinFile, pinEnv (none given)')

    def test_w_plain_http(self):
        self._assertError({'params': {'source': 'vaultKV',
                                      'url': 'http://127.0.0.1:8200',
                                      'token': 'a', 'path': 'p'}},
                          'params.url: plain http is refused')

    def test_plain_http_when_allowed(self):
        s = self._callFUT({'params': {'source': 'vaultKV',
                                      'url': 'http://127.0.0.1:8200',
                                      'token': 'a', 'path': 'p',
                                      'allowHttp': True}})
        self.assertTrue(s.params['allowHttp'])

    def test_w_bad_scheme(self):
        self._assertError({'params': {'source': 'vaultTransit',
                                      'url': 'ftp://x', 'token': 'a',
                                      'keyName': 'k'}},
                          'params.url: must start with https://')

    def test_w_bad_timeout(self):
        self._assertError({'params': {'source': 'vaultTransit',
                                      'url': 'https://x', 'token': 'a',
                                      'keyName': 'k', 'timeout': 0}},
                          'params.timeout: must be between 0 and 300')

    def test_w_bad_version(self):
        self._assertError({'params': {'source': 'vaultKV', 'url': 'https://x',
                                      'token': 'a', 'path': 'p',
                                      'version': 0}},
                          'params.version: must be 1 or more')

    def test_w_key_id_not_url_safe(self):
        self._assertError({'params': {'source': 'raw', 'key': KEY,
                                      'keyId': 'a/b'}},
                          'params.keyId: use 1 to 255 letters')

    def test_w_previous_not_list(self):
        self._assertError({'params': {'source': 'env', 'variable': 'K'},
                           'previous': {}}, 'previous: must be a list')


class LoadSettingsTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_load_settings(self):
        from zodbkmi.sources.settings import load_settings
        path = os.path.join(self.tmp, 'enc.json')
        with open(path, 'w') as f:
            json.dump({'params': {'source': 'env', 'variable': 'K'}}, f)
        self.assertEqual(load_settings(path).params['variable'], 'K')

    def test_load_settings_w_error_names_file(self):
        from zodbkmi.sources.settings import load_settings
        path = os.path.join(self.tmp, 'enc.json')
        with open(path, 'w') as f:
            f.write('{"params": 1}')
        with self.assertRaises(SettingsError) as cm:
            load_settings(path)
        self.assertIn('(in %s)' % path, str(cm.exception))

    def test_load_settings_w_missing_file(self):
        from zodbkmi.sources.settings import load_settings
        with self.assertRaises(SettingsError) as cm:
            load_settings(os.path.join(self.tmp, 'nope.json'))
        self.assertIn('cannot read', str(cm.exception))

    def test_settings_from_environ(self):
        from zodbkmi.sources.settings import settings_from_environ
        env = {'ZODBKMI_ENCRYPTION': '{"enabled": false}'}
        self.assertFalse(settings_from_environ(environ=env).enabled)
        self.assertIsNone(settings_from_environ(environ={}))
        with self.assertRaises(SettingsError) as cm:
            settings_from_environ(environ={'ZODBKMI_ENCRYPTION': '{'})
        self.assertIn('(in $ZODBKMI_ENCRYPTION)', str(cm.exception))


class SettingsProperties(unittest.TestCase):
    """For any JSON value, parse_settings returns settings or raises
    SettingsError (one line), nothing else."""

    def test_any_json_value(self):
        from hypothesis import given
        from hypothesis import settings
        from hypothesis import strategies as st
        from zodbkmi.sources.settings import EncryptionSettings
        from zodbkmi.sources.settings import SOURCES
        from zodbkmi.sources.settings import parse_settings
        names = st.sampled_from(sorted({n for t in SOURCES.values()
                                        for n in t} | {'source', 'x'}))
        scalars = st.one_of(st.none(), st.booleans(), st.integers(),
                            st.floats(allow_nan=False), st.text(max_size=20),
                            st.sampled_from(sorted(SOURCES)),
                            st.just('https://127.0.0.1:1'))
        params = st.dictionaries(names, scalars, max_size=8)
        top = st.fixed_dictionaries({}, optional={
            'enabled': st.one_of(st.booleans(), scalars),
            'algorithm': st.one_of(st.just('aes256-gcm'), scalars),
            'params': st.one_of(params, scalars),
            'previous': st.one_of(st.lists(params, max_size=3), scalars)})

        @settings(max_examples=200, deadline=None)
        @given(st.one_of(top, scalars, st.text(max_size=50)))
        def check(value):
            try:
                result = parse_settings(value)
            except SettingsError as e:
                self.assertNotIn('\n', str(e))
            else:
                self.assertIsInstance(result, EncryptionSettings)

        check()

    def test_decode_key_is_strict(self):
        import base64
        from hypothesis import given
        from hypothesis import settings
        from hypothesis import strategies as st
        from zodbkmi.exceptions import InvalidKeyError
        from zodbkmi.sources.local import decode_key

        @settings(max_examples=200, deadline=None)
        @given(st.one_of(
            st.text(max_size=60),
            st.binary(min_size=30, max_size=34).map(
                lambda b: base64.b64encode(b).decode())))
        def check(text):
            try:
                key = decode_key(text, 'test')
            except InvalidKeyError:
                return
            self.assertEqual(len(key), 32)
            self.assertEqual(base64.b64encode(key).decode(), text)

        check()
