"""Fault tests: what survives a SIGKILL of the key server or of a process
writing keys, a full disk under the key directory, and a key server that is
down, killed or hanging while an application commits.

Each fault and the behaviour it proves is listed in ``docs/security.rst``
(section "Faults").  The key server is the real one (``zodbkmi serve``
over TLS, in its own process group so that SIGKILL reaches its workers);
the full disk is a real 64 KiB tmpfs (needs root: skipped otherwise).
"""
import base64
import errno
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import transaction
import zope.component
import zope.component.testing
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

import zodbkmi
from zodbkmi import exceptions
from zodbkmi.format import envelope
from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.testing import ServerProcess
from zodbkmi.testing import free_port
from zodbkmi.keystore import ACTIVE
from zodbkmi.keystore import RETIRED
from zodbkmi.keystore import SUFFIX
from zodbkmi.keystore import KeyStoreEntry
from zodbkmi.testing import StaticKeyHolder as Holder

ZODBKMI = [sys.executable, '-m', 'zodbkmi.cli']
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(zodbkmi.__file__)))


def _env():
    # the child processes import the zodbkmi this test imports
    path = os.environ.get('PYTHONPATH')
    return dict(os.environ, PYTHONPATH=SRC + (os.pathsep + path
                                              if path else ''))


class KillableServer(ServerProcess):
    """``zodbkmi serve`` over TLS in ``base`` (kept across restarts), in a
    process group of its own: :meth:`kill` sends SIGKILL to all of it.
    Started with :meth:`start`."""

    def __init__(self, base, port=None, args=()):
        super().__init__('--access-log', 'off', *args, env=_env(),
                         directory=base, port=port, new_session=True,
                         start=False)

    def facility(self, **kw):
        from zodbkmi.facility import LocalKeyManagementFacility
        kw.setdefault('token', self.admin)
        kw.setdefault('ca_file', self.ca)
        kw.setdefault('request_timeout', 3.0)
        return LocalKeyManagementFacility(self.url, **kw)


def _tmpdir(test, prefix='zodbkmi-faults-'):
    path = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, path, True)
    return path


# -- vault consistency ----------------------------------------------------

def check_vault(test, key_dir, keks, acknowledged,
                group=lambda e: e.kek_id):
    """Assert that ``key_dir`` is consistent after a crash; return the
    number of leftover temporary files.

    ``keks`` maps KEK ids to the KEKs that may have wrapped entries;
    ``acknowledged`` maps DEK ids a writer was told are stored to their
    KEK id (or None when the KEK may have changed by a rewrap).  ``group``
    gives the sequence of keys an entry belongs to (one per KEK, unless
    rewraps move keys between KEKs): one key of each sequence is active.

    Every ``.dek`` file parses, names its own id, unwraps with its KEK and
    decrypts data; nothing else is taken for a key; every acknowledged key
    is there; per KEK the active key is complete and the newest, and every
    key older than the newest acknowledged one is retired.
    """
    from zodbkmi.facility import KeyManagementFacility
    names = sorted(os.listdir(key_dir))
    dek_files = [n for n in names if n.endswith(SUFFIX)]
    others = [n for n in names if not n.endswith(SUFFIX)]
    for name in others:   # only the temporary files of write_atomic
        test.assertTrue(name.startswith('.tmp-') and name.endswith('.part'),
                        name)
    entries = {}
    for name in dek_files:
        with open(os.path.join(key_dir, name), 'rb') as f:
            data = f.read()
        entry = KeyStoreEntry.from_json(data, name)   # complete JSON
        test.assertEqual(entry.dek_id + SUFFIX, name)
        test.assertIn(entry.kek_id, keks)
        test.assertIn(entry.state, (ACTIVE, RETIRED))
        raw_id, dek = wrapped.unwrap(keks[entry.kek_id], entry.wrapped)
        test.assertEqual(raw_id.hex(), entry.dek_id)
        entries[entry.dek_id] = (entry, raw_id, dek)
    facility = KeyManagementFacility(key_dir)
    # the vault takes exactly the complete entries, no temporary file
    test.assertEqual(facility.keys(), sorted(entries))
    for dek_id, (entry, raw_id, dek) in entries.items():
        sealed = envelope.Sealer(raw_id, dek).seal(b'data under ' +
                                                   dek_id.encode())
        test.assertEqual(facility.decrypt(keks[entry.kek_id], sealed),
                         b'data under ' + dek_id.encode())
    for dek_id, kek_id in acknowledged.items():
        test.assertIn(dek_id, entries, 'acknowledged key lost')
        if kek_id is not None:
            test.assertEqual(entries[dek_id][0].kek_id, kek_id)
    by_kek = {}
    for entry, _, _ in entries.values():
        by_kek.setdefault(group(entry), []).append(entry)
    for kek_entries in by_kek.values():
        kek_entries.sort(key=lambda e: (e.created, e.dek_id))
        newest = kek_entries[-1]
        active = facility.key_store.active_for(newest.kek_id)
        test.assertEqual(active.dek_id, newest.dek_id)
        test.assertEqual(newest.state, ACTIVE)
        acked = [i for i, e in enumerate(kek_entries)
                 if e.dek_id in acknowledged]
        if acked:
            for e in kek_entries[:acked[-1]]:
                test.assertEqual(e.state, RETIRED,
                                 'key %s older than an acknowledged key of '
                                 'its KEK is still active' % e.dek_id)
    return len(others)


