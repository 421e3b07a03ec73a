"""EncryptingStorage inside a real Pyramid application (issues #17 and #18).

A Pyramid app as its users write it: pyramid_zodbconn opens the database
from a ``zodbkmi+file`` URI (with a blob directory: zodburi puts ZODB's
``BlobStorage`` proxy around the FileStorage), pyramid_tm commits each
request, pyramid_retry retries a request on a ConflictError.  It is served
by waitress on 127.0.0.1, and eight concurrent clients drive it over HTTP:
each reads its patient (the blob of scans is read), then adds a note (one
shared OOBTree index and one ``BTrees.Length`` counter, whose concurrent
changes conflict resolution merges, and a line appended to the blob with
``open('a')`` in a later transaction of a pooled connection).

The checks: no request fails, conflict resolution never fails (ZODB logs
each failed resolution), every note and line is there, and no file of the
database (records, blobs, keys) holds a plaintext marker.

:class:`PyramidDeployingTests` runs the same with the ``zodbconn.uri`` of
docs/deploying.rst (the KEK in OpenBao Transit).
"""
import http.client
import logging
import os
import shutil
import socket
import tempfile
import threading
import unittest
import urllib.parse
import warnings

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

from zodbkmi.keyholder import write_key_file
from tests.bao import BaoLayer

try:
    with warnings.catch_warnings():
        # WebOb imports the cgi module, deprecated since Python 3.11: its
        # warning is WebOb's, not ours
        warnings.filterwarnings('ignore', "'cgi' is deprecated",
                                DeprecationWarning)
        import pyramid.config
        import pyramid_zodbconn
        from webtest.http import StopableWSGIServer
except ImportError:      # pragma: no cover
    pyramid = None

WRITERS = 8
REQUESTS = 25
SECRET = 'dr-house'        # in every note: must not reach a file in clear
PATH_MARK = '/patients/'   # in the request paths (the transaction notes)


def _root(request):
    conn = pyramid_zodbconn.get_connection(request)
    root = conn.root()
    if 'patients' not in root:
        # first request: the tree, made in its own transaction up front
        raise RuntimeError('database not initialised')
    return root


def show(request):
    root = _root(request)
    patient = root['patients'][request.matchdict['pid']]
    with patient['scans'].open('r') as f:
        body = f.read()
    request.response.text = body.decode()
    return request.response


def add_note(request):
    root = _root(request)
    pid = request.matchdict['pid']
    patient = root['patients'][pid]
    n = int(request.params['n'])
    note = '%s note %d of %s by %s' % (pid, n, pid, SECRET)
    root['index']['%s-%03d' % (pid, n)] = note
    root['count'].change(1)
    with patient['scans'].open('a') as f:
        f.write(('%s scan %d %s\n' % (pid, n, SECRET)).encode())
    request.tm.get().note(request.path)
    request.response.text = 'ok'
    return request.response


def make_app(uri):
    settings = {
        'zodbconn.uri': uri,
        'tm.manager_hook': 'pyramid_tm.explicit_manager',
        # genuine conflicts (two writers splitting one BTree bucket) are
        # retried, as in plain ZODB; many writers on 2 loaded cores need
        # more attempts than the usual 3
        'retry.attempts': 20,
    }
    config = pyramid.config.Configurator(settings=settings)
    config.include('pyramid_retry')
    config.include('pyramid_tm')
    config.include('pyramid_zodbconn')
    config.add_route('show', '/patients/{pid}', request_method='GET')
    config.add_route('note', '/patients/{pid}', request_method='POST')
    config.add_view(show, route_name='show')
    config.add_view(add_note, route_name='note')
    return config.make_wsgi_app()


