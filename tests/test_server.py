"""Tests of zodbkmi.server and the CLI: settings, TLS material, and the real
key server started as a subprocess (``zodbkmi serve``) on a free loopback
port with TLS, driven through LocalKeyManagementFacility and the CLI."""
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import warnings

from zodbkmi import exceptions
from zodbkmi.testing import ServerProcess
from zodbkmi.testing import free_port

ZODBKMI = [sys.executable, '-m', 'zodbkmi.cli']


def tls_exchange(port, ctx, data):
    """Send ``data`` to the server on ``port`` over TLS made with ``ctx``;
    return ``(all it answered until it closed, TLS version, cipher)``."""
    with socket.create_connection(('127.0.0.1', port), 5) as sock:
        with ctx.wrap_socket(sock, server_hostname='127.0.0.1') as tls:
            tls.sendall(data)
            answer = b''
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer, tls.version(), tls.cipher()[0]


class ServerLayer:
    """One key server for the tests of this module."""

    __name__ = 'ServerLayer'
    __bases__ = ()
    __module__ = __name__

    @classmethod
    def setUp(cls):
        cls.server = ServerProcess()

    @classmethod
    def tearDown(cls):
        cls.server.stop()
        cls.server.cleanup()


class SettingsTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _callFUT(self, *a, **kw):
        from zodbkmi.server import resolve_settings
        return resolve_settings(*a, **kw)

    def _write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, 'w') as f:
            f.write(text)
        return path

    def test_defaults(self):
        s = self._callFUT(environ={})
        self.assertEqual((s['host'], s['port'], s['key_dir'], s['tls_dir']),
                         ('127.0.0.1', 8443, 'var/keys', 'var/tls'))
        self.assertFalse(s['insecure_http'])

    def test_precedence_file_env_flags(self):
        path = self._write('c.toml', 'port = 1000\nthreads = 4\n'
                                     'key-dir = "/k"\n')
        s = self._callFUT(path, environ={'ZODBKMI_PORT': '2000'},
                          overrides={'threads': None})
        self.assertEqual((s['port'], s['threads'], s['key_dir']),
                         (2000, 4, '/k'))
        s = self._callFUT(path, environ={'ZODBKMI_PORT': '2000'},
                          overrides={'port': '3000'})
        self.assertEqual(s['port'], 3000)

    def test_json_file_and_booleans(self):
        path = self._write('c.json', '{"insecure_http": true}')
        self.assertTrue(self._callFUT(path, environ={})['insecure_http'])
        s = self._callFUT(environ={'ZODBKMI_ACCESS_LOG': 'off'})
        self.assertFalse(s['access_log'])

    def test_unknown_key_rejected_in_one_line(self):
        from zodbkmi.server import SettingsError
        path = self._write('c.toml', 'prot = 8443\n')
        with self.assertRaises(SettingsError) as cm:
            self._callFUT(path, environ={})
        self.assertEqual(str(cm.exception),
                         "unknown setting 'prot' in %s" % path)

    def test_bad_values(self):
        from zodbkmi.server import SettingsError
        for env in ({'ZODBKMI_PORT': 'http'}, {'ZODBKMI_PORT': '70000'},
                    {'ZODBKMI_THREADS': '0'},
                    {'ZODBKMI_INSECURE_HTTP': 'maybe'}):
            with self.assertRaises(SettingsError) as cm:
                self._callFUT(environ=env)
            self.assertEqual(len(str(cm.exception).splitlines()), 1)
        with self.assertRaises(SettingsError):
            self._callFUT(self._write('bad.toml', 'port = ['),
                          environ={})


class TLSMaterialTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_self_signed_certificate(self):
        from cryptography import x509

        from zodbkmi.server import fingerprint, generate_self_signed
        tls = os.path.join(self.tmp, 'tls')
        cert, key = generate_self_signed(tls)
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(cert).st_mode & 0o777, 0o600)
        with open(cert, 'rb') as f:
            c = x509.load_pem_x509_certificate(f.read())
        sans = c.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertIn('localhost', sans.get_values_for_type(x509.DNSName))
        fp = fingerprint(cert)
        self.assertEqual(fp.replace(':', '').lower(), c.fingerprint(
            __import__('cryptography.hazmat.primitives.hashes',
                       fromlist=['x']).SHA256()).hex())
        # a second start keeps the certificate
        self.assertEqual(generate_self_signed(tls), (cert, key))
        self.assertEqual(fingerprint(cert), fp)

    def test_tokens_created_once_hashed(self):
        from zodbkmi.server import ensure_tokens
        path = os.path.join(self.tmp, 'var', 'tokens.json')
        table, created = ensure_tokens(path)
        self.assertEqual(len(created), 2)
        with open(created[0]) as f:
            admin = f.read().strip()
        self.assertEqual(table.lookup(admin), ('admin', 'admin'))
        with open(path) as f:
            self.assertNotIn(admin, f.read())
        self.assertEqual(os.stat(created[0]).st_mode & 0o777, 0o600)
        again, created = ensure_tokens(path)
        self.assertEqual((again.lookup(admin), created),
                         (('admin', 'admin'), []))


