"""The key store in PostgreSQL (zodbkmi.keystore_pg) and server replicas
over it: a real PostgreSQL cluster and three ``zodbkmi serve`` processes
with TLS on loopback ports."""
import json
import os
import threading
import time
import unittest
import urllib.error
import urllib.request
import ssl
import uuid

from zodbkmi import keystore
from zodbkmi.exceptions import KeyStateError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.format import wrapped
from zodbkmi.kek import as_kek

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres

# trust authentication ignores it: the replicas are given a URL with a
# password that must appear nowhere
PASSWORD = 'pw-' + uuid.uuid4().hex


def new_entry(kek, created=None):
    raw_id = os.urandom(16)
    return keystore.KeyStoreEntry(raw_id.hex(), kek.key_id, wrapped.wrap(
        kek, raw_id, os.urandom(32), created=created or time.time_ns()))


def poll(check, timeout=60):
    """Call ``check()`` until it returns true; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('condition not reached in %ds' % timeout)
        time.sleep(0.1)


class _StoreTestBase(unittest.TestCase):

    layer = PostgresLayer

    def setUp(self):
        needs_postgres(self)
        self.dbname = 'ks_' + uuid.uuid4().hex[:12]
        PostgresLayer.server.createdb(self.dbname)
        self.url = 'postgresql://postgres@127.0.0.1:%d/%s' % (
            PostgresLayer.server.port, self.dbname)
        self.kek = as_kek(os.urandom(32))

    def _getTargetClass(self):
        from zodbkmi.keystore_pg import PostgresKeyStore
        return PostgresKeyStore

    def _makeOne(self, url=None, **kw):
        store = self._getTargetClass()(url or self.url, **kw)
        self.addCleanup(store.close)
        return store


class PostgresKeyStoreTests(_StoreTestBase):

    def test_interfaces(self):
        from zope.interface.verify import verifyObject
        from zodbkmi.interfaces import IKeyStore, IKeyStoreCheck
        store = self._makeOne()
        self.assertTrue(verifyObject(IKeyStore, store))
        self.assertTrue(verifyObject(IKeyStoreCheck, store))

    def test_schema_init_idempotent(self):
        from zodbkmi.keystore_pg import SCHEMA_VERSION
        store = self._makeOne(init=False)
        self.assertIsNone(store.schema_version())
        with self.assertRaisesRegex(KeyStoreError, '--init-vault'):
            store.ids()
        self.assertIsNone(store.init_schema())
        entry = new_entry(self.kek)
        store.add(entry)
        self.assertEqual(store.init_schema(), SCHEMA_VERSION)
        self.assertEqual(self._makeOne().ids(), [entry.dek_id])

    def test_lifecycle(self):
        store = self._makeOne()
        first = new_entry(self.kek)
        self.assertEqual(store.rotate(first), [])
        self.assertEqual(store.active_for(self.kek.key_id).dek_id,
                         first.dek_id)
        second = new_entry(self.kek)
        retired = store.rotate(second)
        self.assertEqual([(e.dek_id, e.state) for e in retired],
                         [(first.dek_id, 'retired')])
        self.assertEqual(store.active_for(self.kek.key_id).dek_id,
                         second.dek_id)
        with self.assertRaises(ValueError):
            store.add(second)
        self.assertEqual(store.count_by_state(),
                         {'active': 1, 'retired': 1})
        store.remove(first.dek_id)
        self.assertIsNone(store.get(first.dek_id))
        self.assertEqual(store.ids(), [second.dek_id])

    def test_concurrent_rotation_leaves_one_active(self):
        # two stores (two pools, as two replicas) rotate one KEK at the
        # same moment, many times over
        stores = [self._makeOne(), self._makeOne()]
        outcomes = set()
        for _ in range(25):
            barrier = threading.Barrier(2)
            results = []

            def rotate(store):
                entry = new_entry(self.kek)
                barrier.wait()
                try:
                    store.rotate(entry)
                    results.append('ok')
                except KeyStateError as e:
                    self.assertIn('rotated at the same moment', str(e))
                    results.append('conflict')
            threads = [threading.Thread(target=rotate, args=(s,))
                       for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertIn('ok', results)
            outcomes.update(results)
            active = [e for e in stores[0].entries() if e.state == 'active']
            self.assertEqual(len(active), 1)
            self.assertEqual(stores[1].active_for(self.kek.key_id).dek_id,
                             active[0].dek_id)

    def test_attack_reactivate_old_key_in_database(self):
        # an attacker with write access to the table marks an old DEK
        # active: the state only restricts, the newest entry decides
        store = self._makeOne()
        old, new = new_entry(self.kek), new_entry(self.kek)
        store.rotate(old)
        store.rotate(new)
        store._run(lambda cur: cur.execute(
            "UPDATE zodbkmi_keys SET state = 'retired' WHERE dek_id = %s; "
            "UPDATE zodbkmi_keys SET state = 'active' WHERE dek_id = %s",
            (new.dek_id, old.dek_id)))
        self.assertIsNone(store.active_for(self.kek.key_id))

    def test_attack_swapped_wrapped_dek_refused(self):
        store = self._makeOne()
        a, b = new_entry(self.kek), new_entry(self.kek)
        b.state = 'retired'
        store.add(a)
        store.add(b)
        store._run(lambda cur: cur.execute(
            'UPDATE zodbkmi_keys SET wrapped = %s WHERE dek_id = %s',
            (b.wrapped, a.dek_id)))
        with self.assertRaisesRegex(KeyStoreError, 'corrupt key store entry'):
            store.get(a.dek_id)

    def test_unreachable_error_hides_password(self):
        from zodbkmi.testing import free_port
        url = ('postgresql://postgres:%s@127.0.0.1:%d/x?connect_timeout=3'
               % (PASSWORD, free_port()))
        store = self._makeOne(url, init=False)
        with self.assertRaises(KeyStoreError) as cm:
            store.check()
        self.assertIn('unreachable', str(cm.exception))
        self.assertNotIn(PASSWORD, str(cm.exception))
        self.assertNotIn(PASSWORD, repr(store))

    def test_redact(self):
        from zodbkmi.keystore_pg import redact
        self.assertEqual(redact('postgresql://u:secret@h/db x'),
                         'postgresql://u:***@h/db x')
        self.assertEqual(redact('password=abc host=h'),
                         'password=*** host=h')


class EntryCacheTests(_StoreTestBase):
    """The store's cache of entries (``cache_size``), kept right by the
    trigger's notifications: a change by any writer (another replica,
    SQL by hand) reaches it; a row read before a change is not cached
    after it; what was missed while the listener was away is forgotten;
    an unconfirmed cache is not used."""

    def _counting(self, store):
        """Count the queries ``store`` sends from now on."""
        calls = []
        run = store._run

        def counted(work, *args, **kw):
            calls.append(work)
            return run(work, *args, **kw)
        store._run = counted
        return calls

    def _cached(self, store, dek_id):
        poll(lambda: store.get(dek_id) is not None and
             store._cache.valid() and store.get(dek_id) is not None
             and dek_id in store._cache._entries, 10)

    def _sql(self, statement, *args):
        import psycopg2
        conn = psycopg2.connect(PostgresLayer.server.dsn(self.dbname))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement, args)
        finally:
            conn.close()

    def test_hits_send_no_query(self):
        store = self._makeOne()
        entry = new_entry(self.kek)
        store.add(entry)
        self._cached(store, entry.dek_id)
        calls = self._counting(store)
        for _ in range(100):
            self.assertEqual(store.get(entry.dek_id).wrapped, entry.wrapped)
        self.assertEqual(calls, [])
        # a cache its listener has not vouched for lately is not used
        store._cache._contact -= 100
        store.get(entry.dek_id)
        self.assertEqual(len(calls), 1)

    def test_changes_by_any_writer_reach_the_cache(self):
        writer, reader = self._makeOne(), self._makeOne(init=False)
        a, b = new_entry(self.kek), new_entry(self.kek)
        writer.add(a)
        writer.add(keystore.KeyStoreEntry(b.dek_id, b.kek_id, b.wrapped,
                                          keystore.RETIRED))
        for entry in (a, b):
            self._cached(reader, entry.dek_id)
        # another replica retires a key
        writer.update(keystore.KeyStoreEntry(a.dek_id, a.kek_id, a.wrapped,
                                             keystore.RETIRED))
        poll(lambda: reader.get(a.dek_id).state == keystore.RETIRED, 10)
        # SQL by hand deletes one; TRUNCATE empties every cache
        self._sql('DELETE FROM zodbkmi_keys WHERE dek_id = %s', a.dek_id)
        poll(lambda: reader.get(a.dek_id) is None, 10)
        self._cached(reader, b.dek_id)
        self._sql('TRUNCATE zodbkmi_keys')
        poll(lambda: reader.get(b.dek_id) is None, 10)

    def test_own_changes_seen_at_once(self):
        store = self._makeOne()
        old, new = new_entry(self.kek), new_entry(self.kek)
        store.rotate(old)
        self._cached(store, old.dek_id)
        store.rotate(new)
        self.assertEqual(store.get(old.dek_id).state, keystore.RETIRED)
        store.remove(old.dek_id)
        self.assertIsNone(store.get(old.dek_id))

    def test_row_read_before_a_change_is_not_cached(self):
        writer, reader = self._makeOne(), self._makeOne(init=False)
        entry = new_entry(self.kek)
        writer.add(entry)
        other = new_entry(self.kek)
        writer.add(keystore.KeyStoreEntry(other.dek_id, other.kek_id,
                                          other.wrapped, keystore.RETIRED))
        self._cached(reader, other.dek_id)   # listening
        run = reader._run

        def late(work, *args, **kw):
            # the row is read; then, before it is cached, another
            # replica retires the key and the notification is heard
            row = run(work, *args, **kw)
            seen = reader._cache.generation
            writer.update(keystore.KeyStoreEntry(
                entry.dek_id, entry.kek_id, entry.wrapped, keystore.RETIRED))
            poll(lambda: reader._cache.generation != seen, 10)
            return row
        reader._run = late
        self.assertEqual(reader.get(entry.dek_id).state, keystore.ACTIVE)
        reader._run = run
        self.assertNotIn(entry.dek_id, reader._cache._entries)
        self.assertEqual(reader.get(entry.dek_id).state, keystore.RETIRED)

    def test_changes_missed_by_a_lost_listener_are_forgotten(self):
        store = self._makeOne()
        entry = new_entry(self.kek)
        store.add(entry)
        self._cached(store, entry.dek_id)
        # a change nobody hears of (the trigger off), then the listening
        # connection is cut: the listener reconnects and empties the cache
        self._sql('ALTER TABLE zodbkmi_keys DISABLE TRIGGER '
                  'zodbkmi_keys_changed')
        self._sql("UPDATE zodbkmi_keys SET state = 'retired' "
                  "WHERE dek_id = %s", entry.dek_id)
        self._sql('ALTER TABLE zodbkmi_keys ENABLE TRIGGER '
                  'zodbkmi_keys_changed')
        self.assertEqual(store.get(entry.dek_id).state, keystore.ACTIVE)
        before = self._listeners()
        self.assertEqual(len(before), 1)
        self._sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = %s AND query LIKE 'LISTEN%%'",
                  self.dbname)
        # once listening again, the cache vouches for nothing it had
        poll(lambda: self._listeners() not in ([], before)
             and store._cache.valid(), 10)
        self.assertEqual(store.get(entry.dek_id).state, keystore.RETIRED)

    def _listeners(self):
        import psycopg2
        conn = psycopg2.connect(PostgresLayer.server.dsn(self.dbname))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE datname "
                            "= %s AND query LIKE 'LISTEN%%'", (self.dbname,))
                return sorted(r[0] for r in cur.fetchall())
        finally:
            conn.close()

    def test_bounded_and_optional(self):
        store = self._makeOne(self.url + '?cache_size=2')
        entries = [new_entry(as_kek(os.urandom(32))) for _ in range(3)]
        for entry in entries:
            store.add(entry)
        self._cached(store, entries[0].dek_id)
        for entry in entries:
            store.get(entry.dek_id)
        self.assertEqual(len(store._cache), 2)
        self.assertNotIn(entries[0].dek_id, store._cache._entries)
        off = self._makeOne(self.url + '?cache_size=0')
        self.assertIsNone(off._cache)
        calls = self._counting(off)
        off.get(entries[0].dek_id)
        off.get(entries[0].dek_id)
        self.assertEqual(len(calls), 2)
        with self.assertRaisesRegex(KeyStoreError, 'cache_check must be '):
            self._makeOne(self.url + '?cache_check=0')

    def test_closed_store_stops_listening(self):
        store = self._makeOne()
        entry = new_entry(self.kek)
        store.add(entry)
        self._cached(store, entry.dek_id)
        thread = store._cache._thread
        store.close()
        thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertEqual(len(store._cache), 0)


class ReplicasLayer(PostgresLayer):
    """Three ``zodbkmi serve`` replicas over one database of the cluster
    (setUp and tearDown of its own: PostgresLayer's run once, as base)."""

    __name__ = 'ReplicasLayer'
    __module__ = __name__
    replicas = None

    @classmethod
    def setUp(cls):
        if PostgresLayer.server is None:
            return
        from tests.replicas import Replicas
        pg = PostgresLayer.server
        pg.createdb('replicas')
        cls.url = 'postgresql://postgres:%s@127.0.0.1:%d/replicas' % (
            PASSWORD, pg.port)
        cls.replicas = Replicas(cls.url, 3).start()

    @classmethod
    def tearDown(cls):
        if cls.replicas is not None:
            cls.replicas.cleanup()
            cls.replicas = None


class ReplicaTests(unittest.TestCase):

    layer = ReplicasLayer

    def setUp(self):
        needs_postgres(self)
        self.replicas = ReplicasLayer.replicas
        self.replicas.start()   # again, after a failover test killed some
        self.ctx = ssl.create_default_context(cafile=self.replicas.ca)

    def _client(self, i=0, **kw):
        from zodbkmi.facility import LocalKeyManagementFacility
        local = LocalKeyManagementFacility(
            self.replicas.urls[i], token=self.replicas.admin,
            ca_file=self.replicas.ca, **kw)
        self.addCleanup(local.close)
        return local

    def _get(self, i, path, token=None):
        """``(status, body bytes, content type)`` of GET ``path`` on
        replica ``i``."""
        request = urllib.request.Request(self.replicas.urls[i] + path)
        if token:
            request.add_header('Authorization', 'Bearer ' + token)
        try:
            with urllib.request.urlopen(request, timeout=30,
                                        context=self.ctx) as r:
                return r.status, r.read(), r.headers['Content-Type']
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read(), e.headers['Content-Type']

    def test_keys_served_by_every_replica(self):
        kek = as_kek(os.urandom(32))
        dek_id = self._client(0).create_key(kek)
        for i in (1, 2):
            other = self._client(i)
            self.assertEqual(other.active_key_id(kek), dek_id)
            data = self._client(0).encrypt(kek, b'secret')
            self.assertEqual(other.decrypt(kek, data), b'secret')

    def test_changes_reach_the_other_replicas_caches(self):
        # every replica has the entry in its cache (two fetches each);
        # a retirement, then a deletion, through replica 0 reach the
        # others through the notifications
        kek = as_kek(os.urandom(32))
        dek_id = self._client(0).create_key(kek)
        path = '/v1/keys/' + dek_id

        def state(i):
            status, body, _ = self._get(i, path, self.replicas.client)
            return json.loads(body)['state'] if status == 200 else status
        for i in (0, 1, 2, 0, 1, 2):
            self.assertEqual(state(i), 'active')
        admin = self._client(0)
        admin.retire(dek_id)
        for i in (1, 2):
            poll(lambda: state(i) == 'retired', 10)
        admin.delete(dek_id)
        for i in (1, 2):
            poll(lambda: state(i) == 404, 10)

    def test_simultaneous_rotation_on_two_replicas(self):
        kek = as_kek(os.urandom(32))
        clients = [self._client(1), self._client(2)]
        for _ in range(10):
            barrier = threading.Barrier(2)
            failures = []

            def rotate(client):
                barrier.wait()
                try:
                    client.rotate(kek)
                except Exception as e:   # KeyServerError: a 409
                    failures.append(e)
                finally:
                    client.close()
            threads = [threading.Thread(target=rotate, args=(c,))
                       for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertLessEqual(len(failures), 1)
            for e in failures:
                self.assertEqual(e.status, 409)
                self.assertIn('rotated at the same moment', e.reason)
            active = [m for m in clients[0].metadata()
                      if m['kek_id'] == kek.key_id
                      and m['state'] == 'active']
            self.assertEqual(len(active), 1)

    def test_metrics_need_their_token(self):
        self._client(0).create_key(as_kek(os.urandom(32)))
        status, body, _ = self._get(0, '/v1/metrics')
        self.assertEqual(status, 401)
        status, body, _ = self._get(0, '/v1/metrics', self.replicas.client)
        self.assertEqual(status, 403)
        status, body, ctype = self._get(0, '/v1/metrics',
                                        self.replicas.metrics)
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith('text/plain'))
        text = body.decode()
        self.assertIn('zodbkmi_server_requests_total{method="POST",'
                      'route="keys",status="201"}', text)
        self.assertIn('zodbkmi_server_request_duration_seconds_bucket', text)
        self.assertIn('zodbkmi_server_key_store_duration_seconds_count'
                      '{operation="rotate"}', text)
        self.assertIn('zodbkmi_server_keys{state="active"}', text)
        self.assertIn('zodbkmi_server_audit_write_failures_total 0.0', text)
        # a metrics token reads no key
        status, _, _ = self._get(0, '/v1/keys', self.replicas.metrics)
        self.assertEqual(status, 403)

    def test_outage_503_then_recovery(self):
        kek = as_kek(os.urandom(32))
        warm = self._client(0, retries=0)
        warm.create_key(kek)
        sealed = warm.encrypt(kek, b'before')   # the DEK is cached now
        pg = PostgresLayer.server
        pg.pause()
        try:
            for i in range(3):
                status, body, ctype = self._get(i, '/v1/health')
                self.assertEqual(status, 503)
                self.assertEqual(json.loads(body), {
                    'status': 'unavailable',
                    'reason': 'key store unreachable'})
                status, body, ctype = self._get(
                    i, '/v1/keys', self.replicas.client)
                self.assertEqual(status, 503)
                self.assertEqual(ctype, 'application/json')
                self.assertEqual(json.loads(body),
                                 {'error': 'key store unavailable'})
                self.assertNotIn(PASSWORD.encode(), body)
            # a client with a warm DEK cache goes on
            self.assertEqual(warm.decrypt(kek, sealed), b'before')
            again = warm.encrypt(kek, b'during')
            self.assertEqual(warm.decrypt(kek, again), b'during')
        finally:
            pg.resume()
        # the replicas recover by themselves (their pools reconnect)
        for i in range(3):
            poll(lambda: self._get(i, '/v1/health')[0] == 200)
            status, _, _ = self._get(i, '/v1/keys', self.replicas.client)
            self.assertEqual(status, 200)
        self.assertEqual(self._client(2).decrypt(kek, again), b'during')
        logs = self.replicas.logs()
        self.assertIn('key store unreachable', logs)
        self.assertNotIn(PASSWORD, logs)


class InitVaultTests(unittest.TestCase):
    """``zodbkmi serve --init-vault``."""

    layer = PostgresLayer

    def setUp(self):
        needs_postgres(self)

    def test_init_vault_idempotent(self):
        import subprocess
        import sys
        import tempfile
        from zodbkmi.testing import child_environ
        pg = PostgresLayer.server
        name = 'iv_' + uuid.uuid4().hex[:12]
        pg.createdb(name)
        url = 'postgresql://postgres:%s@127.0.0.1:%d/%s' % (
            PASSWORD, pg.port, name)
        tmp = tempfile.mkdtemp(prefix='zodbkmi-iv-')
        env = child_environ({'ZODBKMI_KEY_STORE': url,
                             'ZODBKMI_TOKENS_IN_KEY_STORE': 'yes'})
        outs = []
        for _ in range(2):
            proc = subprocess.run(
                [sys.executable, '-m', 'zodbkmi.cli', 'serve',
                 '--init-vault'], cwd=tmp, env=env, capture_output=True,
                text=True, timeout=60)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            outs.append(proc.stdout + proc.stderr)
        self.assertIn('schema version none -> 1', outs[0])
        self.assertIn('created token file', outs[0])
        self.assertIn('schema version 1, up to date', outs[1])
        self.assertNotIn('created token file', outs[1])
        self.assertNotIn(PASSWORD, ''.join(outs))
        from zodbkmi.keystore_pg import PostgresKeyStore
        store = PostgresKeyStore(url)
        self.addCleanup(store.close)
        with open(os.path.join(tmp, 'var', 'admin.token')) as f:
            token = f.read().strip()
        self.assertEqual(store.load_tokens().lookup(token),
                         ('admin', 'admin'))
