"""Test support: a facility and a key holder with a fixed, public test key.

The testing KEK and DEK are derived from public strings, so every
:class:`TestingKeyManagementFacility` (in any directory, in any process) can
read what another one wrote: a test database can be reused.  They protect
nothing; never use them outside tests.
"""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import zope.component.testing
from zope.interface import implementer

from zodbkmi import facility
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.kek import AESKeyEncryptingKey

KeyEncryptingKey = hashlib.sha256(b'zodbkmi public testing KEK').digest()
TESTING_DEK_ID = hashlib.sha256(b'zodbkmi public testing DEK id').digest()[:16]
_TESTING_DEK = hashlib.sha256(b'zodbkmi public testing DEK').digest()


class TestingKeyManagementFacility(facility.KeyManagementFacility):
    """A master facility that always hands out the same (public) KEK."""

    def __init__(self, storage_dir, **kw):
        super().__init__(storage_dir, **kw)
        kek = AESKeyEncryptingKey(KeyEncryptingKey)
        if TESTING_DEK_ID.hex() not in self:
            self.create_key(kek, _dek=_TESTING_DEK, _dek_id=TESTING_DEK_ID)

    def generate(self):
        return KeyEncryptingKey


@implementer(IKeyHolder)
class TestingKeyHolder:
    """A key holder with the public testing KEK."""

    key = KeyEncryptingKey
    previous_keys = ()

    def __repr__(self):
        return '<TestingKeyHolder>'


def setUp(test=None):
    """Reset the component registry (for doctests and unit tests)."""
    zope.component.testing.setUp(test)


def tearDown(test=None):
    zope.component.testing.tearDown(test)


def setupRestApi(localFacility, masterFacility):
    """Wire ``localFacility`` (a LocalKeyManagementFacility) to the REST API
    of ``masterFacility`` in this process, without a socket, as keas.kmi's
    function of the same name.  A fresh admin token is made for the pair.
    Return the WSGI application."""
    from zodbkmi import rest
    token = rest.new_token()
    tokens = rest.TokenTable([('testing', 'admin', rest.hash_token(token))])
    app = rest.KeyServerApp(masterFacility, tokens)
    localFacility._transport = rest.WSGITransport(app)
    localFacility._token = token
    localFacility.clear_cache()
    return app


def free_port(host='127.0.0.1'):
    """A TCP port that is free on ``host`` (loopback) right now, for the
    servers that tests and benchmarks start."""
    s = socket.socket()
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


class ServerProcess:
    """``zodbkmi serve`` started for real, as a subprocess, in a temporary
    directory of its own (embedded defaults: keys in ``var/keys``, a
    generated certificate in ``var/tls``, tokens in ``var``), on a free
    loopback port; for tests and benchmarks.  ``args`` are more command
    line arguments, ``env`` more environment variables.  Stop it with
    :meth:`stop`, then remove its directory with :meth:`cleanup`.
    """

    def __init__(self, *args, env=None, timeout=30):
        self.dir = tempfile.mkdtemp(prefix='zodbkmi-server-')
        self.port = free_port()
        self.url = 'https://127.0.0.1:%d' % self.port
        self.out = open(os.path.join(self.dir, 'out.txt'), 'w+')
        self.err = open(os.path.join(self.dir, 'err.txt'), 'w+')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'zodbkmi.cli', 'serve',
             '--port', str(self.port)] + list(args),
            cwd=self.dir, stdout=self.out, stderr=self.err,
            env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.stderr()
                self.stop()
                self.cleanup()
                raise RuntimeError('server exited: %s' % err)
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    self.cleanup()
                    raise RuntimeError('server did not start')
                time.sleep(0.05)
        self.ca = os.path.join(self.dir, 'var', 'tls', 'cert.pem')
        self.key_dir = os.path.join(self.dir, 'var', 'keys')
        self.admin = self.read('var/admin.token')
        self.client = self.read('var/client.token')

    def read(self, name):
        """The text of the file ``name`` of the server's directory."""
        with open(os.path.join(self.dir, name)) as f:
            return f.read().strip()

    def stdout(self):
        self.out.flush()
        return self.read('out.txt')

    def stderr(self):
        """What the server wrote to stderr: its log, access log included."""
        self.err.flush()
        return self.read('err.txt')

    def pids(self):
        """The server process and all its descendants (its workers)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for tid in os.listdir('/proc/%d/task' % pid):
                    with open('/proc/%d/task/%s/children' % (pid, tid)) as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return found

    def rss(self):
        """Resident memory of the process tree, in bytes (from /proc)."""
        total = 0
        for pid in self.pids():
            try:
                with open('/proc/%d/status' % pid) as f:
                    for line in f:
                        if line.startswith('VmRSS:'):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self):
        """SIGTERM (SIGKILL after 15 s); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:   # pragma: no cover
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        self.err.close()
        return self.proc.returncode

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
