"""EncryptingStorage inside a real Zope instance (issues #17 and #18).

A Zope instance made by ``mkwsgiinstance``, its ``zope.conf`` changed as
docs/storage.rst says (``%import zodbkmi`` and ``<encryptingstorage>``
around the ``<filestorage>`` with a blob directory), served by
``runwsgi`` on 127.0.0.1.  Through the ZMI, as an administrator does: add
a folder and a file (multipart upload), edit the file's title, then undo
that edit from the undo form of the database (the undo log lists the
transactions by their notes, which Zope writes: user and request path).

Then the instance is stopped and the database files are read: the data
(ids, titles, file content) and the transaction notes (user name, request
paths) must be nowhere in clear, and the database opens with the keys to
the state the ZMI left.

:class:`DeployingZopeTests` runs the ``zope.conf`` of docs/deploying.rst
(``key-settings``: the KEK in OpenBao Transit, prepared by the page's shell
steps against a real OpenBao server) and checks what the page says about
plaintext outside the database: the page template cache, exports saved on
the server, the access log.
"""
import base64
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid

from tests.bao import bare_layer
from zodbkmi.keyholder import write_key_file

try:
    import Zope2    # noqa: F401  (Zope's application package)
except ImportError:      # pragma: no cover
    Zope2 = None

USER = 'admin'
MARKERS = ('tumour', 'Ward 7', 'patients', 'manage_', 'scan-1234', USER)

