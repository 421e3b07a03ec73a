"""Per-tenant keys and crypto-shredding (zodbkmi.tenants, docs/tenants.rst).

Three tenants in one FileStorage; one is shredded; what stays readable,
what does not, in the storage, its history and its backups."""
import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import unittest

import transaction
import ZODB
import ZODB.FileStorage
import zope.component
import zope.component.testing
from zope.interface import implementer

from zodbkmi import exceptions
from zodbkmi import tenants
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.interfaces import IEncryptionService
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.interfaces import IKeySelector
from zodbkmi.interfaces import ITenant
from zodbkmi.keyholder import KeyHolder
from zodbkmi.keyholder import write_key_file
from zodbkmi.persistent import EncryptedPersistent

NAMES = ('acme', 'globex', 'initech')


@implementer(ITenant)
class Tenant(EncryptedPersistent):
    def __init__(self, tenant_id):
        self.tenant_id = tenant_id
        self.__parent__ = None


class Item(EncryptedPersistent):
    def __init__(self, parent, secret):
        self.__parent__ = parent
        self.secret = secret


def canary(name):
    return 'CANARY-%s-7f3a' % name


class _Base(unittest.TestCase):

    def setUp(self):
        zope.component.testing.setUp()
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-tenants-')
        self.key_file = self.path('default.key')
        write_key_file(self.key_file, os.urandom(32))
        self.holder = KeyHolder(self.key_file)
        self.facility = KeyManagementFacility(self.path('keys'))
        self.facility.create_key(self.holder.key)
        zope.component.provideUtility(self.holder, IKeyHolder)
        zope.component.provideUtility(self.facility, IEncryptionService)
        self.registry = tenants.TenantRegistry(self.path('tenants'))
        self.dbs = []

    def tearDown(self):
        transaction.abort()
        for db in self.dbs:
            db.close()
        zope.component.testing.tearDown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def open(self, path=None, **kw):
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            path or self.path('Data.fs'), **kw))
        self.dbs.append(db)
        return db

    def close(self, db):
        db.close()
        self.dbs.remove(db)

    def make_tenants(self, kinds=('file', 'shared', 'file')):
        for name, kind in zip(NAMES, kinds):
            self.registry.create(name, self.facility, kind,
                                 shared=self.holder.key)
        tenants.register_tenants(self.registry, shared=self.holder.key)

    def populate(self, db):
        with db.transaction() as conn:
            root = conn.root()
            for name in NAMES:
                t = root[name] = Tenant(name)
                t.items = [Item(t, canary(name)) for _ in range(3)]
                t.profile = Item(t, canary(name) + '-profile')
            root['common'] = Item(None, 'COMMON-VALUE')

    def shred(self, name='acme', **kw):
        kw.setdefault('confirm', True)
        kw.setdefault('default_key', self.holder.key)
        return tenants.shred(self.registry, self.facility, name, **kw)


