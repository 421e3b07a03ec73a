"""Tests of zodbkmi.sources.vault against a real OpenBao dev server."""
import base64
import os
import shutil
import socket
import tempfile
import unittest

from zope.interface.verify import verifyObject

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.format import wrapped
from tests.bao import ROOT_TOKEN
from tests.bao import BaoServer
from tests.bao import BaoTestCase
from tests.bao import free_port


def b64(key):
    return base64.b64encode(key).decode()


class _Base(BaoTestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.path = 'zodbkmi/%s' % self.id().rsplit('.', 1)[-1]

    def client(self, token=ROOT_TOKEN, **kw):
        from zodbkmi.sources.vault import VaultClient
        c = VaultClient(self.bao.url, token, self.bao.ca_file, **kw)
        self.addCleanup(c.close)
        return c

    def params(self, source, **kw):
        p = {'source': source, 'url': self.bao.url, 'token': ROOT_TOKEN,
             'caFile': self.bao.ca_file}
        p.update(kw)
        return p

    def put_secret(self, data, path=None):
        r = self.bao.api('POST', 'secret/data/' + (path or self.path),
                         {'data': data})
        return r['data']['version']

    def transit_key(self, name=None, derived=True):
        name = name or self.id().rsplit('.', 1)[-1].replace('_', '-')
        self.bao.api('POST', 'transit/keys/' + name, {'derived': derived})
        return name


class VaultKVTests(_Base):

    def _callFUT(self, params, environ=None):
        from zodbkmi.sources import kek_from_params
        return kek_from_params(params, environ=environ)

    def test_latest_version(self):
        k1, k2 = os.urandom(32), os.urandom(32)
        self.put_secret({'key': b64(k1), 'algorithm': 'aes256-gcm'})
        self.put_secret({'key': b64(k2), 'algorithm': 'aes256-gcm'})
        kek = self._callFUT(self.params('vaultKV', path=self.path))
        self.assertEqual(kek.key_id, 'vaultkv:secret:%s:v2'
                         % self.path.replace('/', ':'))
        self.assertEqual(kek.version, 2)
        from zodbkmi.sources.local import key_check_value
        self.assertEqual(kek.check_value, key_check_value(k2))

    def test_pinned_version_is_previous_key(self):
        k1, k2 = os.urandom(32), os.urandom(32)
        self.put_secret({'key': b64(k1), 'algorithm': 'aes256-gcm'})
        self.put_secret({'key': b64(k2), 'algorithm': 'aes256-gcm'})
        kek = self._callFUT(self.params('vaultKV', path=self.path, version=1))
        self.assertEqual(kek.key_id, 'vaultkv:secret:%s:v1'
                         % self.path.replace('/', ':'))
        from zodbkmi.kek import AESKeyEncryptingKey
        blob = AESKeyEncryptingKey(k1).wrap(b'x' * 32, b'h')
        self.assertEqual(kek.unwrap(blob, b'h'), b'x' * 32)

    def test_verifyObject(self):
        from zodbkmi.interfaces import IKeyEncryptingKey
        self.put_secret({'key': b64(os.urandom(32))})
        verifyObject(IKeyEncryptingKey,
                     self._callFUT(self.params('vaultKV', path=self.path)))

    def test_token_from_file_and_env(self):
        self.put_secret({'key': b64(os.urandom(32))})
        path = os.path.join(self.tmp, 'token')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, ROOT_TOKEN.encode() + b'\n')
        os.close(fd)
        p = self.params('vaultKV', path=self.path)
        del p['token']
        self.assertEqual(self._callFUT(dict(p, tokenFile=path)).version, 1)
        self.assertEqual(self._callFUT(dict(p, tokenEnv='T'),
                                       {'T': ROOT_TOKEN}).version, 1)
        with self.assertRaisesRegex(KeySourceError, 'variable T is not set'):
            self._callFUT(dict(p, tokenEnv='T'), {})
        os.chmod(path, 0o640)
        with self.assertRaisesRegex(KeySourceError, 'token file .* group'):
            self._callFUT(dict(p, tokenFile=path))

    def test_w_missing_path_404(self):
        with self.assertRaises(KeySourceError) as cm:
            self._callFUT(self.params('vaultKV', path='no/such/secret'))
        self.assertIn('/v1/secret/data/no/such/secret: HTTP 404, not found',
                      str(cm.exception))

    def test_w_missing_version(self):
        self.put_secret({'key': b64(os.urandom(32))})
        with self.assertRaisesRegex(KeySourceError, 'version 5 not found'):
            self._callFUT(self.params('vaultKV', path=self.path, version=5))

    def test_w_deleted_version(self):
        self.put_secret({'key': b64(os.urandom(32))})
        self.bao.api('POST', 'secret/delete/' + self.path, {'versions': [1]})
        with self.assertRaisesRegex(KeySourceError, 'deleted or destroyed'):
            self._callFUT(self.params('vaultKV', path=self.path))

    def test_w_bad_token_403_never_shows_token(self):
        self.put_secret({'key': b64(os.urandom(32))})
        with self.assertRaises(KeySourceError) as cm:
            self._callFUT(self.params('vaultKV', path=self.path,
                                      token='s.sekrit-token'))
        self.assertIn('HTTP 403, permission denied', str(cm.exception))
        self.assertNotIn('sekrit', str(cm.exception))

    def test_w_bad_base64(self):
        self.put_secret({'key': 'not base64', 'algorithm': 'aes256-gcm'})
        with self.assertRaisesRegex(InvalidKeyError, 'not base64'):
            self._callFUT(self.params('vaultKV', path=self.path))

    def test_w_wrong_length(self):
        self.put_secret({'key': b64(os.urandom(16))})
        with self.assertRaisesRegex(InvalidKeyError, 'not 16'):
            self._callFUT(self.params('vaultKV', path=self.path))

    def test_w_wrong_algorithm(self):
        self.put_secret({'key': b64(os.urandom(32)), 'algorithm': 'aes128'})
        with self.assertRaisesRegex(InvalidKeyError, "algorithm 'aes128'"):
            self._callFUT(self.params('vaultKV', path=self.path))

    def test_w_no_key_field(self):
        self.put_secret({'kee': b64(os.urandom(32))})
        with self.assertRaisesRegex(InvalidKeyError, 'no "key" field'):
            self._callFUT(self.params('vaultKV', path=self.path))

    def test_w_wrong_check_value(self):
        self.put_secret({'key': b64(os.urandom(32))})
        with self.assertRaisesRegex(InvalidKeyError, 'key check value'):
            self._callFUT(self.params('vaultKV', path=self.path,
                                      checkValue='0' * 32))

    def test_w_wrong_ca(self):
        other = os.path.join(self.tmp, 'ca.pem')
        import ssl
        shutil.copy(ssl.get_default_verify_paths().cafile
                    or '/etc/ssl/certs/ca-certificates.crt', other)
        with self.assertRaisesRegex(KeySourceError,
                                    'TLS certificate not verified'):
            self._callFUT(self.params('vaultKV', path=self.path,
                                      caFile=other))

    def test_write_kv_key(self):
        from zodbkmi.sources.vault import read_kv_key
        from zodbkmi.sources.vault import write_kv_key
        key = os.urandom(32)
        client = self.client()
        self.assertEqual(write_kv_key(client, 'secret', self.path, key), 1)
        self.assertEqual(read_kv_key(client, 'secret', self.path).check_value,
                         __import__('zodbkmi.sources.local', fromlist=['x'])
                         .key_check_value(key))