class ServerTests(unittest.TestCase):
    """The real server over TLS, through LocalKeyManagementFacility."""

    layer = ServerLayer

    def setUp(self):
        self.server = ServerLayer.server

    def _makeOne(self, **kw):
        from zodbkmi.facility import LocalKeyManagementFacility
        kw.setdefault('token', self.server.admin)
        kw.setdefault('ca_file', self.server.ca)
        local = LocalKeyManagementFacility(self.server.url, **kw)
        self.addCleanup(local.close)
        return local

    def test_startup_prints_url_and_fingerprint(self):
        from zodbkmi.server import fingerprint
        out = self.server.stdout()
        self.assertIn('listening on %s/v1/' % self.server.url, out)
        self.assertIn('certificate SHA-256 fingerprint: %s'
                      % fingerprint(self.server.ca), out)
        self.assertNotIn(self.server.admin, out)

    def test_generate_encrypt_decrypt_over_tls(self):
        local = self._makeOne()
        kek = os.urandom(32)
        dek_id = local.create_key(kek)
        data = local.encrypt(kek, b'over TLS')
        other = self._makeOne(token=self.server.client)
        self.assertEqual(other.decrypt(kek, data), b'over TLS')
        self.assertEqual(other.key_id_of(data), dek_id)
        self.assertIn(dek_id, other.keys())
        with self.assertRaises(exceptions.KeyServerError) as cm:
            other.retire(dek_id)
        self.assertEqual(cm.exception.status, 403)

    def test_wrong_ca_is_refused(self):
        from zodbkmi.server import generate_self_signed
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        other_ca, _ = generate_self_signed(tmp)
        local = self._makeOne(ca_file=other_ca)
        with self.assertRaises(exceptions.KeyServerError) as cm:
            local.status()
        self.assertIn('certificate verification failed', str(cm.exception))

    def test_tls_1_1_refused(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.server.ca)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, ssl.SSLError):   # pragma: no cover
            self.skipTest('TLS 1.1 not available in this OpenSSL')
        with socket.create_connection(('127.0.0.1', self.server.port),
                                      5) as sock:
            with self.assertRaises(ssl.SSLError):
                ctx.wrap_socket(sock, server_hostname='127.0.0.1')

    def test_server_survives_misbehaving_clients(self):
        # garbage instead of TLS, a half-open TLS connection, a bad request
        with socket.create_connection(('127.0.0.1', self.server.port),
                                      5) as sock:
            sock.sendall(b'GET / HTTP/1.1\r\n\r\n' + os.urandom(500))
            try:
                sock.recv(100)
            except OSError:
                pass
        ctx = ssl.create_default_context(cafile=self.server.ca)
        answer = tls_exchange(
            self.server.port, ctx,
            b'POST /v1/keys HTTP/1.1\r\nHost: x\r\n'
            b'Content-Length: 99999999\r\n'
            b'Content-Type: application/json\r\n'
            b'Authorization: Bearer ' + self.server.admin.encode() +
            b'\r\n\r\n{')[0]
        self.assertIn(b' 413 ', answer.split(b'\r\n')[0])
        self.assertIn(b'"error"', answer)
        local = self._makeOne()
        self.assertIn('KMS server holding', local.status()['message'])
        self.assertNotIn('Traceback', self.server.stderr())

    def test_logs_hold_no_secrets(self):
        local = self._makeOne()
        kek = os.urandom(32)
        dek_id = local.create_key(kek)
        local.decrypt(kek, local.encrypt(kek, b'x'))
        bad = self._makeOne(token='not-the-token')
        with self.assertRaises(exceptions.KeyServerError):
            bad.status()
        time.sleep(0.1)
        logs = self.server.stderr() + self.server.stdout() + \
            self.server.read('var/audit.log')
        for secret in (self.server.admin, self.server.client,
                       'not-the-token'):
            self.assertNotIn(secret, logs)
        audit = [json.loads(line) for line in
                 self.server.read('var/audit.log').splitlines()]
        self.assertIn({'client': 'admin', 'operation': 'create',
                       'key_id': dek_id, 'outcome': 'ok'},
                      [{k: v for k, v in r.items() if k != 'time'}
                       for r in audit])