class SelectionTests(_Base):

    def test_objects_are_sealed_under_their_tenants_key(self):
        self.make_tenants()
        db = self.open()
        self.populate(db)
        conn = db.open()
        root = conn.root()
        for name in NAMES:
            deks = self.registry.record(name)['deks']
            for obj in [root[name], root[name].profile] + root[name].items:
                self.assertIn(
                    self.facility.key_id_of(obj.__getstate__()[0]), deks)
        default = self.facility.active_key_id(self.holder.key)
        self.assertEqual(self.facility.key_id_of(
            root['common'].__getstate__()), default)

    def test_moving_to_another_tenant_reseals_on_commit(self):
        self.make_tenants()
        db = self.open()
        self.populate(db)
        with db.transaction() as conn:
            root = conn.root()
            item = root['acme'].items.pop()
            root['acme']._p_changed = True
            item.__parent__ = root['globex']
            root['globex'].moved = item
        conn = db.open()
        item = conn.root()['globex'].moved
        self.assertIn(self.facility.key_id_of(item.__getstate__()[0]),
                      self.registry.record('globex')['deks'])

    def test_key_selector_utility_decides(self):
        self.make_tenants()
        chosen = tenants.TenantKeyHolder(
            'initech', self.registry.kek('initech'))

        @implementer(IKeySelector)
        class Selector:
            def __call__(self, obj):
                return chosen if getattr(obj, 'secret', '') == 'x' else None
        zope.component.provideUtility(Selector(), IKeySelector)
        db = self.open()
        with db.transaction() as conn:
            conn.root()['a'] = Item(None, 'x')
            conn.root()['b'] = Item(None, 'y')
        conn = db.open()
        self.assertIn(self.facility.key_id_of(
            conn.root()['a'].__getstate__()[0]
            if isinstance(conn.root()['a'].__getstate__(), tuple)
            else conn.root()['a'].__getstate__()),
            self.registry.record('initech')['deks'])
        self.assertEqual(self.facility.key_id_of(conn.root()['b']
                                                 .__getstate__()),
                         self.facility.active_key_id(self.holder.key))

    def test_tenant_without_key_holder_fails_closed(self):
        db = self.open()
        conn = db.open()
        conn.root()['x'] = Tenant('nobody')
        with self.assertRaises(exceptions.NoKeyHolderError) as cm:
            transaction.commit()
        self.assertIn('tenant nobody', str(cm.exception))

    def test_tenant_ids_checked(self):
        for bad in ('', 'a/b', '../x', 'x' * 65, 'é'):
            with self.assertRaises(exceptions.TenantError):
                self.registry.create(bad, self.facility)
        self.registry.create('ok', self.facility)
        with self.assertRaises(exceptions.TenantError):
            self.registry.create('ok', self.facility)

    def test_registry_files_are_private(self):
        self.make_tenants()
        self.assertEqual(stat.S_IMODE(os.stat(self.registry.path).st_mode),
                         0o700)
        for name in ('tenants.json', 'receipt-signing.key',
                     os.path.join('keys', 'acme.key')):
            self.assertEqual(stat.S_IMODE(os.stat(
                self.path('tenants', name)).st_mode), 0o600, name)
        os.chmod(self.path('tenants', 'tenants.json'), 0o644)
        with self.assertRaises(exceptions.KeyStoreError):
            tenants.TenantRegistry(self.path('tenants')).tenants()


def _history(path):
    """Every envelope of every revision of every object in ``path``, with
    its oid: ``(oid, dek id, envelope)``."""
    from zodbkmi.tenants import _RecordUnpickler
    from zodbkmi.format import envelope
    out = []
    for txn in ZODB.FileStorage.FileIterator(path):
        for rec in txn:
            if not rec.data:
                continue
            state = _RecordUnpickler(rec.data).state()
            if type(state) is tuple and state and type(state[0]) is bytes:
                state = state[0]
            if type(state) is bytes:
                out.append((rec.oid, envelope.read_dek_id(
                    state, envelope.CONTEXT_STATE).hex(), state))
    return out


