"""Tests of the client's replicas (zodbkmi.client): several URLs, the
"prefer" and "spread" policies, replicas marked down, which requests are
repeated on another replica, idempotent key creation on the server, the
outage policy, the client metrics, and the CLI and ZCML settings.

The replicas are key server applications in this process (WSGITransport)
and real loopback sockets: a port nobody listens on (connection refused),
a server that reads a request and hangs up without answering.  The
replicas killed for real under load are in tests/test_failover.py.
"""
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import unittest

from zodbkmi import rest
from zodbkmi.client import HTTPTransport
from zodbkmi.client import LocalKeyManagementFacility
from zodbkmi.client import WSGITransport
from zodbkmi.client import split_urls
from zodbkmi.exceptions import KeyServerError
from zodbkmi.exceptions import SettingsError
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.keystore import ACTIVE
from zodbkmi.keystore import RETIRED
from zodbkmi.keystore import KeyStoreEntry
from zodbkmi.testing import free_port

try:
    import prometheus_client
except ImportError:     # pragma: no cover
    prometheus_client = None


class HangUpServer:
    """A loopback server that reads one request and closes the connection
    without answering (the server died after the request was sent)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(8)
        self.url = 'http://127.0.0.1:%d' % self.sock.getsockname()[1]
        self.requests = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.requests.append(conn.recv(65536).split(b' ')[0])
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)


class NoConnection:
    """A transport that fails the test if a request is attempted."""

    def request(self, *args):
        raise AssertionError('a request was attempted')

    def close(self):
        pass


def unavailable_app(environ, start_response):
    """A replica whose store is down: 503 with a short JSON message."""
    start_response('503 Service Unavailable',
                   [('Content-Type', 'application/json')])
    return [b'{"error": "key store unavailable"}']


class ReplicaTestBase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.master = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        self.token = rest.new_token()
        tokens = rest.TokenTable([('t', 'admin', rest.hash_token(self.token))])
        self.app = rest.KeyServerApp(self.master, tokens)

    def dead_url(self):
        """An http:// URL on which nothing listens (connection refused)."""
        return 'http://127.0.0.1:%d' % free_port()

    def make(self, replicas, **kw):
        """A client of ``replicas``: (url, transport or None) pairs; None
        is a real HTTP transport of the URL."""
        urls = [u for u, _ in replicas]
        transports = [t if t is not None else
                      HTTPTransport(u, timeout=5, allow_http=True)
                      for u, t in replicas]
        client = LocalKeyManagementFacility(
            urls, token=self.token, transport=transports, allow_http=True,
            **kw)
        self.addCleanup(client.close)
        return client

    def good(self, n=1):
        return ('https://127.0.0.1:%d' % (9000 + n), WSGITransport(self.app))


class SettingsTests(ReplicaTestBase):

    def test_split_urls(self):
        self.assertEqual(split_urls('https://a:1'), ['https://a:1'])
        self.assertEqual(split_urls(' https://a:1, https://b:2\nhttps://c '),
                         ['https://a:1', 'https://b:2', 'https://c'])
        self.assertEqual(split_urls(['https://a:1', 'https://b:2,https://c']),
                         ['https://a:1', 'https://b:2', 'https://c'])
        for bad in ('', ' , ', [], 'https://a https://a', 3, [None]):
            with self.assertRaises(SettingsError):
                split_urls(bad)

    def test_one_url_as_before(self):
        client = LocalKeyManagementFacility('https://127.0.0.1:1')
        self.assertEqual(client.url, 'https://127.0.0.1:1')
        self.assertEqual(client.urls, ['https://127.0.0.1:1'])
        self.assertEqual(client.policy, 'prefer')
        self.assertEqual(client.grace, 0)

    def test_several_urls(self):
        client = LocalKeyManagementFacility(
            'https://127.0.0.1:1,https://127.0.0.1:2', policy='spread',
            down_time=5, grace=60)
        self.assertEqual(client.urls,
                         ['https://127.0.0.1:1', 'https://127.0.0.1:2'])
        self.assertEqual(
            repr(client),
            '<LocalKeyManagementFacility https://127.0.0.1:1 '
            'https://127.0.0.1:2>')
        self.assertEqual(client.grace, 60)
        self.assertEqual(client.down_time, 5)

    def test_bad_settings(self):
        url = 'https://127.0.0.1:1'
        for kw in ({'policy': 'random'}, {'down_time': -1},
                   {'grace': -1}, {'grace': 86401}, {'grace': 'x'}):
            with self.assertRaises(SettingsError):
                LocalKeyManagementFacility(url, **kw)
        with self.assertRaisesRegex(SettingsError, 'plain HTTP'):
            LocalKeyManagementFacility([url, 'http://127.0.0.1:2'])


