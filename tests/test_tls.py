"""The TLS settings of the real key server (``zodbkmi serve``, granian with
rustls) on 127.0.0.1: protocol versions, cipher suites and the generated
certificate.

Refusals are checked twice: with Python's ``ssl`` client (OpenSSL) where it
can still offer the old protocol or the weak suite, and with a ClientHello
built byte by byte here and sent over a plain socket, which does not depend
on what the local OpenSSL is willing to offer.  Every hand-made refusal has
a control: the same hello with TLS 1.2 and modern suites gets a ServerHello,
so a refusal is the server's answer to the version or suite, not to a
malformed hello.
"""
import os
import socket
import ssl
import stat
import struct
import unittest
import warnings

from tests.test_server import ServerProcess


class TLSServerLayer:
    """One key server with its generated self-signed certificate."""

    __name__ = 'TLSServerLayer'
    __bases__ = ()
    __module__ = __name__

    @classmethod
    def setUp(cls):
        cls.server = ServerProcess()

    @classmethod
    def tearDown(cls):
        cls.server.stop()
        cls.server.cleanup()


# -- a hand-made ClientHello --------------------------------------------------

SSL3, TLS10, TLS11, TLS12 = 0x0300, 0x0301, 0x0302, 0x0303

#: TLS 1.2 AEAD suites with forward secrecy that an ECDSA certificate can
#: serve: ECDHE-ECDSA with AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305.
MODERN_SUITES = (0xc02b, 0xc02c, 0xcca9)
#: Weak suites, by what makes them weak.
WEAK_SUITES = {
    'RSA key exchange, CBC, SHA-1': (0x002f, 0x0035),
    'RSA key exchange, GCM': (0x009c, 0x009d),
    'ECDHE, CBC, SHA-1': (0xc009, 0xc00a),
    'ECDHE, CBC, SHA-256/384': (0xc023, 0xc024),
    '3DES': (0x000a, 0xc008),
    'RC4': (0x0005, 0xc007),
    'NULL cipher': (0x0002, 0xc006),
    'export and DES': (0x0003, 0x0009),
}

ALERT_HANDSHAKE_FAILURE = 40
ALERT_PROTOCOL_VERSION = 70


def _extension(kind, data):
    return struct.pack('!HH', kind, len(data)) + data


def client_hello(version, suites):
    """A ClientHello record offering ``version`` (legacy field, no
    supported_versions extension) and ``suites``, with the extensions an
    ECDHE-ECDSA handshake needs (groups x25519 and P-256, uncompressed
    points, ECDSA/RSA-PSS/RSA SHA-256 signatures)."""
    extensions = (
        _extension(0x000a, struct.pack('!HHH', 4, 0x001d, 0x0017))
        + _extension(0x000b, b'\x01\x00')
        + _extension(0x000d, struct.pack('!HHHH', 6, 0x0403, 0x0804,
                                         0x0401)))
    cipher_suites = b''.join(struct.pack('!H', s) for s in suites)
    body = (struct.pack('!H', version) + os.urandom(32) + b'\x00'
            + struct.pack('!H', len(cipher_suites)) + cipher_suites
            + b'\x01\x00'   # compression: null only
            + struct.pack('!H', len(extensions)) + extensions)
    handshake = b'\x01' + len(body).to_bytes(3, 'big') + body
    return b'\x16' + struct.pack('!HH', TLS10, len(handshake)) + handshake


def _recv_exactly(sock, n):
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def server_answer(port, hello):
    """Send ``hello`` on a new connection; return the server's first
    record: ``('server_hello', version)``, ``('alert', level,
    description)``, ``('closed',)`` or ``('other', content_type)``."""
    with socket.create_connection(('127.0.0.1', port), 5) as sock:
        sock.sendall(hello)
        try:
            head = _recv_exactly(sock, 5)
        except ConnectionResetError:
            return ('closed',)
        if len(head) < 5:
            return ('closed',)
        body = _recv_exactly(sock, struct.unpack('!H', head[3:5])[0])
    if head[0] == 0x15 and len(body) >= 2:
        return ('alert', body[0], body[1])
    if head[0] == 0x16 and body[:1] == b'\x02' and len(body) >= 6:
        return ('server_hello', struct.unpack('!H', body[4:6])[0])
    return ('other', head[0])