class ShredTests(_Base):

    def setUp(self):
        super().setUp()
        self.make_tenants()
        self.db = self.open()
        self.populate(self.db)
        with self.db.transaction() as conn:     # a second revision each
            for name in NAMES:
                conn.root()[name].profile.secret += '-v2'

    def test_shred_end_to_end_with_history_and_backups(self):
        data_fs = self.path('Data.fs')
        backups = self.path('backups')
        os.mkdir(backups)
        subprocess.run([sys.executable, '-m', 'ZODB.scripts.repozo', '-B',
                        '-r', backups, '-f', data_fs], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        backup_zks = self.path('Data.fs.zks')
        out = self.cli('encrypt-file', '--key-file', self.key_file,
                       '--key-dir', self.path('keys'), data_fs,
                       '-o', backup_zks)
        self.assertEqual(out[0], 0, out)
        acme_deks = set(self.registry.record('acme')['deks'])
        acme_oids = {oid for oid, dek, _ in _history(data_fs)
                     if dek in acme_deks}
        self.assertGreaterEqual(len(acme_oids), 5)

        receipt = self.shred(operator='dpo@example.org')

        # the receipt: signed, in the audit log
        self.assertEqual(receipt['deks'], sorted(acme_deks))
        self.assertTrue(receipt['kek']['destroyed'])
        tenants.verify_receipt(receipt, self.registry.public_key_pem())
        with open(self.registry.audit_log_path, 'rb') as f:
            logged = [json.loads(line) for line in f]
        self.assertEqual(logged[-1], receipt)
        forged = dict(receipt, tenant='globex')
        with self.assertRaises(exceptions.AuthenticationError):
            tenants.verify_receipt(forged, self.registry.public_key_pem())

        # no key on disk or in the process opens acme's envelopes
        self.assertFalse(os.path.exists(self.registry.key_file('acme')))
        for dek in acme_deks:
            self.assertNotIn(dek, self.facility)
            self.assertIsNone(self.facility._cache.get(bytes.fromhex(dek)))
            # ids are public (registry, receipt): no wrapped form is left
            for root, dirs, files in os.walk(self.path('keys')):
                for name in files:
                    with open(os.path.join(root, name), 'rb') as f:
                        self.assertNotIn(bytes.fromhex(dek), f.read(), name)
                        f.seek(0)
                        self.assertNotIn(dek.encode(), f.read(), name)
        keks = [self.holder.key] + [
            self.registry.kek(n, shared=self.holder.key)
            for n in ('globex', 'initech')]
        # plaintext of the three copies: Data.fs with its history, the
        # repozo backup, the decrypted encrypt-file backup
        restored = self.path('restored.fs')
        self.assertEqual(self.cli(
            'decrypt-file', '--key-file', self.key_file, '--key-dir',
            self.path('keys'), backup_zks, '-o', restored)[0], 0)
        repozo_fs = [os.path.join(backups, n) for n in os.listdir(backups)
                     if n.endswith('.fs')]
        with open(backup_zks, 'rb') as f:
            self.assertNotIn(b'CANARY', f.read())
        for copy in [data_fs, restored] + repozo_fs:
            with open(copy, 'rb') as f:
                raw = f.read()
            self.assertNotIn(canary('acme').encode(), raw, copy)
            # the other tenants: ciphertext too, though readable with keys
            self.assertNotIn(canary('globex').encode(), raw, copy)
            envelopes = [(oid, e) for oid, dek, e in _history(copy)
                         if dek in acme_deks]
            self.assertEqual({oid for oid, _ in envelopes}, acme_oids)
            for oid, envelope in envelopes:
                for kek in keks:
                    with self.assertRaises(exceptions.UnknownKeyError):
                        self.facility.decrypt_state(kek, envelope)

        # the database keeps working around it
        self.close(self.db)
        db = self.open()
        conn = db.open()
        root = conn.root()
        with self.assertRaises(exceptions.KeyDestroyedError) as cm:
            root['acme'].items
        self.assertEqual(cm.exception.oid, root['acme']._p_oid)
        self.assertIn(cm.exception.key_id, acme_deks)
        self.assertEqual(cm.exception.tenant, 'acme')
        self.assertIn(cm.exception.key_id, str(cm.exception))
        self.assertIn('0x' + root['acme']._p_oid.hex(), str(cm.exception))
        for name in ('globex', 'initech'):
            self.assertEqual(root[name].profile.secret,
                             canary(name) + '-profile-v2')
            root[name].items.append(Item(root[name], 'new'))
            root[name]._p_changed = True
        self.assertEqual(root['common'].secret, 'COMMON-VALUE')
        transaction.commit()
        # export of a shredded subtree copies ciphertext as it is
        exported = io.BytesIO()
        conn.exportFile(root['acme']._p_oid, exported)
        self.assertNotIn(canary('acme').encode(), exported.getvalue())
        # pack with garbage collection follows references through acme
        del root['initech'].items[0]
        root['initech']._p_changed = True
        transaction.commit()
        before = len(db.storage)
        db.pack(time.time() + 1)
        self.assertEqual(len(db.storage), before - 1)
        conn.cacheMinimize()
        self.assertEqual(len(root['initech'].items), 3)
        with self.assertRaises(exceptions.KeyDestroyedError):
            root['acme'].profile.secret
        # writing under the shredded tenant is refused
        transaction.abort()
        with self.assertRaises(exceptions.KeyDestroyedError):
            with db.transaction() as c2:
                c2.root()['late'] = Tenant('acme')

        # migrate scan --by-tenant counts the shredded records
        self.close(db)
        code, out, err = self.cli(
            'migrate', 'scan', data_fs, '--by-tenant', '--tenant-registry',
            self.registry.path, '--key-dir', self.path('keys'),
            '--no-progress')
        self.assertEqual(code, 0, err)
        rows = {line.split()[0]: line.split() for line in out.splitlines()}
        self.assertEqual(rows['acme'][1:], ['shredded', '5', rows['acme'][3],
                                            '5'])
        self.assertEqual(rows['globex'][4], '0')
        self.assertEqual(rows['initech'][2], '5')

    def test_shared_kind_keeps_the_shared_kek(self):
        receipt = self.shred('globex')
        self.assertFalse(receipt['kek']['destroyed'])
        self.assertEqual(receipt['kek']['id'], self.holder.key_id)
        self.close(self.db)     # its cache holds the objects, decrypted
        conn = self.open().open()
        self.assertEqual(conn.root()['common'].secret, 'COMMON-VALUE')
        with self.assertRaises(exceptions.KeyDestroyedError):
            conn.root()['globex'].profile

    def cli(self, *argv):
        from zodbkmi.cli import main
        out = io.TextIOWrapper(io.BytesIO(), encoding='utf-8')
        err = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        out.flush()
        return code, out.buffer.getvalue().decode(), err.getvalue()

    # -- refusals: nothing destroyed ----------------------------------------

    def assertNothingDestroyed(self):
        for name in NAMES:
            record = self.registry.record(name)
            self.assertEqual(record['state'], 'active')
            for dek in record['deks']:
                self.assertIn(dek, self.facility)
        for name in ('acme', 'initech'):
            self.assertTrue(os.path.exists(self.registry.key_file(name)))
        self.assertFalse(os.path.exists(self.registry.audit_log_path))

    def test_refuses_unknown_tenant(self):
        with self.assertRaises(exceptions.TenantError) as cm:
            self.shred('hooli')
        self.assertIn('no tenant hooli', str(cm.exception))
        self.assertNothingDestroyed()

    def test_refuses_without_confirmation(self):
        with self.assertRaises(exceptions.TenantError):
            self.shred(confirm=False)
        code, out, err = self.cli(
            'shred', 'acme', '--registry', self.registry.path, '--key-dir',
            self.path('keys'))
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn('not confirmed', err)
        self.assertNothingDestroyed()

    def _edit_registry(self, name, **changes):
        path = self.path('tenants', 'tenants.json')
        with open(path) as f:
            data = json.load(f)
        data['tenants'][name].update(changes)
        with open(path, 'w') as f:
            json.dump(data, f)
        self.registry._cache = None

    def test_refuses_a_key_shared_with_another_tenant(self):
        self._edit_registry('initech',
                            kek_id=self.registry.record('acme')['kek_id'])
        with self.assertRaises(exceptions.TenantError) as cm:
            self.shred('acme')
        self.assertIn('shares its key with tenant initech', str(cm.exception))
        self._edit_registry('initech', kek_id='x', deks=self.registry.record(
            'acme')['deks'] + self.registry.record('initech')['deks'])
        with self.assertRaises(exceptions.TenantError):
            self.shred('initech')
        self._edit_registry('initech', kek_id=self.registry.kek(
            'initech').key_id, deks=self.registry.record('initech')['deks'][
                -1:])
        self.assertNothingDestroyed()

    def test_refuses_the_default_key(self):
        self.registry.create('dflt', self.facility, 'source', params={
            'source': 'file', 'path': self.key_file})
        with self.assertRaises(exceptions.TenantError) as cm:
            self.shred('dflt')
        self.assertIn('default key', str(cm.exception))
        self.assertTrue(os.path.exists(self.key_file))
        self.assertNothingDestroyed()

    def test_refuses_when_the_key_service_is_unreachable(self):
        import socket
        s = socket.socket()
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
        s.close()
        token = self.path('token')
        with open(token, 'w') as f:
            f.write('t')
        os.chmod(token, 0o600)
        path = self.path('tenants', 'tenants.json')
        with open(path) as f:
            data = json.load(f)
        data['tenants']['vaulted'] = {
            'kind': 'source', 'state': 'active', 'deks': [],
            'kek_id': 'vault-transit:transit/vaulted', 'created': '',
            'params': {'source': 'vaultTransit', 'keyName': 'vaulted',
                       'url': 'http://127.0.0.1:%d' % port,
                       'allowHttp': True, 'tokenFile': token,
                       'timeout': 1}}
        with open(path, 'w') as f:
            json.dump(data, f)
        with self.assertRaises(exceptions.TenantError) as cm:
            self.shred('vaulted')
        self.assertIn('unreachable', str(cm.exception))
        shutil.rmtree(self.path('keys'))
        code, out, err = self.cli(
            'shred', 'acme', '--yes', '--registry', self.registry.path,
            '--key-dir', self.path('keys'))
        self.assertEqual(code, 2)
        self.assertIn('unreachable', err)
        self.assertEqual(self.registry.record('acme')['state'], 'active')
        self.assertTrue(os.path.exists(self.registry.key_file('acme')))

    # -- a crash in the middle -----------------------------------------

    def test_crash_in_the_middle_then_rerun_finishes(self):
        kek = self.registry.kek('acme')
        self.facility.rotate(kek)
        self.facility.rotate(kek)
        deks = sorted(e.dek_id for e in self.facility.key_store.entries()
                      if e.kek_id == kek.key_id)
        self.assertEqual(len(deks), 3)
        code = (
            'import os, sys\n'
            'from zodbkmi import tenants\n'
            'from zodbkmi.facility import KeyManagementFacility\n'
            'r = tenants.TenantRegistry(sys.argv[1])\n'
            'f = KeyManagementFacility(sys.argv[2])\n'
            'def crash(n):\n'
            '    if n == 0: os._exit(9)\n'
            'tenants.shred(r, f, "acme", confirm=True, _step=crash)\n')
        proc = subprocess.run([sys.executable, '-c', code,
                               self.registry.path, self.path('keys')])
        self.assertEqual(proc.returncode, 9)
        self.registry._cache = None
        self.assertEqual(self.registry.record('acme')['state'], 'shredding')
        left = [d for d in deks if d in self.facility]
        self.assertEqual(len(left), 2)       # each key whole or gone
        receipt = self.shred()
        self.assertEqual(receipt['deks'], deks)
        self.assertFalse([d for d in deks if d in self.facility])
        self.assertEqual(self.registry.record('acme')['state'], 'shredded')
        self.assertFalse(os.path.exists(self.path('tenants',
                                                  'shred-acme.json')))
        with self.assertRaises(exceptions.TenantError):
            self.shred()

    def test_cli_create_list_shred_verify(self):
        args = ('--registry', self.registry.path, '--key-dir',
                self.path('keys'))
        code, out, err = self.cli('tenant', 'create', 'umbrella', *args)
        self.assertEqual(code, 0, err)
        self.assertIn('tenant umbrella: KEK aes-', out)
        code, out, err = self.cli('tenant', 'list', '--registry',
                                  self.registry.path)
        self.assertIn('umbrella file active', out)
        receipt_file = self.path('receipt.json')
        code, out, err = self.cli('shred', 'umbrella', '--yes',
                                  '--receipt', receipt_file, *args)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)['tenant'], 'umbrella')
        code, out, err = self.cli(
            'tenant', 'verify-receipt', receipt_file, '--public-key',
            self.registry.public_key_path)
        self.assertEqual(code, 0, err)
        self.assertIn('valid receipt: tenant umbrella', out)
        with open(receipt_file) as f:
            data = json.load(f)
        data['operator'] = 'someone else'
        with open(receipt_file, 'w') as f:
            json.dump(data, f)
        code, out, err = self.cli(
            'tenant', 'verify-receipt', receipt_file, '--public-key',
            self.registry.public_key_path)
        self.assertEqual(code, 2)
        self.assertIn('altered', err)