class VaultDownTests(_Base):

    def test_closed_port(self):
        from zodbkmi.sources import kek_from_params
        port = free_port()   # nothing listens there
        with self.assertRaises(KeySourceError) as cm:
            kek_from_params(self.params('vaultKV', path='x', timeout=1,
                                        url='https://127.0.0.1:%d' % port))
        self.assertIn('cannot connect (server down or unreachable)',
                      str(cm.exception))
        self.assertIn('127.0.0.1:%d' % port, cm.exception.source)

    def test_no_answer_times_out(self):
        from zodbkmi.sources import kek_from_params
        # A socket that accepts connections (in the kernel backlog) and
        # never answers: a hung server.
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(('127.0.0.1', 0))
        s.listen(8)
        url = 'https://127.0.0.1:%d' % s.getsockname()[1]
        with self.assertRaisesRegex(KeySourceError,
                                    'no answer within 0.3s'):
            kek_from_params(self.params('vaultTransit', keyName='k',
                                        timeout=0.3, url=url))


class TransitTests(_Base):

    def _getTargetClass(self):
        from zodbkmi.sources.vault import TransitKeyEncryptingKey
        return TransitKeyEncryptingKey

    def _makeOne(self, name=None, **kw):
        return self._getTargetClass()(self.client(), name or
                                      self.transit_key(), **kw)

    def test_verifyObject(self):
        from zodbkmi.interfaces import IKeyEncryptingKey
        verifyObject(IKeyEncryptingKey, self._makeOne())

    def test_wrap_unwrap(self):
        kek = self._makeOne()
        self.assertEqual(kek.suite, wrapped.SUITE_VAULT_TRANSIT)
        dek, dek_id = os.urandom(32), os.urandom(16)
        data = wrapped.wrap(kek, dek_id, dek)
        wk = wrapped.parse(data)
        self.assertEqual(wk.kek_id, kek.key_id)
        self.assertTrue(wk.blob.startswith(b'vault:v1:'))
        self.assertNotIn(b64(dek).encode(), data)
        self.assertEqual(wrapped.unwrap(kek, data), (dek_id, dek))

    def test_from_settings(self):
        from zodbkmi.sources import kek_from_params
        name = self.transit_key()
        kek = kek_from_params(self.params('vaultTransit', keyName=name))
        self.assertEqual(kek.key_id, 'transit:transit:%s' % name)
        self.assertEqual(repr(kek), '<TransitKeyEncryptingKey %s>'
                         % kek.key_id)

    def test_header_is_bound(self):
        kek = self._makeOne()
        data = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        wk = wrapped.parse(data)
        other = wrapped.build_header(kek.suite, os.urandom(16), kek.key_id)
        with self.assertRaisesRegex(AuthenticationError,
                                    'did not authenticate under KEK '
                                    'transit:'):
            kek.unwrap(wk.blob, other)

    def test_unwrap_w_garbage(self):
        kek = self._makeOne()
        for blob in (b'\xff\xfe', b'vault:v1:', b'vault:vX:abc', b'plain'):
            with self.assertRaises(AuthenticationError):
                kek.unwrap(blob, b'h')

    def test_unwrap_w_tampered_ciphertext(self):
        kek = self._makeOne()
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        raw = bytearray(base64.b64decode(wk.blob[9:]))
        raw[-1] ^= 1
        blob = b'vault:v1:' + base64.b64encode(bytes(raw))
        with self.assertRaises(AuthenticationError):
            kek.unwrap(blob, wk.header)

    def test_wrong_key_name(self):
        with self.assertRaises(KeySourceError) as cm:
            self._makeOne('no-such-key')
        self.assertIn('/v1/transit/keys/no-such-key: no such Transit key',
                      str(cm.exception))

    def test_wrong_key_name_at_unwrap(self):
        kek = self._makeOne()
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        ghost = self._makeOne('ghost', check=False)
        with self.assertRaisesRegex(KeySourceError, 'no such Transit key'):
            ghost.unwrap(wk.blob, wk.header)

    def test_key_name_w_slash_refused(self):
        with self.assertRaisesRegex(KeySourceError, 'invalid Transit key '
                                    'name'):
            self._makeOne('a/b', check=False)

    def test_nested_mount_in_key_id(self):
        from zodbkmi.sources.vault import transit_key_id
        self.assertEqual(transit_key_id('kms/apps', 'zodb'),
                         'transit:kms:apps:zodb')

    def test_not_derived_refused(self):
        name = self.transit_key(derived=False)
        with self.assertRaisesRegex(KeySourceError, 'derived=true'):
            self._makeOne(name)

    def test_bad_token(self):
        name = self.transit_key()
        from zodbkmi.sources.vault import TransitKeyEncryptingKey
        with self.assertRaisesRegex(KeySourceError, 'HTTP 403'):
            TransitKeyEncryptingKey(self.client('bad-token'), name)

    def test_rotate_and_server_side_rewrap(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.sources.vault import key_version
        from zodbkmi.sources.vault import transit_rewrap
        kek = self._makeOne()
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        dek_id = facility.create_key(kek)
        data = facility.encrypt(kek, b'payload')
        self.assertEqual(key_version(facility[dek_id]), 1)
        self.assertEqual(kek.rotate(), 2)
        self.assertEqual(transit_rewrap(facility, kek), 1)
        self.assertEqual(key_version(facility[dek_id]), 2)
        self.assertEqual(transit_rewrap(facility, kek), 0)   # idempotent
        facility.clear_cache()
        self.assertEqual(facility.decrypt(kek, data), b'payload')
        # New DEKs are wrapped by the latest version.
        self.assertEqual(key_version(facility[facility.rotate(kek)]), 2)

    def test_transit_rewrap_needs_transit_kek(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.sources.vault import transit_rewrap
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        with self.assertRaisesRegex(InvalidKeyError, 'needs a Transit KEK'):
            transit_rewrap(facility, os.urandom(32))

    def test_min_decryption_version(self):
        kek = self._makeOne()
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        kek.rotate()
        self.bao.api('POST', 'transit/keys/%s/config' % kek.name,
                     {'min_decryption_version': 2})
        with self.assertRaisesRegex(KeySourceError, 'min_decryption_version'):
            kek.unwrap(wk.blob, wk.header)

    def test_facility_rewrap_from_master_key_to_transit(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        master = AESKeyEncryptingKey.generate()
        facility.create_key(master)
        data = facility.encrypt(master, b'moved')
        kek = self._makeOne()
        self.assertEqual(facility.rewrap(master, kek), 1)
        facility.clear_cache()
        self.assertEqual(facility.decrypt(kek, data), b'moved')


class SealedVaultTests(BaoTestCase):
    """A server of its own, sealed: everything fails with 'sealed'."""

    def setUp(self):
        super().setUp()
        self.server = BaoServer().start()
        self.addCleanup(self.server.stop)
        self.server.api('POST', 'sys/mounts/transit', {'type': 'transit'})
        self.server.api('POST', 'transit/keys/k', {'derived': True})
        self.server.api('POST', 'secret/data/kek',
                        {'data': {'key': b64(os.urandom(32))}})

    def test_sealed(self):
        from zodbkmi.sources import kek_from_params
        from zodbkmi.sources.vault import TransitKeyEncryptingKey
        from zodbkmi.sources.vault import VaultClient
        client = VaultClient(self.server.url, ROOT_TOKEN,
                             self.server.ca_file)
        self.addCleanup(client.close)
        kek = TransitKeyEncryptingKey(client, 'k')
        wk = wrapped.parse(wrapped.wrap(kek, os.urandom(16), os.urandom(32)))
        self.server.seal()
        with self.assertRaisesRegex(KeySourceError, 'HTTP 503, Vault is '
                                    'sealed'):
            kek.unwrap(wk.blob, wk.header)
        with self.assertRaisesRegex(KeySourceError, 'HTTP 503, Vault is '
                                    'sealed'):
            kek_from_params({'source': 'vaultKV', 'url': self.server.url,
                             'token': ROOT_TOKEN, 'path': 'kek',
                             'caFile': self.server.ca_file})


class Suite3ContextTests(_Base):
    """What zodbkmi sends to Transit: the base64 header as the context."""

    def test_context_is_the_base64_header(self):
        from zodbkmi.sources.vault import TransitKeyEncryptingKey
        name = self.transit_key()
        kek = TransitKeyEncryptingKey(self.client(), name)
        dek = os.urandom(32)
        data = wrapped.wrap(kek, os.urandom(16), dek)
        wk = wrapped.parse(data)
        answer = self.bao.api('POST', 'transit/decrypt/' + name, {
            'ciphertext': wk.blob.decode(),
            'context': base64.b64encode(wk.header).decode()})
        self.assertEqual(base64.b64decode(answer['data']['plaintext']), dek)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
