"""Tests of zodbkmi.config: ``<encryptingstorage>`` and the zodburi scheme
taking their key encrypting key from a key source (``key-settings``).

The local sources run everywhere; OpenBao Transit runs against a real
OpenBao dev server (tests/bao.py).
"""
import json
import os
import shutil
import tempfile
import unittest

import ZODB
import ZODB.config

from tests.bao import ROOT_TOKEN
from tests.bao import BaoTestCase

SECRET = 'KEY-SETTINGS-SECRET-7f2c'


def write_secret(path, text):
    """Write ``text`` to ``path``, mode 0600 (a key or token file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(text)


def write_json(path, settings):
    with open(path, 'w') as f:
        json.dump(settings, f)


class _Base:

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-config-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.key_dir = os.path.join(self.tmp, 'keys')
        self.settings = os.path.join(self.tmp, 'encryption.json')

    def zconfig(self, keys, storage=None):
        if storage is None:
            storage = ('<filestorage>\n path %s/Data.fs\n blob-dir %s/blobs\n'
                       '</filestorage>' % (self.tmp, self.tmp))
        return ('%%import zodbkmi\n<zodb>\n<encryptingstorage>\n%s\n'
                'key-dir %s\n%s\n</encryptingstorage>\n</zodb>\n'
                % (keys, self.key_dir, storage))

    def roundtrip(self, open_db):
        """Write with a database from ``open_db()``, reopen, read; nothing
        in clear in the files."""
        db = open_db()
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
        db.close()
        db = open_db()
        try:
            with db.transaction() as conn:
                self.assertEqual(conn.root()['secret'], SECRET)
        finally:
            db.close()
        with open(os.path.join(self.tmp, 'Data.fs'), 'rb') as f:
            data = f.read()
        self.assertIn(b'.km', data)
        self.assertNotIn(SECRET.encode(), data)
        self.check_keys()

    def check_keys(self):
        """The one data key is in the key directory."""
        self.assertEqual(len(os.listdir(self.key_dir)), 1)


class LocalSourceTests(_Base, unittest.TestCase):
    """key-settings with a local key file source."""

    def setUp(self):
        super().setUp()
        import base64
        self.key_file = os.path.join(self.tmp, 'master.key')
        write_secret(self.key_file,
                     base64.b64encode(os.urandom(32)).decode() + '\n')
        write_json(self.settings, {
            'enabled': True, 'algorithm': 'aes256-gcm',
            'params': {'source': 'file', 'path': self.key_file,
                       'keyId': 'master-1'}})

    def test_zconfig_key_settings(self):
        config = self.zconfig('key-settings %s' % self.settings)
        self.roundtrip(lambda: ZODB.config.databaseFromString(config))
        (name,) = os.listdir(self.key_dir)
        with open(os.path.join(self.key_dir, name)) as f:
            self.assertEqual(json.load(f)['kek_id'], 'master-1')

    def test_zodburi_key_settings(self):
        import zodburi
        uri = ('zodbkmi+file://%s/Data.fs?blobstorage_dir=%s/blobs'
               '&key_settings=%s&key_dir=%s'
               % (self.tmp, self.tmp, self.settings, self.key_dir))

        def open_db():
            factory, dbkw = zodburi.resolve_uri(uri)
            return ZODB.DB(factory(), **dbkw)
        self.roundtrip(open_db)

    def test_previous_keys_of_the_settings(self):
        import base64
        config = self.zconfig('key-settings %s' % self.settings)
        db = ZODB.config.databaseFromString(config)
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
        db.close()
        # a new current key; the old one kept as a previous key
        new_key = os.path.join(self.tmp, 'master-2.key')
        write_secret(new_key,
                     base64.b64encode(os.urandom(32)).decode() + '\n')
        write_json(self.settings, {
            'params': {'source': 'file', 'path': new_key,
                       'keyId': 'master-2'},
            'previous': [{'source': 'file', 'path': self.key_file,
                          'keyId': 'master-1'}]})
        db = ZODB.config.databaseFromString(config)
        try:
            with db.transaction() as conn:
                self.assertEqual(conn.root()['secret'], SECRET)
        finally:
            db.close()
        # writing needs a data key of the new KEK (create-key true, or
        # "zodbkmi migrate rotate-kek" to rewrap the old ones)
        db = ZODB.config.databaseFromString(
            config.replace('key-dir', 'create-key true\nkey-dir'))
        try:
            with db.transaction() as conn:
                conn.root()['more'] = SECRET
        finally:
            db.close()
        self.assertEqual(len(os.listdir(self.key_dir)), 2)

    def _config_error(self, keys):
        import ZConfig
        with self.assertRaises(ZConfig.ConfigurationError) as cm:
            ZODB.config.databaseFromString(self.zconfig(keys))
        message = str(cm.exception)
        self.assertNotIn('\n', message)
        return message

    def test_neither_key_file_nor_key_settings(self):
        self.assertIn('give key-file (a local key encrypting key) or '
                      'key-settings', self._config_error(''))

    def test_both_key_file_and_key_settings(self):
        message = self._config_error('key-file %s\nkey-settings %s'
                                     % (self.key_file, self.settings))
        self.assertIn('not both', message)

    def test_previous_key_file_with_key_settings(self):
        message = self._config_error(
            'key-settings %s\nprevious-key-file %s'
            % (self.settings, self.key_file))
        self.assertIn('previous-key-file goes with key-file', message)

    def test_settings_not_json(self):
        with open(self.settings, 'w') as f:
            f.write('{"params": ')
        message = self._config_error('key-settings %s' % self.settings)
        self.assertIn('key-settings: encryption settings: JSON: cannot be '
                      'parsed', message)
        self.assertIn(self.settings, message)

    def test_settings_w_unknown_source(self):
        write_json(self.settings, {'params': {'source': 'vault'}})
        message = self._config_error('key-settings %s' % self.settings)
        self.assertIn("params.source: unknown key source 'vault'", message)

    def test_settings_disabled(self):
        write_json(self.settings, {'enabled': False})
        message = self._config_error('key-settings %s' % self.settings)
        self.assertIn('"enabled": false', message)

    def test_settings_file_missing(self):
        message = self._config_error('key-settings %s/no.json' % self.tmp)
        self.assertIn('no.json', message)

    def test_key_source_fails_on_open(self):
        # the settings are fine; the key file they name is not
        from zodbkmi.exceptions import SecretFileError
        os.chmod(self.key_file, 0o644)
        config = self.zconfig('key-settings %s' % self.settings)
        with self.assertRaises(SecretFileError) as cm:
            ZODB.config.databaseFromString(config)
        message = str(cm.exception)
        self.assertIn('key-settings %s: cannot get the keys: key file %s '
                      'is accessible by group or others'
                      % (self.settings, self.key_file), message)
        # the base storage was not left open (locked)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'Data.fs')))

    def test_wrong_key_w_check_value(self):
        # the settings carry the key check value: a wrong key is refused
        # when the storage opens, before any record is read
        import base64
        from zodbkmi.exceptions import InvalidKeyError
        from zodbkmi.sources.local import key_check_value
        with open(self.key_file) as f:
            check = key_check_value(base64.b64decode(f.read().strip()))
        write_json(self.settings, {'params': {
            'source': 'file', 'path': self.key_file, 'keyId': 'master-1',
            'checkValue': check}})
        config = self.zconfig('key-settings %s' % self.settings)
        self.roundtrip(lambda: ZODB.config.databaseFromString(config))
        write_secret(self.key_file,
                     base64.b64encode(os.urandom(32)).decode() + '\n')
        with self.assertRaises(InvalidKeyError) as cm:
            ZODB.config.databaseFromString(config)
        self.assertIn('key-settings %s: cannot get the keys: file %s: the '
                      'key does not match its key check value'
                      % (self.settings, self.key_file), str(cm.exception))

    def _uri_error(self, query):
        import zodburi
        with self.assertRaises(ValueError) as cm:
            zodburi.resolve_uri('zodbkmi+memory://?key_dir=%s&%s'
                                % (self.key_dir, query))
        message = str(cm.exception)
        self.assertNotIn('\n', message)
        return message

    def test_uri_errors(self):
        self.assertIn('give key_file (a local key encrypting key) or '
                      'key_settings', self._uri_error('mode=strict'))
        self.assertIn('not both', self._uri_error(
            'key_file=%s&key_settings=%s' % (self.key_file, self.settings)))
        self.assertIn('previous_key_file goes with key_file', self._uri_error(
            'key_settings=%s&previous_key_file=%s'
            % (self.settings, self.key_file)))
        write_json(self.settings, {'params': {'source': 'file'}})
        self.assertIn('params.path: missing', self._uri_error(
            'key_settings=%s' % self.settings))


class TransitTests(_Base, BaoTestCase):
    """key-settings naming a Transit key of a real OpenBao server."""

    def setUp(self):
        super().setUp()
        self.name = 'config-' + self.id().rsplit('.', 1)[-1].replace('_', '-')
        self.bao.api('POST', 'transit/keys/' + self.name, {'derived': True})
        self.token_file = os.path.join(self.tmp, 'bao-token')
        write_secret(self.token_file, ROOT_TOKEN + '\n')
        self.write_settings()

    def write_settings(self, **kw):
        params = {'source': 'vaultTransit', 'url': self.bao.url,
                  'caFile': self.bao.ca_file, 'tokenFile': self.token_file,
                  'keyName': self.name}
        params.update(kw)
        write_json(self.settings, {'enabled': True, 'algorithm': 'aes256-gcm',
                                   'params': params})

    def test_zconfig_transit(self):
        config = self.zconfig('key-settings %s' % self.settings)
        self.roundtrip(lambda: ZODB.config.databaseFromString(config))
        # the data key is wrapped by Transit (a vault:v1: ciphertext)
        (name,) = os.listdir(self.key_dir)
        with open(os.path.join(self.key_dir, name)) as f:
            entry = json.load(f)
        self.assertEqual(entry['kek_id'], 'transit:transit:' + self.name)

    def test_zodburi_transit(self):
        import zodburi
        uri = ('zodbkmi+file://%s/Data.fs?key_settings=%s&key_dir=%s'
               % (self.tmp, self.settings, self.key_dir))

        def open_db():
            factory, dbkw = zodburi.resolve_uri(uri)
            return ZODB.DB(factory(), **dbkw)
        self.roundtrip(open_db)

    def test_wrong_key_name(self):
        from zodbkmi.exceptions import KeySourceError
        self.write_settings(keyName='no-such-key')
        with self.assertRaises(KeySourceError) as cm:
            ZODB.config.databaseFromString(
                self.zconfig('key-settings %s' % self.settings))
        message = str(cm.exception)
        self.assertIn('key-settings %s: cannot get the keys: vaultTransit '
                      '%s/v1/transit/keys/no-such-key: no such Transit key'
                      % (self.settings, self.bao.url), message)
        self.assertNotIn('\n', message)

    def test_wrong_token_never_shown(self):
        from zodbkmi.exceptions import KeySourceError
        write_secret(self.token_file, 's.not-the-token\n')
        with self.assertRaises(KeySourceError) as cm:
            ZODB.config.databaseFromString(
                self.zconfig('key-settings %s' % self.settings))
        self.assertIn('HTTP 403, permission denied', str(cm.exception))
        self.assertNotIn('not-the-token', str(cm.exception))

    def test_another_transit_key_refused(self):
        from zodbkmi.exceptions import DatabaseKeyError
        config = self.zconfig('key-settings %s' % self.settings)
        db = ZODB.config.databaseFromString(config)
        with db.transaction() as conn:
            conn.root()['secret'] = SECRET
        db.close()
        other = self.name + '-other'
        self.bao.api('POST', 'transit/keys/' + other, {'derived': True})
        self.write_settings(keyName=other)
        with self.assertRaises(DatabaseKeyError):
            ZODB.config.databaseFromString(config)


class KeyServerTests(_Base, unittest.TestCase):
    """key-server: the wrapped data keys on replicas of a key server
    (real ``zodbkmi serve`` processes over TLS), the KEK in this
    process."""

    from tests.test_failover import ReplicasLayer as layer

    def setUp(self):
        super().setUp()
        self.replicas = self.layer.replicas
        self.replicas.start()       # after a failover test killed some
        self.key_file = os.path.join(self.tmp, 'kek.key')
        from zodbkmi.keyholder import write_key_file
        write_key_file(self.key_file, os.urandom(32))
        self.token_file = os.path.join(self.tmp, 'token')
        write_secret(self.token_file, self.replicas.admin + '\n')
        self.server = ('key-server %s\nkey-server-token-file %s\n'
                       'key-server-ca-file %s\n'
                       % (' '.join(self.replicas.urls), self.token_file,
                          self.replicas.ca))

    def zconfig(self, keys, storage=None):
        # key-server instead of key-dir
        return super().zconfig(keys, storage).replace(
            'key-dir %s\n' % self.key_dir, self.server)

    def stored_here(self, kek_id):
        from zodbkmi.keystore import DirectoryKeyStore
        store = DirectoryKeyStore(self.replicas.key_dir)
        return [e for e in store.entries() if e.kek_id == kek_id]

    def check_keys(self):
        """The data key is on the key server, not in a directory here."""
        from zodbkmi.keyholder import read_key_file
        from zodbkmi.kek import as_kek
        kek_id = as_kek(read_key_file(self.key_file)).key_id
        self.assertEqual(len(self.stored_here(kek_id)), 1)
        self.assertFalse(os.path.exists(self.key_dir))

    def test_zconfig_key_server(self):
        config = self.zconfig('key-file %s\nkey-server-policy spread'
                              % self.key_file)
        self.roundtrip(lambda: ZODB.config.databaseFromString(config))

    def test_zodburi_key_server(self):
        import urllib.parse

        import zodburi
        query = urllib.parse.urlencode({
            'blobstorage_dir': self.tmp + '/blobs',
            'key_file': self.key_file,
            'key_server': ','.join(self.replicas.urls),
            'key_server_token_file': self.token_file,
            'key_server_ca_file': self.replicas.ca,
            'key_server_grace': '60'})
        uri = 'zodbkmi+file://%s/Data.fs?%s' % (self.tmp, query)

        def open_db():
            factory, dbkw = zodburi.resolve_uri(uri)
            return ZODB.DB(factory(), **dbkw)
        self.roundtrip(open_db)

    def _config_error(self, text):
        import ZConfig
        with self.assertRaises(ZConfig.ConfigurationError) as cm:
            ZODB.config.databaseFromString(text)
        message = str(cm.exception)
        self.assertNotIn('\n', message)
        return message

    def test_errors(self):
        keys = 'key-file %s' % self.key_file
        both = self.zconfig(keys).replace(
            'key-server ', 'key-dir %s\nkey-server ' % self.tmp)
        self.assertIn('give key-dir or key-server, not both',
                      self._config_error(both))
        neither = super().zconfig(keys).replace(
            'key-dir %s\n' % self.key_dir, '')
        self.assertIn('give key-dir (a directory of wrapped data keys) or '
                      'key-server', self._config_error(neither))
        orphan = super().zconfig(keys).replace(
            'key-dir', 'key-server-token-file %s\nkey-dir'
            % self.token_file)
        self.assertIn('key-server-token-file goes with key-server',
                      self._config_error(orphan))
        plain = self.zconfig(keys).replace('https://', 'http://')
        self.assertIn('http://', self._config_error(plain))
        self.assertIn('key-server-policy must be prefer or spread',
                      self._config_error(self.zconfig(
                          keys + '\nkey-server-policy nearest')))
        self.assertIn('key-server-grace must be 0 to 86400 seconds',
                      self._config_error(self.zconfig(
                          keys + '\nkey-server-grace 90000')))
        import zodburi
        with self.assertRaises(ValueError) as cm:
            zodburi.resolve_uri(
                'zodbkmi+memory://?key_file=%s&key_dir=%s&key_server=%s'
                % (self.key_file, self.tmp, self.replicas.urls[0]))
        self.assertIn('give key_dir or key_server, not both',
                      str(cm.exception))

    def test_token_refused(self):
        from zodbkmi.exceptions import KeyServerError
        write_secret(self.token_file, 'not-a-token\n')
        config = self.zconfig('key-file %s' % self.key_file)
        with self.assertRaises(KeyServerError) as cm:
            ZODB.config.databaseFromString(config)
        self.assertNotIn('not-a-token', str(cm.exception))
