"""docs/deploying.rst, step by step, against a real OpenBao server.

The page marks each shell step and configuration file with a comment
``.. deploy-snippet: NAME`` before its code block.  :func:`snippet` reads
them from the page, and the test runs them in the page's order, as an
operator would: the shell steps with ``bash -e`` (``bao`` is OpenBao's
command, against a dev server of its own with TLS), the configuration files
written with the paths and the server of the test put in for the page's
examples (:data:`EXAMPLE_INSTANCE`, :data:`EXAMPLE_URL`, ...).  The Python
examples of the page (the catalog leak) are a doctest, run by
tests/test_docs.py.
"""
import base64
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

import ZODB
import ZODB.FileStorage
import ZODB.blob
from persistent.mapping import PersistentMapping

from zodbkmi.persistent import EncryptedPersistent

from zodbkmi.testing import child_environ
from tests.bao import bao_binary
from tests.bao import bare_layer
from tests.bao import skip_requested

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(os.path.dirname(HERE), 'docs', 'deploying.rst')

#: What the page uses as examples, replaced by the test's own.
EXAMPLE_INSTANCE = '/srv/zope/instance'
EXAMPLE_APP = '/srv/myapp'
EXAMPLE_URL = 'https://bao.example.org:8200'

MARKER = 'Deploying-Marker-Ward-7'

_SNIPPET = re.compile(r'^( *)\.\. deploy-snippet: (\S+) *$')
_BLOCK = re.compile(r'^( *)\.\. code-block::')


def snippets(path=PAGE):
    """``{name: text}`` of the marked code blocks of the page."""
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = _SNIPPET.match(line)
        if m is None:
            continue
        j = i + 1
        while not _BLOCK.match(lines[j]):
            if lines[j].strip():
                raise ValueError('snippet %s: no code block follows'
                                 % m.group(2))
            j += 1
        indent = len(_BLOCK.match(lines[j]).group(1))
        body = []
        for text in lines[j + 1:]:
            if text.strip() and len(text) - len(text.lstrip()) <= indent:
                break
            body.append(text)
        found[m.group(2)] = textwrap.dedent('\n'.join(body)).strip() + '\n'
    return found


def snippet(name, instance=None, url=None, app=None):
    """The snippet ``name``, with the page's example paths and server
    replaced by those given."""
    text = snippets()[name]
    if instance is not None:
        text = text.replace(EXAMPLE_INSTANCE, instance)
    if url is not None:
        text = text.replace(EXAMPLE_URL, url)
    if app is not None:
        text = text.replace(EXAMPLE_APP, app)
    return text


def zodbkmi_bin_dir(tmp):
    """A directory with the ``zodbkmi`` command: the installed script's,
    or (under zc.buildout, whose bin/test is the only script) one made in
    ``tmp`` that runs the module with this Python."""
    here = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(here, 'zodbkmi')):
        return here
    bin_dir = os.path.join(tmp, 'bin')
    os.makedirs(bin_dir, exist_ok=True)
    script = os.path.join(bin_dir, 'zodbkmi')
    with open(script, 'w') as f:
        f.write('#!/bin/sh\nexec %s -m zodbkmi.cli "$@"\n'
                % shlex.quote(sys.executable))
    os.chmod(script, 0o755)
    return bin_dir


def bao_environ(server, instance, extra=None):
    """The environment of the shell steps: an administrator of ``server``
    (``BAO_*``), ``$INSTANCE``, ``bao`` and ``zodbkmi`` on the path."""
    path = os.pathsep.join([os.path.dirname(bao_binary()),
                            zodbkmi_bin_dir(os.path.dirname(instance)),
                            os.environ.get('PATH', '')])
    env = child_environ(extra)
    env.update(server.environ(), INSTANCE=instance, PATH=path)
    return env