class _FailedResolutions(logging.Handler):
    """What ZODB logs when a conflict resolution fails: an error when the
    resolution itself broke (it could not read the records), a debug
    message naming the ConflictError when the changes really conflict
    (two writers splitting one BTree bucket: plain ZODB too)."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.records = []

    def emit(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING or 'ConflictError' not in message:
            self.records.append(message)


@unittest.skipIf(pyramid is None, 'needs pyramid, pyramid_zodbconn, webtest')
class PyramidAppTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-pyramid-')
        self.key_file = os.path.join(self.tmp, 'kek.key')
        write_key_file(self.key_file, os.urandom(32))
        self.uri = (
            'zodbkmi+file://%s/Data.fs?blobstorage_dir=%s/blobs'
            '&key_file=%s&key_dir=%s/keys&connection_pool_size=%d' % (
                self.tmp, self.tmp, self.key_file, self.tmp, WRITERS))
        self.failed = _FailedResolutions()
        self.logger = logging.getLogger('ZODB.ConflictResolution')
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.failed)

    def tearDown(self):
        self.logger.removeHandler(self.failed)
        self.logger.setLevel(self.level)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _initialise(self, app):
        db = app.registry._zodb_databases['']
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            root = conn.root()
            root['patients'] = OOBTree()
            root['index'] = OOBTree()
            root['count'] = Length()
            for w in range(WRITERS):
                patient = PersistentMapping()
                patient['scans'] = Blob(b'')
                root['patients']['p%d' % w] = patient
            tm.commit()
        finally:
            conn.close()
        return db

    def _writer(self, host, port, pid, results):
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            for n in range(REQUESTS):
                conn.request('GET', '/patients/%s' % pid)
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or body.count(b'\n') != n:
                    results.append(('GET', pid, n, r.status, body[-200:]))
                conn.request(
                    'POST', '/patients/%s' % pid,
                    body=urllib.parse.urlencode({'n': n}),
                    headers={'Content-Type':
                             'application/x-www-form-urlencoded'})
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    results.append(('POST', pid, n, r.status, body[-200:]))
        except Exception as e:     # reported by the test, in its thread
            results.append(('error', pid, repr(e)))
        finally:
            conn.close()

    def test_concurrent_writers(self):
        app = make_app(self.uri)
        db = self._initialise(app)
        server = StopableWSGIServer.create(app, host='127.0.0.1',
                                           threads=WRITERS)
        try:
            host, port = server.adj.host, server.adj.port
            # the socket listens once create() returns; webtest's wait()
            # leaves its probe connection open (a ResourceWarning)
            with socket.create_connection((host, port), timeout=60):
                pass
            results = []
            threads = [threading.Thread(target=self._writer,
                                        args=(host, port, 'p%d' % w, results))
                       for w in range(WRITERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            self.assertFalse([t for t in threads if t.is_alive()])
            self.assertFalse(results, '%d failed requests, the first: %r'
                             % (len(results), results[:3]))
        finally:
            server.shutdown()
            server.runner.join(60)     # its loop wakes every 0.5 s
        self.assertFalse(self.failed.records,
                         '%d failed conflict resolutions, the first: %r'
                         % (len(self.failed.records), self.failed.records[:3]))
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            root = conn.root()
            self.assertEqual(root['count'](), WRITERS * REQUESTS)
            self.assertEqual(len(root['index']), WRITERS * REQUESTS)
            for w in range(WRITERS):
                with root['patients']['p%d' % w]['scans'].open() as f:
                    lines = f.read().splitlines()
                self.assertEqual(len(lines), REQUESTS)
            # the notes (request paths) are in the undo log as written
            notes = [d['description'] for d in db.undoLog(0, 20)]
            self.assertEqual(len(notes), 20)
            for note in notes:
                if isinstance(note, bytes):
                    note = note.decode()
                self.assertRegex(note, r'^/patients/p\d')
        finally:
            tm.abort()
            conn.close()
        db.close()
        # nothing in clear on disk: records, transaction notes, blobs, keys
        for dirpath, _, names in os.walk(self.tmp):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, 'rb') as f:
                    data = f.read()
                for marker in (SECRET, PATH_MARK, 'scan 1 '):
                    at = data.find(marker.encode())
                    self.assertEqual(at, -1, '%r in clear in %s: %r' % (
                        marker, path, data[max(0, at - 40):at + 60]))


class PyramidDeployingTests(PyramidAppTests):
    """The same application, its database opened from the ``zodbconn.uri``
    of docs/deploying.rst: ``key_settings`` naming a settings file whose
    KEK is a Transit key of a real OpenBao server."""

    layer = BaoLayer

    def setUp(self):
        import configparser
        from tests.bao import ROOT_TOKEN
        from tests.bao import skip_requested
        from tests.test_deploying import snippet
        if skip_requested():
            self.skipTest('ZODBKMI_SKIP_BAO=1')
        super().setUp()
        bao = BaoLayer.server
        bao.api('POST', 'transit/keys/zope-kek', {'derived': True})
        # the page's files, made in the application's directory
        app = self.tmp
        etc = os.path.join(app, 'etc')
        os.makedirs(os.path.join(etc, 'zodbkmi'), 0o700)
        os.makedirs(os.path.join(app, 'var', 'keys'), 0o700)
        fd = os.open(os.path.join(etc, 'zodbkmi', 'bao-token'),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(ROOT_TOKEN + '\n')
        shutil.copy(bao.ca_file, os.path.join(etc, 'zodbkmi', 'bao-ca.pem'))
        with open(os.path.join(etc, 'encryption.json'), 'w') as f:
            f.write(snippet('encryption.json', instance=app, url=bao.url))
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(snippet('pyramid.ini', app=app))
        # one pooled connection per writer, as in PyramidAppTests
        self.uri = (parser['app:main']['zodbconn.uri']
                    + '&connection_pool_size=%d' % WRITERS)
        self.assertIn('key_settings=%s/etc/encryption.json' % app, self.uri)
