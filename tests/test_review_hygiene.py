"""Attack tests of the review of issue 16, findings 7, 8, 10 and 12.

Each test performs the attack (or the misuse) through the public API, the
command line or the files on disk, and shows that it now fails with the
documented exception, or (finding 12) that the documented behaviour holds.

7.  Lossy text keys: ``str`` keys are refused.
8.  Key hygiene: one checked reader for key, PIN and token files;
    ``zodbkmi rotate`` reads KEK files as the key holder does; key
    directories writable by others are refused; plain HTTP needs
    ``allow_http``.
10. Deeply nested JSON gets 400 from the key server, and breaks no JSON
    reader of zodbkmi.
12. ``decrypt-file`` to standard output releases authenticated chunks of a
    cut stream; with ``-o`` nothing is left.
"""
import base64
import contextlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.exceptions import SecretFileError
from zodbkmi.exceptions import SettingsError

DEEP = 4000
DEEP_ARRAY = b'[' * DEEP + b']' * DEEP
DEEP_OBJECT = b'{"a": ' * DEEP + b'1' + b'}' * DEEP


class _TmpDir(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-hygiene-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def write(self, name, data, mode=0o600):
        path = self.path(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        os.chmod(path, mode)
        return path

    def main(self, *argv):
        """Run the ``zodbkmi`` command line in process; return
        ``(exit code, stdout, stderr)``."""
        from zodbkmi.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def assertOneLineError(self, stderr, *fragments):
        self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
        self.assertNotIn('Traceback', stderr)
        for fragment in fragments:
            self.assertIn(fragment, stderr)


# -- 7. lossy text keys -------------------------------------------------------

class TextKeyTests(_TmpDir):
    """Finding 7: ``as_kek`` encoded a ``str`` with errors='replace'."""

    def test_two_non_ascii_text_keys_are_refused(self):
        # Both were b'?' * 32 before: one key for two "different" keys.
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import as_kek
        first, second = '\u00e9' * 32, '\u00fc' * 32
        self.assertNotEqual(first, second)
        facility = KeyManagementFacility(self.path('keys'))
        for key in (first, second):
            with self.assertRaisesRegex(InvalidKeyError, r'text \(str\)'):
                as_kek(key)
            with self.assertRaises(InvalidKeyError):
                facility.create_key(key)
            with self.assertRaises(InvalidKeyError):
                facility.encrypt(key, b'secret')
        self.assertEqual(len(facility), 0)   # no DEK under a lossy key

    def test_passphrase_of_32_characters_is_refused(self):
        # Before: an AES KEK whose public id (an HMAC under the passphrase)
        # let anyone test guesses offline.
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import as_kek
        passphrase = 'correct horse battery staple 123'
        self.assertEqual(len(passphrase), 32)
        with self.assertRaises(InvalidKeyError) as cm:
            as_kek(passphrase)
        self.assertNotIn(passphrase, str(cm.exception))
        self.assertIn('pass bytes', str(cm.exception))
        facility = KeyManagementFacility(self.path('keys'))
        with self.assertRaises(InvalidKeyError):
            facility.ensure_key(passphrase)
        self.assertEqual(len(facility), 0)

    def test_pem_text_must_be_encoded_by_its_reader(self):
        from zodbkmi.kek import RSAKeyEncryptingKey
        from zodbkmi.kek import as_kek
        from tests.test_keyholder import rsa_pem
        pem = rsa_pem()
        with self.assertRaises(InvalidKeyError):
            as_kek(pem.decode('ascii'))
        self.assertIsInstance(as_kek(pem.decode('ascii').encode('ascii')),
                              RSAKeyEncryptingKey)


# -- 8. key hygiene: the one checked reader ---------------------------------

class SecretFileReaderTests(_TmpDir):
    """Finding 8: every key, PIN and token file goes through one reader."""

    def test_reader_refuses_any_group_or_other_bit(self):
        from zodbkmi.keyholder import read_secret_file
        for mode in (0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o644,
                     0o666, 0o700, 0o500):
            path = self.write('secret-%o' % mode, b'token', mode)
            if not mode & 0o077:
                self.assertEqual(read_secret_file(path, 'token'), b'token')
                continue
            with self.assertRaises(SecretFileError) as cm:
                read_secret_file(path, 'token')
            message = str(cm.exception)
            for fragment in ('token file', path, '%04o' % mode,
                             'chmod 600 %s' % path):
                self.assertIn(fragment, message)
            self.assertNotIn('token\n', message)
            # documented for both kinds of callers
            self.assertIsInstance(cm.exception, KeyStoreError)
            self.assertIsInstance(cm.exception, KeySourceError)
            self.assertEqual(cm.exception.source, path)

    def test_reader_refuses_more_than_one_mib(self):
        from zodbkmi.keyholder import read_secret_file
        path = self.write('big', b'x' * ((1 << 20) + 1))
        with self.assertRaisesRegex(SecretFileError, 'larger than'):
            read_secret_file(path, 'key')
        path = self.write('ok', b'x' * (1 << 20))
        self.assertEqual(len(read_secret_file(path, 'key')), 1 << 20)

    def test_key_holder_and_key_source_files(self):
        from zodbkmi.keyholder import KeyHolder
        from zodbkmi.sources import kek_from_params
        key = os.urandom(32)
        path = self.write('master.key', base64.b64encode(key) + b'\n',
                          0o640)
        with self.assertRaisesRegex(SecretFileError, 'chmod 600'):
            KeyHolder(path)
        with self.assertRaisesRegex(KeySourceError, 'chmod 600'):
            kek_from_params({'source': 'file', 'path': path})

    def test_vault_token_file_and_pkcs11_pin_file(self):
        from zodbkmi.sources.pkcs11 import read_pin
        from zodbkmi.sources.vault import read_token
        token = self.write('vault.token', b's.abcdef\n', 0o644)
        pin = self.write('hsm.pin', b'1234\n', 0o604)
        with self.assertRaisesRegex(SecretFileError, 'token file'):
            read_token({'tokenFile': token})
        with self.assertRaisesRegex(SecretFileError, 'PIN file'):
            read_pin({'pinFile': pin})
        os.chmod(token, 0o600)
        os.chmod(pin, 0o400)
        self.assertEqual(read_token({'tokenFile': token}), 's.abcdef')
        self.assertEqual(read_pin({'pinFile': pin}), '1234')

    def test_token_text_is_never_decoded_lossily(self):
        from zodbkmi.sources.vault import read_token
        path = self.write('vault.token', 's.\u00e9t\u00e9'.encode('utf-8'))
        with self.assertRaisesRegex(SecretFileError, 'ASCII'):
            read_token({'tokenFile': path})
        empty = self.write('empty.token', b'\n')
        with self.assertRaisesRegex(SecretFileError, 'empty'):
            read_token({'tokenFile': empty})

    def test_server_token_table(self):
        # whoever can write the table can add an admin token
        from zodbkmi.rest import TokenTable, hash_token
        table = TokenTable([('admin', 'admin', hash_token('t'))])
        path = self.write('tokens.json', table.to_json(), 0o664)
        with self.assertRaisesRegex(SecretFileError,
                                    'token table file .* chmod 600'):
            TokenTable.load(path)
        os.chmod(path, 0o600)
        self.assertEqual(TokenTable.load(path).lookup('t'),
                         ('admin', 'admin'))

    def test_keas_kmi_key_file(self):
        from zodbkmi.migrate.legacy import KeasKMIKeys
        path = self.write('keas.pem', b'-----BEGIN RSA PRIVATE KEY-----\n',
                          0o644)
        with self.assertRaisesRegex(SecretFileError, 'key file'):
            KeasKMIKeys.from_files(path, self.tmp)


class TokenFileTests(_TmpDir):
    """Finding 8: a 0644 token file was read by the client."""

    def test_local_facility_refuses_0644_token_file(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        path = self.write('client.token', b'token-text\n', 0o644)
        with self.assertRaises(SecretFileError) as cm:
            LocalKeyManagementFacility('https://127.0.0.1:1',
                                       token_file=path)
        self.assertIn('chmod 600 %s' % path, str(cm.exception))
        self.assertNotIn('token-text', str(cm.exception))
        os.chmod(path, 0o600)
        local = LocalKeyManagementFacility('https://127.0.0.1:1',
                                           token_file=path)
        self.assertEqual(local._token, 'token-text')

    def test_cli_refuses_0644_token_file(self):
        path = self.write('admin.token', b'token-text\n', 0o644)
        for argv in (['status'], ['list'], ['retire', '0' * 32]):
            rc, out, err = self.main(*argv, '--url', 'https://127.0.0.1:1',
                                     '--token-file', path)
            self.assertEqual(rc, 2)
            self.assertEqual(out, '')
            self.assertOneLineError(err, 'token file %s' % path,
                                    'mode 0644', 'chmod 600 %s' % path)
            self.assertNotIn('token-text', err)

    def test_cli_refuses_0644_default_token_file(self):
        os.mkdir(self.path('var'))
        self.write(os.path.join('var', 'client.token'), b'token-text\n',
                   0o644)
        old = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, old)
        rc, _, err = self.main('status', '--url', 'https://127.0.0.1:1')
        self.assertEqual(rc, 2)
        self.assertOneLineError(err, 'chmod 600 var/client.token')


class KeyDirectoryTests(_TmpDir):
    """Finding 8: a key directory that others can write was used as is;
    they could plant, replace or delete wrapped DEKs."""

    def test_group_or_world_writable_directory_refused(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.keystore import DirectoryKeyStore
        for mode in (0o777, 0o770, 0o730, 0o702, 0o1777):
            path = self.path('keys-%o' % mode)
            os.mkdir(path)
            os.chmod(path, mode)
            for factory in (DirectoryKeyStore, KeyManagementFacility):
                with self.assertRaises(KeyStoreError) as cm:
                    factory(path)
                message = str(cm.exception)
                self.assertIn(path, message)
                self.assertIn('chmod 700 %s' % path, message)
            os.chmod(path, 0o700)
            KeyManagementFacility(path)   # fixed as the message says

    def test_readable_directory_still_accepted(self):
        # others may list (see key ids) but not write: not refused
        from zodbkmi.keystore import DirectoryKeyStore
        path = self.path('keys')
        os.mkdir(path)
        os.chmod(path, 0o755)
        DirectoryKeyStore(path)

    def test_new_directory_made_0700_whatever_the_umask(self):
        from zodbkmi.facility import KeyManagementFacility
        old = os.umask(0)
        try:
            # made with the first key (opening creates nothing)
            KeyManagementFacility(self.path('a', 'new', 'keys')).ensure_key(
                os.urandom(32))
        finally:
            os.umask(old)
        self.assertEqual(os.stat(self.path('a', 'new', 'keys')).st_mode
                         & 0o777, 0o700)

    @unittest.skipUnless(hasattr(os, 'geteuid') and os.geteuid() == 0,
                         'needs root to give a directory to another user')
    def test_directory_of_another_user_refused(self):
        from zodbkmi.facility import KeyManagementFacility
        path = self.path('keys')
        os.mkdir(path, 0o700)
        os.chown(path, 65534, -1)
        with self.assertRaisesRegex(KeyStoreError,
                                    'belongs to user id 65534.*chown'):
            KeyManagementFacility(path)

    def test_cli_refuses_writable_key_directory(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.keyholder import write_key_file
        key = os.urandom(32)
        KeyManagementFacility(self.path('keys')).create_key(key)
        write_key_file(self.path('kek.key'), key)
        self.write('data', b'data')
        os.chmod(self.path('keys'), 0o777)
        rc, _, err = self.main('encrypt-file', '-k', self.path('kek.key'),
                               '-d', self.path('keys'), self.path('data'),
                               '-o', self.path('data.zks'))
        self.assertEqual(rc, 2)
        self.assertOneLineError(err, 'writable by group or others',
                                'chmod 700')
        self.assertFalse(os.path.exists(self.path('data.zks')))


class PlainHTTPTests(_TmpDir):
    """Finding 8: ``http://`` key server URLs were accepted silently, so
    bearer tokens (and wrapped keys) would travel in clear."""

    def test_facility_refuses_http_without_allow_http(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        for url in ('http://127.0.0.1:8080', 'http://localhost',
                    'HTTP://keys.example:80/v1', 'http://[::1]:8080'):
            with self.assertRaises(SettingsError) as cm:
                LocalKeyManagementFacility(url, token='t')
            message = str(cm.exception)
            self.assertIn('allow_http', message)
            self.assertIn('in clear', message)
            self.assertIsInstance(cm.exception, ValueError)
        local = LocalKeyManagementFacility('http://127.0.0.1:1', token='t',
                                           allow_http=True)
        self.assertEqual(local._transport.scheme, 'http')

    def test_transport_refuses_http_too(self):
        from zodbkmi.client import HTTPTransport
        with self.assertRaisesRegex(SettingsError, 'allow_http'):
            HTTPTransport('http://127.0.0.1:1')
        HTTPTransport('http://127.0.0.1:1', allow_http=True)

    def test_http_refused_before_the_token_file_is_read(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        path = self.write('token', b't\n')
        with self.assertRaises(SettingsError):
            LocalKeyManagementFacility('http://127.0.0.1:1', token_file=path)

    def test_cli_refuses_http_without_allow_http(self):
        path = self.write('admin.token', b'token-text\n')
        rc, _, err = self.main('status', '--url', 'http://127.0.0.1:1',
                               '--token-file', path)
        self.assertEqual(rc, 2)
        self.assertOneLineError(err, '--allow-http', 'in clear')
        # with --allow-http it tries (and fails to connect, port 1)
        rc, _, err = self.main('status', '--url', 'http://127.0.0.1:1',
                               '--token-file', path, '--allow-http',
                               '--timeout', '1')
        self.assertEqual(rc, 2)
        self.assertOneLineError(err, 'cannot be reached')

    def test_zcml_refuses_http_and_passes_allow_http(self):
        try:
            from zope.configuration import xmlconfig
        except ImportError:   # pragma: no cover
            self.skipTest('zope.configuration is not installed')
        import zope.component
        import zope.component.testing
        from zope.configuration.exceptions import ConfigurationError

        from zodbkmi.interfaces import IKeyManagementFacility
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        os.environ['ZODBKMI_HYGIENE_TOKEN'] = 't'
        self.addCleanup(os.environ.pop, 'ZODBKMI_HYGIENE_TOKEN')
        zcml = ('<configure xmlns:kmi="http://namespaces.zodbkmi.org/'
                'zodbkmi"><include package="zodbkmi" file="meta.zcml" />'
                '<kmi:localKeyManagementFacility url="http://127.0.0.1:1" '
                'tokenEnv="ZODBKMI_HYGIENE_TOKEN"%s /></configure>')
        with self.assertRaisesRegex(ConfigurationError, 'allowHttp'):
            xmlconfig.string(zcml % '')
        xmlconfig.string(zcml % ' allowHttp="true"')
        facility = zope.component.getUtility(IKeyManagementFacility)
        self.assertEqual(facility._transport.scheme, 'http')

    def test_settings_table_refuses_http(self):
        from zodbkmi.sources import parse_settings
        params = {'source': 'vaultKV', 'url': 'http://127.0.0.1:8200',
                  'token': 's.x', 'path': 'app/kek'}
        with self.assertRaisesRegex(SettingsError, 'allowHttp'):
            parse_settings({'params': params})
        parse_settings({'params': dict(params, allowHttp=True)})


class ServerLayer:
    """One real key server (``zodbkmi serve``, TLS, loopback) for the
    ``rotate`` tests."""

    __name__ = 'HygieneServerLayer'
    __bases__ = ()
    __module__ = __name__

    @classmethod
    def setUp(cls):
        from zodbkmi.testing import ServerProcess
        cls.server = ServerProcess('--access-log', 'off')

    @classmethod
    def tearDown(cls):
        cls.server.stop()
        cls.server.cleanup()


class RotateCommandTests(_TmpDir):
    """Finding 8: ``zodbkmi rotate`` read a 0644 KEK file, and refused the
    base64 AES key files that ``write_key_file`` writes."""

    layer = ServerLayer

    def setUp(self):
        super().setUp()
        self.server = ServerLayer.server

    def rotate(self, kek_file):
        return self.main('rotate', kek_file, '--url', self.server.url,
                         '--ca-file', self.server.ca, '--token-file',
                         os.path.join(self.server.dir, 'var', 'admin.token'))

    def server_keys(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        local = LocalKeyManagementFacility(
            self.server.url, token=self.server.admin, ca_file=self.server.ca)
        try:
            return local.metadata()
        finally:
            local.close()

    def test_0644_kek_file_refused_before_anything_is_sent(self):
        from zodbkmi.keyholder import write_key_file
        from tests.test_keyholder import rsa_pem
        before = self.server_keys()
        for name, key in (('kek.pem', rsa_pem()), ('kek.key',
                                                   os.urandom(32))):
            path = self.path(name)
            write_key_file(path, key)
            os.chmod(path, 0o644)
            rc, out, err = self.rotate(path)
            self.assertEqual(rc, 2)
            self.assertEqual(out, '')
            self.assertOneLineError(err, 'key file %s' % path, 'mode 0644',
                                    'chmod 600 %s' % path)
        self.assertEqual(self.server_keys(), before)

    def test_base64_aes_key_file_works(self):
        from zodbkmi.kek import aes_key_id
        from zodbkmi.keyholder import write_key_file
        key = os.urandom(32)
        path = self.path('master.key')
        write_key_file(path, key)     # one base64 line, 0600
        rc, out, err = self.rotate(path)
        self.assertEqual(rc, 0, err)
        self.assertNotIn('error', err)
        dek_id = out.strip()
        keys = {k['dek_id']: k for k in self.server_keys()}
        self.assertEqual(keys[dek_id]['kek_id'], aes_key_id(key))
        self.assertEqual(keys[dek_id]['state'], 'active')
        # the same file as the key holder reads it: the same KEK
        from zodbkmi.keyholder import KeyHolder
        self.assertEqual(KeyHolder(path).key_id, aes_key_id(key))

    def test_pem_key_file_works(self):
        from zodbkmi.kek import as_kek
        from zodbkmi.keyholder import write_key_file
        from tests.test_keyholder import rsa_pem
        path = self.path('kek.pem')
        write_key_file(path, rsa_pem())
        rc, out, err = self.rotate(path)
        self.assertEqual(rc, 0, err)
        self.assertNotIn('error', err)
        keys = {k['dek_id']: k for k in self.server_keys()}
        self.assertEqual(keys[out.strip()]['kek_id'],
                         as_kek(rsa_pem()).key_id)


# -- 10. deeply nested JSON ---------------------------------------------------

class NestedJSONTests(_TmpDir):
    """Finding 10: nested arrays in a 8 KB body raised RecursionError in
    the key server (500)."""

    def _app(self):
        from tests.test_rest import ADMIN
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.rest import AuditLog, KeyServerApp, TokenTable
        from zodbkmi.rest import hash_token
        self.facility = KeyManagementFacility(self.path('keys'))
        tokens = TokenTable([('alice', 'admin', hash_token(ADMIN))])
        return KeyServerApp(self.facility, tokens,
                            audit=AuditLog(stream=io.StringIO()))

    def test_post_keys_with_nested_json_is_400(self):
        from tests.test_rest import call
        app = self._app()
        log = io.StringIO()
        import logging
        handler = logging.StreamHandler(log)
        logger = logging.getLogger('zodbkmi.server')
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        for body in (DEEP_ARRAY, DEEP_OBJECT,
                     b'{"wrapped": ' + DEEP_ARRAY + b'}'):
            status, headers, data = call(app, 'POST', '/v1/keys', body)
            self.assertEqual(status, 400, data[:200])
            self.assertEqual(headers['Content-Type'], 'application/json')
            self.assertEqual(json.loads(data), {'error': 'malformed JSON'})
            self.assertLess(len(data), 100)
            self.assertNotIn(b'Traceback', data)
            self.assertNotIn(b'Recursion', data)
        self.assertEqual(log.getvalue(), '')   # no internal error logged
        self.assertEqual(len(self.facility), 0)
        # the server still serves
        self.assertEqual(call(app, 'GET', '/v1/health')[0], 200)

    def test_through_the_wsgi_transport(self):
        from zodbkmi.client import WSGITransport
        from tests.test_rest import ADMIN
        transport = WSGITransport(self._app())
        status, data = transport.request(
            'POST', '/v1/keys', DEEP_ARRAY,
            {'Content-Type': 'application/json',
             'Authorization': 'Bearer ' + ADMIN})
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(data), {'error': 'malformed JSON'})

    def test_key_server_answer_nested_deeply(self):
        # a key server (or something in its place) answering nested JSON:
        # the client raises KeyServerError, not RecursionError
        from zodbkmi.exceptions import KeyServerError
        from zodbkmi.facility import LocalKeyManagementFacility

        class Answers:
            def request(self, method, path, body=None, headers=None):
                return 200, DEEP_ARRAY

            def close(self):
                pass

        local = LocalKeyManagementFacility('https://127.0.0.1:1',
                                           token='t', transport=Answers())
        with self.assertRaises(KeyServerError):
            local.status()

    def test_planted_nested_vault_entry_is_a_key_store_error(self):
        # someone who can write the key directory plants an entry that
        # would crash every reader with RecursionError
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(self.path('keys'), create=True)
        dek_id = 'ab' * 16
        self.write(os.path.join('keys', dek_id + '.dek'), DEEP_OBJECT)
        with self.assertRaisesRegex(KeyStoreError, 'corrupt key store entry'):
            facility.key_store.get(dek_id)

    def test_token_table_with_nested_json_is_a_key_store_error(self):
        from zodbkmi.rest import TokenTable
        path = self.write('tokens.json', DEEP_ARRAY)
        with self.assertRaisesRegex(KeyStoreError, 'invalid token file'):
            TokenTable.load(path)

    def test_vault_client_answer_nested_deeply(self):
        # a Vault/OpenBao (or something in its place) answering nested
        # JSON: a KeySourceError, not a RecursionError
        try:
            from zodbkmi.sources.vault import VaultClient
            VaultClient('https://127.0.0.1:1', 't')
        except KeySourceError:   # pragma: no cover
            self.skipTest('urllib3 is not installed')

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(DEEP_ARRAY)))
                self.end_headers()
                self.wfile.write(DEEP_ARRAY)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        client = VaultClient('http://127.0.0.1:%d' % server.server_port,
                             't', allow_http=True)
        self.addCleanup(client.close)
        with self.assertRaisesRegex(KeySourceError,
                                    'answer is not a JSON object'):
            client.request('GET', 'secret/data/x')


# -- 12. decrypt-file to standard output --------------------------------------

def cli(*args, **kw):
    """Run ``python -m zodbkmi.cli ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, '-m', 'zodbkmi.cli'] + list(args),
        capture_output=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), **kw)


class CutStreamToStdoutTests(_TmpDir):
    """Finding 12: the help said "nothing is written before it
    authenticated"; to standard output, the chunks before the damage ARE
    written (documented now), and ``-o`` leaves nothing."""

    CHUNK = 65536

    def setUp(self):
        super().setUp()
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.keyholder import write_key_file
        key = os.urandom(32)
        facility = KeyManagementFacility(self.path('keys'))
        facility.create_key(key)
        self.kek_file = self.path('kek.key')
        write_key_file(self.kek_file, key)
        self.plain = os.urandom(3 * self.CHUNK + 1000)   # 4 chunks
        out = io.BytesIO()
        facility.encrypt_file(key, io.BytesIO(self.plain), out)
        self.sealed = out.getvalue()
        header = len(self.sealed) - len(self.plain) - 4 * 16
        # cut inside the third chunk: chunks 0 and 1 are whole
        self.cut = self.sealed[:header + 2 * (self.CHUNK + 16) + 500]

    def decrypt(self, *extra):
        return cli('decrypt-file', '-k', self.kek_file, '-d',
                   self.path('keys'), *extra, input=self.cut)

    def test_stdout_gets_the_authenticated_chunks_and_a_failure(self):
        proc = self.decrypt()
        self.assertEqual(proc.returncode, 2)
        err = proc.stderr.decode()
        self.assertOneLineError(err, 'zodbkmi decrypt-file: error:',
                                'did not authenticate at chunk 2')
        # the documented behaviour: chunks 0 and 1 were released
        self.assertEqual(proc.stdout, self.plain[:2 * self.CHUNK])
        # and never a byte of the chunk that did not authenticate
        self.assertNotIn(self.plain[2 * self.CHUNK:2 * self.CHUNK + 64],
                         proc.stdout)

    def test_output_file_leaves_nothing(self):
        target = self.path('restored')
        proc = self.decrypt('-o', target)
        self.assertEqual(proc.returncode, 2)
        self.assertOneLineError(proc.stderr.decode(),
                                'did not authenticate at chunk 2')
        self.assertEqual(proc.stdout, b'')
        self.assertFalse(os.path.lexists(target))
        self.assertEqual([n for n in os.listdir(self.tmp)
                          if 'restored' in n], [])

    def test_whole_stream_still_decrypts(self):
        target = self.path('restored')
        proc = cli('decrypt-file', '-k', self.kek_file, '-d',
                   self.path('keys'), '-o', target, input=self.sealed)
        self.assertEqual((proc.returncode, proc.stderr), (0, b''))
        with open(target, 'rb') as f:
            self.assertEqual(f.read(), self.plain)

    def test_help_says_so(self):
        proc = cli('decrypt-file', '--help')
        self.assertEqual(proc.returncode, 0)
        text = ' '.join(proc.stdout.decode().split())
        self.assertIn('has already written its earlier chunks', text)
        self.assertIn('Use -o wherever a partial result must not be used',
                      text)
        self.assertNotIn('Nothing is written before it authenticated', text)
