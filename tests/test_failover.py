"""Client failover between key server replicas, under faults.

Three real ``zodbkmi serve`` replicas on loopback ports, over TLS, share
one key store, one certificate and one token table (:class:`Replicas`).
A client with the three URLs and no DEK cache to speak of works with 16
threads while one replica is killed with SIGKILL: no client operation may
fail, and afterwards no key is lost or duplicated and every KEK has
exactly one active key.  Then every replica is killed: cached DEKs keep
working within their time to live (and the grace period, when one is
set), an uncached one fails at once with ``KeyServerError``.

They run twice: over a key directory shared by the replicas, and over
PostgreSQL (the replicas of ``tests.test_keystore_pg``).  See
``docs/server.rst`` ("Several key servers", "Outage policy").
"""
import os
import threading
import time
import unittest

from tests.replicas import Replicas
from zodbkmi.exceptions import KeyServerError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.keystore import ACTIVE

THREADS = 16
LOAD_SECONDS = 3.0


class ReplicasLayer:
    """Three replicas over one key directory, started once."""

    __module__ = __name__

    @classmethod
    def setUp(cls):
        cls.replicas = Replicas(None, 3).start()

    @classmethod
    def tearDown(cls):
        cls.replicas.cleanup()


class _NoConnection:
    """A transport that fails the test if a request is attempted."""

    def request(self, *args):
        raise AssertionError('a request was attempted')

    def close(self):
        pass


def _poll(condition, timeout=60.0, what='condition'):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for ' + what)
        time.sleep(0.01)


class Load:
    """``THREADS`` threads calling ``step(index, n)`` (n = 1, 2, ...) until
    stopped, counting the calls (``done``) and the failures (their
    messages); each thread closes ``client``'s connections of its own when
    it ends.  Used as a context manager: the threads run inside."""

    def __init__(self, client, step):
        self.client, self.step = client, step
        self.done, self.failures = 0, []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,))
                         for i in range(THREADS)]

    def _run(self, index):
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.step(index, n)
            except Exception as e:
                with self._lock:
                    self.failures.append('%s: %s' % (type(e).__name__, e))
            with self._lock:
                self.done += 1
        self.client.close()

    def more(self, count, what):
        """Wait for ``count`` more operations (or a failure)."""
        start = self.done
        _poll(lambda: self.done >= start + count or self.failures,
              what=what)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(120)


class FailoverTests(unittest.TestCase):

    layer = ReplicasLayer

    def setUp(self):
        self.replicas = self.layer.replicas
        self.replicas.start()   # again, after a test killed some

    def tearDown(self):
        self.replicas.start()

    def _check_store(self, created, keks):
        """Every key acknowledged is there once, and each KEK has exactly
        one active key: the last one created for it."""
        check = self.replicas.facility(self)
        metadata = check.metadata()
        ids = [m['dek_id'] for m in metadata]
        self.assertEqual(len(ids), len(set(ids)), 'a key listed twice')
        for dek_id in created:
            self.assertIn(dek_id, ids, 'acknowledged key lost')
        for index, kek in enumerate(keks):
            mine = [m for m in metadata if m['kek_id'] == kek.key_id]
            active = [m['dek_id'] for m in mine if m['state'] == ACTIVE]
            self.assertEqual(len(active), 1, 'KEK %d: active keys %s'
                             % (index, active))
            newest = max(mine, key=lambda m: (m['created'], m['dek_id']))
            self.assertEqual(active, [newest['dek_id']])
            self.assertEqual(check.active_key_id(kek), newest['dek_id'])
        return metadata

    def test_sigkill_of_a_replica_under_load_fails_no_operation(self):
        # a tiny DEK cache: most operations fetch from a replica
        client = self.replicas.facility(self, policy='spread',
                                        timeout=0.5, cache_size=4 * THREADS)
        keks = [AESKeyEncryptingKey(os.urandom(32)) for _ in range(THREADS)]
        for kek in keks:
            client.create_key(kek)
        created = []
        firsts = [client.encrypt(kek, b'first %d' % index)
                  for index, kek in enumerate(keks)]

        def step(index, n):
            kek, sealed = keks[index], firsts[index]
            if n % 10 == 0:                    # rotation: key creation
                created.append(client.create_key(kek))
            elif n % 10 == 5:                  # metadata of one key
                client.entry(client.key_id_of(sealed))
            else:                              # wrap, unwrap
                data = b'record %d %d' % (index, n)
                self.assertEqual(
                    client.decrypt(kek, client.encrypt(kek, data)), data)
                self.assertEqual(client.decrypt(kek, sealed),
                                 b'first %d' % index)

        with Load(client, step) as load:
            # some load first, then SIGKILL one replica under it
            load.more(200, 'load')
            self.replicas.kill(1)
            killed_at = load.done
            load.more(200, 'load after the kill')
            deadline = time.monotonic() + LOAD_SECONDS
            _poll(lambda: time.monotonic() > deadline or load.failures,
                  what='the end of the load')
        self.assertEqual(load.failures, [])
        replica = client.replicas[1]
        self.assertFalse(replica.up())
        self.assertIn(replica.url, repr(client.replicas))
        metadata = self._check_store(created, keks)
        print('\n  replica killed under %d threads: %d operations (%d after '
              'the kill), 0 failed, %d keys created, %d in the store'
              % (THREADS, load.done, load.done - killed_at, len(created),
                 len(metadata)))

    def test_all_replicas_down_cached_keys_serve_uncached_fail_at_once(self):
        kek = AESKeyEncryptingKey(os.urandom(32))
        other = AESKeyEncryptingKey(os.urandom(32))
        client = self.replicas.facility(self, down_time=600)
        admin = self.replicas.facility(self)
        admin.create_key(kek)
        admin.create_key(other)
        sealed_other = admin.encrypt(other, b'never fetched here')
        sealed = client.encrypt(kek, b'cached')
        self.replicas.kill()
        # the cached DEK: encryption and decryption go on
        self.assertEqual(client.decrypt(kek, sealed), b'cached')
        self.assertEqual(client.decrypt(kek, client.encrypt(kek, b'x')),
                         b'x')
        # an uncached DEK: KeyServerError, naming every replica and why
        with self.assertRaises(KeyServerError) as cm:
            client.decrypt(other, sealed_other)
        message = str(cm.exception)
        for url in self.replicas.urls:
            self.assertIn(url, message)
        self.assertNotIn(self.replicas.admin, message)
        self.assertEqual(message.count('\n'), 0)
        # every replica is down now: at once, without a connection
        for replica in client.replicas:
            self.assertFalse(replica.up())
            replica.transport = _NoConnection()
        with self.assertRaises(KeyServerError) as cm:
            client.decrypt(other, sealed_other)
        self.assertIn('no key server replica is up', str(cm.exception))
        # no DEK is created locally for a KEK without a known active one
        with self.assertRaises(KeyServerError):
            client.encrypt(other, b'data')
        with self.assertRaises(KeyServerError):
            client.ensure_key(AESKeyEncryptingKey(os.urandom(32)))

    def test_grace_period_serves_expired_dek_only_in_an_outage(self):
        kek = AESKeyEncryptingKey(os.urandom(32))
        admin = self.replicas.facility(self)
        admin.create_key(kek)
        sealed = admin.encrypt(kek, b'data')
        clients = {grace: self.replicas.facility(self, timeout=1,
                                                 grace=grace, down_time=600)
                   for grace in (0, 600)}
        for client in clients.values():
            self.assertEqual(client.decrypt(kek, sealed), b'data')
        raw_id = bytes.fromhex(admin.key_id_of(sealed))
        for client in clients.values():
            _poll(lambda: client._cache.get(raw_id) is None, what='expiry')
        # a replica answers that the key is gone: no grace
        self.assertEqual(self.replicas.delete(admin.key_id_of(sealed)), 200)
        with self.assertRaises(UnknownKeyError):
            clients[600].decrypt(kek, sealed)
        # the grace period covers an outage only
        kek2 = AESKeyEncryptingKey(os.urandom(32))
        admin.create_key(kek2)
        sealed = admin.encrypt(kek2, b'more data')
        for client in clients.values():
            self.assertEqual(client.decrypt(kek2, sealed), b'more data')
            client.encrypt(kek2, b'y')   # the client knows the active DEK
        raw_id = bytes.fromhex(admin.key_id_of(sealed))
        for client in clients.values():
            _poll(lambda: client._cache.get(raw_id) is None, what='expiry')
        self.replicas.kill()
        self.assertEqual(clients[600].decrypt(kek2, sealed), b'more data')
        self.assertEqual(
            clients[600].decrypt(kek2, clients[600].encrypt(kek2, b'z')),
            b'z')
        with self.assertRaises(KeyServerError):
            clients[0].decrypt(kek2, sealed)
        with self.assertRaises(KeyServerError):
            clients[0].encrypt(kek2, b'z')