# -- 1. SIGKILL during key creation and rotation --------------------------

def writer_keks(seed, n=200):
    """The KEKs of the writer process: KEK i is SHA-256(seed, i)."""
    import hashlib
    return [AESKeyEncryptingKey(hashlib.sha256(seed + b'%d' % i).digest())
            for i in range(n)]


_WRITER = r'''
import sys
from tests.test_faults import writer_keks
from zodbkmi.facility import KeyManagementFacility
facility = KeyManagementFacility(sys.argv[1])
keks = writer_keks(bytes.fromhex(sys.argv[2]))
index = {k.key_id: i for i, k in enumerate(keks)}
used = sorted({index[e.kek_id] for e in facility.key_store.entries()})
current = used[-1] if used else 0
for i in used[:-1]:   # finish a KEK rotation a kill interrupted
    facility.rewrap(keks[i], keks[current])
n = 0
while True:
    n += 1
    if n % 7 == 0:   # KEK rotation: rewrap every DEK under the next KEK
        facility.rewrap(keks[current], keks[current + 1])
        current += 1
        print('rewrapped', flush=True)
    else:            # DEK creation, a DEK rotation once the KEK has one
        print('created', facility.create_key(keks[current]), flush=True)
'''


class SigkillTests(unittest.TestCase):
    """SIGKILL of the key server and of a process writing keys."""

    def setUp(self):
        self.tmp = _tmpdir(self)

    def test_sigkill_of_writer_process_leaves_vault_consistent(self):
        # A child process creates, rotates and rewraps keys through the
        # directory vault; it is killed after a varying number of writes.
        key_dir = os.path.join(self.tmp, 'keys')
        seed = os.urandom(16)
        keks = {k.key_id: k for k in writer_keks(seed)}
        acknowledged, temp_files = {}, 0
        rng = random.Random()
        for kill_after in [rng.randint(1, 40) for _ in range(6)]:
            proc = subprocess.Popen(
                [sys.executable, '-c', _WRITER, key_dir, seed.hex()],
                stdout=subprocess.PIPE, env=_env(), text=True,
                cwd=TOP)   # the child imports tests.test_faults
            lines = 0
            for line in proc.stdout:
                words = line.split()
                if words[0] == 'created':
                    # rewraps change its KEK: any KEK of the writer
                    acknowledged[words[1]] = None
                lines += 1
                if lines == kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.stdout.close()
            proc.wait()
            self.assertEqual(proc.returncode, -signal.SIGKILL)
            # one sequence of DEKs, whatever KEK wraps them now
            temp_files = check_vault(self, key_dir, keks, acknowledged,
                                     group=lambda e: 0)
        self.assertGreater(len(acknowledged), 0)
        print('\n  writer killed 6 times: %d keys acknowledged, %d in the '
              'key store, %d stale temporary files'
              % (len(acknowledged), len(os.listdir(key_dir)) - temp_files,
                 temp_files), end=' ')

    def test_sigkill_of_key_server_during_creation_and_rotation(self):
        server = KillableServer(self.tmp)
        self.addCleanup(server.kill)
        keks = {}
        for _ in range(3):
            kek = AESKeyEncryptingKey(os.urandom(32))
            keks[kek.key_id] = kek
        acknowledged = {}
        lock = threading.Lock()
        unexpected = []
        rng = random.Random()

        def hammer(kek, stop):
            client = server.facility(retries=0)
            try:
                while not stop.is_set():
                    # a create is a DEK rotation once the KEK has a key
                    dek_id = client.create_key(kek)
                    with lock:
                        acknowledged[dek_id] = kek.key_id
            except exceptions.KeyServerError:
                pass   # the server was killed
            except Exception as e:   # pragma: no cover
                unexpected.append(repr(e))
            finally:
                client.close()

        kills = 6
        for i in range(kills + 1):
            server.start()
            check = server.facility(token=server.admin)
            # every key acknowledged before a kill is served after restart
            for dek_id, kek_id in sorted(acknowledged.items()):
                entry = check.entry(dek_id)
                self.assertEqual(entry.kek_id, kek_id)
                self.assertEqual(wrapped.unwrap(keks[kek_id],
                                                entry.wrapped)[0].hex(),
                                 dek_id)
            check.close()
            if i == kills:
                break
            stop = threading.Event()
            threads = [threading.Thread(target=hammer, args=(kek, stop))
                       for kek in keks.values()]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.1, 0.5))
            server.kill()
            stop.set()
            for t in threads:
                t.join(30)
            self.assertEqual(unexpected, [])
            temp_files = check_vault(self, server.key_dir, keks,
                                     acknowledged)
        server.stop()
        self.assertGreater(len(acknowledged), kills)
        # after one more rotation per KEK exactly one key per KEK is active
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(server.key_dir)
        for kek in keks.values():
            facility.rotate(kek)
        states = [e.state for e in facility.key_store.entries()]
        self.assertEqual(states.count(ACTIVE), len(keks))
        # a KEK rotation leaves no copy wrapped by an old KEK behind
        for kek in keks.values():
            facility.rewrap(kek, AESKeyEncryptingKey(os.urandom(32)))
        for name in os.listdir(server.key_dir):
            if not name.endswith(SUFFIX):
                with open(os.path.join(server.key_dir, name), 'rb') as f:
                    data = f.read()
                for dek_id in facility.keys():
                    self.assertNotIn(dek_id.encode(), data)
        print('\n  key server killed %d times: %d keys acknowledged, %d in '
              'the key store, %d stale temporary files'
              % (kills, len(acknowledged), len(states), temp_files),
              end=' ')

    def _crashed_vault(self, name='keys'):
        """A vault as a crash leaves it: a key added and the previous one
        not yet retired (two active keys of one KEK), and temporary files
        of writers killed before their rename."""
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.keystore import TEMP_PREFIX, TEMP_SUFFIX
        facility = KeyManagementFacility(os.path.join(self.tmp, name))
        kek = AESKeyEncryptingKey(os.urandom(32))
        first = facility.create_key(kek)
        raw_id = os.urandom(16)
        second = KeyStoreEntry(raw_id.hex(), kek.key_id,
                               wrapped.wrap(kek, raw_id, os.urandom(32)))
        facility.key_store.add(second)       # killed before the retire
        leftovers = []
        for entry in (facility.entry(first), second,
                      KeyStoreEntry(os.urandom(16).hex(), kek.key_id, b'x')):
            fd, name = tempfile.mkstemp(dir=facility.key_store.path,
                                        prefix=TEMP_PREFIX,
                                        suffix=TEMP_SUFFIX)
            os.write(fd, entry.to_json())   # killed before the rename
            os.close(fd)
            leftovers.append(name)
        return facility, kek, first, second.dek_id, leftovers

    def test_crash_between_add_and_retire_heals_on_next_rotation(self):
        facility, kek, first, second, _ = self._crashed_vault()
        self.assertEqual(facility.key_store.active_for(kek.key_id).dek_id,
                         second)   # the newest wins meanwhile
        third = facility.rotate(kek)
        self.assertEqual([(e.dek_id, e.state)
                          for e in facility.key_store.entries()
                          if e.state == ACTIVE], [(third, ACTIVE)])
        self.assertEqual(facility.entry(first).state, RETIRED)

    def test_crash_between_add_and_retire_heals_through_rest_api(self):
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.testing import setupRestApi
        facility, kek, first, second, _ = self._crashed_vault()
        local = LocalKeyManagementFacility('https://127.0.0.1:1')
        setupRestApi(local, facility)
        third = local.rotate(kek)
        self.assertEqual([e['dek_id'] for e in local.metadata()
                          if e['state'] == ACTIVE], [third])

    def test_leftover_copies_are_swept_by_delete_and_rewrap(self):
        facility, kek, first, second, leftovers = self._crashed_vault()
        self.assertEqual(facility.keys(), sorted([first, second]))
        new = AESKeyEncryptingKey(os.urandom(32))
        self.assertEqual(facility.rewrap(kek, new), 2)
        # no copy wrapped by the old KEK of a key of the vault is left
        self.assertEqual([os.path.exists(n) for n in leftovers],
                         [False, False, True])
        self.assertEqual(facility.key_store.sweep([first]), 0)
        check_vault(self, facility.key_store.path, {new.key_id: new}, {})
        # a destroyed key leaves no copy behind either
        other, _, first, _, leftovers = self._crashed_vault('other')
        other.delete(first)
        self.assertEqual([os.path.exists(n) for n in leftovers],
                         [False, True, True])

    def test_write_atomic_syncs_file_and_directory(self):
        # SIGKILL cannot lose what reached the page cache; a power cut can.
        # So write_atomic must fsync the file before the rename and the
        # directory after it: watched here (os.fsync still runs).
        from zodbkmi import keystore
        synced = []
        real = os.fsync

        def watching(fd):
            synced.append(os.path.realpath('/proc/self/fd/%d' % fd))
            return real(fd)
        path = os.path.join(self.tmp, 'k.dek')
        keystore.os.fsync = watching
        try:
            keystore.write_atomic(path, b'{}')
        finally:
            keystore.os.fsync = real
        self.assertEqual(len(synced), 2)
        self.assertTrue(os.path.basename(synced[0]).startswith('.tmp-'))
        self.assertEqual(synced[1], os.path.realpath(self.tmp))


