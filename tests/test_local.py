"""Tests of zodbkmi.facility.LocalKeyManagementFacility, wired in process
to a master facility (zodbkmi.testing.setupRestApi)."""
import os
import shutil
import socket
import tempfile
import unittest

from zodbkmi import exceptions


class CountingTransport:
    """Wraps a transport; records every request (and lets tests break
    it)."""

    def __init__(self, inner):
        self.inner = inner
        self.requests = []
        self.fail = None

    def close(self):
        pass

    def request(self, method, path, body=None, headers=None):
        self.requests.append((method, path, body, dict(headers or {})))
        if self.fail is not None:
            raise self.fail
        return self.inner.request(method, path, body, headers)


class LocalKeyManagementFacilityTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _getTargetClass(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        return LocalKeyManagementFacility

    def _makeOne(self, **kw):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.testing import setupRestApi
        self.master = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        local = self._getTargetClass()('https://127.0.0.1:1', **kw)
        setupRestApi(local, self.master)
        self.transport = CountingTransport(local._transport)
        local._transport = self.transport
        return local

    def test_verifyObject(self):
        from zope.interface.verify import verifyObject

        from zodbkmi.facility import EncryptionService
        from zodbkmi.interfaces import IExtendedKeyManagementFacility
        from zodbkmi.interfaces import IKeyGenerationService
        local = self._makeOne()
        self.assertTrue(IExtendedKeyManagementFacility.providedBy(local))
        self.assertTrue(verifyObject(IKeyGenerationService, local))
        if hasattr(EncryptionService, 'encrypt_file'):
            # the file methods come with the stream format
            self.assertTrue(verifyObject(IExtendedKeyManagementFacility,
                                         local))

    def test_generate_encrypt_decrypt_both_ways(self):
        local = self._makeOne()
        local.rsa_bits = 3072
        kek = local.generate(kind='rsa')
        self.assertTrue(kek.startswith(b'-----BEGIN PRIVATE KEY-----'))
        self.assertEqual(len(local), 1)
        self.assertEqual(len(self.master), 1)
        data = local.encrypt(kek, b'Stephan Richter')
        self.assertNotIn(b'Stephan', data)
        self.assertEqual(self.master.decrypt(kek, data), b'Stephan Richter')
        self.assertEqual(local.decrypt(kek, self.master.encrypt(kek, b'x')),
                         b'x')

    def test_kek_and_plaintext_dek_never_sent(self):
        import base64

        from zodbkmi.format import wrapped
        from zodbkmi.kek import as_kek
        local = self._makeOne()
        kek = os.urandom(32)
        dek_id = local.create_key(kek)
        local.decrypt(kek, local.encrypt(kek, b'data'))
        _, dek = wrapped.unwrap(as_kek(kek), self.master[dek_id])
        sent = b''.join((body or b'') + repr(headers).encode()
                        for _, _, body, headers in self.transport.requests)
        for secret in (kek, dek):
            self.assertNotIn(secret, sent)
            self.assertNotIn(base64.b64encode(secret), sent)
            self.assertNotIn(secret.hex().encode(), sent)

    def test_unwrapped_deks_are_cached(self):
        local = self._makeOne()
        kek = os.urandom(32)
        local.create_key(kek)
        data = local.encrypt(kek, b'data')
        n = len(self.transport.requests)
        for _ in range(5):
            local.encrypt(kek, b'data')
            local.decrypt(kek, data)
        self.assertEqual(len(self.transport.requests), n)
        local.clear_cache()
        local.decrypt(kek, data)
        self.assertEqual(len(self.transport.requests), n + 1)

    def test_default_ttl_and_bounded_cache(self):
        local = self._makeOne()
        self.assertEqual(local.timeout, 3600)
        self.assertGreater(local._cache.maxsize, 0)

    def test_error_response_never_cached(self):
        local = self._makeOne()
        kek = os.urandom(32)
        local.create_key(kek)
        data = self.master.encrypt(kek, b'data')
        token = local._token
        local._token = 'wrong'
        with self.assertRaises(exceptions.KeyServerError) as cm:
            local.decrypt(kek, data)
        self.assertEqual(cm.exception.status, 401)
        self.assertEqual(cm.exception.reason, 'invalid credentials')
        self.assertNotIn('wrong', str(cm.exception))
        local._token = token
        self.assertEqual(local.decrypt(kek, data), b'data')

    def test_decrypt_w_unknown_key(self):
        local = self._makeOne()
        kek = os.urandom(32)
        from zodbkmi.facility import KeyManagementFacility
        elsewhere = KeyManagementFacility(os.path.join(self.tmp, 'other'))
        elsewhere.create_key(kek)
        data = elsewhere.encrypt(kek, b'data')
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            local.decrypt(kek, data)
        self.assertEqual(cm.exception.key_id, elsewhere.keys()[0])

    def test_decrypt_w_wrong_kek(self):
        local = self._makeOne()
        kek = os.urandom(32)
        local.create_key(kek)
        data = local.encrypt(kek, b'data')
        local.clear_cache()
        with self.assertRaises(exceptions.WrongKeyError):
            local.decrypt(os.urandom(32), data)

    def test_encrypt_without_active_key(self):
        local = self._makeOne()
        with self.assertRaises(exceptions.UnknownKeyError):
            local.encrypt(os.urandom(32), b'data')

    def test_rotate_retire_delete(self):
        local = self._makeOne()
        kek = os.urandom(32)
        first = local.create_key(kek)
        old = local.encrypt(kek, b'old')
        second = local.rotate(kek)
        self.assertNotEqual(first, second)
        self.assertEqual(local.entry(first).state, 'retired')
        self.assertEqual(local.key_id_of(local.encrypt(kek, b'new')), second)
        self.assertEqual(local.decrypt(kek, old), b'old')
        self.assertEqual(local.ensure_key(kek), second)
        local.retire(second)
        self.assertEqual(self.master.entry(second).state, 'retired')
        third = local.ensure_key(kek)
        self.assertNotIn(third, (first, second))
        local.delete(first)
        self.assertNotIn(first, local)
        self.assertNotIn(first, self.master)
        with self.assertRaises(exceptions.UnknownKeyError):
            local.decrypt(kek, old)
        with self.assertRaises(exceptions.UnknownKeyError):
            local.delete(first)

    def test_mapping_api(self):
        local = self._makeOne()
        kek = os.urandom(32)
        dek_id = local.create_key(kek)
        self.assertEqual(local.keys(), [dek_id])
        self.assertEqual(list(local), [dek_id])
        self.assertIn(dek_id, local)
        self.assertEqual(local[dek_id], self.master[dek_id])
        self.assertIsNone(local.get('f' * 32))
        with self.assertRaises(KeyError):
            local['f' * 32]
        self.assertEqual(local.status(), {
            'keys': 1, 'message': 'KMS server holding 1 key'})
        with self.assertRaises(exceptions.UnknownKeyError):
            local.entry('../etc')

    def test_retries_with_backoff_then_clear_error(self):
        local = self._makeOne(retries=2, backoff=0.001)
        self.transport.fail = ConnectionRefusedError(111, 'refused')
        with self.assertRaises(exceptions.KeyServerError) as cm:
            local.encrypt(os.urandom(32), b'x')
        self.assertEqual(len(self.transport.requests), 3)
        self.assertIsNone(cm.exception.status)
        self.assertIn('cannot be reached (3 attempts)', str(cm.exception))

    def test_recovers_after_transient_error(self):
        local = self._makeOne(retries=2, backoff=0.001)
        kek = os.urandom(32)
        local.create_key(kek)
        inner = self.transport.request
        calls = []

        def flaky(*a):
            calls.append(a)
            if len(calls) == 1:
                raise ConnectionResetError(104, 'reset')
            return inner(*a)
        self.transport.request = flaky
        self.assertEqual(local.decrypt(kek, local.encrypt(kek, b'x')), b'x')
        self.assertEqual(len(calls), 3)


class UnreachableServerTests(unittest.TestCase):
    """A real HTTP transport against a closed loopback port."""

    def _getTargetClass(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        return LocalKeyManagementFacility

    def test_closed_port(self):
        s = socket.socket()
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
        s.close()   # nothing listens there now
        local = self._getTargetClass()('https://127.0.0.1:%d' % port,
                                       token='t', retries=1, backoff=0.001,
                                       request_timeout=2)
        with self.assertRaises(exceptions.KeyServerError) as cm:
            local.encrypt(os.urandom(32), b'data')
        self.assertIn('cannot be reached', str(cm.exception))

    def test_bad_url(self):
        with self.assertRaises(ValueError):
            self._getTargetClass()('ftp://127.0.0.1/')


class SetupRestApiTests(unittest.TestCase):

    def test_setupRestApi_returns_wsgi_app(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.rest import KeyServerApp
        from zodbkmi.testing import setupRestApi
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        from zodbkmi.facility import LocalKeyManagementFacility
        local = LocalKeyManagementFacility('https://localhost')
        app = setupRestApi(local, KeyManagementFacility(tmp))
        self.assertIsInstance(app, KeyServerApp)
        self.assertEqual(local.status()['keys'], 0)