class KeyServerShredTests(_Base):
    """Tenant DEKs kept by replicas of a key server (the KEKs here): the
    shred deletes them on the key service, through the Python API and
    ``zodbkmi shred --url``."""

    from tests.test_failover import ReplicasLayer as layer

    cli = ShredTests.cli

    def setUp(self):
        super().setUp()
        self.replicas = self.layer.replicas
        self.replicas.start()
        self.remote = self.replicas.facility(self)

    def on_server(self, kek_id):
        return sorted(m['dek_id'] for m in self.remote.metadata()
                      if m['kek_id'] == kek_id and m['state'] != 'destroyed')

    def test_shred_deletes_the_deks_on_the_key_server(self):
        for name in ('north', 'south'):
            self.registry.create(name, self.remote, 'file')
        keks = {name: self.registry.kek(name) for name in ('north', 'south')}
        sealed = {name: self.remote.encrypt(kek, canary(name).encode())
                  for name, kek in keks.items()}
        deks = self.on_server(keks['north'].key_id)
        self.assertEqual(len(deks), 1)
        receipt = tenants.shred(self.registry, self.remote, 'north',
                                confirm=True)
        self.assertEqual(receipt['deks'], deks)
        self.assertEqual(self.on_server(keks['north'].key_id), [])
        # another client (no cache) cannot open it; the other tenant can
        other = self.replicas.facility(self)
        with self.assertRaises(exceptions.UnknownKeyError):
            other.decrypt(keks['north'], sealed['north'])
        self.assertEqual(other.decrypt(keks['south'], sealed['south']),
                         canary('south').encode())

    def test_cli_shred_through_the_key_server(self):
        token = self.path('admin.token')
        fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, self.replicas.admin.encode())
        os.close(fd)
        server = ('--registry', self.registry.path,
                  '--url', ','.join(self.replicas.urls),
                  '--ca-file', self.replicas.ca, '--token-file', token)
        code, out, err = self.cli('tenant', 'create', 'east', *server)
        self.assertEqual(code, 0, err)
        kek_id = self.registry.record('east')['kek_id']
        self.assertEqual(len(self.on_server(kek_id)), 1)
        code, out, err = self.cli('shred', 'east', '--yes', *server)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.on_server(kek_id), [])
        code, out, err = self.cli('shred', 'east', '--yes', '--key-dir',
                                  self.path('keys'), *server)
        self.assertEqual((code, err.count('\n')), (2, 1))
        self.assertIn('give --key-dir or --url, not both', err)


