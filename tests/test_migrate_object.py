"""Object-level migrations (zodbkmi.migrate.ObjectTransformer).

The application's classes change between the phases of a migration, as
they do for real: ``secretapp.Secret`` is a plain ``Persistent`` class in
``v1/`` and an encrypting class in ``v2/``.  The encrypting class here is
the test's own (the ``encrypting`` argument of ObjectTransformer accepts
any): it keeps references outside the ciphertext, like
``EncryptedPersistent``, and seals the rest with the facility.
"""
import io
import os
import shutil
import sys
import tempfile
import unittest

V1 = '''\
import persistent


class Secret(persistent.Persistent):
    pass


class Note(persistent.Persistent):
    pass
'''

V2 = '''\
import io

import persistent
import persistent.wref
from zodbpickle import pickle

FACILITY = KEY = DECRYPT_KEYS = None


class Secret(persistent.Persistent):
    """Seals its state (references kept outside) with the facility."""

    def __getstate__(self):
        state = super().__getstate__()
        refs = []
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, 3)

        def persistent_id(obj):
            if isinstance(obj, (persistent.Persistent, type,
                                persistent.wref.WeakRef)):
                refs.append(obj)
                return len(refs) - 1
        pickler.persistent_id = persistent_id
        pickler.dump(state)
        return FACILITY.encrypt(KEY, buf.getvalue()), refs

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 2 and
                isinstance(state[0], bytes)):
            # not encrypted yet: readable during a migration
            return super().__setstate__(state)
        data, refs = state
        unpickler = pickle.Unpickler(io.BytesIO(
            FACILITY.decrypt(DECRYPT_KEYS, data)))
        unpickler.persistent_load = refs.__getitem__
        super().__setstate__(unpickler.load())


class Note(persistent.Persistent):
    pass
'''


class ObjectMigrationTests(unittest.TestCase):

    count = 300

    def setUp(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.kek import AESKeyEncryptingKey
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        for name, text in (('v1', V1), ('v2', V2)):
            os.mkdir(os.path.join(self.tmp, name))
            with open(os.path.join(self.tmp, name, 'secretapp.py'),
                      'w') as f:
                f.write(text)
        self.facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        self.kek_bytes = os.urandom(32)
        self.kek = AESKeyEncryptingKey(self.kek_bytes)
        self.facility.ensure_key(self.kek)
        self.addCleanup(self._unimport)
        self._phase('v1')
        self.expected = self._populate()

    def _unimport(self):
        sys.modules.pop('secretapp', None)
        sys.path[:] = [p for p in sys.path if not p.startswith(self.tmp)]

    def _phase(self, name):
        """Deploy version ``name`` of the application."""
        self._unimport()
        sys.path.insert(0, os.path.join(self.tmp, name))
        import secretapp
        if name == 'v2':
            secretapp.FACILITY = self.facility
            secretapp.KEY = self.kek
            secretapp.DECRYPT_KEYS = self.kek
        return secretapp

    def _db(self):
        import ZODB
        import ZODB.FileStorage
        return ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(self.tmp, 'Data.fs')))

    def _populate(self):
        import secretapp
        db = self._db()
        expected = {}
        with db.transaction() as conn:
            root = conn.root()
            previous = None
            for i in range(self.count):
                secret = secretapp.Secret()
                secret.text = 'secret text %d' % i
                secret.note = secretapp.Note()
                secret.note.text = 'note %d' % i
                secret.previous = previous
                root[i] = previous = secret
                expected[i] = ('secret text %d' % i, 'note %d' % i)
        db.close()
        return expected

    def _check(self):
        db = self._db()
        try:
            with db.transaction() as conn:
                root = conn.root()
                for i, (text, note) in self.expected.items():
                    secret = root[i]
                    self.assertEqual(secret.text, text)
                    self.assertEqual(secret.note.text, note)
                    self.assertIs(secret.previous,
                                  root[i - 1] if i else None)
        finally:
            db.close()

    def _run(self, mode, **kw):
        import secretapp
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import ObjectTransformer
        db = self._db()
        try:
            transformer = ObjectTransformer(
                db, MigrationKeys(self.facility, self.kek),
                encrypting=(getattr(secretapp, 'FACILITY', False) and
                            (secretapp.Secret,) or ()), **kw)
            return Migration(db.storage, transformer, mode,
                             chunk_size=64).run()
        finally:
            db.close()

    def _raw(self):
        with open(os.path.join(self.tmp, 'Data.fs'), 'rb') as f:
            return f.read()

    def test_encrypt_rekey_decrypt(self):
        self._phase('v2')
        report = self._run('encrypt')
        self.assertEqual(report.kinds['plaintext'], report.records)
        self.assertEqual(report.rewritten, self.count)   # Secrets only
        self.assertEqual(report.failed, 0)
        self._check()
        again = self._run('encrypt')
        self.assertEqual(again.rewritten, 0)
        self.assertEqual(again.kinds['encrypted'], self.count)
        old_dek = self.facility.ensure_key(self.kek)
        self.assertEqual(again.by_dek, {old_dek: self.count})
        # DEK rotation, then rekey moves every state to the new DEK
        new_dek = self.facility.rotate(self.kek)
        report = self._run('rekey')
        self.assertEqual(report.rewritten, self.count)
        self.assertEqual(self._run('scan').by_dek, {new_dek: self.count})
        self._check()
        # leaving: the class is plain again, decrypt writes plaintext
        self._phase('v1')
        report = self._run('decrypt', codec=_Codec(self.facility, self.kek))
        self.assertEqual(report.rewritten, self.count)
        self.assertEqual(report.failed, 0)
        self._check()
        self.assertEqual(self._run('scan').kinds['encrypted'], 0)

    def test_encrypt_refused_while_the_class_does_not_encrypt(self):
        # v1 is deployed: Secret does not encrypt; nothing needs work
        report = self._run('encrypt')
        self.assertEqual(report.rewritten, 0)

    def test_decrypt_refused_while_the_class_still_encrypts(self):
        self._phase('v2')
        self._run('encrypt')
        before = self._raw()
        report = self._run('decrypt', codec=_Codec(self.facility, self.kek))
        self.assertEqual(report.failed, self.count)
        self.assertIn('still encrypts its state', report.failed_oids[0][1])
        self.assertEqual(report.rewritten, 0)
        self.assertEqual(self._raw()[:len(before)], before)

    def test_dry_run(self):
        self._phase('v2')
        size = len(self._raw())
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import ObjectTransformer
        import secretapp
        db = self._db()
        try:
            report = Migration(db.storage, ObjectTransformer(
                db, MigrationKeys(self.facility, self.kek),
                encrypting=(secretapp.Secret,)), 'encrypt',
                dry_run=True).run()
        finally:
            db.close()
        self.assertEqual(report.rewritten, self.count)
        self.assertEqual(report.transactions, 0)
        self.assertEqual(len(self._raw()), size)