class PostgresFailoverTests(FailoverTests):
    """The same over the PostgreSQL key store."""

    from tests.test_keystore_pg import ReplicasLayer as layer

    def setUp(self):
        from tests.postgres import needs_postgres
        needs_postgres(self)
        super().setUp()

    def test_database_restart_under_load_fails_no_cached_operation(self):
        """PostgreSQL stopped and started again under 16 threads whose
        DEKs are cached: no operation fails; the replicas answer 503
        meanwhile and recover by themselves."""
        from tests.postgres import PostgresLayer
        # replicas that answered 503 are tried again after 2 s
        client = self.replicas.facility(self, policy='spread', down_time=2)
        keks = [AESKeyEncryptingKey(os.urandom(32)) for _ in range(THREADS)]
        sealed = []
        for index, kek in enumerate(keks):
            client.create_key(kek)
            sealed.append(client.encrypt(kek, b'first %d' % index))

        def step(index, n):
            kek = keks[index]
            data = b'record %d %d' % (index, n)
            self.assertEqual(client.decrypt(kek, client.encrypt(kek, data)),
                             data)
            self.assertEqual(client.decrypt(kek, sealed[index]),
                             b'first %d' % index)

        pg = PostgresLayer.server
        with Load(client, step) as load:
            load.more(200, 'load')
            pg.pause()
            try:
                load.more(200, 'load during the outage')
                status = self.replicas.facility(self, retries=0)
                with self.assertRaises(KeyServerError) as cm:
                    status.metadata()
                self.assertEqual(cm.exception.status, 503)
            finally:
                pg.resume()
            _poll(lambda: self._healthy(), what='recovery')
            load.more(200, 'load after the restart')
        self.assertEqual(load.failures, [])
        # writes work again, through every replica, once the replicas
        # marked down are tried again
        kek = AESKeyEncryptingKey(os.urandom(32))
        _poll(lambda: all(r.up() for r in client.replicas), what='up again')
        client.create_key(kek)
        for url in self.replicas.urls:
            one = self.replicas.facility(self, urls=[url])
            self.assertIsNotNone(one.active_key_id(kek))
        print('\n  PostgreSQL restarted under %d threads: %d operations, 0 '
              'failed' % (THREADS, load.done))

    def _healthy(self):
        import ssl
        import urllib.request
        ctx = ssl.create_default_context(cafile=self.replicas.ca)
        for url in self.replicas.urls:
            try:
                with urllib.request.urlopen(url + '/v1/health', timeout=10,
                                            context=ctx) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return True


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