class RelStorageShredTests(_Base):
    """The same on RelStorage (history-preserving) on PostgreSQL: a
    pg_dump made before the shred holds the shredded tenant's data only as
    ciphertext that nothing opens, the other tenants work, pack with GC
    works."""

    from tests.postgres import PostgresLayer as layer

    def open(self, path=None, **kw):
        import uuid
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        from tests.postgres import needs_postgres
        needs_postgres(self)
        if not hasattr(self, 'dbname'):
            self.dbname = 'tn_' + uuid.uuid4().hex[:12]
            self.dsn = self.layer.server.createdb(self.dbname)
        opts = Options(keep_history=True, cache_local_mb=0)
        db = ZODB.DB(RelStorage(PostgreSQLAdapter(dsn=self.dsn,
                                                  options=opts),
                                options=opts))
        self.dbs.append(db)
        return db

    def test_shred_on_relstorage(self):
        self.make_tenants()
        db = self.open()
        self.populate(db)
        dump = self.layer.server.dump(self.dbname)
        self.assertNotIn(b'CANARY', dump)
        self.shred()
        self.close(db)
        db = self.open()
        conn = db.open()
        root = conn.root()
        with self.assertRaises(exceptions.KeyDestroyedError):
            root['acme'].profile
        gone = []
        for name in ('globex', 'initech'):
            self.assertEqual(root[name].profile.secret,
                             canary(name) + '-profile')
            gone.append(root[name].items.pop()._p_oid)
            root[name]._p_changed = True
        transaction.commit()
        db.pack(time.time() + 1)
        from ZODB.POSException import POSKeyError
        from ZODB.utils import load_current
        for oid in gone:
            with self.assertRaises(POSKeyError):
                load_current(db.storage, oid)
        load_current(db.storage, root['acme']._p_oid)   # kept, unreadable
        self.assertEqual(len(root['globex'].items), 2)