# -- 2. disk full while writing a key --------------------------------------

def _mount_tmpfs(test, path, size='64k'):
    """Mount a small tmpfs on ``path`` (unmounted at cleanup) or skip."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        test.skipTest('mounting a tmpfs needs root')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%s,mode=0700'
                        % size, 'tmpfs', path],
                       capture_output=True, text=True)
    if r.returncode:
        test.skipTest('cannot mount a tmpfs here: %s' % r.stderr.strip())
    test.addCleanup(_umount, path)


def _umount(path):
    if subprocess.run(['umount', path], capture_output=True).returncode:
        subprocess.run(['umount', '-l', path], capture_output=True)


def _fill(path):
    """Fill the file system of ``path``; return the filler's name."""
    filler = os.path.join(path, 'filler')
    with open(filler, 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:   # pragma: no cover
                raise
    return filler


class DiskFullTests(unittest.TestCase):

    def setUp(self):
        self.tmp = _tmpdir(self)
        self.mnt = os.path.join(self.tmp, 'small')
        _mount_tmpfs(self, self.mnt)

    def test_create_key_on_full_disk(self):
        from zodbkmi.facility import KeyManagementFacility
        key_dir = os.path.join(self.mnt, 'keys')
        facility = KeyManagementFacility(key_dir)
        raw_kek = os.urandom(32)
        kek = AESKeyEncryptingKey(raw_kek)
        first = facility.create_key(kek)
        sealed = facility.encrypt(kek, b'written before the disk filled')
        filler = _fill(self.mnt)
        before = sorted(os.listdir(key_dir))
        for attempt in (facility.create_key, facility.rotate):
            with self.assertRaises(exceptions.KeyStoreError) as cm:
                attempt(kek)
            message = str(cm.exception)
            self.assertIn('No space left on device', message)
            self.assertIn(key_dir, message)
            self.assertEqual(cm.exception.errno, errno.ENOSPC)
            self.assertNotIn(raw_kek.hex(), message)
            # no partial nor temporary file, the old key unchanged
            self.assertEqual(sorted(os.listdir(key_dir)), before)
        self.assertEqual(facility.key_store.active_for(kek.key_id).dek_id,
                         first)
        other = KeyManagementFacility(key_dir)   # existing keys still load
        self.assertEqual(other.decrypt(kek, sealed),
                         b'written before the disk filled')
        self.assertEqual(other.keys(), [first])
        os.unlink(filler)
        second = facility.rotate(kek)
        self.assertEqual(other.key_store.active_for(kek.key_id).dek_id, second)
        self.assertEqual(other.entry(first).state, RETIRED)
        check_vault(self, key_dir, {kek.key_id: kek},
                    {first: kek.key_id, second: kek.key_id})

    def test_key_server_answers_507_on_full_disk_and_keeps_serving(self):
        server = KillableServer(
            self.tmp, args=['--key-dir', os.path.join(self.mnt, 'keys')])
        self.addCleanup(server.kill)
        server.start()
        client = server.facility(retries=0)
        self.addCleanup(client.close)
        kek = AESKeyEncryptingKey(os.urandom(32))
        first = client.create_key(kek)
        filler = _fill(self.mnt)
        with self.assertRaises(exceptions.KeyServerError) as cm:
            client.create_key(kek)
        self.assertEqual((cm.exception.status, cm.exception.reason),
                         (507, 'key store full'))
        self.assertIn(server.url, str(cm.exception))
        # the raw answer: short JSON, no traceback
        status, body = self._post_raw(server, kek)
        self.assertEqual(status, 507)
        self.assertEqual(json.loads(body), {'error': 'key store full'})
        # still serving: the old key is there and still active
        self.assertEqual(client.entry(first).state, ACTIVE)
        self.assertEqual(client.keys(), [first])
        self.assertEqual(client.status()['keys'], 1)
        os.unlink(filler)
        second = client.create_key(kek)
        self.assertEqual(client.entry(first).state, RETIRED)
        self.assertEqual(client.entry(second).state, ACTIVE)
        server.stop()
        err = server.read('err.txt')
        self.assertIn('No space left on device', err)
        self.assertNotIn('Traceback', err)

    def _post_raw(self, server, kek):
        import http.client
        ctx = ssl.create_default_context(cafile=server.ca)
        conn = http.client.HTTPSConnection('127.0.0.1', server.port,
                                           context=ctx, timeout=5)
        try:
            data = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
            conn.request('POST', '/v1/keys', json.dumps(
                {'wrapped': base64.b64encode(data).decode()}),
                {'Authorization': 'Bearer ' + server.admin,
                 'Content-Type': 'application/json'})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


# -- 3. key server unreachable while an application commits ----------------

CANARY = 'canary-plaintext-7f3b9c1e'


class HangingServer:
    """A TCP port that accepts connections and never answers; with
    ``tls_dir`` it completes the TLS handshake first (a server that hangs
    inside a request), else it never answers the handshake."""

    def __init__(self, tls_dir=None):
        self.context = self.ca = None
        if tls_dir is not None:
            from zodbkmi.server import generate_self_signed, server_context
            self.ca, key = generate_self_signed(tls_dir)
            self.context = server_context(self.ca, key)
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = 'https://127.0.0.1:%d' % self.port
        self.held = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.context is not None:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except OSError:   # pragma: no cover
                    conn.close()
                    continue
            self.held.append(conn)   # read nothing, answer nothing

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:   # pragma: no cover
            pass
        self.sock.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()


class UnreachableServerTests(unittest.TestCase):
    """Commits of EncryptedPersistent objects and through EncryptingStorage
    while the key server is down, killed or hanging."""

    def setUp(self):
        from tests.test_persistent import Secret
        self.Secret = Secret
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        self.addCleanup(transaction.abort)
        self.tmp = _tmpdir(self)
        self.kek = os.urandom(32)

    def _facility(self, url, ca=None, token=None, **kw):
        from zodbkmi.facility import LocalKeyManagementFacility
        kw.setdefault('request_timeout', 0.5)
        kw.setdefault('retries', 1)
        f = LocalKeyManagementFacility(url, token=token, ca_file=ca, **kw)
        self.addCleanup(f.close)
        zope.component.provideUtility(f)
        zope.component.provideUtility(Holder(self.kek))
        return f

    def _db(self, facility, wrap):
        from zodbkmi.storage import EncryptingStorage
        self.path = os.path.join(self.tmp, 'Data.fs')
        storage = ZODB.FileStorage.FileStorage(self.path)
        self.addCleanup(storage.close)
        if wrap:
            storage = EncryptingStorage(storage, facility, key=self.kek)
        db = ZODB.DB(storage)
        self.addCleanup(self._close, db)
        return db

    def _close(self, db):
        if not getattr(db, '_closed_by_test', False):
            db._closed_by_test = True
            db.close()

    def _connect(self, db):
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        self.addCleanup(conn.close)
        self.addCleanup(tm.abort)
        return tm, conn

    def _assertKeyServerError(self, error, url):
        self.assertIsInstance(error, exceptions.KeyServerError)
        self.assertIn(url, str(error))
        self.assertIsNone(error.__cause__)
        self.assertTrue(error.__suppress_context__)
        self.assertNotIn(self.kek.hex(), str(error))

    def _assertNoCanary(self):
        for top, dirs, files in os.walk(self.tmp):
            for name in files:
                with open(os.path.join(top, name), 'rb') as f:
                    self.assertNotIn(CANARY.encode(), f.read(),
                                     os.path.join(top, name))

    def _reopen_and_check(self, expected, key_dir=None):
        """Reopen Data.fs: ``expected`` transactions, every record of the
        last one decrypts (with the key directory when given)."""
        storage = ZODB.FileStorage.FileStorage(self.path, read_only=True)
        try:
            tids = [t.tid for t in storage.iterator()]
            self.assertEqual(len(tids), expected)
            self.assertEqual(storage.lastTransaction(), tids[-1])
            if key_dir is not None:
                from zodbkmi.facility import KeyManagementFacility
                from zodbkmi.storage import EncryptingStorage
                wrapped_storage = EncryptingStorage(
                    storage, KeyManagementFacility(key_dir), key=self.kek)
                for txn in wrapped_storage.iterator():
                    for record in txn:
                        data, _ = wrapped_storage.load(record.oid)
                        self.assertTrue(data)
        finally:
            storage.close()

    def test_server_never_started(self):
        url = 'https://127.0.0.1:%d' % free_port()
        facility = self._facility(url)
        # object level: the root is plain, the commit of a Secret fails
        db = self._db(facility, wrap=False)
        tm, conn = self._connect(db)
        conn.root()['plain'] = PersistentMapping(x=1)
        tm.commit()
        conn.root()['secret'] = self.Secret('s', CANARY)
        with self.assertRaises(exceptions.KeyServerError) as cm:
            tm.commit()
        self._assertKeyServerError(cm.exception, url)
        self.assertIn('cannot be reached (2 attempts)', str(cm.exception))
        tm.abort()
        self.assertNotIn('secret', conn.root())
        conn.root()['plain']['y'] = 2      # the connection still works
        tm.commit()
        self._close(db)
        self._reopen_and_check(3)
        # storage level: not even the root can be written
        os.unlink(self.path)
        facility.clear_cache()
        with self.assertRaises(exceptions.KeyServerError) as cm:
            self._db(facility, wrap=True)
        self._assertKeyServerError(cm.exception, url)
        self._assertNoCanary()

    def test_server_killed_mid_session(self):
        server = KillableServer(_tmpdir(self))
        self.addCleanup(server.kill)
        server.start()
        facility = self._facility(server.url, server.ca, server.admin)
        facility.create_key(self.kek)
        db = self._db(facility, wrap=True)
        tm, conn = self._connect(db)
        root = conn.root()
        root['kept'] = self.Secret('kept', 'committed-1')
        root['changed'] = self.Secret('changed', 'committed-2')
        tm.commit()
        root['changed'].value = 'committed-3'
        tm.commit()
        server.kill()
        # cached DEKs keep working until the cache expires
        root['changed'].value = 'committed-while-down'
        tm.commit()
        facility.clear_cache()   # expired (the TTL path refetches the same)
        kept, changed = root['kept'], root['changed']
        changed.value = CANARY
        root['new'] = self.Secret('new', CANARY)
        with self.assertRaises(exceptions.KeyServerError) as cm:
            tm.commit()
        self._assertKeyServerError(cm.exception, server.url)
        tm.abort()
        # unmodified objects stay usable; the aborted ones need their key
        self.assertEqual(kept.value, 'committed-1')
        with self.assertLogs('ZODB.Connection', 'ERROR'):
            with self.assertRaises(exceptions.KeyServerError) as cm:
                changed.value
        self._assertKeyServerError(cm.exception, server.url)
        self._assertNoCanary()
        self._reopen_and_check(4, server.key_dir)
        # the server comes back: reads and commits work again
        server.start()
        self.assertEqual(root['changed'].value, 'committed-while-down')
        root['changed'].value = 'committed-after-restart'
        tm.commit()
        _, other = self._connect(db)
        self.assertEqual(other.root()['changed'].value,
                         'committed-after-restart')
        self.assertNotIn('new', other.root())
        self._reopen_and_check(5, server.key_dir)
        server.stop()

    def test_server_hangs_before_tls(self):
        self._check_hanging(HangingServer())

    def test_server_hangs_inside_a_request(self):
        self._check_hanging(HangingServer(_tmpdir(self)))

    def _check_hanging(self, hanging):
        self.addCleanup(hanging.close)
        facility = self._facility(hanging.url, hanging.ca,
                                  request_timeout=0.3, retries=1)
        db = self._db(facility, wrap=False)
        tm, conn = self._connect(db)
        conn.root()['secret'] = self.Secret('s', CANARY)
        started = time.monotonic()
        with self.assertRaises(exceptions.KeyServerError) as cm:
            tm.commit()
        took = time.monotonic() - started
        self._assertKeyServerError(cm.exception, hanging.url)
        self.assertIn('cannot be reached (2 attempts)', str(cm.exception))
        self.assertIn('Timeout', str(cm.exception))
        tm.abort()
        self.assertNotIn('secret', conn.root())
        self._close(db)
        self._reopen_and_check(1)
        self._assertNoCanary()
        print('\n  hanging key server (%s): KeyServerError after %.2f s '
              '(2 attempts of 0.3 s)' % ('TLS' if hanging.ca else 'TCP',
                                         took), end=' ')
