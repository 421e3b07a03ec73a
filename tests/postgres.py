"""A throwaway PostgreSQL cluster on a loopback port, as a test layer.

``PostgresLayer`` runs ``initdb`` and ``pg_ctl`` from Debian's
``postgresql`` package (as the ``postgres`` user when the tests run as
root), listening on 127.0.0.1 only, and removes the cluster in tearDown.
"""
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import unittest
from zodbkmi.testing import free_port


def postgres_bin():
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
                   key=lambda p: int(p.split('/')[-3]))
    return os.path.dirname(found[-1]) if found else None


class ThrowawayPostgres:
    """One cluster in its own temporary directory."""

    def __init__(self, port=None):
        self.bin = postgres_bin()
        self.port = port or free_port()
        self.base = tempfile.mkdtemp(prefix='zodbkmi-pg-')
        self.data = os.path.join(self.base, 'data')
        self.prefix = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam('postgres')
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self.prefix = ['runuser', '-u', 'postgres', '--']

    def _run(self, *args):
        subprocess.run(self.prefix + list(args), check=True, cwd=self.base,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self):
        self._run(self.bin + '/initdb', '-D', self.data, '-U', 'postgres',
                  '-A', 'trust', '-E', 'UTF8', '--no-sync')
        self.resume()

    def pause(self):
        """Stop the server (an outage), keeping the cluster."""
        self._run(self.bin + '/pg_ctl', '-D', self.data, '-m', 'fast',
                  '-w', 'stop')

    def resume(self):
        """Start the server (again, after :meth:`pause`)."""
        self._run(self.bin + '/pg_ctl', '-D', self.data, '-l',
                  self.base + '/server.log', '-w', '-t', '30', '-o',
                  '-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off '
                  '-c synchronous_commit=off -c full_page_writes=off'
                  % (self.port, self.base), 'start')

    def createdb(self, name):
        subprocess.run([self.bin + '/createdb', '-h', '127.0.0.1', '-p',
                        str(self.port), '-U', 'postgres', name], check=True)
        return self.dsn(name)

    def dsn(self, name):
        return ('dbname=%s user=postgres host=127.0.0.1 port=%d'
                % (name, self.port))

    def dump(self, name):
        """Everything in database ``name``, as ``pg_dump`` writes it."""
        return subprocess.run(
            [self.bin + '/pg_dump', '-h', '127.0.0.1', '-p', str(self.port),
             '-U', 'postgres', '--data-only', name],
            check=True, stdout=subprocess.PIPE).stdout

    def stop(self):
        try:
            self._run(self.bin + '/pg_ctl', '-D', self.data, '-m',
                      'immediate', '-w', 'stop')
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class PostgresLayer:
    """Starts one cluster for the tests of the layer; ``server`` is the
    ThrowawayPostgres (None when PostgreSQL is not installed)."""

    __name__ = 'PostgresLayer'
    __module__ = __name__
    server = None

    @classmethod
    def setUp(cls):
        if postgres_bin() is None:
            return
        cls.server = ThrowawayPostgres()
        cls.server.start()

    @classmethod
    def tearDown(cls):
        if cls.server is not None:
            cls.server.stop()
            cls.server = None


def needs_postgres(test):
    if PostgresLayer.server is None:
        raise unittest.SkipTest('Debian package postgresql not installed')
