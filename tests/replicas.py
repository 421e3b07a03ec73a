"""Several ``zodbkmi serve`` replicas over one PostgreSQL key store.

:class:`Replicas` starts ``n`` real server processes on loopback ports,
with TLS (one self-signed certificate shared by all, so one CA file
verifies every replica), the same tokens (an admin, a client and a
metrics token) and the key store URL given in the environment
(``ZODBKMI_KEY_STORE``, never on the command line: it may hold a
password).  Used by the PostgreSQL key store tests, the client failover
tests and ``benchmarks/bench_server.py``.
"""
import json
import os
import shutil
import tempfile

from zodbkmi.fileutil import write_atomic
from zodbkmi.rest import hash_token
from zodbkmi.rest import new_token
from zodbkmi.server import generate_self_signed
from zodbkmi.testing import ServerProcess


class Replicas:
    """``n`` replicas serving ``key_store`` (a ``postgresql://`` URL).

    ``args`` and ``env`` are given to every replica.  Attributes after
    :meth:`start`: ``servers`` (:class:`zodbkmi.testing.ServerProcess`),
    ``urls``, ``ca`` (the CA file), ``admin``, ``client``, ``metrics``
    (the tokens)."""

    def __init__(self, key_store, n=3, args=(), env=None):
        self.base = tempfile.mkdtemp(prefix='zodbkmi-replicas-')
        self.key_store = key_store
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
            environ = {'ZODBKMI_KEY_STORE': key_store,
                       'ZODBKMI_ACCESS_LOG': 'no'}
            environ.update(env or {})
            self.servers.append(ServerProcess(
                *args, env=environ, directory=directory, start=False))
        self.urls = [s.url for s in self.servers]

    def start(self):
        for server in self.servers:
            if server.proc is None:
                server.start()
        return self

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