class CommandLineTests(unittest.TestCase):
    """The client commands against the real server."""

    layer = ServerLayer

    def setUp(self):
        self.server = ServerLayer.server
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def run_cli(self, *args, token=None):
        env = dict(os.environ, ZODBKMI_URL=self.server.url,
                   ZODBKMI_CA_FILE=self.server.ca,
                   ZODBKMI_TOKEN=token or self.server.admin)
        proc = subprocess.run(ZODBKMI + list(args), cwd=self.tmp, env=env,
                              capture_output=True, text=True, timeout=60)
        self.assertNotIn('Traceback', proc.stderr)
        return proc.returncode, proc.stdout, proc.stderr

    def test_key_lifecycle(self):
        rc, out, err = self.run_cli('new', 'kek.pem')
        self.assertEqual(rc, 0, err)
        dek_id = out.strip()
        self.assertEqual(os.stat(os.path.join(self.tmp, 'kek.pem')).st_mode
                         & 0o777, 0o600)
        rc, out, _ = self.run_cli('status', token=self.server.client)
        self.assertRegex(out, r'^KMS server holding \d+ keys?$')
        rc, out, _ = self.run_cli('get', dek_id, token=self.server.client)
        self.assertEqual(json.loads(out)['state'], 'active')
        rc, out, _ = self.run_cli('rotate', 'kek.pem')
        new_id = out.strip()
        self.assertNotEqual(new_id, dek_id)
        rc, out, _ = self.run_cli('list')
        self.assertIn('%s retired' % dek_id, out)
        self.assertIn('%s active ' % new_id, out)
        self.assertEqual(self.run_cli('retire', new_id)[:2],
                         (0, 'retired %s\n' % new_id))
        rc, out, err = self.run_cli('delete', dek_id)
        self.assertEqual(rc, 2)
        self.assertIn('add --yes', err)
        self.assertEqual(self.run_cli('delete', '--yes', dek_id)[0], 0)
        rc, _, err = self.run_cli('get', dek_id)
        self.assertEqual(rc, 2)
        self.assertEqual(err.strip(), 'zodbkmi get: error: no key %s on '
                                      'the key server' % dek_id)

    def test_user_errors_exit_2_without_traceback(self):
        rc, _, err = self.run_cli('new', 'k.pem', token=self.server.client)
        self.assertEqual(rc, 2)
        self.assertIn('403', err)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'k.pem')))
        rc, _, err = self.run_cli('status', token='wrong')
        self.assertEqual(rc, 2)
        self.assertIn('401', err)
        self.assertEqual(self.run_cli('get', 'nonsense')[0], 2)
        self.assertEqual(self.run_cli('rotate', 'missing.pem')[0], 2)
        rc, _, err = self.run_cli('status', '--url',
                                  'https://127.0.0.1:%d' % free_port())
        self.assertEqual(rc, 2)
        self.assertIn('cannot be reached', err)

    def test_help(self):
        for cmd in ('serve', 'new', 'get', 'status', 'list', 'rotate',
                    'retire', 'delete'):
            rc, out, _ = self.run_cli(cmd, '--help')
            self.assertEqual(rc, 0)
            self.assertIn('usage: zodbkmi %s' % cmd, out)