def run_shell(text, env, cwd):
    """Run a shell step with ``bash -e``; return its standard output."""
    proc = subprocess.run(['bash', '-e', '-c', text], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise AssertionError('shell step failed (exit %d):\n%s\n%s'
                             % (proc.returncode, text, proc.stderr[-3000:]))
    return proc.stdout


def prepare_openbao(server, instance):
    """Run the page's OpenBao steps, key directory and settings file for
    ``instance`` (made if missing); return the settings file's path."""
    os.makedirs(os.path.join(instance, 'etc'), exist_ok=True)
    os.makedirs(os.path.join(instance, 'var'), exist_ok=True)
    env = bao_environ(server, instance)
    for name in ('openbao', 'token', 'keydir'):
        run_shell(snippet(name), env, instance)
    path = os.path.join(instance, 'etc', 'zodbkmi', 'encryption.json')
    with open(path, 'w') as f:
        f.write(snippet('encryption.json', instance, server.url))
    return path


DeployingLayer = bare_layer(
    'DeployingLayer', __name__,
    'An OpenBao server of its own: the page enables Transit itself.')


class SnippetTests(unittest.TestCase):
    """The page's snippets are found (no server needed)."""

    def test_every_snippet_is_found(self):
        self.assertEqual(sorted(snippets()), [
            'backup', 'destroy-old', 'encryption.json', 'keydir', 'migrate',
            'openbao',
            'pyramid.ini', 'token', 'transit-retire', 'transit-rewrap',
            'transit-rotate', 'zope.conf'])

    def test_settings_snippet_is_valid(self):
        from zodbkmi.sources import parse_settings
        settings = parse_settings(snippet('encryption.json'))
        self.assertEqual(settings.params['source'], 'vaultTransit')
        self.assertEqual(settings.params['keyName'], 'zope-kek')


class Patient(EncryptedPersistent):
    """An object-level encrypted record, indexed by its title."""

    def __init__(self, title, text=''):
        self.title = title
        self.text = text

    def getPhysicalPath(self):
        return ('', 'p1')


try:
    from Products.ZCatalog.ZCatalog import ZCatalog
except ImportError:
    ZCatalog = None


class IndexLeakTests(unittest.TestCase):
    """What the page says of object-level encryption: an index over an
    encrypted object stores its values in clear; EncryptingStorage does
    not."""

    TITLE = 'Alice Oncology-Ward 7'
    WORD = 'malignantlymphoma'

    def setUp(self):
        import zope.component.testing
        from zope.component import provideUtility
        from zodbkmi.testing import TestingKeyHolder
        from zodbkmi.testing import TestingKeyManagementFacility
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-leak-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        provideUtility(TestingKeyHolder())
        provideUtility(TestingKeyManagementFacility(
            os.path.join(self.tmp, 'keys')))

    def _raw(self, fill, encrypting):
        path = os.path.join(self.tmp, 'Data.fs')
        storage = ZODB.FileStorage.FileStorage(path)
        if encrypting:
            from zodbkmi.facility import KeyManagementFacility
            from zodbkmi.storage import EncryptingStorage
            storage = EncryptingStorage(
                storage, KeyManagementFacility(os.path.join(self.tmp, 'sk')),
                os.urandom(32), create_key=True)
        db = ZODB.DB(storage)
        try:
            with db.transaction() as conn:
                fill(conn.root())
        finally:
            db.close()
        with open(path, 'rb') as f:
            data = f.read()
        for name in os.listdir(self.tmp):
            if name.startswith('Data.fs'):
                os.unlink(os.path.join(self.tmp, name))
        return data

    def _btree(self, root):
        from BTrees.OOBTree import OOBTree
        folder = root['patients'] = PersistentMapping()
        folder['p1'] = patient = Patient(self.TITLE)
        folder['by_title'] = OOBTree({patient.title: 'p1'})

    def test_btree_index_w_encrypted_persistent(self):
        def without_index(root):
            root['patients'] = PersistentMapping(p1=Patient(self.TITLE))
        # the object alone: its title is encrypted
        self.assertNotIn(self.TITLE.encode(),
                         self._raw(without_index, False))
        # indexed by title in an OOBTree: the title is in clear
        self.assertIn(self.TITLE.encode(), self._raw(self._btree, False))
        # the whole storage encrypted: nowhere
        self.assertNotIn(self.TITLE.encode(), self._raw(self._btree, True))

    @unittest.skipIf(ZCatalog is None, 'needs Products.ZCatalog')
    def test_zcatalog_w_encrypted_persistent(self):
        from Products.PluginIndexes.FieldIndex.FieldIndex import FieldIndex
        from Products.ZCTextIndex.Lexicon import CaseNormalizer
        from Products.ZCTextIndex.Lexicon import Splitter
        from Products.ZCTextIndex.ZCTextIndex import PLexicon
        from Products.ZCTextIndex.ZCTextIndex import ZCTextIndex

        class Extra:
            doc_attr = 'text'
            index_type = 'Okapi BM25 Rank'
            lexicon_id = 'lexicon'

        def fill(root):
            catalog = root['catalog'] = ZCatalog('catalog')
            catalog._setObject('lexicon', PLexicon(
                'lexicon', '', Splitter(), CaseNormalizer()))
            catalog.addIndex('title', FieldIndex('title'))
            catalog.addIndex('text', ZCTextIndex('text', extra=Extra(),
                                                 caller=catalog))
            catalog.addColumn('title')
            root['p1'] = patient = Patient(self.TITLE, 'a %s' % self.WORD)
            catalog.catalog_object(patient, uid='/p1')
        raw = self._raw(fill, False)
        self.assertIn(self.TITLE.encode(), raw)   # index and metadata
        self.assertIn(self.WORD.encode(), raw)    # the lexicon
        raw = self._raw(fill, True)
        self.assertNotIn(self.TITLE.encode(), raw)
        self.assertNotIn(self.WORD.encode(), raw)


class DeployingTests(unittest.TestCase):
    """The page, from the OpenBao steps to the backup."""

    layer = DeployingLayer

    def setUp(self):
        if skip_requested():
            self.skipTest('ZODBKMI_SKIP_BAO=1')
        self.bao = DeployingLayer.server
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-deploying-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.instance = os.path.join(self.tmp, 'instance')
        self.env = bao_environ(self.bao, self.instance)

    def shell(self, name, cwd=None):
        return run_shell(snippet(name, self.instance, self.bao.url),
                         self.env, cwd or self.instance)

    def _plaintext_database(self):
        """A database in clear, as a site had it before zodbkmi."""
        var = os.path.join(self.instance, 'var')
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(var, 'Data.fs'), blob_dir=os.path.join(var, 'blobs')))
        with db.transaction() as conn:
            folder = conn.root()['patients'] = PersistentMapping()
            folder['title'] = MARKER
            folder['scan'] = ZODB.blob.Blob(MARKER.encode() * 100)
        db.close()

    def _zope_database(self):
        """The database of the page's zope.conf, opened by Zope's own
        configuration schema."""
        from Zope2.Startup.options import ZopeWSGIOptions
        path = os.path.join(self.instance, 'etc', 'zope.conf')
        with open(path, 'w') as f:
            f.write(snippet('zope.conf', self.instance))
        opts = ZopeWSGIOptions(configfile=path)()
        (database,) = opts.configroot.databases
        return database.createDB('main', {})

    def _read(self, db):
        with db.transaction() as conn:
            folder = conn.root()['patients']
            self.assertEqual(folder['title'], MARKER)
            with folder['scan'].open() as f:
                self.assertEqual(f.read(), MARKER.encode() * 100)

    def _files_hold_no_marker(self, top):
        for dirpath, _, names in os.walk(top):
            for name in names:
                with open(os.path.join(dirpath, name), 'rb') as f:
                    self.assertNotIn(MARKER.encode(), f.read(),
                                     os.path.join(dirpath, name))

    def test_deploying_page(self):
        try:
            import Zope2  # noqa: F401
        except ImportError:      # pragma: no cover
            self.skipTest('needs Zope')
        settings = prepare_openbao(self.bao, self.instance)
        # the token file and the key directory are private
        token = os.path.join(self.instance, 'etc', 'zodbkmi', 'bao-token')
        self.assertEqual(os.stat(token).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.join(
            self.instance, 'var', 'keys')).st_mode & 0o777, 0o700)
        # the token has the page's policy, not root's
        with open(token) as f:
            info = self.bao.api('GET', 'auth/token/lookup-self',
                                token=f.read().strip())['data']
        self.assertEqual(sorted(info['policies']), ['default', 'zope-kek'])

        # an existing database in clear, encrypted by the migration
        self._plaintext_database()
        self.shell('migrate')
        var = os.path.join(self.instance, 'var')
        self.shell('destroy-old')
        self.assertEqual(sorted(os.listdir(var)), [
            'Data.fs', 'Data.fs.index', 'Data.fs.lock', 'Data.fs.tmp',
            'blobs', 'keys'])
        self._files_hold_no_marker(var)

        # the site's zope.conf opens it, with the key from OpenBao
        db = self._zope_database()
        try:
            self._read(db)
        finally:
            db.close()
        (name,) = os.listdir(os.path.join(var, 'keys'))
        with open(os.path.join(var, 'keys', name)) as f:
            self.assertEqual(json.load(f)['kek_id'],
                             'transit:transit:zope-kek')

        # rotation of the Transit key: rotate, rewrap, retire
        self.shell('transit-rotate')
        out = subprocess.run(
            [sys.executable, '-c', snippet('transit-rewrap')],
            cwd=self.instance, env=child_environ(), capture_output=True,
            text=True, timeout=120)
        self.assertEqual(out.stdout, '1 data keys rewrapped\n', out.stderr)
        self.shell('transit-retire')
        from zodbkmi.sources.vault import key_version
        with open(os.path.join(var, 'keys', name)) as f:
            wrapped = base64.b64decode(json.load(f)['wrapped'])
        self.assertEqual(key_version(wrapped), 2)
        db = self._zope_database()
        try:
            self._read(db)
        finally:
            db.close()

        # the Pyramid URI: another application, the same OpenBao key
        app = os.path.join(self.tmp, 'myapp')
        os.makedirs(os.path.join(app, 'etc'))
        os.makedirs(os.path.join(app, 'var', 'keys'), 0o700)
        shutil.copy(settings, os.path.join(app, 'etc', 'encryption.json'))
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(snippet('pyramid.ini', app=app))
        uri = parser['app:main']['zodbconn.uri']
        import zodburi
        for _ in range(2):
            factory, dbkw = zodburi.resolve_uri(uri)
            db = ZODB.DB(factory(), **dbkw)
            try:
                with db.transaction() as conn:
                    conn.root().setdefault('n', 0)
                    conn.root()['n'] += 1
                    conn.root()['title'] = MARKER
            finally:
                db.close()
        self._files_hold_no_marker(os.path.join(app, 'var'))

        # the backup of the Transit key, encrypted for an offline key pair
        backup = os.path.join(self.tmp, 'backup')
        os.mkdir(backup)
        for cmd in (['zodbkmi', 'kek-file', '--rsa', 'backup-kek.pem'],
                    ['zodbkmi', 'public-key', 'backup-kek.pem', '-o',
                     'backup-kek.pub']):
            subprocess.run(cmd, cwd=backup, env=self.env, check=True,
                           stdout=subprocess.DEVNULL)
        self.shell('backup', cwd=backup)
        plain = subprocess.run(
            ['zodbkmi', 'decrypt-file', '--identity', 'backup-kek.pem',
             'zope-kek.backup.zks'], cwd=backup, env=self.env,
            capture_output=True, check=True).stdout
        # what OpenBao restores from (base64 of the key's JSON)
        self.assertIn(b'"name":"zope-kek"', base64.b64decode(plain.strip()))
