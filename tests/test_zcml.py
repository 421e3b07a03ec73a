"""Tests of zodbkmi.zcml: the ZCML directives, loaded by zope.configuration
from real ZCML, and the utilities they register used for real (ZODB
FileStorage, a key server started as a subprocess)."""
import base64
import json
import os
import shutil
import tempfile
import unittest

import transaction
import zope.component
import zope.component.testing

from zodbkmi.interfaces import IEncryptionService
from zodbkmi.interfaces import IKeyGenerationService
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.interfaces import IKeyManagementFacility
from zodbkmi.persistent import EncryptedPersistent

NS = 'http://namespaces.zodbkmi.org/zodbkmi'

HEAD = ('<configure xmlns="http://namespaces.zope.org/zope"\n'
        '           xmlns:kmi="%s">\n'
        '  <include package="zodbkmi" file="meta.zcml" />\n' % NS)
TAIL = '</configure>\n'

ENVIRON = ('ZODBKMI_ENCRYPTION', 'ZODBKMI_ENCRYPTION_FILE',
           'ZODBKMI_TEST_MASTER_KEY', 'ZODBKMI_TEST_TOKEN')


class Note(EncryptedPersistent):
    """An object whose state is stored encrypted."""

    def __init__(self, text):
        self.text = text


def b64(key):
    return base64.b64encode(key).decode()


class ZCMLTestBase(unittest.TestCase):

    def setUp(self):
        zope.component.testing.setUp(self)
        self.addCleanup(zope.component.testing.tearDown, self)
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        saved = {k: os.environ.pop(k, None) for k in ENVIRON}
        self.addCleanup(self._restore, saved)
        self.key = os.urandom(32)

    def _restore(self, saved):
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def write(self, name, text, mode=0o600):
        path = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def settings(self, key=None, **kw):
        settings = {'params': {'source': 'raw',
                               'key': b64(key or self.key)}}
        settings.update(kw)
        return json.dumps(settings)

    def load(self, body, name="site.zcml"):
        """Write ``body`` as the ZCML file ``name`` in the temporary
        directory and execute it."""
        from zope.configuration import xmlconfig
        path = self.write(name, HEAD + body + TAIL)
        return xmlconfig.file(path)

    def load_string(self, body):
        from zope.configuration import xmlconfig
        return xmlconfig.string(HEAD + body + TAIL)

    def key_id(self, key=None):
        from zodbkmi.kek import aes_key_id
        return aes_key_id(key or self.key)


