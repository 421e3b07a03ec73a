"""Tests of the local key commands: ``kek-file`` and ``create-key``."""
import contextlib
import io
import os
import shutil
import stat
import tempfile
import unittest

from zodbkmi.cli import main
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.keyholder import read_key_file
from zodbkmi.kek import as_kek


class LocalKeyCommandTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-cli-keys-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.old = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, self.old)

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def test_kek_file_aes(self):
        rc, out, err = self.run_cli('kek-file', 'site.key')
        self.assertEqual((rc, err), (0, ''))
        key = read_key_file('site.key')
        self.assertEqual(len(key), 32)
        self.assertEqual(out.strip(), as_kek(key).key_id)
        self.assertEqual(stat.S_IMODE(os.stat('site.key').st_mode), 0o600)
        # the key is never printed
        self.assertNotIn(key.hex(), out)

    def test_kek_file_rsa(self):
        rc, out, err = self.run_cli('kek-file', '--rsa', 'site.pem')
        self.assertEqual(rc, 0, err)
        key = read_key_file('site.pem')
        self.assertTrue(key.startswith(b'-----BEGIN PRIVATE KEY-----'))
        self.assertEqual(out.strip(), as_kek(key).key_id)
        self.assertTrue(out.startswith('rsa-'))

    def test_kek_file_never_overwrites(self):
        for existing in ('site.key', 'link'):
            with open('site.key', 'wb') as f:
                f.write(b'precious')
            if existing == 'link':
                os.symlink('nowhere', 'link')
            rc, out, err = self.run_cli('kek-file', existing)
            self.assertEqual((rc, out), (2, ''))
            self.assertEqual(
                err, 'zodbkmi kek-file: error: %s exists: refusing to '
                     'overwrite a key\n' % existing)
        with open('site.key', 'rb') as f:
            self.assertEqual(f.read(), b'precious')
        self.assertFalse(os.path.exists('nowhere'))

    def test_create_key_in_a_key_directory(self):
        self.run_cli('kek-file', 'site.key')
        rc, first, err = self.run_cli('create-key', 'site.key',
                                      '--key-dir', 'keys')
        self.assertEqual(rc, 0, err)
        kek = read_key_file('site.key')
        facility = KeyManagementFacility('keys')
        self.assertEqual(facility.ensure_key(kek), first.strip())
        # again: a new active data key, the first one retired
        rc, second, err = self.run_cli('create-key', 'site.key',
                                       '--key-dir', 'keys')
        self.assertEqual(rc, 0, err)
        self.assertNotEqual(first, second)
        facility = KeyManagementFacility('keys')
        self.assertEqual(facility.ensure_key(kek), second.strip())
        self.assertEqual(facility.entry(first.strip()).state, 'retired')
        sealed = facility.encrypt(kek, b'data')
        self.assertEqual(facility.decrypt(kek, sealed), b'data')

    def test_create_key_errors_are_one_line(self):
        with open('open.key', 'w') as f:
            f.write('x' * 44 + '\n')
        os.chmod('open.key', 0o644)
        for argv in (('create-key', 'missing.key', '--key-dir', 'keys'),
                     ('create-key', 'open.key', '--key-dir', 'keys')):
            rc, out, err = self.run_cli(*argv)
            self.assertEqual(rc, 2)
            self.assertEqual(err.count('\n'), 1, err)
            self.assertTrue(err.startswith('zodbkmi create-key: error: '),
                            err)
            self.assertNotIn('Traceback', err)
        self.assertFalse(os.path.exists('keys'))
