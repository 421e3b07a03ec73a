"""Tests of zodbkmi.fileutil: the atomic writer and the secret reader."""
import os
import shutil
import stat
import tempfile
import unittest

from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.exceptions import SecretFileError


class _TmpDir(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-fileutil-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def mode(self, name):
        return stat.S_IMODE(os.stat(self.path(name)).st_mode)


class WriteAtomicTests(_TmpDir):

    def _callFUT(self, *args, **kw):
        from zodbkmi.fileutil import write_atomic
        return write_atomic(*args, **kw)

    def test_writes_0600_whatever_the_umask(self):
        old = os.umask(0)
        try:
            self._callFUT(self.path('k'), b'secret')
        finally:
            os.umask(old)
        with open(self.path('k'), 'rb') as f:
            self.assertEqual(f.read(), b'secret')
        self.assertEqual(self.mode('k'), 0o600)
        self.assertEqual(os.listdir(self.tmp), ['k'])

    def test_mode_given(self):
        self._callFUT(self.path('pub.pem'), b'public', 0o644)
        self.assertEqual(self.mode('pub.pem'), 0o644)

    def test_replaces_an_existing_file_by_default(self):
        self._callFUT(self.path('k'), b'old')
        self._callFUT(self.path('k'), b'new')
        with open(self.path('k'), 'rb') as f:
            self.assertEqual(f.read(), b'new')
        self.assertEqual(os.listdir(self.tmp), ['k'])

    def test_w_overwrite_false_refuses_an_existing_file(self):
        self._callFUT(self.path('k'), b'old')
        with self.assertRaises(FileExistsError):
            self._callFUT(self.path('k'), b'new', overwrite=False)
        with open(self.path('k'), 'rb') as f:
            self.assertEqual(f.read(), b'old')
        self.assertEqual(os.listdir(self.tmp), ['k'])

    def test_failure_leaves_no_file(self):
        # bytes expected: the write fails after the temporary file exists
        with self.assertRaises(TypeError):
            self._callFUT(self.path('k'), 'text')
        self.assertEqual(os.listdir(self.tmp), [])

    def test_failure_leaves_the_old_file(self):
        self._callFUT(self.path('k'), b'old')
        with self.assertRaises(TypeError):
            self._callFUT(self.path('k'), 'text')
        with open(self.path('k'), 'rb') as f:
            self.assertEqual(f.read(), b'old')
        self.assertEqual(os.listdir(self.tmp), ['k'])

    def test_missing_directory_is_named_by_the_file(self):
        target = os.path.join(self.tmp, 'missing', 'k')
        with self.assertRaises(FileNotFoundError) as cm:
            self._callFUT(target, b'x')
        self.assertIn(target, str(cm.exception))
        self.assertNotIn('.part', str(cm.exception))

    def test_never_renames_over_a_fifo(self):
        os.mkfifo(self.path('fifo'))
        with self.assertRaises(ValueError):
            self._callFUT(self.path('fifo'), b'x')
        self.assertTrue(stat.S_ISFIFO(os.stat(self.path('fifo')).st_mode))
        self.assertEqual(os.listdir(self.tmp), ['fifo'])

    def test_temporary_file_is_named_for_the_key_store(self):
        from zodbkmi.fileutil import TEMP_PREFIX
        from zodbkmi.fileutil import TEMP_SUFFIX
        from zodbkmi.fileutil import atomic_output
        with atomic_output(self.path('k'), temp_prefix=TEMP_PREFIX) as f:
            f.write(b'x')
            names = os.listdir(self.tmp)
        self.assertEqual(len(names), 1)
        self.assertTrue(names[0].startswith(TEMP_PREFIX))
        self.assertTrue(names[0].endswith(TEMP_SUFFIX))
        self.assertEqual(os.listdir(self.tmp), ['k'])


class AtomicOutputTests(_TmpDir):

    def _callFUT(self, *args, **kw):
        from zodbkmi.fileutil import atomic_output
        return atomic_output(*args, **kw)

    def test_appears_only_when_complete(self):
        with self._callFUT(self.path('out')) as f:
            f.write(b'part')
            self.assertFalse(os.path.exists(self.path('out')))
        self.assertEqual(os.listdir(self.tmp), ['out'])
        self.assertEqual(self.mode('out'), 0o600)

    def test_refuses_an_existing_file_by_default(self):
        with open(self.path('out'), 'wb') as f:
            f.write(b'old')
        with self.assertRaises(FileExistsError):
            with self._callFUT(self.path('out')):
                pass

    def test_file_appearing_while_writing_is_kept(self):
        with self.assertRaises(FileExistsError):
            with self._callFUT(self.path('out')) as f:
                f.write(b'new')
                with open(self.path('out'), 'wb') as other:
                    other.write(b'other')
        with open(self.path('out'), 'rb') as f:
            self.assertEqual(f.read(), b'other')
        self.assertEqual(os.listdir(self.tmp), ['out'])

    def test_interrupt_leaves_nothing(self):
        with self.assertRaises(KeyboardInterrupt):
            with self._callFUT(self.path('out')) as f:
                f.write(b'half')
                raise KeyboardInterrupt
        self.assertEqual(os.listdir(self.tmp), [])

    def test_symlink_is_followed(self):
        os.symlink('target', self.path('link'))
        with self._callFUT(self.path('link'), overwrite=True) as f:
            f.write(b'x')
        self.assertTrue(os.path.islink(self.path('link')))
        with open(self.path('target'), 'rb') as f:
            self.assertEqual(f.read(), b'x')

    def test_old_home_in_files(self):
        from zodbkmi import fileutil
        from zodbkmi import files
        self.assertIs(files.atomic_output, fileutil.atomic_output)


class ReadSecretFileTests(_TmpDir):

    def _callFUT(self, *args, **kw):
        from zodbkmi.fileutil import read_secret_file
        return read_secret_file(*args, **kw)

    def write(self, name, data, mode):
        from zodbkmi.fileutil import write_atomic
        write_atomic(self.path(name), data, mode)
        return self.path(name)

    def test_reads_a_0600_and_a_0400_file(self):
        self.assertEqual(self._callFUT(self.write('a', b'k', 0o600)), b'k')
        self.assertEqual(self._callFUT(self.write('b', b'k', 0o400)), b'k')

    def test_w_any_group_or_other_bit(self):
        for bit in (0o040, 0o020, 0o010, 0o004, 0o002, 0o001):
            path = self.write('s%o' % bit, b'k', 0o600 | bit)
            with self.assertRaises(SecretFileError) as cm:
                self._callFUT(path, 'PIN')
            message = str(cm.exception)
            self.assertIn('PIN file %s' % path, message)
            self.assertIn('chmod 600', message)
            self.assertNotIn("b'k'", message)

    def test_error_is_both_documented_kinds(self):
        with self.assertRaises(SecretFileError) as cm:
            self._callFUT(self.path('missing'), 'token')
        self.assertIsInstance(cm.exception, KeyStoreError)
        self.assertIsInstance(cm.exception, KeySourceError)
        self.assertEqual(cm.exception.source, self.path('missing'))

    def test_w_more_than_one_mib(self):
        from zodbkmi.fileutil import MAX_SECRET_FILE
        path = self.write('big', b'x' * (MAX_SECRET_FILE + 1), 0o600)
        with self.assertRaisesRegex(SecretFileError, 'larger than'):
            self._callFUT(path)

    def test_text_stripped_and_never_decoded_lossily(self):
        from zodbkmi.fileutil import read_secret_text
        self.assertEqual(read_secret_text(self.write('t', b' tok\n', 0o600)),
                         'tok')
        with self.assertRaisesRegex(SecretFileError, 'ASCII'):
            read_secret_text(self.write('u', 'tök'.encode(), 0o600))
        with self.assertRaisesRegex(SecretFileError, 'empty'):
            read_secret_text(self.write('e', b'\n', 0o600))

    def test_old_homes_in_keyholder_and_keystore(self):
        from zodbkmi import fileutil
        from zodbkmi import keyholder
        from zodbkmi import keystore
        self.assertIs(keyholder.read_secret_file, fileutil.read_secret_file)
        self.assertIs(keyholder.read_secret_text, fileutil.read_secret_text)
        self.assertIs(keystore.write_atomic, fileutil.write_atomic)


class LayeringTests(unittest.TestCase):

    def test_imports_only_the_exceptions_of_zodbkmi(self):
        import ast
        from zodbkmi import fileutil
        with open(fileutil.__file__, encoding='utf-8') as f:
            tree = ast.parse(f.read())
        modules = {n.module for n in ast.walk(tree)
                   if isinstance(n, ast.ImportFrom)}
        self.assertEqual({m for m in modules if m.startswith('zodbkmi')},
                         {'zodbkmi.exceptions'})