class KeyHolderTests(ZCMLTestBase):

    def test_settings_file_relative_to_the_zcml_file(self):
        from zodbkmi.sources import SettingsKeyHolder
        self.write('etc/encryption.json', self.settings())
        self.load('<kmi:keyHolder settings="encryption.json" />',
                  'etc/site.zcml')
        holder = zope.component.getUtility(IKeyHolder)
        self.assertIsInstance(holder, SettingsKeyHolder)
        self.assertEqual(holder.key.key_id, self.key_id())
        self.assertEqual(holder.previous_keys, ())

    def test_settings_w_previous_keys(self):
        old = os.urandom(32)
        self.write('enc.json', self.settings(
            previous=[{'source': 'raw', 'key': b64(old)}]))
        self.load('<kmi:keyHolder settings="enc.json" />')
        holder = zope.component.getUtility(IKeyHolder)
        self.assertEqual([k.key_id for k in holder.keys],
                         [self.key_id(), self.key_id(old)])

    def test_registration_info_names_the_zcml_file(self):
        self.write('enc.json', self.settings())
        self.load('<kmi:keyHolder settings="enc.json" />')
        [reg] = [r for r in zope.component.getSiteManager()
                 .registeredUtilities() if r.provided is IKeyHolder]
        self.assertIn('site.zcml', str(reg.info))

    def test_environment_json(self):
        os.environ['ZODBKMI_TEST_MASTER_KEY'] = b64(self.key)
        os.environ['ZODBKMI_ENCRYPTION'] = json.dumps(
            {'params': {'source': 'env',
                        'variable': 'ZODBKMI_TEST_MASTER_KEY'}})
        self.load_string('<kmi:keyHolder />')
        self.assertEqual(zope.component.getUtility(IKeyHolder).key.key_id,
                         self.key_id())

    def test_environment_file(self):
        os.environ['ZODBKMI_ENCRYPTION_FILE'] = self.write(
            'enc.json', self.settings())
        self.load_string('<kmi:keyHolder />')
        self.assertEqual(zope.component.getUtility(IKeyHolder).key.key_id,
                         self.key_id())

    def test_environment_not_set(self):
        from zope.configuration.exceptions import ConfigurationError
        from zodbkmi.exceptions import SettingsError
        with self.assertRaises(ConfigurationError) as cm:
            self.load('<kmi:keyHolder />')
        message = str(cm.exception)
        self.assertIn('keyHolder: encryption settings: neither '
                      '$ZODBKMI_ENCRYPTION nor $ZODBKMI_ENCRYPTION_FILE '
                      'is set', message)
        self.assertIn('site.zcml", line 4', message)
        self.assertIsInstance(cm.exception.__cause__, SettingsError)
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_disabled_settings_register_nothing(self):
        self.write('off.json', '{"enabled": false}')
        self.load('<kmi:keyHolder settings="off.json" />\n'
                  '<kmi:keyManagementFacility storageDir="keys"'
                  ' ensureKey="true" />')
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))
        # ensureKey had no key holder: no data key was created.
        facility = zope.component.getUtility(IKeyManagementFacility)
        self.assertEqual(len(facility), 0)

    def test_disabled_environment_registers_nothing(self):
        os.environ['ZODBKMI_ENCRYPTION'] = '{"enabled": false}'
        self.load_string('<kmi:keyHolder />')
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_override_w_disabled_settings_switches_encryption_off(self):
        self.write('enc.json', self.settings())
        self.write('off.json', '{"enabled": false}')
        self.write('base.zcml', HEAD + '<kmi:keyHolder settings="enc.json" />'
                   + TAIL)
        self.write('off.zcml', HEAD + '<kmi:keyHolder settings="off.json" />'
                   + TAIL)
        self.load('<include file="base.zcml" />')
        self.assertIsNotNone(zope.component.queryUtility(IKeyHolder))
        zope.component.testing.tearDown(self)
        zope.component.testing.setUp(self)
        self.load('<include file="base.zcml" />\n'
                  '<includeOverrides file="off.zcml" />')
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_bad_settings_file(self):
        from zope.configuration.exceptions import ConfigurationError
        from zodbkmi.exceptions import SettingsError
        path = self.write('enc.json', '{"params": {"source": "raw", '
                          '"key": "%s", "colour": 1}}' % b64(self.key))
        with self.assertRaises(ConfigurationError) as cm:
            self.load('<kmi:keyHolder settings="enc.json" />')
        message = str(cm.exception)
        self.assertIn('keyHolder: encryption settings: params.colour: '
                      'unknown setting for source raw', message)
        self.assertIn('(in %s)' % path, message)
        self.assertIn('site.zcml", line 4', message)
        self.assertNotIn(b64(self.key), message + repr(cm.exception))
        self.assertIsInstance(cm.exception.__cause__, SettingsError)
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_settings_file_not_json(self):
        from zope.configuration.exceptions import ConfigurationError
        self.write('enc.json', '{"params": ')
        with self.assertRaisesRegex(ConfigurationError,
                                    r'JSON: cannot be parsed .* \(in '):
            self.load('<kmi:keyHolder settings="enc.json" />')

    def test_settings_file_missing(self):
        from zope.configuration.exceptions import ConfigurationError
        with self.assertRaisesRegex(
                ConfigurationError, 'cannot read %s: No such file'
                % os.path.join(self.tmp, 'nowhere.json')):
            self.load('<kmi:keyHolder settings="nowhere.json" />')

    def test_key_that_cannot_be_had(self):
        # Valid settings, a key source that fails when the actions run:
        # a key file that others can read.
        from zope.configuration.exceptions import ConfigurationError
        from zodbkmi.exceptions import KeySourceError
        key_file = self.write('master.key', b64(self.key), mode=0o644)
        path = self.write('enc.json', json.dumps(
            {'params': {'source': 'file', 'path': key_file}}))
        with self.assertRaises(ConfigurationError) as cm:
            self.load('<kmi:keyHolder settings="enc.json" />')
        message = str(cm.exception)
        self.assertIn('keyHolder: cannot get the keys of the encryption '
                      'settings %s: key file %s is accessible by group or '
                      'others' % (path, key_file), message)
        self.assertIn('site.zcml", line 4', message)
        self.assertNotIn(b64(self.key), message + repr(cm.exception))
        self.assertIsInstance(cm.exception.__cause__, KeySourceError)
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_wrong_key_check_value(self):
        from zope.configuration.exceptions import ConfigurationError
        from zodbkmi.exceptions import InvalidKeyError
        self.write('enc.json', json.dumps(
            {'params': {'source': 'raw', 'key': b64(self.key),
                        'checkValue': '0' * 32}}))
        with self.assertRaises(ConfigurationError) as cm:
            self.load('<kmi:keyHolder settings="enc.json" />')
        self.assertIn('does not match its key check value',
                      str(cm.exception))
        self.assertNotIn(b64(self.key), str(cm.exception))
        self.assertIsInstance(cm.exception.__cause__, InvalidKeyError)

    def test_two_key_holders_conflict(self):
        from zope.configuration.config import ConfigurationConflictError
        self.write('a.json', self.settings())
        self.write('b.json', self.settings(os.urandom(32)))
        with self.assertRaises(ConfigurationConflictError) as cm:
            self.load('<kmi:keyHolder settings="a.json" />\n'
                      '<kmi:keyHolder settings="b.json" />')
        message = str(cm.exception)
        self.assertIn('IKeyHolder', message)
        self.assertIn('line 4', message)
        self.assertIn('line 5', message)
        self.assertIsNone(zope.component.queryUtility(IKeyHolder))

    def test_disabled_key_holder_still_conflicts(self):
        from zope.configuration.config import ConfigurationConflictError
        self.write('a.json', self.settings())
        self.write('off.json', '{"enabled": false}')
        with self.assertRaises(ConfigurationConflictError):
            self.load('<kmi:keyHolder settings="a.json" />\n'
                      '<kmi:keyHolder settings="off.json" />')

    def test_key_holder_conflicts_w_utility(self):
        from zope.configuration.config import ConfigurationConflictError
        self.write('a.json', self.settings())
        with self.assertRaises(ConfigurationConflictError):
            self.load('<include package="zope.component" file="meta.zcml"'
                      ' />\n'
                      '<kmi:keyHolder settings="a.json" />\n'
                      '<utility factory="zodbkmi.sources.EnvironmentKeyHolder"'
                      ' provides="zodbkmi.interfaces.IKeyHolder" />')

    def test_unknown_attribute(self):
        from zope.configuration.exceptions import ConfigurationError
        with self.assertRaisesRegex(ConfigurationError, 'key'):
            self.load('<kmi:keyHolder key="%s" />' % b64(self.key))


