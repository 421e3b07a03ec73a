"""Tests of zodbkmi.keyholder."""
import base64
import os
import shutil
import tempfile
import unittest

from zodbkmi import exceptions

AES_KEY = bytes(range(150, 182))


def rsa_pem():
    from tests.test_format_vectors import load
    return load('wrapped.json')['keys']['rsa']['private_pem'].encode()


class KeyFileTestCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-keyholder-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _file(self, content, mode=0o600, name='kek'):
        path = os.path.join(self.tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(content)
        os.chmod(path, mode)
        return path


class ReadKeyFileTests(KeyFileTestCase):

    def _callFUT(self, path):
        from zodbkmi.keyholder import read_key_file
        return read_key_file(path)

    def test_pem(self):
        self.assertEqual(self._callFUT(self._file(rsa_pem())), rsa_pem())

    def test_base64(self):
        path = self._file(base64.b64encode(AES_KEY) + b'\n')
        self.assertEqual(self._callFUT(path), AES_KEY)

    def test_refuses_group_or_other_access(self):
        for mode in (0o640, 0o604, 0o660, 0o644, 0o620, 0o601, 0o610):
            path = self._file(base64.b64encode(AES_KEY), mode,
                              'kek-%o' % mode)
            with self.assertRaises(exceptions.KeyStoreError) as cm:
                self._callFUT(path)
            message = str(cm.exception)
            self.assertIn(path, message)
            self.assertIn('%04o' % mode, message)
            self.assertIn('chmod 600', message)

    def test_accepts_0400(self):
        path = self._file(base64.b64encode(AES_KEY), 0o400)
        self.assertEqual(self._callFUT(path), AES_KEY)

    def test_missing_file(self):
        path = os.path.join(self.tmp, 'missing')
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            self._callFUT(path)
        self.assertIn(path, str(cm.exception))

    def test_not_a_key(self):
        for content in (b'', b'not a key', base64.b64encode(AES_KEY[:16]),
                        b'-----BEGIN PRIVATE KEY-----\nAAAA\n'
                        b'-----END PRIVATE KEY-----\n'):
            path = self._file(content, name=os.urandom(4).hex())
            with self.assertRaises(exceptions.InvalidKeyError):
                self._callFUT(path)

    def test_errors_show_no_key(self):
        key = b'\x07' * 31
        path = self._file(base64.b64encode(key))
        with self.assertRaises(exceptions.InvalidKeyError) as cm:
            self._callFUT(path)
        self.assertNotIn(base64.b64encode(key).decode(), str(cm.exception))


class WriteKeyFileTests(KeyFileTestCase):

    def _callFUT(self, path, key):
        from zodbkmi.keyholder import write_key_file
        return write_key_file(path, key)

    def test_aes_as_one_base64_line(self):
        path = os.path.join(self.tmp, 'kek')
        old = os.umask(0)
        try:
            self._callFUT(path, AES_KEY)
        finally:
            os.umask(old)
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), base64.b64encode(AES_KEY) + b'\n')
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.tmp), ['kek'])

    def test_pem_as_is(self):
        path = os.path.join(self.tmp, 'kek.pem')
        self._callFUT(path, rsa_pem())
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), rsa_pem())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_roundtrip(self):
        from zodbkmi.keyholder import read_key_file
        for key in (AES_KEY, rsa_pem()):
            path = os.path.join(self.tmp, os.urandom(4).hex())
            self._callFUT(path, key)
            self.assertEqual(read_key_file(path), key)

    def test_invalid_key_writes_nothing(self):
        path = os.path.join(self.tmp, 'kek')
        for key in (b'k' * 31, b'-----BEGIN PRIVATE KEY-----\nAAAA\n'
                    b'-----END PRIVATE KEY-----\n', rsa_pem()[:200]):
            with self.assertRaises(exceptions.InvalidKeyError):
                self._callFUT(path, key)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_replaces_atomically(self):
        path = os.path.join(self.tmp, 'kek')
        self._callFUT(path, AES_KEY)
        self._callFUT(path, rsa_pem())
        self.assertEqual(os.listdir(self.tmp), ['kek'])
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), rsa_pem())


class KeyHolderTests(KeyFileTestCase):

    def _getTargetClass(self):
        from zodbkmi.keyholder import KeyHolder
        return KeyHolder

    def test_provides_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyHolder
        holder = self._getTargetClass()(self._file(rsa_pem()))
        self.assertTrue(verifyObject(IKeyHolder, holder))

    def test_pem(self):
        from zodbkmi.kek import as_kek
        path = self._file(rsa_pem())
        holder = self._getTargetClass()(path)
        self.assertEqual(holder.key, rsa_pem())
        self.assertEqual(holder.key_id, as_kek(rsa_pem()).key_id)
        self.assertEqual(holder.filename, path)
        self.assertEqual(holder.previous_keys, ())

    def test_base64_w_previous(self):
        from zodbkmi.kek import as_kek
        current = self._file(base64.b64encode(AES_KEY) + b'\n')
        previous = self._file(rsa_pem(), name='old.pem')
        holder = self._getTargetClass()(current, [previous])
        self.assertEqual(holder.key, AES_KEY)
        self.assertEqual(holder.key_id, as_kek(AES_KEY).key_id)
        self.assertEqual(holder.previous_keys, (rsa_pem(),))

    def test_refuses_readable_previous_key(self):
        current = self._file(base64.b64encode(AES_KEY))
        previous = self._file(rsa_pem(), 0o644, 'old.pem')
        with self.assertRaises(exceptions.KeyStoreError):
            self._getTargetClass()(current, [previous])

    def test_repr_shows_no_key(self):
        from zodbkmi.kek import as_kek
        for key, content in ((AES_KEY, base64.b64encode(AES_KEY)),
                             (rsa_pem(), rsa_pem())):
            path = self._file(content, name=os.urandom(4).hex())
            text = repr(self._getTargetClass()(path))
            self.assertEqual(text, '<KeyHolder %s (KEK %s)>'
                             % (path, as_kek(key).key_id))
            self.assertNotIn(base64.b64encode(AES_KEY).decode()[:12], text)
            self.assertNotIn(AES_KEY.hex()[:12], text)
            self.assertNotIn('PRIVATE', text)
