"""Tests of zodbkmi.cli.files: encrypt-file, decrypt-file, public-key."""
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

from zodbkmi.facility import KeyManagementFacility
from zodbkmi.format import stream
from zodbkmi.kek import RSAKeyEncryptingKey
from zodbkmi.keyholder import read_key_file
from zodbkmi.keyholder import write_key_file
from zodbkmi.testing import child_environ

GiB = 1 << 30
MiB = 1 << 20
_RSA = []


def rsa_pem():
    if not _RSA:
        _RSA.append(RSAKeyEncryptingKey.generate().private_pem())
    return _RSA[0]


def cli(*args, **kw):
    """Run ``python -m zodbkmi.cli ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, '-m', 'zodbkmi.cli'] + list(args),
        capture_output=True, timeout=120,
        env=child_environ(), **kw)


class _Base(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-cli-files-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.old = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, self.old)
        self.key = os.urandom(32)
        write_key_file('kek.key', self.key)
        KeyManagementFacility('keys').create_key(self.key)
        self.data = os.urandom(200000)
        with open('data', 'wb') as f:
            f.write(self.data)

    def main(self, *argv):
        from zodbkmi.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(list(argv))
        self.stderr = err.getvalue()
        return rc

    def read(self, path):
        with open(path, 'rb') as f:
            return f.read()


class EncryptFileTests(_Base):

    def test_roundtrip_w_facility(self):
        self.assertEqual(self.main('encrypt-file', '-k', 'kek.key',
                                   '-d', 'keys', 'data', '-o', 'data.zks'),
                         0)
        sealed = self.read('data.zks')
        self.assertEqual(sealed[:3], b'zks')
        self.assertNotIn(self.data[:100], sealed)
        self.assertEqual(self.main('decrypt-file', '--key-file', 'kek.key',
                                   '--key-dir', 'keys', 'data.zks',
                                   '--output', 'plain'), 0)
        self.assertEqual(self.read('plain'), self.data)

    def test_chunk_size(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks', '--chunk-size', '1048576')
        self.assertEqual(stream.parse_header(
            self.read('data.zks')).chunk_size, MiB)
        self.main('decrypt-file', '-k', 'kek.key', '-d', 'keys', 'data.zks',
                  '-o', 'plain')
        self.assertEqual(self.read('plain'), self.data)

    def test_bad_chunk_size(self):
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(SystemExit):
                self.main('encrypt-file', '--chunk-size', '1000')

    def test_existing_output_needs_force(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        self.assertEqual(self.main('encrypt-file', '-k', 'kek.key', '-d',
                                   'keys', 'data', '-o', 'data.zks'), 2)
        self.assertIn('exists', self.stderr)
        self.assertEqual(self.main('encrypt-file', '-k', 'kek.key', '-d',
                                   'keys', '-f', 'data', '-o', 'data.zks'),
                         0)

    def test_missing_key_arguments(self):
        self.assertEqual(self.main('encrypt-file', 'data', '-o', 'x'), 2)
        self.assertIn('give --recipient, or --key-file and --key-dir',
                      self.stderr)
        self.assertEqual(self.main('decrypt-file', 'data', '-o', 'x'), 2)
        self.assertIn('give --identity', self.stderr)
        self.assertEqual(self.main('encrypt-file', '-r', 'kek.pub', '-k',
                                   'kek.key', 'data', '-o', 'x'), 2)
        self.assertIn('excludes', self.stderr)
        self.assertEqual(self.main('encrypt-file', '-k', 'kek.key', '-d',
                                   'nokeys', 'data', '-o', 'x'), 2)
        self.assertIn('does not exist', self.stderr)
        self.assertFalse(os.path.exists('nokeys'))
        self.assertFalse(os.path.exists('x'))

    def test_key_file_readable_by_others(self):
        os.chmod('kek.key', 0o644)
        self.assertEqual(self.main('encrypt-file', '-k', 'kek.key', '-d',
                                   'keys', 'data', '-o', 'x'), 2)
        self.assertIn('chmod 600', self.stderr)

    def test_tampered_file_leaves_no_output(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        sealed = bytearray(self.read('data.zks'))
        sealed[-3] ^= 1
        with open('bad.zks', 'wb') as f:
            f.write(sealed)
        self.assertEqual(self.main('decrypt-file', '-k', 'kek.key', '-d',
                                   'keys', 'bad.zks', '-o', 'plain'), 2)
        self.assertIn('did not authenticate at chunk 3', self.stderr)
        self.assertFalse([n for n in os.listdir('.') if 'plain' in n])

    def test_truncated_file(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        sealed = self.read('data.zks')
        with open('cut.zks', 'wb') as f:
            f.write(sealed[:39 + 2 * (65536 + 16)])
        self.assertEqual(self.main('decrypt-file', '-k', 'kek.key', '-d',
                                   'keys', 'cut.zks', '-o', 'plain'), 2)
        self.assertIn('without its final chunk', self.stderr)
        self.assertFalse(os.path.exists('plain'))

    def test_wrong_key(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        write_key_file('other.key', os.urandom(32))
        self.assertEqual(self.main('decrypt-file', '-k', 'other.key', '-d',
                                   'keys', 'data.zks', '-o', 'plain'), 2)
        self.assertIn('which was not given', self.stderr)
        self.assertEqual(self.main('decrypt-file', '-k', 'kek.key',
                                   'data.zks', '-o', 'plain'), 2)
        self.assertIn('--key-dir', self.stderr)

    def test_reader_going_away_is_not_an_error(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        proc = subprocess.run(
            '"%s" -m zodbkmi.cli decrypt-file -k kek.key -d keys data.zks'
            ' | head -c 10 > /dev/null' % sys.executable, shell=True,
            capture_output=True, timeout=120,
            env=child_environ())
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(proc.stderr, b'')

    def interrupt_decrypt(self, sealed, timeout, fifo=False):
        """Start ``decrypt-file -o plain`` on a pipe holding the first
        chunks of ``sealed`` (its standard input, or with ``fifo`` a FIFO
        given by its path), send it SIGINT as soon as its temporary
        output exists, and return its exit status and standard error;
        fail if it is still running ``timeout`` seconds later."""
        import signal
        import time
        argv = [sys.executable, '-m', 'zodbkmi.cli', 'decrypt-file', '-k',
                'kek.key', '-d', 'keys', '-o', 'plain']
        if fifo:
            if os.path.exists('in.fifo'):
                os.unlink('in.fifo')
            os.mkfifo('in.fifo', 0o600)
            argv.append('in.fifo')
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL if fifo else subprocess.PIPE,
            stderr=subprocess.PIPE, env=child_environ(),
            # a shell ignores SIGINT in the jobs it puts in the
            # background, and the child would inherit that
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        writer = proc.stdin
        if fifo:
            # blocks until the process opens the FIFO for reading
            writer = open('in.fifo', 'wb')
        try:
            # the first chunks, then nothing more: the process waits for
            # input
            writer.write(sealed[:39 + 2 * 65552 + 100])
            writer.flush()
            deadline = time.monotonic() + 120
            while not [n for n in os.listdir('.') if n.endswith('.part')]:
                # until its temporary output exists (a loaded machine may
                # take long to start it): a signal sent before the process
                # reads its input tests nothing
                self.assertLess(time.monotonic(), deadline, 'no output')
                self.assertIsNone(proc.poll())
                time.sleep(0.05)
            # at once: the signal comes while the process is between two
            # reads of its input, or in one (the race of issue #18: the
            # handler ran, then read() blocked for ever)
            proc.send_signal(signal.SIGINT)
            # wait with standard input still open: closing it first (as
            # communicate() does) could end the stream before the signal
            # is handled, and the run would fail on a cut stream instead
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.fail('decrypt-file ignored SIGINT: still reading its '
                          'input %d seconds later' % timeout)
            return proc.returncode, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if writer is not None:
                writer.close()
            proc.stderr.close()

    def test_interrupted_decrypt_leaves_no_output(self):
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        rc, err = self.interrupt_decrypt(self.read('data.zks'), 300)
        self.assertEqual(rc, 130, err)
        self.assertIn(b'interrupted', err)
        self.assertEqual(sorted(n for n in os.listdir('.')
                                if 'plain' in n), [])

    def test_interrupt_while_reading_a_pipe_is_never_lost(self):
        # the signal and the blocking read() race: repeat it
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        sealed = self.read('data.zks')
        for i in range(10):
            # an exit takes well under a second; 20 allow for a loaded
            # machine, and a hang fails in 20 seconds, not in 300
            rc, err = self.interrupt_decrypt(sealed, 20)
            self.assertEqual(rc, 130, 'run %d: %r' % (i, err))
            self.assertEqual(sorted(n for n in os.listdir('.')
                                    if 'plain' in n), [], 'run %d' % i)

    def test_interrupt_while_reading_a_fifo_path_is_never_lost(self):
        # the same race with a FIFO named as the input (``<(...)``)
        self.main('encrypt-file', '-k', 'kek.key', '-d', 'keys', 'data',
                  '-o', 'data.zks')
        sealed = self.read('data.zks')
        for i in range(10):
            rc, err = self.interrupt_decrypt(sealed, 20, fifo=True)
            self.assertEqual(rc, 130, 'run %d: %r' % (i, err))
            self.assertEqual(sorted(n for n in os.listdir('.')
                                    if 'plain' in n), [], 'run %d' % i)


class RecipientCommandTests(_Base):

    def setUp(self):
        super().setUp()
        write_key_file('kek.pem', rsa_pem())

    def test_public_key_and_recipient_roundtrip(self):
        self.assertEqual(self.main('public-key', 'kek.pem', '-o', 'kek.pub'),
                         0)
        pub = self.read('kek.pub')
        self.assertTrue(pub.startswith(b'-----BEGIN PUBLIC KEY-----'))
        self.assertEqual(os.stat('kek.pub').st_mode & 0o777, 0o644)
        self.assertEqual(self.main('encrypt-file', '--recipient', 'kek.pub',
                                   'data', '-o', 'data.zks'), 0)
        self.assertIsNotNone(stream.parse_header(
            self.read('data.zks')).wrapped)
        self.assertEqual(self.main('decrypt-file', '--identity', 'kek.pem',
                                   'data.zks', '-o', 'plain'), 0)
        self.assertEqual(self.read('plain'), self.data)
        # the facility opens it too, with the private KEK
        self.assertEqual(self.main('decrypt-file', '-k', 'kek.pem', '-d',
                                   'keys', 'data.zks', '-o', 'plain2'), 0)
        self.assertEqual(self.read('plain2'), self.data)

    def test_public_key_to_stdout(self):
        proc = cli('public-key', 'kek.pem')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(b'PUBLIC KEY', proc.stdout)

    def test_public_key_of_aes_key(self):
        self.assertEqual(self.main('public-key', 'kek.key'), 2)
        self.assertIn('is not a hybrid or RSA key', self.stderr)

    def test_recipient_refuses_a_private_key_file(self):
        # the machine that writes backups must not hold the key that reads
        # them: a private key (or an AES key) given as --recipient is an
        # operator's mistake, refused in one line naming the KEK, never
        # silently replaced by its public half
        from zodbkmi.kek import as_kek
        for name in ('kek.pem', 'kek.key'):
            with self.subTest(name):
                kek_id = as_kek(read_key_file(name)).key_id
                self.assertEqual(self.main('encrypt-file', '-r', name,
                                           'data', '-o', 'data.zks'), 2)
                self.assertEqual(self.stderr.count('\n'), 1, self.stderr)
                self.assertIn('holds KEK %s that is no public key' % kek_id,
                              self.stderr)
                self.assertFalse(os.path.exists('data.zks'))

    def test_pipes(self):
        with open('kek.pub', 'wb') as f:
            f.write(RSAKeyEncryptingKey.from_pem(rsa_pem()).public_pem())
        enc = cli('encrypt-file', '--recipient', 'kek.pub',
                  input=self.data, cwd=self.tmp)
        self.assertEqual(enc.returncode, 0, enc.stderr)
        self.assertEqual(enc.stderr, b'')       # no progress on a pipe
        dec = cli('decrypt-file', '--identity', 'kek.pem', '-',
                  input=enc.stdout, cwd=self.tmp)
        self.assertEqual(dec.returncode, 0, dec.stderr)
        self.assertEqual(dec.stdout, self.data)
        bad = cli('decrypt-file', '--identity', 'kek.pem',
                  input=enc.stdout[:-1], cwd=self.tmp)
        self.assertEqual(bad.returncode, 2)
        self.assertIn(b'did not authenticate', bad.stderr)
        self.assertNotIn(b'Traceback', bad.stderr)


class HybridRecipientCommandTests(_Base):
    """public-key, encrypt-file --recipient and decrypt-file --identity with
    a hybrid (ML-KEM-768 + X25519) key."""

    def setUp(self):
        super().setUp()
        from zodbkmi.kek import HybridKeyEncryptingKey
        self.kek = HybridKeyEncryptingKey.generate()
        write_key_file('hyb.pem', self.kek.private_pem())
        write_key_file('kek.pem', rsa_pem())

    def test_roundtrip(self):
        self.assertEqual(self.main('public-key', 'hyb.pem', '-o', 'hyb.pub'),
                         0)
        pub = self.read('hyb.pub')
        self.assertTrue(pub.startswith(
            b'-----BEGIN ZODBKMI HYBRID PUBLIC KEY-----\n'))
        self.assertEqual(os.stat('hyb.pub').st_mode & 0o777, 0o644)
        self.assertEqual(self.main('encrypt-file', '--recipient', 'hyb.pub',
                                   'data', '-o', 'data.zks'), 0)
        w = stream.parse_header(self.read('data.zks')).wrapped
        self.assertEqual(w[4], 5)                   # suite 5, version 1
        self.assertEqual(self.main('decrypt-file', '--identity', 'hyb.pem',
                                   'data.zks', '-o', 'plain'), 0)
        self.assertEqual(self.read('plain'), self.data)
        self.assertEqual(self.main('decrypt-file', '-k', 'hyb.pem', '-d',
                                   'keys', 'data.zks', '-o', 'plain2'), 0)
        self.assertEqual(self.read('plain2'), self.data)
        # another identity: one line naming both KEKs, nothing written
        rsa_id = RSAKeyEncryptingKey.from_pem(rsa_pem()).key_id
        self.assertEqual(self.main('decrypt-file', '--identity', 'kek.pem',
                                   'data.zks', '-o', 'plain3'), 2)
        self.assertEqual(self.stderr.count('\n'), 1, self.stderr)
        self.assertIn('by KEK %s, not by KEK %s' % (self.kek.key_id, rsa_id),
                      self.stderr)
        self.assertFalse(os.path.exists('plain3'))
        # the public key where the private key is needed
        os.chmod('hyb.pub', 0o600)
        self.assertEqual(self.main('decrypt-file', '--identity', 'hyb.pub',
                                   'data.zks', '-o', 'plain3'), 2)
        self.assertIn('KEK %s: a public key where the private key is needed'
                      % self.kek.key_id, self.stderr)
        self.assertEqual(self.stderr.count('\n'), 1, self.stderr)

    def test_recipient_refuses_the_private_key(self):
        self.assertEqual(self.main('encrypt-file', '-r', 'hyb.pem', 'data',
                                   '-o', 'data.zks'), 2)
        self.assertEqual(self.stderr.count('\n'), 1, self.stderr)
        self.assertIn('--recipient hyb.pem holds KEK %s that is no public '
                      'key' % self.kek.key_id, self.stderr)
        self.assertNotIn(self.kek.private_pem().decode().splitlines()[1],
                         self.stderr)

    def test_damaged_public_key(self):
        pub = self.kek.public_pem()
        with open('hyb.pub', 'wb') as f:
            f.write(pub[:500] + pub[600:])
        self.assertEqual(self.main('encrypt-file', '-r', 'hyb.pub', 'data',
                                   '-o', 'data.zks'), 2)
        self.assertIn('error: key file hyb.pub: hybrid public key file '
                      'damaged', self.stderr)
        self.assertEqual(self.stderr.count('\n'), 1, self.stderr)


class _Blocks:
    """1 GiB of data in 1 MiB blocks, each block different."""

    def __init__(self, size=GiB, block=MiB):
        self.size = size
        self.base = os.urandom(block)

    def __iter__(self):
        for i in range(self.size // len(self.base)):
            yield i.to_bytes(8, 'big') + self.base[8:]


# Runs ``zodbkmi ARGS`` in a grandchild and writes the grandchild's peak
# resident set size (KiB, from wait4) to the file named first.  The
# grandchild is spawned from this small interpreter, not from the test
# process: Linux carries the peak RSS of the process that forked over exec.
MEASURE = """
import os, sys
pid = os.posix_spawn(sys.executable,
                     [sys.executable, '-m', 'zodbkmi.cli'] + sys.argv[2:],
                     os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], 'w') as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