class NamespaceTests(unittest.TestCase):

    def test_meta_zcml_uses_the_documented_namespace(self):
        import zodbkmi.zcml
        self.assertEqual(zodbkmi.zcml.NAMESPACE, NS)
        path = os.path.join(os.path.dirname(zodbkmi.zcml.__file__),
                            'meta.zcml')
        with open(path) as f:
            self.assertIn('namespace="%s"' % NS, f.read())


class UtilitySnippetTests(ZCMLTestBase):
    """The ``<utility>`` registration of EnvironmentKeyHolder that the
    docstring of zodbkmi.sources.EnvironmentKeyHolder shows."""

    SNIPPET = ('<include package="zope.component" file="meta.zcml" />\n'
               '<utility factory="zodbkmi.sources.EnvironmentKeyHolder"\n'
               '         provides="zodbkmi.interfaces.IKeyHolder" />')

    def test_environment_key_holder_utility(self):
        from zodbkmi.sources import EnvironmentKeyHolder
        os.environ['ZODBKMI_ENCRYPTION_FILE'] = self.write(
            'enc.json', self.settings())
        self.load(self.SNIPPET)
        holder = zope.component.getUtility(IKeyHolder)
        self.assertIsInstance(holder, EnvironmentKeyHolder)
        self.assertEqual(holder.key.key_id, self.key_id())

    def test_environment_key_holder_utility_unset(self):
        from zope.configuration.exceptions import ConfigurationError
        with self.assertRaisesRegex(ConfigurationError, 'neither'):
            self.load(self.SNIPPET)