class _Codec:
    """How the test's encrypting class lays out its state (what
    zodbkmi.persistent provides for EncryptedPersistent)."""

    def __init__(self, facility, key):
        self.facility = facility
        self.key = key

    def classify(self, state):
        from zodbkmi.format import envelope
        if (isinstance(state, tuple) and len(state) == 2 and
                isinstance(state[0], bytes) and
                envelope.is_envelope(state[0])):
            return 'encrypted', self.facility.key_id_of(state[0])
        return None, None

    def verify(self, state):
        self.facility.decrypt(self.key, state[0])

    def decrypt(self, state):
        from zodbpickle import pickle
        data, refs = state
        unpickler = pickle.Unpickler(io.BytesIO(
            self.facility.decrypt(self.key, data)))
        unpickler.persistent_load = refs.__getitem__
        return unpickler.load()


OBJECT_KILL_SCRIPT = '''\
"""Encrypt at the object level; SIGKILL this process at KILL_AT."""
import base64, os, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], 'v2'))
import ZODB, ZODB.FileStorage
import secretapp
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.migrate import Migration, MigrationKeys, ObjectTransformer
secretapp.FACILITY = KeyManagementFacility(os.path.join(sys.argv[1], 'keys'))
secretapp.KEY = secretapp.DECRYPT_KEYS = AESKeyEncryptingKey(
    base64.b64decode(os.environ['KEK']))
if os.environ.get('KILL_AT'):
    point, n = os.environ['KILL_AT'].split(':')
    calls = [0]
    orig = getattr(ZODB.FileStorage.FileStorage, point)

    def hook(self, *args, **kw):
        calls[0] += 1
        if calls[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *args, **kw)
    setattr(ZODB.FileStorage.FileStorage, point, hook)
db = ZODB.DB(ZODB.FileStorage.FileStorage(
    os.path.join(sys.argv[1], 'Data.fs')))
report = Migration(db.storage, ObjectTransformer(
    db, MigrationKeys(secretapp.FACILITY, secretapp.KEY),
    encrypting=(secretapp.Secret,)), 'encrypt', chunk_size=1000).run()
db.close()
print('rewritten %d failed %d' % (report.rewritten, report.failed))
'''


class ObjectKillTests(ObjectMigrationTests):
    """An object-level encrypt of 20,000 objects killed with SIGKILL."""

    count = 20000

    def test_encrypt_killed_and_resumed(self):
        import base64
        import signal
        import subprocess
        with open(os.path.join(self.tmp, 'kill.py'), 'w') as f:
            f.write(OBJECT_KILL_SCRIPT)
        env = dict(os.environ, KEK=base64.b64encode(self.kek_bytes).decode())

        def run(kill_at):
            proc = subprocess.run(
                [sys.executable, os.path.join(self.tmp, 'kill.py'),
                 self.tmp], env=dict(env, KILL_AT=kill_at),
                capture_output=True, text=True, timeout=600)
            return proc
        for point in ('tpc_finish:3', 'tpc_vote:9', 'store:5500'):
            proc = run(point)
            self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
            self._phase('v2')
            self._check()     # every object reads back equal
            done = self._run('scan').kinds['encrypted']
            self.assertTrue(0 < done < self.count, done)   # half done
        proc = run('')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn('failed 0', proc.stdout)
        self._phase('v2')
        report = self._run('scan')
        self.assertEqual(report.kinds['encrypted'], self.count)
        self.assertEqual(self._run('encrypt').rewritten, 0)
        self._check()

    # the tests of the base class, once, are enough
    test_encrypt_rekey_decrypt = None
    test_encrypt_refused_while_the_class_does_not_encrypt = None
    test_decrypt_refused_while_the_class_still_encrypts = None
    test_dry_run = None


