"""Tests of zodbkmi.keystore (and of zodbkmi.vault, its old name)."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

from zodbkmi import exceptions

DEK = bytes(range(200, 232))


def make_entry(dek_id=None, kek=None, state='active', created=None,
               dek=DEK, version=2):
    from zodbkmi.format import wrapped
    from zodbkmi.kek import AESKeyEncryptingKey
    from zodbkmi.keystore import KeyStoreEntry
    kek = kek or AESKeyEncryptingKey(b'V' * 32)
    raw_id = os.urandom(16) if dek_id is None else bytes.fromhex(dek_id)
    return KeyStoreEntry(
        raw_id.hex(), kek.key_id,
        wrapped.wrap(kek, raw_id, dek, version=version,
                     created=created if version == 2 else None),
        state, created)


class TempDirMixin:

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-keystore-')
        self.addCleanup(shutil.rmtree, self.tmp, True)


class CheckDekIdTests(unittest.TestCase):

    def _callFUT(self, dek_id):
        from zodbkmi.keystore import check_dek_id
        return check_dek_id(dek_id)

    def test_valid(self):
        self.assertEqual(self._callFUT('0123456789abcdef' * 2),
                         '0123456789abcdef' * 2)

    def test_invalid(self):
        for dek_id in ('', 'a' * 31, 'a' * 33, 'A' * 32, 'g' * 32,
                       '../' + 'a' * 29, b'a' * 32, None, 'a' * 31 + '\n'):
            with self.assertRaises(exceptions.UnknownKeyError) as cm:
                self._callFUT(dek_id)
            self.assertEqual(cm.exception.key_id, dek_id)


class KeyStoreEntryTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.keystore import KeyStoreEntry
        return KeyStoreEntry

    def test_defaults(self):
        before = time.time_ns()
        entry = make_entry()
        self.assertEqual(entry.state, 'active')
        self.assertGreaterEqual(entry.created, before)

    def test_unknown_state(self):
        with self.assertRaises(ValueError):
            make_entry(state='destroyed')

    def test_json_roundtrip(self):
        entry = make_entry(state='retired', created=123)
        doc = json.loads(entry.to_json())
        self.assertEqual(sorted(doc), ['created', 'dek_id', 'format',
                                       'kek_id', 'state', 'version',
                                       'wrapped'])
        self.assertEqual((doc['format'], doc['version']),
                         ('zodbkmi-vault-entry', 2))
        self.assertEqual(base64.b64decode(doc['wrapped']), entry.wrapped)
        back = self._getTargetClass().from_json(entry.to_json())
        self.assertEqual(
            (back.dek_id, back.kek_id, back.state, back.created,
             back.wrapped),
            (entry.dek_id, entry.kek_id, 'retired', 123, entry.wrapped))

    def test_json_is_ascii_and_sorted(self):
        data = make_entry(created=1).to_json()
        self.assertIsInstance(data, bytes)
        data.decode('ascii')
        keys = list(json.loads(data))
        self.assertEqual(keys, sorted(keys))

    def test_from_json_names_the_entry(self):
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            self._getTargetClass().from_json(b'{', 'abc.dek')
        self.assertIn('abc.dek', str(cm.exception))

    def test_from_json_w_malformed_wrapped_dek(self):
        entry = make_entry()
        doc = json.loads(entry.to_json())
        doc['wrapped'] = base64.b64encode(b'zkw\x09' + bytes(40)).decode()
        with self.assertRaises(exceptions.KeyStoreError):
            self._getTargetClass().from_json(json.dumps(doc).encode())

    def test_repr_shows_no_wrapped_key(self):
        entry = make_entry()
        text = repr(entry)
        self.assertIn(entry.dek_id, text)
        self.assertIn(entry.kek_id, text)
        self.assertNotIn(base64.b64encode(entry.wrapped).decode()[:20], text)


class WriteAtomicTests(TempDirMixin, unittest.TestCase):

    def _callFUT(self, path, data, *args):
        from zodbkmi.keystore import write_atomic
        return write_atomic(path, data, *args)

    def test_writes_0600(self):
        path = os.path.join(self.tmp, 'f')
        old = os.umask(0)
        try:
            self._callFUT(path, b'data')
        finally:
            os.umask(old)
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'data')
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.tmp), ['f'])

    def test_other_mode(self):
        path = os.path.join(self.tmp, 'f')
        self._callFUT(path, b'data', 0o640)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)

    def test_replaces(self):
        path = os.path.join(self.tmp, 'f')
        self._callFUT(path, b'one')
        inode = os.stat(path).st_ino
        self._callFUT(path, b'two')
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'two')
        self.assertNotEqual(os.stat(path).st_ino, inode)   # renamed over
        self.assertEqual(os.listdir(self.tmp), ['f'])

    def test_failure_leaves_no_temporary_file(self):
        path = os.path.join(self.tmp, 'f')
        self._callFUT(path, b'old')
        with self.assertRaises(TypeError):
            self._callFUT(path, 'not bytes')
        self.assertEqual(os.listdir(self.tmp), ['f'])
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'old')

    def test_missing_directory(self):
        with self.assertRaises(OSError):
            self._callFUT(os.path.join(self.tmp, 'no', 'f'), b'x')


class DirectoryKeyStoreTests(TempDirMixin, unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.keystore import DirectoryKeyStore
        return DirectoryKeyStore

    def _makeOne(self, name='keys', **kw):
        return self._getTargetClass()(os.path.join(self.tmp, name), **kw)

    def _files(self, store):
        return sorted(os.listdir(store.path))

    def test_provides_interface(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyStore
        self.assertTrue(verifyObject(IKeyStore, self._makeOne()))

    def test_creates_directory_0700(self):
        old = os.umask(0)
        try:
            store = self._makeOne('a/b/keys')
        finally:
            os.umask(old)
        self.assertEqual(os.stat(store.path).st_mode & 0o777, 0o700)
        self.assertEqual(repr(store), '<DirectoryKeyStore %s>' % store.path)

    def test_missing_directory_wo_create(self):
        with self.assertRaises(exceptions.KeyStoreError):
            self._makeOne(create=False)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'keys')))

    def test_directory_under_a_file(self):
        with open(os.path.join(self.tmp, 'file'), 'w') as f:
            f.write('x')
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            self._makeOne('file/keys')
        self.assertIn('file/keys', str(cm.exception))

    def test_add_get(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        self.assertEqual(store.get(entry.dek_id).wrapped, entry.wrapped)
        self.assertEqual(store.ids(), [entry.dek_id])
        self.assertEqual([e.dek_id for e in store.entries()], [entry.dek_id])
        # a new store reads it from the file
        again = self._makeOne().get(entry.dek_id)
        self.assertEqual((again.dek_id, again.kek_id, again.wrapped,
                          again.created),
                         (entry.dek_id, entry.kek_id, entry.wrapped,
                          entry.created))

    def test_files_0600_and_no_temporary_files(self):
        store = self._makeOne()
        old = os.umask(0)
        try:
            entries = [make_entry() for _ in range(5)]
            for entry in entries:
                store.add(entry)
            for entry in entries:
                store.update(make_entry(entry.dek_id, state='retired'))
        finally:
            os.umask(old)
        self.assertEqual(self._files(store),
                         sorted(e.dek_id + '.dek' for e in entries))
        for name in self._files(store):
            self.assertEqual(
                os.stat(os.path.join(store.path, name)).st_mode & 0o777,
                0o600)

    def test_no_unwrapped_dek_in_directory(self):
        store = self._makeOne()
        for _ in range(3):
            store.add(make_entry())
        forms = [DEK, DEK.hex().encode(), base64.b64encode(DEK),
                 base64.b64encode(DEK).rstrip(b'=')]
        for name in self._files(store):
            with open(os.path.join(store.path, name), 'rb') as f:
                data = f.read()
            doc = json.loads(data)
            blobs = [data, base64.b64decode(doc['wrapped'])]
            for blob in blobs:
                for form in forms:
                    self.assertNotIn(form, blob)

    def test_add_existing(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        with self.assertRaises(ValueError):
            store.add(make_entry(entry.dek_id))

    def test_update(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        store.update(make_entry(entry.dek_id, state='retired'))
        self.assertEqual(store.get(entry.dek_id).state, 'retired')
        self.assertEqual(self._makeOne().get(entry.dek_id).state, 'retired')

    def test_update_missing(self):
        entry = make_entry()
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            self._makeOne().update(entry)
        self.assertEqual(cm.exception.key_id, entry.dek_id)

    def test_remove(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        store.remove(entry.dek_id)
        self.assertIsNone(store.get(entry.dek_id))
        self.assertEqual(self._files(store), [])
        with self.assertRaises(exceptions.UnknownKeyError):
            store.remove(entry.dek_id)

    def test_get_w_invalid_or_unknown_id(self):
        store = self._makeOne()
        for dek_id in ('0' * 32, 'x', '../../etc/passwd', None, 'A' * 32):
            self.assertIsNone(store.get(dek_id))

    def test_remove_w_invalid_id(self):
        with self.assertRaises(exceptions.UnknownKeyError):
            self._makeOne().remove('../x')

    def test_active_for_newest_wins(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        kek = AESKeyEncryptingKey(b'V' * 32)
        other = AESKeyEncryptingKey(b'W' * 32)
        store = self._makeOne()
        self.assertIsNone(store.active_for(kek.key_id))
        old = make_entry(kek=kek, created=1)
        new = make_entry(kek=kek, created=2)
        retired = make_entry(kek=kek, created=3, state='retired')
        foreign = make_entry(kek=other, created=4)
        for entry in (new, old, retired, foreign):
            store.add(entry)
        # the newest entry of a KEK is the active one, if not retired
        self.assertIsNone(store.active_for(kek.key_id))
        self.assertEqual(store.active_for(other.key_id).dek_id,
                         foreign.dek_id)
        self.assertIsNone(store.active_for('aes-none'))
        store.remove(retired.dek_id)
        self.assertEqual(store.active_for(kek.key_id).dek_id, new.dek_id)

    def test_active_for_never_a_version_1_entry(self):
        # its creation time is not authenticated: never the active key
        from zodbkmi.kek import AESKeyEncryptingKey
        kek = AESKeyEncryptingKey(b'V' * 32)
        store = self._makeOne()
        legacy = make_entry(kek=kek, created=2 ** 62, version=1)
        store.add(legacy)
        self.assertIsNone(store.active_for(kek.key_id))
        current = make_entry(kek=kek, created=1)
        store.add(current)
        self.assertEqual(store.active_for(kek.key_id).dek_id,
                         current.dek_id)
        self.assertEqual(store.get(legacy.dek_id).version, 1)

    def test_marking_an_older_entry_active_changes_nothing(self):
        # the state is not authenticated, so it can only restrict
        from zodbkmi.kek import AESKeyEncryptingKey
        from zodbkmi.keystore import KeyStoreEntry
        kek = AESKeyEncryptingKey(b'V' * 32)
        store = self._makeOne()
        old = make_entry(kek=kek, created=1, state='retired')
        new = make_entry(kek=kek, created=2, state='retired')
        store.add(old)
        store.add(new)
        store.update(KeyStoreEntry(old.dek_id, old.kek_id, old.wrapped,
                                   'active', old.created))
        self.assertIsNone(store.active_for(kek.key_id))

    def test_shared_between_instances(self):
        a = self._makeOne()
        b = self._makeOne()
        self.assertEqual(b.ids(), [])
        entry = make_entry()
        a.add(entry)
        self.assertEqual(b.get(entry.dek_id).dek_id, entry.dek_id)
        self.assertEqual(b.ids(), [entry.dek_id])
        a.remove(entry.dek_id)
        os.utime(b.path, ns=(1, 1))   # make sure the mtime differs
        self.assertEqual(b.ids(), [])

    def test_sees_entry_written_within_the_same_mtime(self):
        a = self._makeOne()
        b = self._makeOne()
        self.assertEqual(b.ids(), [])
        st = os.stat(b.path)
        entry = make_entry()
        a.add(entry)
        # as if the directory changed within one tick of its clock
        os.utime(b.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertEqual(b.ids(), [])
        self.assertEqual(b.get(entry.dek_id).dek_id, entry.dek_id)

    def test_ignores_other_files(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        for name in ('README', '.tmp-x.part', 'abc.dek', 'a' * 33 + '.dek'):
            with open(os.path.join(store.path, name), 'w') as f:
                f.write('{}')
        self.assertEqual(self._makeOne().ids(), [entry.dek_id])

    def test_corrupt_entry(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        path = os.path.join(store.path, entry.dek_id + '.dek')
        with open(path, 'wb') as f:
            f.write(b'{"format": "zodbkmi-vault-entry", "version": 1')
        fresh = self._makeOne()
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            fresh.get(entry.dek_id)
        self.assertIn(entry.dek_id, str(cm.exception))
        with self.assertRaises(exceptions.KeyStoreError):
            fresh.ids()

    def test_entry_under_another_name(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        other = 'f' * 32
        shutil.copy(os.path.join(store.path, entry.dek_id + '.dek'),
                    os.path.join(store.path, other + '.dek'))
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            self._makeOne().get(other)
        self.assertIn(other, str(cm.exception))

    def test_unreadable_entry(self):
        store = self._makeOne()
        dek_id = 'a' * 32
        os.mkdir(os.path.join(store.path, dek_id + '.dek'))
        with self.assertRaises(exceptions.KeyStoreError):
            store.get(dek_id)

    def test_directory_removed(self):
        store = self._makeOne()
        shutil.rmtree(store.path)
        with self.assertRaises(exceptions.KeyStoreError):
            store.ids()
        with self.assertRaises(exceptions.KeyStoreError):
            store.add(make_entry())

    def test_directory_replaced_by_a_file(self):
        store = self._makeOne()
        os.rmdir(store.path)
        with open(store.path, 'w') as f:
            f.write('x')
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            store.add(make_entry())
        self.assertIn(store.path, str(cm.exception))

    def _make_read_only(self, path):
        """Make ``path`` not writable, even for root; return an undo."""
        if os.geteuid() != 0:
            os.chmod(path, 0o500)
            return lambda: os.chmod(path, 0o700)
        try:
            subprocess.run(['chattr', '+i', path], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            self.skipTest('running as root without chattr +i support')
        return lambda: subprocess.run(['chattr', '-i', path], check=True)

    def test_directory_not_writable(self):
        store = self._makeOne()
        entry = make_entry()
        store.add(entry)
        undo = self._make_read_only(store.path)
        self.addCleanup(undo)
        with self.assertRaises(exceptions.KeyStoreError) as cm:
            store.add(make_entry())
        self.assertIn(store.path, str(cm.exception))
        with self.assertRaises(exceptions.KeyStoreError):
            store.update(make_entry(entry.dek_id, state='retired'))
        with self.assertRaises(exceptions.KeyStoreError):
            store.remove(entry.dek_id)
        # reading still works, and nothing was left behind
        self.assertEqual(store.get(entry.dek_id).state, 'active')
        self.assertEqual(self._files(store), [entry.dek_id + '.dek'])

    def test_thread_safe_adds(self):
        import threading
        store = self._makeOne()
        entries = [make_entry() for _ in range(40)]

        def add(part):
            for entry in part:
                store.add(entry)
                store.get(entry.dek_id)
                store.ids()

        threads = [threading.Thread(target=add, args=(entries[i::4],))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(store.ids(), sorted(e.dek_id for e in entries))
        self.assertEqual(self._makeOne().ids(), store.ids())


class OldNamesTests(TempDirMixin, unittest.TestCase):
    """The key store was the "vault" before 2026-12: the old names still
    import and work (and say they are deprecated)."""

    def _import_vault(self):
        import importlib
        import sys
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            if 'zodbkmi.vault' in sys.modules:
                module = importlib.reload(sys.modules['zodbkmi.vault'])
            else:
                module = importlib.import_module('zodbkmi.vault')
        self.assertEqual([w.category for w in caught], [DeprecationWarning])
        self.assertIn('zodbkmi.keystore', str(caught[0].message))
        return module

    def test_old_module_names(self):
        from zodbkmi import keystore
        vault = self._import_vault()
        self.assertIs(vault.DirectoryVault, keystore.DirectoryKeyStore)
        self.assertIs(vault.VaultEntry, keystore.KeyStoreEntry)
        for name in ('ACTIVE', 'RETIRED', 'STATES', 'SUFFIX', 'ENTRY_FORMAT',
                     'ON_FIRST_KEY', 'TEMP_PREFIX', 'TEMP_SUFFIX',
                     'check_dek_id', 'check_key_directory', 'active_entries',
                     'newest_entry', 'next_created', 'created_after',
                     'write_atomic'):
            self.assertIs(getattr(vault, name), getattr(keystore, name),
                          name)

    def test_old_interface_name(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyStore
        from zodbkmi.interfaces import IKeyVault
        self.assertIs(IKeyVault, IKeyStore)
        vault = self._import_vault()
        self.assertTrue(verifyObject(
            IKeyVault, vault.DirectoryVault(os.path.join(self.tmp, 'k'))))

    def test_old_names_work(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        vault = self._import_vault()
        store = vault.DirectoryVault(os.path.join(self.tmp, 'keys'))
        entry = make_entry()
        store.add(entry)
        self.assertIsInstance(store.get(entry.dek_id), vault.VaultEntry)
        self.assertEqual(vault.active_entries(vault=store,
                                              kek_id=entry.kek_id),
                         [store.get(entry.dek_id)])
        with self.assertRaises(TypeError):
            vault.active_entries(store, entry.kek_id, vault=store)
        # the facility's attribute
        facility = KeyManagementFacility(os.path.join(self.tmp, 'f'))
        self.assertIs(facility.vault, facility.key_store)
        kek = AESKeyEncryptingKey(os.urandom(32))
        dek_id = facility.create_key(kek)
        self.assertEqual(facility.vault.get(dek_id).state, 'active')
        other = facility.key_store.__class__(os.path.join(self.tmp, 'g'))
        facility.vault = other
        self.assertIs(facility.key_store, other)

    def test_stored_names_unchanged(self):
        # formats are frozen: the rename changed no byte on disk
        from zodbkmi import keystore
        entry = make_entry()
        self.assertEqual(keystore.ENTRY_FORMAT, 'zodbkmi-vault-entry')
        self.assertEqual(json.loads(entry.to_json())['format'],
                         'zodbkmi-vault-entry')
        self.assertEqual(keystore.SUFFIX, '.dek')
        here = os.path.dirname(os.path.abspath(__file__))
        self.assertTrue(os.path.exists(
            os.path.join(here, 'vectors', 'vault-entry.json')))
