"""Several ``zodbkmi serve`` replicas of one key service.

:class:`Replicas` starts ``n`` real server processes on loopback ports,
with TLS (one self-signed certificate shared by all, so one CA file
verifies every replica), the same tokens (an admin, a client and a
metrics token) and one key store: a PostgreSQL database, its URL given in
the environment (``ZODBKMI_KEY_STORE``, never on the command line: it may
hold a password), or a key directory shared by every replica.  Each
replica is a process group of its own, so that :meth:`Replicas.kill`
(SIGKILL) also ends its workers.  Used by the PostgreSQL key store tests,
the client failover tests and ``benchmarks/bench_server.py``.
"""
import http.client
import json
import os
import shutil
import ssl
import tempfile

from zodbkmi.fileutil import write_atomic
from zodbkmi.rest import hash_token
from zodbkmi.rest import new_token
from zodbkmi.server import generate_self_signed
from zodbkmi.testing import ServerProcess


class Replicas:
    """``n`` replicas serving ``key_store`` (a ``postgresql://`` URL; None:
    the key directory ``key_dir`` of them all).

    ``args`` and ``env`` are given to every replica.  Attributes:
    ``servers`` (:class:`zodbkmi.testing.ServerProcess`), ``urls``, ``ca``
    (the CA file), ``admin``, ``client``, ``metrics`` (the tokens)."""

    def __init__(self, key_store=None, n=3, args=(), env=None):
        self.base = tempfile.mkdtemp(prefix='zodbkmi-replicas-')
        self.key_store = key_store
        self.key_dir = os.path.join(self.base, 'keys')
        if key_store is None:
            args = ('--key-dir', self.key_dir) + tuple(args)
        self.admin, self.client, self.metrics = (new_token() for _ in
                                                 range(3))
        tls = os.path.join(self.base, 'tls')
        cert, key = generate_self_signed(tls)
        self.ca = cert
        table = {'tokens': [
            {'name': role, 'role': role, 'sha256': hash_token(token)}
            for role, token in (('admin', self.admin),
                                ('client', self.client),
                                ('metrics', self.metrics))]}
        self.servers = []
        for i in range(n):
            directory = os.path.join(self.base, 'replica%d' % i)
            var = os.path.join(directory, 'var')
            os.makedirs(os.path.join(var, 'tls'), mode=0o700)
            write_atomic(os.path.join(var, 'tokens.json'),
                         json.dumps(table).encode('ascii'))
            for role in ('admin', 'client'):
                write_atomic(os.path.join(var, role + '.token'),
                             getattr(self, role).encode('ascii') + b'\n')
            for name in ('cert.pem', 'key.pem'):
                shutil.copy(os.path.join(tls, name),
                            os.path.join(var, 'tls', name))
            environ = {'ZODBKMI_ACCESS_LOG': 'no'}
            if key_store is not None:
                environ['ZODBKMI_KEY_STORE'] = key_store
            environ.update(env or {})
            self.servers.append(ServerProcess(
                *args, env=environ, directory=directory, new_session=True,
                start=False))
        self.urls = [s.url for s in self.servers]

    def start(self):
        """Start every replica not running (again, after a kill)."""
        for server in self.servers:
            if server.proc is None or server.proc.poll() is not None:
                server.start()
        return self

    def kill(self, i=None):
        """SIGKILL replica ``i`` (None: all of them) and its workers."""
        for s in (self.servers if i is None else [self.servers[i]]):
            s.kill()

    def facility(self, test, urls=None, **kw):
        """A client of the replicas (admin token), closed after
        ``test``."""
        from zodbkmi.client import LocalKeyManagementFacility
        kw.setdefault('token', self.admin)
        kw.setdefault('ca_file', self.ca)
        kw.setdefault('request_timeout', 10.0)
        facility = LocalKeyManagementFacility(urls or self.urls, **kw)
        test.addCleanup(facility.close)
        return facility

    def delete(self, dek_id, i=0):
        """DELETE ``dek_id`` on replica ``i`` by plain HTTPS (not through a
        facility of this process, which would evict the DEK from every
        cache here); the status."""
        ctx = ssl.create_default_context(cafile=self.ca)
        conn = http.client.HTTPSConnection(
            '127.0.0.1', self.servers[i].port, context=ctx, timeout=30)
        try:
            conn.request('DELETE', '/v1/keys/' + dek_id, headers={
                'Authorization': 'Bearer ' + self.admin})
            return conn.getresponse().status
        finally:
            conn.close()

    def stop(self):
        for server in self.servers:
            server.stop()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def logs(self):
        """Everything the replicas wrote: stdout, stderr, audit logs."""
        text = []
        for server in self.servers:
            text.append(server.stdout())
            text.append(server.stderr())
            path = os.path.join(server.dir, 'var', 'audit.log')
            if os.path.exists(path):
                with open(path) as f:
                    text.append(f.read())
        return '\n'.join(text)