class FacilityTests(ZCMLTestBase):

    def test_master_facility_registered_as_each_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.facility import KeyManagementFacility
        self.load('<kmi:keyManagementFacility storageDir="var/keys"'
                  ' cacheTimeout="60" cacheSize="10" />')
        facility = zope.component.getUtility(IKeyManagementFacility)
        self.assertIsInstance(facility, KeyManagementFacility)
        verifyObject(IKeyManagementFacility, facility)
        for iface in (IEncryptionService, IKeyGenerationService):
            self.assertIs(zope.component.getUtility(iface), facility)
        # Registered under each interface (so that a <utility> of any of
        # them conflicts), as one object.
        registered = {r.provided: r.component for r in
                      zope.component.getSiteManager().registeredUtilities()}
        self.assertEqual(registered, {IEncryptionService: facility,
                                      IKeyGenerationService: facility,
                                      IKeyManagementFacility: facility})
        self.assertEqual(facility.key_store.path,
                         os.path.join(self.tmp, 'var', 'keys'))
        self.assertEqual(facility.timeout, 60)
        self.assertEqual(facility._cache.maxsize, 10)
        self.assertEqual(len(facility), 0)
        # the directory is made with its first key
        self.assertFalse(os.path.exists(facility.key_store.path))
        facility.ensure_key(os.urandom(32))
        self.assertEqual(os.stat(facility.key_store.path).st_mode & 0o777,
                         0o700)

    def test_ensure_key_creates_one_active_data_key(self):
        self.write('enc.json', self.settings())
        zcml = ('<kmi:keyManagementFacility storageDir="keys"'
                ' ensureKey="true" />\n'
                '<kmi:keyHolder settings="enc.json" />')
        self.load(zcml)
        facility = zope.component.getUtility(IEncryptionService)
        [dek_id] = list(facility)
        self.assertEqual(facility.entry(dek_id).kek_id, self.key_id())
        # Loading again (another process start) keeps the same key.
        zope.component.testing.tearDown(self)
        zope.component.testing.setUp(self)
        self.load(zcml)
        self.assertEqual(list(zope.component.getUtility(IEncryptionService)),
                         [dek_id])

    def test_two_facilities_conflict(self):
        from zope.configuration.config import ConfigurationConflictError
        with self.assertRaises(ConfigurationConflictError) as cm:
            self.load('<kmi:keyManagementFacility storageDir="a" />\n'
                      '<kmi:localKeyManagementFacility'
                      ' url="https://127.0.0.1:1" tokenEnv="T" />')
        message = str(cm.exception)
        for iface in ('IEncryptionService', 'IKeyGenerationService',
                      'IKeyManagementFacility'):
            self.assertIn(iface, message)
        # Nothing was made: the actions did not run.
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'a')))

    def test_storage_dir_unusable(self):
        from zope.configuration.exceptions import ConfigurationError
        from zodbkmi.exceptions import KeyStoreError
        path = self.write('afile', 'x')
        with self.assertRaises(ConfigurationError) as cm:
            self.load('<kmi:keyManagementFacility'
                      ' storageDir="afile/keys" />')
        self.assertIn('keyManagementFacility: cannot create key directory '
                      '%s/keys' % path, str(cm.exception))
        self.assertIn('site.zcml", line 4', str(cm.exception))
        self.assertIsInstance(cm.exception.__cause__, KeyStoreError)

    def test_storage_dir_required(self):
        from zope.configuration.exceptions import ConfigurationError
        with self.assertRaisesRegex(ConfigurationError, 'storageDir'):
            self.load('<kmi:keyManagementFacility />')

    def _local_error(self, attributes):
        from zope.configuration.exceptions import ConfigurationError
        with self.assertRaises(ConfigurationError) as cm:
            self.load('<kmi:localKeyManagementFacility %s />' % attributes)
        return str(cm.exception)

    def test_local_refuses_plain_http(self):
        self.assertIn(
            'localKeyManagementFacility: url http://127.0.0.1:1: plain http '
            'is refused', self._local_error(
                'url="http://127.0.0.1:1" tokenEnv="ZODBKMI_TEST_TOKEN"'))
        self.assertIn("url 'ftp://x' must start with https://",
                      self._local_error('url="ftp://x" tokenEnv="T"'))

    def test_local_bad_urls(self):
        self.assertIn("url 'https://127.0.0.1:x' is not a URL",
                      self._local_error('url="https://127.0.0.1:x"'
                                        ' tokenEnv="T"'))
        self.assertIn("url 'https:///v1' has no host",
                      self._local_error('url="https:///v1" tokenEnv="T"'))

    def test_local_client_key_needs_client_cert(self):
        self.write('client.key', 'x')
        self.assertIn('clientKey needs clientCert', self._local_error(
            'url="https://127.0.0.1:1" tokenEnv="T" clientKey="client.key"'))

    def test_invalid_numbers(self):
        from zope.configuration.exceptions import ConfigurationError
        for attributes in ('cacheSize="0"', 'cacheTimeout="-1"',
                           'cacheSize="many"'):
            with self.assertRaises(ConfigurationError):
                self.load('<kmi:keyManagementFacility storageDir="keys" %s />'
                          % attributes)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'keys')))

    def test_local_allow_http(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        os.environ['ZODBKMI_TEST_TOKEN'] = 'a-token'
        self.load('<kmi:localKeyManagementFacility url="http://127.0.0.1:1"'
                  ' allowHttp="true" tokenEnv="ZODBKMI_TEST_TOKEN" />')
        facility = zope.component.getUtility(IEncryptionService)
        self.assertIsInstance(facility, LocalKeyManagementFacility)
        self.assertEqual(facility._transport.scheme, 'http')

    def test_local_needs_one_token_option(self):
        self.assertIn('give exactly one of tokenFile and tokenEnv',
                      self._local_error('url="https://127.0.0.1:1"'))
        self.write('token', 'x')
        self.assertIn('give exactly one of tokenFile and tokenEnv',
                      self._local_error('url="https://127.0.0.1:1"'
                                        ' tokenFile="token" tokenEnv="T"'))

    def test_local_token_env_not_set(self):
        self.assertIn('tokenEnv: variable ZODBKMI_TEST_TOKEN is not set',
                      self._local_error('url="https://127.0.0.1:1"'
                                        ' tokenEnv="ZODBKMI_TEST_TOKEN"'))

    def test_local_token_file_readable_by_others(self):
        path = self.write('token', 'secret-token-value', mode=0o640)
        message = self._local_error('url="https://127.0.0.1:1"'
                                    ' tokenFile="token"')
        self.assertIn('tokenFile: token file %s is accessible by group or '
                      'others' % path, message)
        self.assertNotIn('secret-token-value', message)

    def test_local_bad_ca_file(self):
        os.environ['ZODBKMI_TEST_TOKEN'] = 'a-token'
        message = self._local_error(
            'url="https://127.0.0.1:1" tokenEnv="ZODBKMI_TEST_TOKEN"'
            ' caFile="missing.pem"')
        self.assertIn('caFile: cannot read %s: No such file'
                      % os.path.join(self.tmp, 'missing.pem'), message)
        self.write('notpem.pem', 'not a certificate')
        message = self._local_error(
            'url="https://127.0.0.1:1" tokenEnv="ZODBKMI_TEST_TOKEN"'
            ' caFile="notpem.pem"')
        self.assertIn('cannot set up TLS with caFile %s'
                      % os.path.join(self.tmp, 'notpem.pem'), message)


class EndToEndTests(ZCMLTestBase):
    """EncryptedPersistent objects in a FileStorage, through the utilities
    the directives register."""

    def _read_note(self):
        import ZODB
        import ZODB.FileStorage
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(self.tmp, 'Data.fs')))
        try:
            conn = db.open(transaction.TransactionManager())
            try:
                return conn.root()['note'].text
            finally:
                conn.close()
        finally:
            db.close()

    def test_encrypted_persistent_in_filestorage(self):
        import ZODB
        import ZODB.FileStorage
        from zodbkmi.exceptions import NoKeyHolderError
        self.write('enc.json', self.settings())
        zcml = ('<kmi:keyHolder settings="enc.json" />\n'
                '<kmi:keyManagementFacility storageDir="keys"'
                ' ensureKey="true" />')
        self.load(zcml)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(self.tmp, 'Data.fs')))
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()['note'] = Note('the zcml secret 4f1d')
            tm.commit()
            conn.close()
        finally:
            db.close()
        with open(os.path.join(self.tmp, 'Data.fs'), 'rb') as f:
            self.assertNotIn(b'the zcml secret 4f1d', f.read())
        self.assertEqual(self._read_note(), 'the zcml secret 4f1d')

        # Another start: nothing registered, the state cannot be read.
        zope.component.testing.tearDown(self)
        zope.component.testing.setUp(self)
        with self.assertRaises(NoKeyHolderError):
            self._read_note()

        # The same configuration again: it reads.
        self.load(zcml)
        self.assertEqual(self._read_note(), 'the zcml secret 4f1d')

    def test_rotation_w_previous_key_in_settings(self):
        # Data written under the old key reads after the settings moved
        # to a new key with the old one as previous.
        import pickle
        old = os.urandom(32)
        self.write('enc.json', self.settings(old))
        zcml = ('<kmi:keyHolder settings="enc.json" />\n'
                '<kmi:keyManagementFacility storageDir="keys"'
                ' ensureKey="true" />')
        self.load(zcml)
        data = pickle.dumps(Note('written under the old key'))
        zope.component.testing.tearDown(self)
        zope.component.testing.setUp(self)
        self.write('enc.json', self.settings(
            previous=[{'source': 'raw', 'key': b64(old)}]))
        self.load(zcml)
        self.assertEqual(pickle.loads(data).text, 'written under the old key')
        facility = zope.component.getUtility(IEncryptionService)
        self.assertEqual(sorted(e.kek_id for e in
                                (facility.entry(d) for d in facility)),
                         sorted([self.key_id(old), self.key_id()]))