class ServeTests(unittest.TestCase):
    """Starting and stopping ``zodbkmi serve`` itself."""

    def test_sigterm_stops_gracefully(self):
        server = ServerProcess('--workers', '2')
        try:
            from zodbkmi.facility import LocalKeyManagementFacility
            local = LocalKeyManagementFacility(
                server.url, token=server.client, ca_file=server.ca)
            for _ in range(4):
                self.assertEqual(local.status()['keys'], 0)
                local.close()
            self.assertIn('listening on', server.stdout())
        finally:
            rc = server.stop()
            server.cleanup()
        self.assertEqual(rc, 0)

    def test_insecure_http_only_when_asked(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        server = ServerProcess(env={'ZODBKMI_INSECURE_HTTP': 'yes'})
        try:
            self.assertIn('WARNING: plain HTTP, for development only',
                          server.stdout())
            self.assertFalse(os.path.exists(server.ca))
            url = 'http://127.0.0.1:%d' % server.port
            # the client asks too: loopback is no exception
            with self.assertRaisesRegex(ValueError, 'allow_http'):
                LocalKeyManagementFacility(url, token=server.client)
            local = LocalKeyManagementFacility(url, token=server.client,
                                               allow_http=True)
            self.addCleanup(local.close)
            self.assertEqual(local.status()['keys'], 0)
        finally:
            server.stop()
            server.cleanup()

    def test_unknown_setting_is_one_line_error(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        with open(os.path.join(tmp, 'c.toml'), 'w') as f:
            f.write('colour = "blue"\n')
        proc = subprocess.run(ZODBKMI + ['serve', '--config', 'c.toml'],
                              cwd=tmp, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr, "zodbkmi serve: error: unknown "
                                      "setting 'colour' in c.toml\n")
        self.assertFalse(os.path.exists(os.path.join(tmp, 'var')))


def _doc_setUp(test):
    from tests import test_docs
    test_docs.setUp(test)
    os.chdir(ServerLayer.server.dir)
    test.globs['url'] = ServerLayer.server.url


def test_suite():
    from tests.test_docs import TOP, doc_suite
    suite = unittest.defaultTestLoader.loadTestsFromName(__name__)
    docs = doc_suite(os.path.join(TOP, 'docs', 'server.rst'),
                     setUp=_doc_setUp)
    docs.layer = ServerLayer
    suite.addTest(docs)
    return suite


def make_ca_and_client(directory, expired=False):
    """A CA and a client certificate it signed (``expired``: valid
    yesterday only); return the paths (ca, cert, key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM,
                               serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name('test CA'))
          .issuer_name(name('test CA')).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=2))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                         critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False,
              key_encipherment=False, data_encipherment=False,
              key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(
              ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    end = now - datetime.timedelta(days=1) if expired else \
        now + datetime.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(name('app'))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = []
    for fname, data in (
            ('ca.pem', ca.public_bytes(serialization.Encoding.PEM)),
            ('client.pem', cert.public_bytes(serialization.Encoding.PEM)),
            ('client-key.pem', pem_key(key))):
        path = os.path.join(directory, fname)
        with open(path, 'wb') as f:
            f.write(data)
        paths.append(path)
    return paths


class BusyPortTests(unittest.TestCase):

    def test_port_in_use_is_one_line_error(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        with socket.socket() as busy:
            busy.bind(('127.0.0.1', 0))
            busy.listen()
            port = busy.getsockname()[1]
            proc = subprocess.run(ZODBKMI + ['serve', '--port', str(port)],
                                  cwd=tmp, capture_output=True, text=True,
                                  timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr, 'zodbkmi serve: error: cannot listen '
                                      'on 127.0.0.1 port %d: Address already '
                                      'in use\n' % port)


class MutualTLSTests(unittest.TestCase):
    """``client_ca``: a client certificate is required on top of tokens."""

    def test_client_certificates(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        ca, cert, key = make_ca_and_client(tmp)
        os.mkdir(os.path.join(tmp, 'expired'))
        _, old_cert, old_key = make_ca_and_client(
            os.path.join(tmp, 'expired'), expired=True)
        os.mkdir(os.path.join(tmp, 'other'))
        _, other_cert, other_key = make_ca_and_client(
            os.path.join(tmp, 'other'))
        server = ServerProcess('--client-ca', ca)
        self.addCleanup(server.cleanup)
        self.addCleanup(server.stop)

        def local(**kw):
            f = LocalKeyManagementFacility(server.url, token=server.client,
                                           ca_file=server.ca, retries=0,
                                           **kw)
            self.addCleanup(f.close)
            return f
        self.assertEqual(local(client_cert=cert, client_key=key)
                         .status()['keys'], 0)
        for kw in ({}, {'client_cert': old_cert, 'client_key': old_key},
                   {'client_cert': other_cert, 'client_key': other_key}):
            with self.assertRaises(exceptions.KeyServerError) as cm:
                local(**kw).status()
            self.assertIsNone(cm.exception.status)
            self.assertIn('TLS refused', str(cm.exception))
        # the server keeps serving good clients
        self.assertEqual(local(client_cert=cert, client_key=key)
                         .status()['keys'], 0)
