"""Test fixture: a real PyKMIP server with TLS client certificates on loopback.

PyKMIP (the ``kmip`` extra) ships ``pykmip-server``.  :class:`KmipServer`
makes a throwaway CA, a server certificate for 127.0.0.1 and client
certificates with ``cryptography``, writes a configuration with a SQLite
database in a temporary directory and starts the server as a subprocess
(stopped by its process group id: the server and its policy manager).
:class:`KmipLayer` shares one server between tests.  When PyKMIP is missing
the layer fails loudly, unless ``ZODBKMI_SKIP_KMIP=1`` is set, in which case
tests using it are skipped.
"""
import datetime
import importlib.util
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from zodbkmi.testing import free_port

SKIP_ENV = 'ZODBKMI_SKIP_KMIP'
CLIENT_NAME = 'zodbkmi'

_SERVER = ('import warnings; warnings.simplefilter("ignore"); '
           'from kmip.services.server.server import main; main()')


def skip_requested():
    return os.environ.get(SKIP_ENV) == '1'


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class _CA:
    """A throwaway certificate authority."""

    def __init__(self, name):
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._build(name, self.key.public_key(), ca=True)

    def _build(self, subject, public_key, ca=False, usage=None, ip=None):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(subject))
                   .issuer_name(_name(self.name))
                   .public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca,
                                                        path_length=None),
                                  critical=True))
        if usage is not None:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([usage]), critical=False)
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, directory, name, common_name, server=False):
        """Write ``name``.pem and ``name``.key (0600); return their
        paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        if server:
            cert = self._build(common_name, key.public_key(),
                               usage=ExtendedKeyUsageOID.SERVER_AUTH,
                               ip='127.0.0.1')
        else:
            cert = self._build(common_name, key.public_key(),
                               usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        cert_path = os.path.join(directory, name + '.pem')
        key_path = os.path.join(directory, name + '.key')
        with open(cert_path, 'wb') as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return cert_path, key_path

    def write(self, path):
        with open(path, 'wb') as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


class KmipServer:
    """``pykmip-server`` in its own temporary directory on a free port.

    ``ca_file``, ``cert_file`` and ``key_file`` are what a client needs;
    ``intruder`` is a client certificate of the same CA for another
    identity, ``rogue`` one signed by another CA.
    """

    def __init__(self):
        self.port = free_port()
        self.host = '127.0.0.1'
        self.dir = tempfile.mkdtemp(prefix='zodbkmi-kmip-')
        self.proc = None

    def start(self, timeout=60):
        if importlib.util.find_spec('kmip') is None:
            raise RuntimeError('PyKMIP is not installed (pip install '
                               'zodbkmi[kmip], or set %s=1 to skip)'
                               % SKIP_ENV)
        d = self.dir
        ca = _CA('zodbkmi test KMIP CA')
        self.ca_file = ca.write(os.path.join(d, 'ca.pem'))
        server_cert, server_key = ca.issue(d, 'server', 'kmip-server',
                                           server=True)
        self.cert_file, self.key_file = ca.issue(d, 'client', CLIENT_NAME)
        self.intruder = ca.issue(d, 'intruder', 'intruder')
        self.rogue = _CA('rogue CA').issue(d, 'rogue', CLIENT_NAME)
        os.mkdir(os.path.join(d, 'policies'))
        conf = os.path.join(d, 'server.conf')
        with open(conf, 'w') as f:
            f.write('[server]\nhostname=%s\nport=%d\ncertificate_path=%s\n'
                    'key_path=%s\nca_path=%s\nauth_suite=TLS1.2\n'
                    'enable_tls_client_auth=True\nlogging_level=WARNING\n'
                    'database_path=%s\npolicy_path=%s\n'
                    % (self.host, self.port, server_cert, server_key,
                       self.ca_file, os.path.join(d, 'kmip.sqlite'),
                       os.path.join(d, 'policies')))
        with open(os.path.join(d, 'stderr.log'), 'wb') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-c', _SERVER, '-f', conf, '-l',
                 os.path.join(d, 'server.log')],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=d, start_new_session=True)
        deadline = time.monotonic() + timeout
        from zodbkmi.exceptions import KmipError
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('pykmip-server exited with %s: %s'
                                   % (self.proc.returncode,
                                      self.log()[-2000:]))
            client = self.client(timeout=2)
            try:
                client.locate('zodbkmi-ready-check')
                break
            except KmipError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('pykmip-server did not start within %ss'
                                   % timeout)
            time.sleep(0.1)
        return self

    def log(self):
        text = ''
        for name in ('stderr.log', 'server.log'):
            try:
                with open(os.path.join(self.dir, name),
                          errors='replace') as f:
                    text += f.read()
            except OSError:
                pass
        return text

    def client(self, cert=None, timeout=10.0, **kw):
        """A :class:`~zodbkmi.sources.kmip.KmipClient` for this server;
        ``cert`` is a (certificate, key) pair, default the client's."""
        from zodbkmi.sources.kmip import KmipClient
        cert_file, key_file = cert or (self.cert_file, self.key_file)
        return KmipClient(self.host, self.port, cert_file, key_file,
                          self.ca_file, timeout=timeout, **kw)

    def params(self, **kw):
        """``kmip`` settings for this server (add ``uid`` or ``name``)."""
        params = {'source': 'kmip', 'host': self.host, 'port': self.port,
                  'certFile': self.cert_file, 'keyFile': self.key_file,
                  'caFile': self.ca_file, 'timeout': 10.0}
        params.update(kw)
        return params

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            # The server and its multiprocessing manager: our own process
            # group (SIGTERM would wait for the 10 s accept timeout).
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


def create_raw_key(client, algorithm, length, activate=True):
    """Create a symmetric key of any ``algorithm`` (a PyKMIP enum name,
    e.g. ``'TRIPLE_DES'``) and ``length``; return its uid."""
    from kmip.core import enums
    from kmip.core import objects
    from kmip.core.factories.attributes import AttributeFactory
    from kmip.core.messages import payloads
    f = AttributeFactory()
    attributes = [
        f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM,
                           enums.CryptographicAlgorithm[algorithm]),
        f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, length),
        f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                           [enums.CryptographicUsageMask.ENCRYPT,
                            enums.CryptographicUsageMask.DECRYPT])]
    payload = client.call(
        enums.Operation.CREATE,
        payloads.CreateRequestPayload(
            object_type=enums.ObjectType.SYMMETRIC_KEY,
            template_attribute=objects.TemplateAttribute(
                attributes=attributes)),
        'a test key')
    if activate:
        client.activate(payload.unique_identifier)
    return payload.unique_identifier


class KmipLayer:
    """One PyKMIP server for the tests of the layer (``server``)."""

    server = None

    @classmethod
    def setUp(cls):
        if skip_requested():
            return
        cls.server = KmipServer().start()

    @classmethod
    def tearDown(cls):
        if cls.server is not None:
            cls.server.stop()
            cls.server = None


class KmipTestCase(unittest.TestCase):
    """Base class of tests using :class:`KmipLayer`."""

    layer = KmipLayer

    def setUp(self):
        if skip_requested():
            self.skipTest('%s=1' % SKIP_ENV)
        self.kmip = KmipLayer.server