V3 = '''\
import persistent
from zodbkmi.persistent import EncryptedPersistent


class Secret(EncryptedPersistent):
    pass


class Note(persistent.Persistent):
    pass
'''


class EncryptedPersistentMigrationTests(ObjectMigrationTests):
    """The same migrations with zodbkmi.persistent.EncryptedPersistent."""

    count = 200

    def setUp(self):
        import zope.component
        import zope.component.testing
        from zope.interface import implementer
        from zodbkmi.interfaces import IEncryptionService
        from zodbkmi.interfaces import IKeyHolder
        super().setUp()
        with open(os.path.join(self.tmp, 'v2', 'secretapp.py'), 'w') as f:
            f.write(V3)
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)

        @implementer(IKeyHolder)
        class Holder:
            key = self.kek
            previous_keys = ()
        self.holder = Holder()
        zope.component.provideUtility(self.holder, IKeyHolder)
        zope.component.provideUtility(self.facility, IEncryptionService)

    def _run(self, mode, **kw):
        # the default encrypting classes: EncryptedPersistent
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import MigrationKeys
        from zodbkmi.migrate import ObjectTransformer
        db = self._db()
        try:
            return Migration(db.storage, ObjectTransformer(
                db, MigrationKeys(self.facility, self.kek), **kw), mode,
                chunk_size=64).run()
        finally:
            db.close()

    def test_encrypt_rekey_decrypt(self):
        self._phase('v2')
        report = self._run('encrypt')
        self.assertEqual(report.rewritten, self.count)
        self.assertEqual(report.failed, 0)
        self._check()
        with open(os.path.join(self.tmp, 'Data.fs'), 'rb') as f:
            data = f.read()
        scan = self._run('scan')
        self.assertEqual(scan.kinds['encrypted'], self.count)
        self.assertEqual(scan.failed, 0)
        self.assertEqual(self._run('encrypt').rewritten, 0)
        # the plaintext is only in the old revisions (until a pack)
        self.assertEqual(data.count(b'secret text 199'), 1)
        # DEK rotation and rekey
        new_dek = self.facility.rotate(self.kek)
        self.assertEqual(self._run('rekey').rewritten, self.count)
        self.assertEqual(self._run('scan').by_dek, {new_dek: self.count})
        self._check()
        # leaving zodbkmi: Secret is a plain Persistent again
        self._phase('v1')
        report = self._run('decrypt')
        self.assertEqual(report.rewritten, self.count)
        self.assertEqual(report.failed, 0)
        self._check()
        self.assertEqual(self._run('scan').kinds['encrypted'], 0)

    def test_rekey_to_another_kek(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        from zodbkmi.migrate import MigrationKeys
        self._phase('v2')
        self._run('encrypt')
        new = AESKeyEncryptingKey.generate()
        self.holder.key = new               # the application's new key
        self.holder.previous_keys = (self.kek,)
        from zodbkmi.migrate import Migration
        from zodbkmi.migrate import ObjectTransformer
        db = self._db()
        try:
            report = Migration(db.storage, ObjectTransformer(
                db, MigrationKeys(self.facility, new, [self.kek])),
                'rekey').run()
        finally:
            db.close()
        self.assertEqual(report.rewritten, self.count)
        self.holder.previous_keys = ()      # the old key is gone
        self._check()

    def test_scan_reports_tampered_states(self):
        import ZODB.FileStorage
        from zodbkmi.format.envelope import MAGIC
        from ZODB.Connection import TransactionMetaData
        self._phase('v2')
        self._run('encrypt')
        fs = ZODB.FileStorage.FileStorage(os.path.join(self.tmp,
                                                       'Data.fs'))
        try:
            oid = b'\0' * 7 + b'\x01'
            data, tid = fs.load(oid)
            at = data.index(MAGIC) + 40          # inside the ciphertext
            bad = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
            txn = TransactionMetaData()
            fs.tpc_begin(txn)
            fs.store(oid, tid, bad, '', txn)
            fs.tpc_vote(txn)
            fs.tpc_finish(txn)
        finally:
            fs.close()
        report = self._run('scan')
        self.assertEqual(report.failed, 1)
        self.assertEqual(report.failed_oids[0][0], '0x01')
        # and rekey leaves it alone, reported
        self.facility.rotate(self.kek)
        report = self._run('rekey')
        self.assertEqual(report.failed, 1)
        self.assertEqual(report.rewritten, self.count - 1)

    test_encrypt_refused_while_the_class_does_not_encrypt = None