class GiBPipeTests(_Base):
    """A 1 GiB round trip through pipes: encrypt-file | decrypt-file.

    About 3 seconds on the reference machine, so it stays at level 1.
    """

    def test_1GiB_roundtrip_through_pipes_in_constant_memory(self):
        env = child_environ()
        key = ['-k', 'kek.key', '-d', 'keys']
        enc = subprocess.Popen(
            [sys.executable, '-c', MEASURE, 'enc.rss', 'encrypt-file'] + key,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env)
        dec = subprocess.Popen(
            [sys.executable, '-c', MEASURE, 'dec.rss', 'decrypt-file'] + key,
            stdin=enc.stdout, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env)
        enc.stdout.close()
        blocks = _Blocks()
        sent = hashlib.sha1()

        def feed():
            try:
                for block in blocks:
                    sent.update(block)
                    enc.stdin.write(block)
            finally:
                enc.stdin.close()
        feeder = threading.Thread(target=feed)
        feeder.start()
        got = hashlib.sha1()
        size = 0
        while True:
            data = dec.stdout.read(MiB)
            if not data:
                break
            got.update(data)
            size += len(data)
        feeder.join(300)
        dec.stdout.close()
        for proc in (enc, dec):
            self.assertEqual(proc.wait(60), 0, proc.stderr.read())
            proc.stderr.close()
        self.assertEqual(size, GiB)
        self.assertEqual(got.hexdigest(), sent.hexdigest())
        for name in ('enc.rss', 'dec.rss'):
            peak = int(self.read(name)) * 1024
            self.assertGreater(peak, 4 * MiB)    # a real measurement
            self.assertLess(peak, 64 * MiB, '%s: peak RSS %.1f MiB'
                            % (name, peak / MiB))
