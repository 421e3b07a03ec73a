"""EncryptingStorage inside a real Zope instance (issue #17).

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

from zodbkmi.keyholder import write_key_file

try:
    import Zope2    # noqa: F401  (Zope's application package)
except ImportError:      # pragma: no cover
    Zope2 = None

BIN = os.path.dirname(sys.executable)
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


@unittest.skipIf(Zope2 is None, 'needs Zope')
class ZopeInstanceTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-zope-')
        self.instance = os.path.join(self.tmp, 'instance')
        self.password = uuid.uuid4().hex
        subprocess.run(
            [os.path.join(BIN, 'mkwsgiinstance'), '-d', self.instance,
             '-u', '%s:%s' % (USER, self.password)],
            check=True, stdout=subprocess.DEVNULL)
        self.key_file = os.path.join(self.tmp, 'kek.key')
        write_key_file(self.key_file, os.urandom(32))
        etc = os.path.join(self.instance, 'etc')
        with open(os.path.join(etc, 'zope.conf'), 'w') as f:
            f.write(ZOPE_CONF % dict(instance=self.instance,
                                     key_file=self.key_file))
        self.port = free_port()
        ini = os.path.join(etc, 'zope.ini')
        with open(ini) as f:
            text = f.read()
        text = re.sub(r'(?m)^port = \d+$', 'port = %d' % self.port, text)
        text = re.sub(r'(?m)^host = .*$', 'host = 127.0.0.1', text)
        with open(ini, 'w') as f:
            f.write(text)
        self.log = open(os.path.join(self.tmp, 'runwsgi.log'), 'wb')
        self.zope = subprocess.Popen(
            [os.path.join(BIN, 'runwsgi'), ini], cwd=self.instance,
            stdout=self.log, stderr=subprocess.STDOUT)
        self.base = 'http://127.0.0.1:%d' % self.port
        auth = base64.b64encode(
            ('%s:%s' % (USER, self.password)).encode()).decode()
        self.headers = {'Authorization': 'Basic ' + auth}
        self._wait_for_zope()

    def tearDown(self):
        self._stop()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _stop(self):
        if self.zope.poll() is None:
            self.zope.send_signal(signal.SIGINT)
            try:
                self.zope.wait(60)
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

    def request(self, path, fields=None, files=None):
        """GET ``path``, or POST ``fields`` (multipart with ``files``:
        ``{name: (filename, bytes)}``); return the body as text."""
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
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                self.fail('%s: HTTP %d %s' % (path, e.code,
                                               e.read().decode()[-2000:]))
            raise

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