def _server_layer():
    from tests.test_server import ServerLayer
    return ServerLayer


class LocalFacilityTests(ZCMLTestBase):
    """localKeyManagementFacility against a real key server (TLS)."""

    layer = _server_layer()

    def setUp(self):
        super().setUp()
        self.server = self.layer.server
        self.write('enc.json', self.settings())

    def load(self, body, name='site.zcml'):
        try:
            return super().load(body, name)
        finally:
            # Close the connections of the registered facility.
            facility = zope.component.queryUtility(IEncryptionService)
            if facility is not None:
                self.addCleanup(facility.close)

    def _zcml(self, token='admin', **extra):
        attributes = ''.join(' %s="%s"' % kv for kv in sorted(extra.items()))
        return ('<kmi:keyHolder settings="enc.json" />\n'
                '<kmi:localKeyManagementFacility url="%s"\n'
                '    caFile="%s" tokenFile="%s"%s />'
                % (self.server.url, self.server.ca,
                   os.path.join(self.server.dir, 'var', token + '.token'),
                   attributes))

    def test_round_trip_through_the_key_server(self):
        import pickle
        from zodbkmi.facility import LocalKeyManagementFacility
        self.load(self._zcml(ensureKey='true', requestTimeout='5'))
        facility = zope.component.getUtility(IKeyManagementFacility)
        self.assertIsInstance(facility, LocalKeyManagementFacility)
        self.assertIs(zope.component.getUtility(IEncryptionService), facility)
        holder = zope.component.getUtility(IKeyHolder)
        dek_id = facility._active_key_id(holder.key.key_id)
        self.assertIn(dek_id, facility)
        data = pickle.dumps(Note('via the key server'))

        # A client token reads (it may not create keys).
        zope.component.testing.tearDown(self)
        zope.component.testing.setUp(self)
        self.load(self._zcml(token='client'))
        self.assertEqual(pickle.loads(data).text, 'via the key server')

    def test_ensure_key_refused_for_a_client_token(self):
        from zope.configuration.exceptions import ConfigurationError
        from zodbkmi.exceptions import KeyServerError
        self.write('enc.json', self.settings(os.urandom(32)))
        with self.assertRaises(ConfigurationError) as cm:
            self.load(self._zcml(token='client', ensureKey='true'))
        message = str(cm.exception)
        self.assertIn('localKeyManagementFacility: ensureKey: cannot create '
                      'the active data key of aes-', message)
        self.assertIn('403', message)
        self.assertIsInstance(cm.exception.__cause__, KeyServerError)
        with open(os.path.join(self.server.dir, 'var', 'client.token')) as f:
            self.assertNotIn(f.read().strip(), message)

    def test_wrong_ca(self):
        # The certificate of the server does not verify against another CA.
        import pickle
        from zodbkmi.exceptions import KeyServerError
        from zodbkmi.server import generate_self_signed
        other = generate_self_signed(os.path.join(self.tmp, 'tls'))
        self.load(self._zcml().replace(self.server.ca, other[0]))
        with self.assertRaises(KeyServerError):
            pickle.dumps(Note('nothing'))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