class FailoverTests(ReplicaTestBase):

    def test_prefer_fails_over_and_marks_down(self):
        dead = self.dead_url()
        client = self.make([(dead, None), self.good()], down_time=600)
        kek = AESKeyEncryptingKey.generate()
        client.create_key(kek)          # first on the dead one
        replica = client.replicas[0]
        self.assertFalse(replica.up())
        self.assertIn('refused', replica.error)
        self.assertEqual(client.decrypt(kek, client.encrypt(kek, b'x')),
                         b'x')
        self.assertTrue(client.replicas[1].up())

    def test_spread_takes_turns(self):
        seen = []

        class Recording(WSGITransport):
            def __init__(self, app, name):
                super().__init__(app)
                self.name = name

            def request(self, *args):
                seen.append(self.name)
                return super().request(*args)

        client = self.make([('https://a:1', Recording(self.app, 'a')),
                            ('https://b:1', Recording(self.app, 'b'))],
                           policy='spread')
        for _ in range(4):
            client.status()
        self.assertEqual(sorted(seen), ['a', 'a', 'b', 'b'])
        seen[:] = []
        client = self.make([('https://a:1', Recording(self.app, 'a')),
                            ('https://b:1', Recording(self.app, 'b'))])
        for _ in range(4):
            client.status()
        self.assertEqual(seen, ['a'] * 4)

    def test_5xx_fails_over_for_idempotent_requests(self):
        client = self.make([('https://a:1', WSGITransport(unavailable_app)),
                            self.good()])
        self.assertEqual(client.status()['keys'], 0)
        self.assertEqual(client.replicas[0].error, 'answered 503')

    def test_every_replica_down_fails_at_once_naming_each(self):
        dead = [self.dead_url(), self.dead_url()]
        client = self.make([(dead[0], None),
                            ('https://a:1', WSGITransport(unavailable_app)),
                            (dead[1], None)], down_time=600)
        with self.assertRaises(KeyServerError) as cm:
            client.status()
        message = str(cm.exception)
        self.assertEqual(message.count('\n'), 0)
        self.assertIn('%s: Connection refused' % dead[0], message)
        self.assertIn('https://a:1: answered 503', message)
        self.assertIn('%s: Connection refused' % dead[1], message)
        self.assertNotIn(self.token, message)
        self.assertEqual(cm.exception.status, 503)
        # all down now: no attempt at all, at once
        client._transport = NoConnection()
        with self.assertRaises(KeyServerError) as cm:
            client.status()
        self.assertIn('no key server replica is up for GET /v1/status: '
                      '%s down for ' % dead[0], str(cm.exception))

    def test_down_replica_is_tried_again_after_down_time(self):
        client = self.make([(self.dead_url(), None), self.good()],
                           down_time=0)
        client.status()
        self.assertFalse(client.replicas[0].error is None)
        self.assertTrue(client.replicas[0].up())   # down for 0 s

    def test_not_idempotent_not_repeated_once_sent(self):
        hangup = HangUpServer()
        self.addCleanup(hangup.close)
        kek = AESKeyEncryptingKey.generate()
        client = self.make([(hangup.url, None), self.good()])
        # a GET sent to it goes on to the next replica
        dek_id = client.ensure_key(kek)
        self.assertFalse(client.replicas[0].up())
        client.replicas[0].down_until = 0    # up again, for the test
        # a retirement sent to it is not repeated: the key stays active
        with self.assertRaises(KeyServerError) as cm:
            client.retire(dek_id)
        self.assertIn('failed after POST /v1/keys/%s/retire was sent'
                      % dek_id, str(cm.exception))
        self.assertIn(b'POST', hangup.requests)
        self.assertEqual(self.master.entry(dek_id).state, ACTIVE)

    def test_not_idempotent_repeated_when_not_sent(self):
        kek = AESKeyEncryptingKey.generate()
        client = self.make([(self.dead_url(), None), self.good()])
        dek_id = client.ensure_key(kek)
        client.replicas[0].down_until = 0    # try the refusing one first
        client.retire(dek_id)
        self.assertEqual(self.master.entry(dek_id).state, RETIRED)


