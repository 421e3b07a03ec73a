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


def child_environ(extra=None):
    """The environment for a Python child process that must import what
    this process imports: ``os.environ`` with ``PYTHONPATH`` set to this
    process's ``sys.path`` (under zc.buildout, ``bin/test`` puts the eggs
    on ``sys.path`` itself, and ``sys.executable`` alone knows none of
    them), and ``extra`` on top."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra or {})
    return env


class TestingKeyManagementFacility(facility.KeyManagementFacility):
    """A master facility that always hands out the same (public) KEK."""

    def __init__(self, storage_dir, **kw):
        super().__init__(storage_dir, **kw)
        kek = AESKeyEncryptingKey(KeyEncryptingKey)
        if TESTING_DEK_ID.hex() not in self:
            self.create_key(kek, _dek=_TESTING_DEK, _dek_id=TESTING_DEK_ID)

    def generate(self, kind=None):
        """The fixed, public testing KEK (an AES key), whatever ``kind``."""
        return KeyEncryptingKey


@implementer(IKeyHolder)
class StaticKeyHolder:
    """A key holder of KEKs given in memory: ``key`` (a new random AES-256
    KEK when not given) and ``previous_keys``.  For tests; applications
    read their KEK from a key source (:mod:`zodbkmi.sources`) or a file
    (:class:`zodbkmi.keyholder.KeyHolder`)."""

    def __init__(self, key=None, previous_keys=()):
        self.key = key or os.urandom(32)
        self.previous_keys = tuple(previous_keys)

    def __repr__(self):
        return '<StaticKeyHolder (+%d previous)>' % len(self.previous_keys)


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
    from zodbkmi.client import WSGITransport
    token = rest.new_token()
    tokens = rest.TokenTable([('testing', 'admin', rest.hash_token(token))])
    app = rest.KeyServerApp(masterFacility, tokens)
    localFacility._transport = WSGITransport(app)
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
    """``zodbkmi serve`` started for real, as a subprocess, on a free
    loopback port, for tests and benchmarks.

    It runs in ``directory`` (a new temporary directory by default) with
    the embedded defaults: keys in ``var/keys``, a generated certificate
    in ``var/tls``, tokens in ``var``.  ``args`` are more command line
    arguments, ``env`` more environment variables.  With ``new_session``
    the server and its workers form a process group of their own, which
    :meth:`kill` ends with SIGKILL.  :meth:`start` starts it (again, on
    the same directory and port: at once unless ``start`` is false);
    :meth:`stop` ends it, :meth:`cleanup` removes its directory.
    """

    def __init__(self, *args, env=None, timeout=30, directory=None,
                 port=None, new_session=False, start=True):
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix='zodbkmi-server-')
        self.port = port or free_port()
        self.url = 'https://127.0.0.1:%d' % self.port
        self.args = list(args)
        self.env = env or {}
        self.timeout = timeout
        self.new_session = new_session
        self.proc = None
        self.starts = 0
        self.ca = os.path.join(self.dir, 'var', 'tls', 'cert.pem')
        self.key_dir = os.path.join(self.dir, 'var', 'keys')
        if start:
            self.start()

    def start(self):
        """Start the server; return when it accepts connections."""
        self.starts += 1
        self.out = open(os.path.join(self.dir, 'out.txt'), 'a+')
        self.err = open(os.path.join(self.dir, 'err.txt'), 'a+')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'zodbkmi.cli', 'serve',
             '--port', str(self.port)] + self.args,
            cwd=self.dir, stdout=self.out, stderr=self.err,
            env=child_environ(self.env),
            start_new_session=self.new_session)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                err = self.stderr()
                self._failed()
                raise RuntimeError('server exited: %s' % err)
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._failed()
                    raise RuntimeError('server did not start')
                time.sleep(0.02)
        from zodbkmi.fileutil import read_secret_text
        self.admin = read_secret_text(
            os.path.join(self.dir, 'var', 'admin.token'), 'token')
        self.client = read_secret_text(
            os.path.join(self.dir, 'var', 'client.token'), 'token')
        return self

    def _failed(self):
        self.stop()
        if self._own_dir and self.starts == 1:
            self.cleanup()

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

    def kill(self):
        """SIGKILL the server (its process group, with ``new_session``)."""
        if self.proc is None:
            return
        try:
            if self.new_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except ProcessLookupError:   # pragma: no cover
            pass
        self._reap()

    def stop(self):
        """SIGTERM (SIGKILL after 15 s); return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:   # pragma: no cover
                self.kill()
                return None
        return self._reap()

    def _reap(self):
        rc = self.proc.wait()
        self.proc = None
        self.out.close()
        self.err.close()
        return rc

    def cleanup(self):
        """Remove the directory the server ran in."""
        shutil.rmtree(self.dir, ignore_errors=True)