class TLSSettingsTests(unittest.TestCase):

    layer = TLSServerLayer

    def setUp(self):
        self.server = TLSServerLayer.server

    def _context(self, version=None, ciphers=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.server.ca)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                if ciphers:
                    # level 0 lets OpenSSL offer what it would refuse
                    ctx.set_ciphers(ciphers + ':@SECLEVEL=0')
                if version is not None:
                    ctx.minimum_version = ctx.maximum_version = version
        except (ValueError, ssl.SSLError):
            return None
        return ctx

    def _connect(self, ctx):
        """Handshake with ``ctx``; return ``(version, cipher)``."""
        with socket.create_connection(('127.0.0.1', self.server.port),
                                      5) as sock:
            with ctx.wrap_socket(sock, server_hostname='127.0.0.1') as tls:
                tls.sendall(b'GET /v1/health HTTP/1.1\r\nHost: x\r\n'
                            b'Connection: close\r\n\r\n')
                answer = b''
                while True:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                self.assertTrue(answer.startswith(b'HTTP/1.1 200 '))
                return tls.version(), tls.cipher()[0]

    def _assertRefused(self, ctx):
        with socket.create_connection(('127.0.0.1', self.server.port),
                                      5) as sock:
            with self.assertRaises((ssl.SSLError, ConnectionResetError)):
                ctx.wrap_socket(sock, server_hostname='127.0.0.1')

    # -- protocol versions ----------------------------------------------

    def test_tls_1_2_and_1_3_accepted(self):
        self.assertEqual(
            self._connect(self._context(ssl.TLSVersion.TLSv1_2))[0],
            'TLSv1.2')
        self.assertEqual(
            self._connect(self._context(ssl.TLSVersion.TLSv1_3))[0],
            'TLSv1.3')

    def test_default_client_gets_tls_1_3(self):
        ctx = ssl.create_default_context(cafile=self.server.ca)
        version, cipher = self._connect(ctx)
        self.assertEqual(version, 'TLSv1.3')
        # every TLS 1.3 suite has forward secrecy; these are the AEADs
        self.assertIn(cipher, ('TLS_AES_256_GCM_SHA384',
                               'TLS_AES_128_GCM_SHA256',
                               'TLS_CHACHA20_POLY1305_SHA256'))

    def test_tls_1_0_and_1_1_refused_openssl_client(self):
        tried = 0
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            ctx = self._context(version, 'DEFAULT')
            if ctx is None:   # pragma: no cover
                continue   # this OpenSSL cannot offer it at all
            tried += 1
            self._assertRefused(ctx)
        if not tried:   # pragma: no cover
            self.skipTest('this OpenSSL offers neither TLS 1.0 nor 1.1 '
                          '(the hand-made hello tests still run)')

    def test_old_protocols_refused_hand_made_hello(self):
        port = self.server.port
        # control: the same hello as TLS 1.2 is answered with a ServerHello
        self.assertEqual(server_answer(port, client_hello(
            TLS12, MODERN_SUITES)), ('server_hello', TLS12))
        for version in (SSL3, TLS10, TLS11):
            answer = server_answer(port, client_hello(version,
                                                      MODERN_SUITES))
            self.assertEqual(answer, ('alert', 2, ALERT_PROTOCOL_VERSION),
                             hex(version))

    # -- cipher suites --------------------------------------------------

    def test_weak_suites_refused_hand_made_hello(self):
        port = self.server.port
        self.assertEqual(server_answer(port, client_hello(
            TLS12, MODERN_SUITES)), ('server_hello', TLS12))
        for name, suites in WEAK_SUITES.items():
            answer = server_answer(port, client_hello(TLS12, suites))
            self.assertEqual(answer, ('alert', 2, ALERT_HANDSHAKE_FAILURE),
                             name)

    def test_weak_suites_refused_openssl_client(self):
        tried = 0
        for ciphers in ('ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA',
                        'ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384',
                        'AES128-SHA:AES256-SHA:AES128-GCM-SHA256',
                        'DES-CBC3-SHA:ECDHE-ECDSA-DES-CBC3-SHA',
                        'RC4-SHA:ECDHE-ECDSA-RC4-SHA',
                        'ECDHE-ECDSA-NULL-SHA'):
            ctx = self._context(ssl.TLSVersion.TLSv1_2, ciphers)
            if ctx is None:
                continue   # not compiled into this OpenSSL
            tried += 1
            self._assertRefused(ctx)
        self.assertGreater(tried, 2)

    def test_tls_1_2_negotiates_aead_with_forward_secrecy(self):
        version, cipher = self._connect(
            self._context(ssl.TLSVersion.TLSv1_2))
        self.assertEqual(version, 'TLSv1.2')
        self.assertTrue(cipher.startswith('ECDHE-'), cipher)
        self.assertTrue(cipher.endswith(('-GCM-SHA256', '-GCM-SHA384',
                                         '-CHACHA20-POLY1305')), cipher)
        for ciphers in ('ECDHE-ECDSA-AES128-GCM-SHA256',
                        'ECDHE-ECDSA-CHACHA20-POLY1305'):
            self.assertEqual(self._connect(self._context(
                ssl.TLSVersion.TLSv1_2, ciphers)), ('TLSv1.2', ciphers))

    # -- the generated certificate ----------------------------------------

    def test_generated_certificate(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        tls_dir = os.path.dirname(self.server.ca)
        key_path = os.path.join(tls_dir, 'key.pem')
        for path in (self.server.ca, key_path):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600,
                             path)
        self.assertEqual(stat.S_IMODE(os.stat(tls_dir).st_mode), 0o700)
        with open(self.server.ca, 'rb') as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, 'rb') as f:
            key = serialization.load_pem_private_key(f.read(), None)
        # P-256: 128-bit security, as AES-128 and RSA-3072
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, (ec.SECP256R1, ec.SECP384R1))
        self.assertEqual(cert.public_key().public_numbers(),
                         key.public_key().public_numbers())
        self.assertIsInstance(cert.signature_hash_algorithm, hashes.SHA256)
        self.assertEqual(cert.signature_algorithm_oid,
                         x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256)
        # the certificate the server presents is this one
        with socket.create_connection(('127.0.0.1', self.server.port),
                                      5) as sock:
            ctx = ssl.create_default_context(cafile=self.server.ca)
            with ctx.wrap_socket(sock, server_hostname='127.0.0.1') as tls:
                der = tls.getpeercert(binary_form=True)
        self.assertEqual(der, cert.public_bytes(serialization.Encoding.DER))