class IdempotentCreationTests(ReplicaTestBase):
    """POST /v1/keys: the DEK id inside the wrapped DEK is the idempotency
    key."""

    def post(self, data):
        transport = WSGITransport(self.app)
        status, body = transport.request(
            'POST', '/v1/keys',
            json.dumps({'wrapped': base64.b64encode(data).decode()}).encode(),
            {'Authorization': 'Bearer ' + self.token,
             'Content-Type': 'application/json'})
        return status, json.loads(body)

    def test_same_bytes_again_answer_the_entry(self):
        kek = AESKeyEncryptingKey.generate()
        raw_id = os.urandom(16)
        data = wrapped.wrap(kek, raw_id, os.urandom(32))
        status, first = self.post(data)
        self.assertEqual(status, 201)
        status, again = self.post(data)
        self.assertEqual(status, 200)
        self.assertEqual(again, first)
        self.assertEqual(self.master.keys(), [raw_id.hex()])
        # other bytes under that id: a conflict
        other = wrapped.wrap(kek, raw_id, os.urandom(32))
        status, answer = self.post(other)
        self.assertEqual(status, 409)
        self.assertEqual(answer, {'error': 'key %s exists already'
                                  % raw_id.hex()})

    def test_repeat_finishes_an_interrupted_creation(self):
        # a replica killed between storing the new key and retiring the
        # previous one: the repeat on another replica retires it
        kek = AESKeyEncryptingKey.generate()
        old = self.master.create_key(kek)
        new = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
        entry = KeyStoreEntry(wrapped.parse(new).dek_id.hex(), kek.key_id,
                              new)
        self.master.key_store.add(entry)
        self.assertEqual(self.master.entry(old).state, ACTIVE)
        status, answer = self.post(new)
        self.assertEqual((status, answer['state']), (200, ACTIVE))
        self.assertEqual(self.master.entry(old).state, RETIRED)
        # an older creation repeated later retires nothing newer
        status, answer = self.post(self.master.entry(old).wrapped)
        self.assertEqual((status, answer['state']), (200, RETIRED))
        self.assertEqual(self.master.entry(entry.dek_id).state, ACTIVE)

    def test_client_repeats_creation_on_another_replica(self):
        hangup = HangUpServer()
        self.addCleanup(hangup.close)
        # down for 0 s: the replica that hangs up is tried first each time
        client = self.make([(hangup.url, None), self.good()], down_time=0)
        kek = AESKeyEncryptingKey.generate()
        dek_id = client.create_key(kek)
        self.assertEqual(hangup.requests, [b'GET', b'POST'])
        self.assertEqual(self.master.keys(), [dek_id])


class OutagePolicyTests(ReplicaTestBase):

    def test_cached_keys_serve_uncached_fail_nothing_created(self):
        dead = self.dead_url()
        client = self.make([(dead, None), self.good()], down_time=600)
        kek = AESKeyEncryptingKey.generate()
        other = AESKeyEncryptingKey.generate()
        client.create_key(kek)
        self.master.create_key(other)
        sealed = client.encrypt(kek, b'cached')
        sealed_other = self.master.encrypt(other, b'not cached')
        client.replicas[1].transport = WSGITransport(unavailable_app)
        self.assertEqual(client.decrypt(kek, sealed), b'cached')
        self.assertEqual(client.decrypt(kek, client.encrypt(kek, b'x')),
                         b'x')
        with self.assertRaises(KeyServerError):
            client.decrypt(other, sealed_other)
        with self.assertRaises(KeyServerError):
            client.ensure_key(AESKeyEncryptingKey.generate())
        self.assertEqual(len(self.master.keys()), 2)


@unittest.skipIf(prometheus_client is None, 'needs prometheus_client')
class MetricsTests(ReplicaTestBase):

    def value(self, name, labels=None):
        return prometheus_client.REGISTRY.get_sample_value(
            name, labels or {}) or 0

    def test_metrics(self):
        from zodbkmi.client import METRIC_NAMES
        dead = self.dead_url()
        client = self.make([(dead, None), self.good()], down_time=600)
        names = ('zodbkmi_client_dek_cache_hits_total',
                 'zodbkmi_client_dek_cache_misses_total',
                 'zodbkmi_client_failovers_total',
                 'zodbkmi_client_fetch_seconds_count')
        before = [self.value(n) for n in names]
        down = self.value('zodbkmi_client_replica_down_total',
                          {'replica': dead})
        kek = AESKeyEncryptingKey.generate()
        client.create_key(kek)
        sealed = client.encrypt(kek, b'x')
        client.clear_cache()
        client.decrypt(kek, sealed)     # a miss: fetched
        client.decrypt(kek, sealed)     # the fast path: not counted
        client._forget_active()
        client.encrypt(kek, b'y')       # a hit
        after = [self.value(n) for n in names]
        hits, misses, failovers, fetches = [
            a - b for a, b in zip(after, before)]
        self.assertGreaterEqual(hits, 1)
        self.assertGreaterEqual(misses, 2)
        self.assertEqual(failovers, 1)
        self.assertGreaterEqual(fetches, 5)
        self.assertEqual(self.value('zodbkmi_client_replica_down_total',
                                    {'replica': dead}), down + 1)
        text = prometheus_client.generate_latest().decode()
        for name in METRIC_NAMES:
            self.assertIn(name.replace('_total', ''), text)