class PKCS11ShredTests(_Base):
    """A tenant whose KEK is a PKCS#11 object (SoftHSM2): created with the
    tenant, destroyed by the shred."""

    from tests.softhsm import SoftHSMLayer as layer

    def test_shred_destroys_the_token_object(self):
        import uuid
        from tests.softhsm import SoftHSMLayer
        from tests.softhsm import LIBRARY, TOKEN_LABEL
        if SoftHSMLayer.hsm is None:
            self.skipTest('SoftHSM2 not available')
        from zodbkmi.sources import kek_from_params
        params = {'source': 'pkcs11', 'library': LIBRARY,
                  'tokenLabel': TOKEN_LABEL,
                  'keyLabel': 'tenant-' + uuid.uuid4().hex[:8],
                  'pinFile': SoftHSMLayer.hsm.pin_file(self.tmp)}
        holder = self.registry.create('hsm', self.facility, 'source',
                                      params=params)
        sealed = self.facility.encrypt(holder.key, b'CANARY-hsm')
        self.assertEqual(self.facility.decrypt(holder.key, sealed),
                         b'CANARY-hsm')
        receipt = self.shred('hsm')
        self.assertEqual(receipt['kek'], {'kind': 'pkcs11', 'destroyed': True,
                                          'id': holder.key.key_id})
        with self.assertRaises(exceptions.KeySourceError) as cm:
            kek_from_params(params)
        self.assertIn('no such AES key', str(cm.exception))
        with self.assertRaises(exceptions.UnknownKeyError):
            self.facility.decrypt(holder.key, sealed)


