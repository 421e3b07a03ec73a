"""Tests of zodbkmi.sources.kmip against a real PyKMIP server on loopback."""
import os
import shutil
import socket
import tempfile
import threading
import unittest

from zope.interface.verify import verifyObject

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import KmipError
from zodbkmi.exceptions import SettingsError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.format import wrapped
from tests.kmipserver import KmipTestCase
from tests.kmipserver import create_raw_key
from zodbkmi.testing import free_port


class _Base(KmipTestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def client(self, cert=None, **kw):
        client = self.kmip.client(cert, **kw)
        self.addCleanup(client.close)
        return client

    def new_kek(self, name=None):
        from zodbkmi.sources.kmip import create_kek
        return create_kek(self.client(), name)

    def assertOneLine(self, error, *absent):
        text = str(error)
        self.assertNotIn('\n', text)
        self.assertNotIn('Traceback', text)
        with open(self.kmip.key_file, 'rb') as f:
            secret = f.read().decode()
        for line in secret.splitlines()[1:-1]:
            self.assertNotIn(line, text)
        for item in absent:
            self.assertNotIn(item, text)


class WrapTests(_Base):

    def test_verifyObject(self):
        from zodbkmi.interfaces import IKeyEncryptingKey
        self.assertTrue(verifyObject(IKeyEncryptingKey, self.new_kek()))

    def test_wrap_unwrap_through_the_server(self):
        kek = self.new_kek()
        self.assertEqual(kek.key_id, 'kmip:' + kek.uid)
        self.assertEqual(kek.suite, wrapped.SUITE_KMIP_AES_GCM)
        dek, dek_id = os.urandom(32), os.urandom(16)
        data = wrapped.wrap(kek, dek_id, dek)
        wk = wrapped.parse(data)
        self.assertEqual(wk.suite, 6)
        self.assertEqual(wk.kek_id, kek.key_id)
        self.assertIn(wk.blob[0], (12, 16))   # PyKMIP's IV: 16 bytes
        self.assertEqual(len(wk.blob), 1 + wk.blob[0] + 32 + 16)
        self.assertEqual(wrapped.unwrap(kek, data), (dek_id, dek))
        self.assertNotEqual(wrapped.wrap(kek, dek_id, dek)[-64:],
                            data[-64:])   # a fresh IV each time

    def test_header_is_bound(self):
        kek = self.new_kek()
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        other = wrapped.parse(wrapped.wrap(kek, os.urandom(16),
                                           os.urandom(32)))
        # The blob moved under another DEK id's header: refused by the
        # server's GCM tag check.
        with self.assertRaises(AuthenticationError) as cm:
            kek.unwrap(wk.blob, other.header)
        self.assertOneLine(cm.exception)
        flipped = bytearray(wk.blob)
        flipped[-20] ^= 1
        with self.assertRaises(AuthenticationError):
            kek.unwrap(bytes(flipped), wk.header)

    def test_blob_sizes(self):
        kek = self.new_kek()
        with self.assertRaises(TruncatedDataError):
            kek.unwrap(b'\x10' + os.urandom(20), b'h')
        with self.assertRaises(AuthenticationError):   # IV length 40
            kek.unwrap(b'\x28' + os.urandom(100), b'h')
        with self.assertRaises(AuthenticationError):   # one byte too many
            kek.unwrap(b'\x0c' + os.urandom(12 + 32 + 16 + 1), b'h')

    def test_fetch_key_mode_reads_the_same_blobs(self):
        from zodbkmi.sources.kmip import KmipFetchedKeyEncryptingKey
        kek = self.new_kek()
        fetched = KmipFetchedKeyEncryptingKey(self.client(), kek.uid)
        self.assertEqual(fetched.key_id, kek.key_id)
        dek = os.urandom(32)
        by_server = wrapped.wrap(kek, os.urandom(16), dek)
        by_process = wrapped.wrap(fetched, os.urandom(16), dek)
        self.assertEqual(wrapped.unwrap(fetched, by_server)[1], dek)
        self.assertEqual(wrapped.unwrap(kek, by_process)[1], dek)
        wk = wrapped.parse(by_process)
        with self.assertRaises(AuthenticationError):
            fetched.unwrap(wk.blob, wk.header[:-1] + b'X')

    def test_settings_uid_name_and_fetch_key(self):
        from zodbkmi.sources import kek_from_params
        from zodbkmi.sources.kmip import KmipFetchedKeyEncryptingKey
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        kek = self.new_kek('settings-kek')
        by_uid = kek_from_params(self.kmip.params(uid=kek.uid))
        self.addCleanup(by_uid.close)
        by_name = kek_from_params(self.kmip.params(name='settings-kek'))
        self.addCleanup(by_name.close)
        self.assertIs(type(by_uid), KmipKeyEncryptingKey)
        self.assertEqual(by_name.key_id, kek.key_id)
        fetched = kek_from_params(self.kmip.params(uid=kek.uid,
                                                   fetchKey=True))
        self.addCleanup(fetched.close)
        self.assertIsInstance(fetched, KmipFetchedKeyEncryptingKey)
        data = wrapped.wrap(by_name, os.urandom(16), b'k' * 32)
        self.assertEqual(wrapped.unwrap(fetched, data)[1], b'k' * 32)

    def test_name_not_found_or_ambiguous(self):
        from zodbkmi.sources import kek_from_params
        with self.assertRaisesRegex(KmipError, "no objects are named "
                                    "'nothing-here'"):
            kek_from_params(self.kmip.params(name='nothing-here'))
        self.new_kek('twice')
        self.new_kek('twice')
        with self.assertRaisesRegex(KmipError, "2 objects are named"):
            kek_from_params(self.kmip.params(name='twice'))

    def test_pool_is_bounded_and_shared_by_threads(self):
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        client = self.client(pool_size=2)
        kek = KmipKeyEncryptingKey(client, self.new_kek().uid)
        data = [wrapped.wrap(kek, os.urandom(16), os.urandom(32))
                for _ in range(4)]
        errors = []

        def work():
            try:
                for d in data:
                    wrapped.unwrap(kek, d)
            except Exception as e:   # pragma: no cover
                errors.append(e)
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        self.assertLessEqual(len(client._idle), 2)

    def test_reconnects_when_a_pooled_connection_is_closed(self):
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        client = self.client()
        kek = KmipKeyEncryptingKey(client, self.new_kek().uid)
        data = wrapped.wrap(kek, os.urandom(16), b'r' * 32)
        self.assertEqual(len(client._idle), 1)
        # What a server does to an idle connection (PyKMIP after 10 s).
        client._idle[0].shutdown(socket.SHUT_RDWR)
        self.assertEqual(wrapped.unwrap(kek, data)[1], b'r' * 32)


class LifecycleTests(_Base):

    def test_rotation_keeps_the_previous_key_for_unwrapping(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.sources import SettingsKeyHolder
        from zodbkmi.sources.kmip import revoke_kek
        from zodbkmi.sources.kmip import rotate_kek
        old = self.new_kek()
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        facility.create_key(old)
        data = facility.encrypt(old, b'written under the old KEK')
        new = rotate_kek(old)
        self.assertNotEqual(new.key_id, old.key_id)
        holder = SettingsKeyHolder({
            'params': self.kmip.params(uid=new.uid),
            'previous': [self.kmip.params(uid=old.uid)]})
        self.assertEqual([k.key_id for k in holder.keys],
                         [new.key_id, old.key_id])
        facility.clear_cache()
        self.assertEqual(facility.decrypt(holder.keys, data),
                         b'written under the old KEK')
        # Rewrap every DEK to the new KEK, then retire the old one.
        self.assertEqual(facility.rewrap(old, new), 1)
        revoke_kek(old.client, old.uid)
        facility.clear_cache()
        self.assertEqual(facility.decrypt(new, data),
                         b'written under the old KEK')
        for kek in holder.keys:
            kek.close()
        with self.assertRaisesRegex(KmipError, 'Permission Denied'):
            facility.create_key(old)

    def test_destroy_shreds(self):
        from zodbkmi.sources.kmip import destroy_kek
        kek = self.new_kek()
        data = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        destroy_kek(kek.client, kek.uid)   # Active: revoked, then destroyed
        with self.assertRaises(KmipError) as cm:
            wrapped.unwrap(kek, data)
        self.assertOneLine(cm.exception)
        self.assertEqual(cm.exception.reason.name, 'ITEM_NOT_FOUND')
        from zodbkmi.sources import kek_from_params
        with self.assertRaisesRegex(KmipError, 'key %s.*Not Found'
                                    % kek.uid):
            kek_from_params(self.kmip.params(uid=kek.uid))


class BadInputTests(_Base):
    """Each failure is a KmipError (a KeySourceError) of one line naming
    the server and the key, within the timeout."""

    def test_server_down(self):
        from zodbkmi.sources import kek_from_params
        params = self.kmip.params(uid='1', port=free_port(), timeout=2.0)
        with self.assertRaisesRegex(KeySourceError, r'kmip://127\.0\.0\.1:'
                                    r'\d+: cannot connect') as cm:
            kek_from_params(params)
        self.assertIsInstance(cm.exception, KmipError)
        self.assertOneLine(cm.exception)

    def test_server_not_answering(self):
        from zodbkmi.sources.kmip import KmipClient
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)   # accepts the TCP connection, never speaks TLS
        client = KmipClient('127.0.0.1', listener.getsockname()[1],
                            self.kmip.cert_file, self.kmip.key_file,
                            self.kmip.ca_file, timeout=0.5)
        self.addCleanup(client.close)
        with self.assertRaisesRegex(KmipError, 'timed out after 0.5s') as cm:
            client.attributes('1')
        self.assertOneLine(cm.exception)

    def test_certificate_of_another_ca(self):
        kek = self.new_kek()
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        with self.assertRaisesRegex(KmipError, 'TLS handshake failed') as cm:
            KmipKeyEncryptingKey(self.client(self.kmip.rogue), kek.uid)
        self.assertOneLine(cm.exception, self.kmip.rogue[1])

    def test_server_certificate_of_another_ca(self):
        from zodbkmi.sources.kmip import KmipClient
        client = KmipClient('127.0.0.1', self.kmip.port, self.kmip.cert_file,
                            self.kmip.key_file,
                            os.path.join(self.kmip.dir, 'server.pem'))
        with self.assertRaisesRegex(KmipError, 'TLS handshake failed.*'
                                    'CERTIFICATE_VERIFY_FAILED'):
            client.attributes('1')

    def test_another_identity_is_refused(self):
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        kek = self.new_kek()
        data = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        intruder = KmipKeyEncryptingKey(self.client(self.kmip.intruder),
                                        kek.uid, check=False)
        with self.assertRaisesRegex(KmipError, 'Decrypt of key %s refused: '
                                    'Permission Denied' % kek.uid) as cm:
            wrapped.unwrap(intruder, data)
        self.assertOneLine(cm.exception)

    def test_unknown_key(self):
        from zodbkmi.sources import kek_from_params
        with self.assertRaisesRegex(KmipError, r'kmip://127\.0\.0\.1:\d+: '
                                    'Get Attributes of key 99999 refused: '
                                    'Item Not Found') as cm:
            kek_from_params(self.kmip.params(uid='99999'))
        self.assertEqual(cm.exception.reason.name, 'ITEM_NOT_FOUND')
        self.assertOneLine(cm.exception)

    def test_pre_active_key(self):
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        client = self.client()
        uid = client.create_key(activate=False)
        with self.assertRaisesRegex(KmipError, 'key %s: the key is '
                                    'Pre Active' % uid):
            KmipKeyEncryptingKey(client, uid)
        unchecked = KmipKeyEncryptingKey(client, uid, check=False)
        with self.assertRaisesRegex(KmipError, 'Encrypt of key %s refused: '
                                    'Permission Denied' % uid):
            unchecked.wrap(os.urandom(32), b'h')

    def test_revoked_key(self):
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        from zodbkmi.sources.kmip import revoke_kek
        kek = self.new_kek()
        data = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        revoke_kek(kek.client, kek.uid, compromised=True)
        # Accepted (a server may still decrypt with it); PyKMIP refuses.
        kek = KmipKeyEncryptingKey(kek.client, kek.uid)
        with self.assertRaisesRegex(KmipError, 'Decrypt of key %s refused: '
                                    'Permission Denied' % kek.uid) as cm:
            wrapped.unwrap(kek, data)
        self.assertOneLine(cm.exception)
        with self.assertRaisesRegex(KmipError, 'Permission Denied'):
            wrapped.wrap(kek, os.urandom(16), os.urandom(32))

    def test_wrong_algorithm(self):
        from zodbkmi.sources.kmip import KmipKeyEncryptingKey
        client = self.client()
        for algorithm, length, shown in (('AES', 128, 'Aes key of 128'),
                                         ('TRIPLE_DES', 192,
                                          'Triple Des key of 192')):
            uid = create_raw_key(client, algorithm, length)
            with self.assertRaisesRegex(KmipError, 'key %s: a %s bits, not '
                                        'AES-256' % (uid, shown)) as cm:
                KmipKeyEncryptingKey(client, uid)
            self.assertOneLine(cm.exception)

    def test_uid_unusable_in_a_key_id(self):
        from zodbkmi.sources.kmip import kmip_key_id
        with self.assertRaisesRegex(KeySourceError, 'not usable in a KEK'):
            kmip_key_id('a/b')

    def test_bad_files(self):
        from zodbkmi.sources.kmip import KmipClient
        with self.assertRaisesRegex(KmipError, 'cannot load the CA file'):
            KmipClient('127.0.0.1', 1, self.kmip.cert_file,
                       self.kmip.key_file, os.path.join(self.tmp, 'none'))
        loose = os.path.join(self.tmp, 'client.key')
        shutil.copy(self.kmip.key_file, loose)
        os.chmod(loose, 0o644)
        with self.assertRaisesRegex(KeySourceError, 'accessible by group'):
            KmipClient('127.0.0.1', 1, self.kmip.cert_file, loose,
                       self.kmip.ca_file)
        with self.assertRaisesRegex(KmipError, 'cannot load the client '
                                    'certificate') as cm:
            KmipClient('127.0.0.1', 1, self.kmip.ca_file,
                       self.kmip.key_file, self.kmip.ca_file)
        self.assertOneLine(cm.exception)


class SettingsTests(unittest.TestCase):

    def test_checks(self):
        from zodbkmi.sources.settings import parse_params
        base = {'source': 'kmip', 'host': 'kmip.example', 'certFile': 'c',
                'keyFile': 'k', 'caFile': 'ca'}
        self.assertEqual(parse_params(dict(base, uid='7'))['port'], 5696)
        for extra, message in (
                ({}, 'exactly one of uid, name'),
                ({'uid': '1', 'name': 'n'}, 'exactly one of uid, name'),
                ({'uid': '1', 'port': 0}, 'port: must be between'),
                ({'uid': '1', 'poolSize': 100}, 'poolSize: must be'),
                ({'uid': '1', 'fetchKey': 'yes'}, 'fetchKey: must be true'),
                ({'uid': '1', 'password': 'x'}, 'unknown setting')):
            with self.assertRaisesRegex(SettingsError, message):
                parse_params(dict(base, **extra))


class VectorTests(unittest.TestCase):
    """tests/vectors/wrapped-suite-6.json (docs/format.rst)."""

    def setUp(self):
        import json
        from zodbkmi.sources.kmip import KmipFetchedKeyEncryptingKey
        path = os.path.join(os.path.dirname(__file__), 'vectors',
                            'wrapped-suite-6.json')
        with open(path) as f:
            self.doc = json.load(f)
        self.kek = KmipFetchedKeyEncryptingKey._from_key(
            bytes.fromhex(self.doc['key']), '1')

    def test_valid(self):
        for v in self.doc['valid']:
            data = bytes.fromhex(v['wrapped'])
            self.assertEqual(wrapped.unwrap(self.kek, data),
                             (bytes.fromhex(v['dek_id']),
                              bytes.fromhex(v['dek'])))
            wk = wrapped.parse(data)
            self.assertEqual((wk.suite, wk.kek_id), (6, v['kek_id']))
            self.assertEqual(self.kek.wrap(bytes.fromhex(v['dek']),
                                           wk.header,
                                           _iv=bytes.fromhex(v['iv'])),
                             wk.blob)

    def test_generator_reproduces_and_keeps_the_released_file(self):
        import contextlib
        import importlib.util
        import io
        vectors = os.path.join(os.path.dirname(__file__), 'vectors')
        spec = importlib.util.spec_from_file_location(
            'zodbkmi_generate_wrapped_suite_6',
            os.path.join(vectors, 'generate_wrapped_suite_6.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tmp = tempfile.mkdtemp(prefix='zodbkmi-vectors-')
        self.addCleanup(shutil.rmtree, tmp, True)
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(module.main(['--out', tmp]), 0)
            self.assertEqual(module.main(['--out', tmp]), 1)   # kept
        with open(os.path.join(tmp, module.NAME)) as f:
            fresh = f.read()
        with open(os.path.join(vectors, module.NAME)) as f:
            self.assertEqual(fresh, f.read())

    def test_invalid(self):
        import zodbkmi.exceptions
        for v in self.doc['invalid']:
            error = getattr(zodbkmi.exceptions, v['error'])
            with self.assertRaises(error, msg=v['name']) as cm:
                wrapped.unwrap(self.kek, bytes.fromhex(v['wrapped']))
            self.assertIs(type(cm.exception), error, v['name'])


class StorageTests(_Base):
    """A FileStorage database encrypted with a KEK in the KMIP server."""

    def test_encrypting_storage(self):
        import transaction
        import ZODB
        from ZODB.FileStorage import FileStorage
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.sources import SettingsKeyHolder
        from zodbkmi.storage import EncryptingStorage
        kek = self.new_kek('storage-kek')
        holder = SettingsKeyHolder({'params': self.kmip.params(
            name='storage-kek')})
        self.addCleanup(holder.key.close)
        path = os.path.join(self.tmp, 'Data.fs')
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        facility.create_key(holder.key)

        def open_db():
            return ZODB.DB(EncryptingStorage(FileStorage(path), facility,
                                             holder.key))
        db = open_db()
        with db.transaction() as conn:
            conn.root()['secret'] = 'kept in the KMIP server'
        db.close()
        with open(path, 'rb') as f:
            self.assertNotIn(b'kept in the KMIP server', f.read())
        facility.clear_cache()
        db = open_db()
        with db.transaction() as conn:
            self.assertEqual(conn.root()['secret'], 'kept in the KMIP server')
        db.close()
        transaction.abort()
        self.assertEqual(kek.key_id, holder.key.key_id)


class ConfigurationTests(_Base):
    """ZConfig's ``key-settings`` and ZCML's ``keyHolder`` take ``kmip``
    settings like any source."""

    def write_settings(self, name):
        import json
        self.new_kek(name)
        path = os.path.join(self.tmp, 'encryption.json')
        with open(path, 'w') as f:
            json.dump({'params': self.kmip.params(name=name)}, f)
        return path

    def test_zconfig_key_settings(self):
        import ZODB.config
        from tests.test_config import SECRET
        settings = self.write_settings('zconfig-kek')
        config = ('%%import zodbkmi\n<zodb>\n<encryptingstorage>\n'
                  'key-settings %s\nkey-dir %s/keys\n<filestorage>\n'
                  'path %s/Data.fs\n</filestorage>\n</encryptingstorage>\n'
                  '</zodb>\n' % (settings, self.tmp, self.tmp))
        for _ in range(2):
            db = ZODB.config.databaseFromString(config)
            with db.transaction() as conn:
                conn.root().setdefault('secret', SECRET)
                self.assertEqual(conn.root()['secret'], SECRET)
            db.close()
        with open(os.path.join(self.tmp, 'Data.fs'), 'rb') as f:
            self.assertNotIn(SECRET.encode(), f.read())

    def test_zcml_key_holder(self):
        import zope.component
        import zope.component.testing
        from zope.configuration import xmlconfig
        from zodbkmi.interfaces import IKeyHolder
        zope.component.testing.setUp(self)
        self.addCleanup(zope.component.testing.tearDown, self)
        settings = self.write_settings('zcml-kek')
        from tests.test_zcml import HEAD
        from tests.test_zcml import TAIL
        xmlconfig.string(HEAD + '<kmi:keyHolder settings="%s" />' % settings
                         + TAIL)
        holder = zope.component.getUtility(IKeyHolder)
        self.addCleanup(holder.key.close)
        self.assertTrue(holder.key.key_id.startswith('kmip:'))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