class ConfigurationTests(ReplicaTestBase):

    def test_cli_several_urls(self):
        from zodbkmi.cli import main
        dead = [self.dead_url(), self.dead_url()]
        token = os.path.join(self.tmp, 'token')
        with open(token, 'w') as f:
            f.write('a-token\n')
        os.chmod(token, 0o600)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(['status', '--url', dead[0], '--url', dead[1],
                       '--allow-http', '--token-file', token,
                       '--timeout', '5'])
        self.assertEqual(rc, 2)
        message = err.getvalue()
        self.assertEqual(message.count('\n'), 1, message)
        for url in dead:
            self.assertIn('%s: Connection refused' % url, message)
        self.assertNotIn('a-token', message)

    def test_cli_facility_from_env(self):
        import argparse

        from zodbkmi.cli.keys import facility
        args = argparse.Namespace(url=None, ca_file=None, token_file=None,
                                  timeout=5.0, admin=True, allow_http=False)
        local = facility(args, {
            'ZODBKMI_URL': 'https://127.0.0.1:1, https://127.0.0.1:2',
            'ZODBKMI_TOKEN': 't'})
        self.assertEqual(local.urls,
                         ['https://127.0.0.1:1', 'https://127.0.0.1:2'])

    def test_zcml_several_urls(self):
        import zope.component
        import zope.component.testing
        from zope.configuration import xmlconfig

        from zodbkmi.interfaces import IEncryptionService
        zope.component.testing.setUp(self)
        self.addCleanup(zope.component.testing.tearDown, self)
        os.environ['ZODBKMI_TEST_TOKEN'] = 'a-token'
        self.addCleanup(os.environ.pop, 'ZODBKMI_TEST_TOKEN', None)
        xmlconfig.string(
            '<configure xmlns="http://namespaces.zope.org/zope"'
            ' xmlns:kmi="http://namespaces.zodbkmi.org/zodbkmi">'
            '<include package="zodbkmi" file="meta.zcml" />'
            '<kmi:localKeyManagementFacility'
            ' url="https://127.0.0.1:1 https://127.0.0.1:2,https://[::1]:3"'
            ' policy="spread" downTime="5" gracePeriod="120"'
            ' tokenEnv="ZODBKMI_TEST_TOKEN" />'
            '</configure>')
        facility = zope.component.getUtility(IEncryptionService)
        self.assertEqual(facility.urls, ['https://127.0.0.1:1',
                                         'https://127.0.0.1:2',
                                         'https://[::1]:3'])
        self.assertEqual((facility.policy, facility.down_time,
                          facility.grace), ('spread', 5, 120))


class KeepAliveServer:
    """A loopback HTTP/1.1 server that keeps connections open and answers
    every GET with a small JSON body."""

    def __init__(self):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self):
                body = b'{"status": "ok"}'
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.url = 'http://127.0.0.1:%d' % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class ConnectionCleanupTests(unittest.TestCase):
    """Kept-alive connections are closed when their thread ends or the
    client is dropped unclosed: no "unclosed socket" ResourceWarning,
    which a command line run in-process would print to its stderr."""

    def setUp(self):
        self.server = KeepAliveServer()
        self.addCleanup(self.server.close)

    def assertNoResourceWarning(self, work):
        import gc
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', ResourceWarning)
            work()
            gc.collect()
        self.assertEqual([str(w.message) for w in caught
                          if issubclass(w.category, ResourceWarning)], [])

    def test_thread_ends(self):
        transport = HTTPTransport(self.server.url, allow_http=True)
        answers = []

        def worker():
            answers.append(transport.request('GET', '/v1/health'))

        def work():
            for _ in range(3):
                thread = threading.Thread(target=worker)
                thread.start()
                thread.join()
        self.assertNoResourceWarning(work)
        self.assertEqual([status for status, _ in answers], [200] * 3)

    def test_client_dropped_unclosed(self):
        def work():
            client = LocalKeyManagementFacility(self.server.url,
                                                allow_http=True)
            status, _ = client._transport.request('GET', '/v1/health')
            self.assertEqual(status, 200)
            self.assertIsNotNone(client._transport._local.conn.sock)
        self.assertNoResourceWarning(work)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