class TransitShredTests(_Base):
    """A tenant whose KEK is an OpenBao Transit key: created with the
    tenant, deleted by the shred."""

    from tests.bao import BaoLayer as layer

    def test_shred_deletes_the_transit_key(self):
        import uuid
        from tests.bao import BaoLayer
        from tests.bao import ROOT_TOKEN
        if BaoLayer.server is None:
            self.skipTest('OpenBao not available')
        from zodbkmi.sources import kek_from_params
        token = self.path('token')
        fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, ROOT_TOKEN.encode())
        os.close(fd)
        params = {'source': 'vaultTransit', 'url': BaoLayer.server.url,
                  'caFile': BaoLayer.server.ca_file, 'tokenFile': token,
                  'keyName': 'tenant-' + uuid.uuid4().hex[:8]}
        holder = self.registry.create('bao', self.facility, 'source',
                                      params=params)
        sealed = self.facility.encrypt(holder.key, b'CANARY-bao')
        receipt = self.shred('bao')
        self.assertEqual(receipt['kek'], {'kind': 'vaultTransit',
                                          'destroyed': True,
                                          'id': holder.key.key_id})
        with self.assertRaises(exceptions.KeySourceError) as cm:
            kek_from_params(params)
        self.assertIn('no such Transit key', str(cm.exception))
        with self.assertRaises(exceptions.UnknownKeyError):
            self.facility.decrypt(holder.key, sealed)


class ReceiptVectorTests(unittest.TestCase):
    """tests/vectors/shred-receipt.json: the receipt format, fixed."""

    def test_vectors(self):
        path = os.path.join(os.path.dirname(__file__), 'vectors',
                            'shred-receipt.json')
        with open(path) as f:
            vectors = json.load(f)
        pem = vectors['public_key_pem'].encode()
        for receipt in vectors['valid']:
            tenants.verify_receipt(receipt, pem)
            body = {k: v for k, v in receipt.items() if k != 'signature'}
            self.assertEqual(tenants._canonical(body).decode(),
                             vectors['canonical_body'])
        for receipt in vectors['invalid']:
            with self.assertRaises(exceptions.AuthenticationError):
                tenants.verify_receipt(receipt, pem)
