"""The command line's errors: one line that names the file or setting at
fault, in words, never Python's or OpenSSL's raw text (issue #18)."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from zodbkmi.facility import KeyManagementFacility
from zodbkmi.keyholder import write_key_file
from zodbkmi.server import generate_self_signed
from zodbkmi.testing import child_environ


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class _CLI(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-cli-messages-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.old = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, self.old)
        self.key = os.urandom(32)
        write_key_file('kek.key', self.key)
        KeyManagementFacility('keys').create_key(self.key)
        with open('in.txt', 'wb') as f:
            f.write(b'data\n')

    def error(self, *argv):
        """The one line ``zodbkmi ARGV`` prints on standard error (run as
        a user runs it, in a process of its own)."""
        proc = subprocess.run(
            [sys.executable, '-m', 'zodbkmi.cli'] + list(argv),
            capture_output=True, text=True, timeout=300,
            env=child_environ())
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertNotIn('Traceback', proc.stderr)
        self.assertNotIn('[Errno', proc.stderr)
        self.assertNotIn('_ssl.c', proc.stderr)
        return proc.stderr.splitlines()[-1]


class FileMessageTests(_CLI):

    def test_missing_input(self):
        self.assertEqual(
            self.error('encrypt-file', '-k', 'kek.key', '-d', 'keys',
                       'missing.txt', '-o', 'out.zks'),
            'zodbkmi encrypt-file: error: input file missing.txt: No such '
            'file or directory')

    def test_output_in_a_missing_directory(self):
        line = self.error('encrypt-file', '-k', 'kek.key', '-d', 'keys',
                          'in.txt', '-o', 'nowhere/out.zks')
        self.assertEqual(
            line, 'zodbkmi encrypt-file: error: output file %s: No such '
                  'file or directory'
                  % os.path.realpath(os.path.join(self.tmp, 'nowhere',
                                                  'out.zks')))
        self.assertNotIn('.part', line)

    def test_chunk_size(self):
        for value in ('7', 'abc', str(1 << 30)):
            self.assertEqual(
                self.error('encrypt-file', '-k', 'kek.key', '-d', 'keys',
                           'in.txt', '--chunk-size', value),
                "zodbkmi encrypt-file: error: argument --chunk-size: %r is "
                "not a chunk size: a power of two from 64 to 16777216 bytes"
                % value)


class TLSMessageTests(_CLI):

    def test_client_ca_file(self):
        with open('ca.pem', 'w') as f:
            f.write('not a certificate\n')
        write_key_file('token', os.urandom(32))
        self.assertEqual(
            self.error('status', '--url', 'https://127.0.0.1:9',
                       '--ca-file', 'ca.pem', '--token-file', 'token'),
            'zodbkmi status: error: CA file ca.pem: no PEM certificate in it')
        self.assertEqual(
            self.error('status', '--url', 'https://127.0.0.1:9',
                       '--ca-file', 'none.pem', '--token-file', 'token'),
            'zodbkmi status: error: CA file none.pem: No such file or '
            'directory')

    def test_serve_tls_files(self):
        cert, key = generate_self_signed('a', '127.0.0.1')
        _, other_key = generate_self_signed('b', '127.0.0.1')
        port = str(free_port())
        self.assertEqual(
            self.error('serve', '--port', port, '--tls-cert', 'none.pem',
                       '--tls-key', key),
            'zodbkmi serve: error: TLS certificate none.pem: No such file '
            'or directory')
        self.assertEqual(
            self.error('serve', '--port', port, '--tls-cert', cert,
                       '--tls-key', 'none.pem'),
            'zodbkmi serve: error: TLS key none.pem: No such file or '
            'directory')
        self.assertEqual(
            self.error('serve', '--port', port, '--tls-cert', cert,
                       '--tls-key', other_key),
            'zodbkmi serve: error: TLS certificate %s with TLS key %s: the '
            'key does not belong to the certificate' % (cert, other_key))
        self.assertEqual(
            self.error('serve', '--port', port, '--tls-cert', 'kek.key',
                       '--tls-key', key),
            'zodbkmi serve: error: TLS certificate kek.key with TLS key %s: '
            'not a PEM certificate or key' % key)

    def test_http_to_a_tls_server(self):
        port = free_port()
        env = child_environ()
        with open('serve.log', 'wb') as log:
            server = subprocess.Popen(
                [sys.executable, '-m', 'zodbkmi.cli', 'serve', '--port',
                 str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with open('serve.log', 'rb') as f:
                    if b'listening on' in f.read():
                        break
                self.assertIsNone(server.poll())
                time.sleep(0.1)
            self.assertEqual(
                self.error('status', '--url', 'http://127.0.0.1:%d' % port,
                           '--allow-http'),
                'zodbkmi status: error: key server http://127.0.0.1:%d '
                'cannot be reached (2 attempts): closed without an answer '
                '(is it an https:// server?)' % port)
        finally:
            server.terminate()
            server.wait(60)


class MigrateMessageTests(_CLI):
    """``zodbkmi migrate`` on the databases users point it at."""

    def setUp(self):
        super().setUp()
        import ZODB
        import ZODB.FileStorage
        db = ZODB.DB(ZODB.FileStorage.FileStorage('Data.fs'))
        with db.transaction() as conn:
            conn.root()['x'] = 1
        db.close()
        self.keys = ('--key-file', 'kek.key', '--key-dir', 'keys',
                     '--no-progress')

    def migrate(self, *argv):
        return subprocess.run(
            [sys.executable, '-m', 'zodbkmi.cli', 'migrate'] + list(argv)
            + list(self.keys), capture_output=True, text=True, timeout=300,
            env=child_environ())

    def test_zodb_section_as_zodb_config_reads_it(self):
        with open('zodb.conf', 'w') as f:
            f.write('<zodb>\n  <filestorage>\n    path %s/Data.fs\n'
                    '  </filestorage>\n</zodb>\n' % self.tmp)
        proc = self.migrate('scan', 'zodb.conf')
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_unknown_zconfig_key(self):
        with open('bad.conf', 'w') as f:
            f.write('<filestorage>\n  path %s/Data.fs\n  colour red\n'
                    '</filestorage>\n' % self.tmp)
        self.assertEqual(
            self.error('migrate', 'scan', 'bad.conf', *self.keys),
            "zodbkmi migrate: error: cannot open bad.conf: 'colour' is not "
            "a known key name")

    def test_unknown_zodburi_parameter(self):
        uri = 'file://%s/Data.fs?colour=red' % self.tmp
        self.assertEqual(
            self.error('migrate', 'scan', uri, *self.keys),
            'zodbkmi migrate: error: cannot open %s: Unrecognized database '
            'keyword(s): colour' % uri)

    def test_not_a_filestorage_leaves_nothing_beside_it(self):
        with open('notes.txt', 'w') as f:
            f.write('not a database\n')
        self.assertEqual(
            self.error('migrate', 'encrypt', 'notes.txt', *self.keys),
            'zodbkmi migrate: error: cannot open notes.txt: not a '
            'FileStorage file')
        self.assertEqual(sorted(n for n in os.listdir('.')
                                if n.startswith('notes.txt')), ['notes.txt'])

    def test_locked_database(self):
        import ZODB.FileStorage
        running = ZODB.FileStorage.FileStorage('Data.fs')   # the application
        try:
            self.assertEqual(
                self.error('migrate', 'encrypt', 'Data.fs', *self.keys),
                'zodbkmi migrate: error: cannot open Data.fs: it is locked '
                'by another process (stop the application, or migrate '
                'through a ZEO client or RelStorage)')
            # a scan and a dry run only read: they open it read-only
            for argv in (('scan', 'Data.fs'),
                         ('encrypt', '--dry-run', 'Data.fs')):
                proc = self.migrate(*argv)
                self.assertEqual(proc.returncode, 0, proc.stderr)
        finally:
            running.close()