ZOPE_CONF = """\
%%define INSTANCE %(instance)s
instancehome $INSTANCE
%%import zodbkmi
<zodb_db main>
  <encryptingstorage>
    key-file %(key_file)s
    key-dir $INSTANCE/var/keys
    <filestorage>
      path $INSTANCE/var/Data.fs
      blob-dir $INSTANCE/var/blobs
    </filestorage>
  </encryptingstorage>
  mount-point /
</zodb_db>
"""


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class _ZopeInstance:
    """An instance made by ``mkwsgiinstance`` in a temporary directory,
    started with ``runwsgi`` on 127.0.0.1 (:meth:`start`) and stopped with
    SIGINT (:meth:`_stop`)."""

    def make_instance(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-zope-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.instance = os.path.join(self.tmp, 'instance')
        self.password = uuid.uuid4().hex
        subprocess.run(
            # through their modules: under zc.buildout the scripts are
            # not beside sys.executable
            [sys.executable, '-c',
             'import sys; from Zope2.utilities.mkwsgiinstance import main; '
             'sys.exit(main())', '-d', self.instance,
             '-u', '%s:%s' % (USER, self.password)],
            check=True, stdout=subprocess.DEVNULL)
        self.etc = os.path.join(self.instance, 'etc')
        auth = base64.b64encode(
            ('%s:%s' % (USER, self.password)).encode()).decode()
        self.headers = {'Authorization': 'Basic ' + auth}
        self.zope = None

    def write_zope_conf(self, text):
        with open(os.path.join(self.etc, 'zope.conf'), 'w') as f:
            f.write(text)

    def start(self, env=None):
        self.port = free_port()
        ini = os.path.join(self.etc, 'zope.ini')
        with open(ini) as f:
            text = f.read()
        text = re.sub(r'(?m)^port = \d+$', 'port = %d' % self.port, text)
        text = re.sub(r'(?m)^host = .*$', 'host = 127.0.0.1', text)
        with open(ini, 'w') as f:
            f.write(text)
        self.log = open(os.path.join(self.tmp, 'runwsgi.log'), 'ab')
        self.zope = subprocess.Popen(
            [sys.executable, '-m', 'Zope2.Startup.serve', ini],
            cwd=self.instance,
            stdout=self.log, stderr=subprocess.STDOUT,
            # a Zope that does not stop prints where it hangs (SIGABRT)
            env=dict(env or os.environ, PYTHONFAULTHANDLER='1'),
            # SIGINT stops Zope: not ignored, even when the tests run in
            # the background of a shell (which ignores it there)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.addCleanup(self.log.close)
        self.addCleanup(self._stop)
        self.base = 'http://127.0.0.1:%d' % self.port
        self._wait_for_zope()

    def _stop(self):
        if self.zope is not None and self.zope.poll() is None:
            self.zope.send_signal(signal.SIGINT)
            try:
                self.zope.wait(180)
            except subprocess.TimeoutExpired:
                self.zope.send_signal(signal.SIGABRT)   # the stacks
                try:
                    self.zope.wait(10)
                except subprocess.TimeoutExpired:
                    self.zope.kill()
                    self.zope.wait()

    def _log_text(self):
        with open(self.log.name, 'rb') as f:
            return f.read().decode(errors='replace')[-3000:]

    def _wait_for_zope(self):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.zope.poll() is not None:
                self.fail('runwsgi exited: %s' % self._log_text())
            try:
                self.request('/')
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.fail('Zope did not answer: %s' % self._log_text())

    def request(self, path, fields=None, files=None, raw=False):
        """GET ``path``, or POST ``fields`` (multipart with ``files``:
        ``{name: (filename, bytes)}``); return the body as text (bytes
        when ``raw``)."""
        data = None
        headers = dict(self.headers)
        if files:
            boundary = uuid.uuid4().hex
            parts = []
            for name, value in (fields or {}).items():
                parts.append(
                    '--%s\r\nContent-Disposition: form-data; name="%s"'
                    '\r\n\r\n%s\r\n' % (boundary, name, value))
            body = ''.join(parts).encode()
            for name, (filename, content) in files.items():
                body += (
                    '--%s\r\nContent-Disposition: form-data; name="%s"; '
                    'filename="%s"\r\nContent-Type: text/plain\r\n\r\n'
                    % (boundary, name, filename)).encode()
                body += content + b'\r\n'
            data = body + ('--%s--\r\n' % boundary).encode()
            headers['Content-Type'] = (
                'multipart/form-data; boundary=%s' % boundary)
        elif fields is not None:
            data = urllib.parse.urlencode(fields, doseq=True).encode()
            headers['Content-Type'] = 'application/x-www-form-urlencoded'
        req = urllib.request.Request(self.base + path, data=data,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                body = r.read()
                return body if raw else body.decode()
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                self.fail('%s: HTTP %d %s'
                          % (path, e.code, e.read().decode()[-2000:]))
            raise


@unittest.skipIf(Zope2 is None, 'needs Zope')
class ZopeInstanceTests(_ZopeInstance, unittest.TestCase):

    def setUp(self):
        self.make_instance()
        self.key_file = os.path.join(self.tmp, 'kek.key')
        write_key_file(self.key_file, os.urandom(32))
        self.write_zope_conf(ZOPE_CONF % dict(instance=self.instance,
                                              key_file=self.key_file))
        self.start()

    def test_zmi_add_edit_undo(self):
        self.request('/manage_addProduct/OFSP/manage_addFolder',
                     {'id': 'patients', 'title': 'Ward 7'})
        self.request(
            '/patients/manage_addProduct/OFSP/manage_addFile',
            {'id': 'scan-1234', 'title': 'scan'},
            files={'file': ('scan.txt', b'tumour in the left lung\n' * 50)})
        self.request('/patients/scan-1234/manage_edit',
                     {'title': 'Ward 7 tumour scan',
                      'content_type': 'text/plain'})
        self.assertIn('Ward 7 tumour scan',
                      self.request('/patients/scan-1234/manage_main'))
        # undo the edit from the undo form: its entries are read from the
        # undo log, with the notes Zope wrote
        form = self.request('/Control_Panel/Database/main/manage_UndoForm')
        entries = re.findall(
            r'name="transaction_info:list"\s+value="([^"]+)"(.*?)</tr>',
            form, re.S)
        edits = [value for value, row in entries if 'manage_edit' in row]
        self.assertEqual(len(edits), 1, form[-3000:])
        self.request(
            '/Control_Panel/Database/main/manage_undo_transactions',
            {'transaction_info:list': html.unescape(edits[0])})
        page = self.request('/patients/scan-1234/manage_main')
        self.assertNotIn('Ward 7 tumour scan', page)
        self._stop()
        self.assertEqual(self.zope.returncode, 0, self._log_text())

        var = os.path.join(self.instance, 'var')
        checked = 0
        for top in ('Data.fs', 'Data.fs.index', 'blobs', 'keys'):
            top = os.path.join(var, top)
            paths = [top] if os.path.isfile(top) else [
                os.path.join(d, n) for d, _, ns in os.walk(top) for n in ns]
            for path in paths:
                with open(path, 'rb') as f:
                    data = f.read()
                checked += 1
                for marker in MARKERS:
                    at = data.find(marker.encode())
                    self.assertEqual(at, -1, '%r in clear in %s: %r' % (
                        marker, path, data[max(0, at - 40):at + 60]))
        self.assertGreaterEqual(checked, 3)
        self._check_database(var)

    def _check_database(self, var):
        # the database opens with the keys, in the state the ZMI left
        import ZODB.config
        db = ZODB.config.databaseFromString(
            '%%import zodbkmi\n<zodb>\n<encryptingstorage>\n'
            'key-file %s\nkey-dir %s/keys\n<filestorage>\n'
            'path %s/Data.fs\nblob-dir %s/blobs\n</filestorage>\n'
            '</encryptingstorage>\n</zodb>\n' % (self.key_file, var, var, var))
        try:
            with db.transaction() as conn:
                app = conn.root()['Application']
                scan = app['patients']['scan-1234']
                self.assertEqual(scan.title, 'scan')
                self.assertEqual(bytes(scan.data),
                                 b'tumour in the left lung\n' * 50)
                self.assertEqual(app['patients'].title, 'Ward 7')
            descriptions = ' '.join(str(d['description'])
                                    for d in db.undoLog(0, 20))
            self.assertIn('manage_addFile', descriptions)
        finally:
            db.close()


ZopeBaoLayer = bare_layer(
    'ZopeBaoLayer', __name__,
    "An OpenBao server for the Zope tests: the page's steps enable Transit "
    "and make the key themselves.")


#: In the page template, in its text (cached when CHAMELEON_CACHE is set)
#: and in what it renders (never cached).
TEMPLATE_MARK = 'Template-Text-Haematology'
TITLE_MARK = 'Folder-Title-Oncology'
TEMPLATE = ('<html><body><p>%s</p><p tal:content="context/title">x</p>'
            '</body></html>' % TEMPLATE_MARK)
CHAMELEON = """
<environment>
  CHAMELEON_CACHE $INSTANCE/var/cache
</environment>
"""


@unittest.skipIf(Zope2 is None, 'needs Zope')
class DeployingZopeTests(_ZopeInstance, unittest.TestCase):

    layer = ZopeBaoLayer

    def setUp(self):
        from tests.bao import skip_requested
        from tests.test_deploying import prepare_openbao
        from tests.test_deploying import snippet
        if skip_requested():
            self.skipTest('ZODBKMI_SKIP_BAO=1')
        self.make_instance()
        prepare_openbao(ZopeBaoLayer.server, self.instance)
        self.conf = snippet('zope.conf', self.instance)
        self.write_zope_conf(self.conf)
        # the page's zope.conf has no CHAMELEON_CACHE; nor has the process
        self.env = dict(os.environ)
        self.env.pop('CHAMELEON_CACHE', None)
        self.var = os.path.join(self.instance, 'var')

    def _files(self, top):
        return [os.path.join(d, n) for d, _, ns in os.walk(top) for n in ns]

    def _holds(self, path, marker):
        with open(path, 'rb') as f:
            return marker.encode() in f.read()

    def test_deploying_zope_conf(self):
        self.start(self.env)
        self.request('/manage_addProduct/OFSP/manage_addFolder',
                     {'id': 'oncology', 'title': TITLE_MARK})
        self.request('/oncology/manage_addProduct/PageTemplates/'
                     'manage_addPageTemplate',
                     {'id': 'report', 'title': 'report', 'text': TEMPLATE})
        page = self.request('/oncology/report')
        self.assertIn(TEMPLATE_MARK, page)
        self.assertIn(TITLE_MARK, page)
        # an export saved on the server, and one downloaded
        self.request('/manage_exportObject',
                     {'id': 'oncology', 'download:int': 0})
        download = self.request('/manage_exportObject',
                                {'id': 'oncology', 'download:int': 1},
                                raw=True)
        self._stop()
        self.assertEqual(self.zope.returncode, 0, self._log_text())

        # the database (records, blobs, keys): nothing in clear
        database = [p for p in self._files(self.var)
                    if os.path.relpath(p, self.var).split(os.sep)[0] in
                    ('Data.fs', 'Data.fs.index', 'Data.fs.tmp', 'blobs',
                     'keys')]
        self.assertGreaterEqual(len(database), 4)
        for path in database:
            for marker in (TEMPLATE_MARK, TITLE_MARK, 'oncology'):
                self.assertFalse(self._holds(path, marker), (marker, path))
        (key,) = os.listdir(os.path.join(self.var, 'keys'))
        with open(os.path.join(self.var, 'keys', key)) as f:
            self.assertIn('"kek_id": "transit:transit:zope-kek"', f.read())
        # without CHAMELEON_CACHE the cache directory stays empty
        self.assertEqual(os.listdir(os.path.join(self.var, 'cache')),
                         ['README.txt'])
        # what the page says of exports: in clear, and the one on the
        # server with the mode of the umask
        zexp = os.path.join(self.var, 'oncology.zexp')
        self.assertTrue(self._holds(zexp, TEMPLATE_MARK))
        self.assertTrue(self._holds(zexp, TITLE_MARK))
        umask = os.umask(0o022)
        os.umask(umask)
        self.assertEqual(os.stat(zexp).st_mode & 0o777, 0o666 & ~umask)
        self.assertIn(TITLE_MARK.encode(), download)
        # and of the access log: the paths
        self.assertTrue(self._holds(os.path.join(self.var, 'log', 'Z4.log'),
                                    '/oncology/report'))

        # with the CHAMELEON_CACHE of mkwsgiinstance: the template's text
        # is written to var/cache, what it renders is not
        self.write_zope_conf(self.conf + CHAMELEON)
        self.start(self.env)
        page = self.request('/oncology/report')
        self.assertIn(TITLE_MARK, page)
        self._stop()
        self.assertEqual(self.zope.returncode, 0, self._log_text())
        cache = self._files(os.path.join(self.var, 'cache'))
        sources = [p for p in cache if p.endswith('.py')
                   and self._holds(p, TEMPLATE_MARK)]
        self.assertEqual(len(sources), 1, cache)
        self.assertTrue([p for p in cache if p.endswith('.pyc')
                         and self._holds(p, TEMPLATE_MARK)])
        self.assertFalse([p for p in cache if self._holds(p, TITLE_MARK)])
