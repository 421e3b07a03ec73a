"""``zodbkmi token add|list|remove`` (zodbkmi.server, zodbkmi.cli.tokens)
and the token file a running server reads again when it changes
(zodbkmi.rest.TokenFile): on a token file, on a real ``zodbkmi serve``,
and in the PostgreSQL key store."""
import contextlib
import io
import json
import os
import shutil
import ssl
import stat
import tempfile
import unittest
import urllib.error
import urllib.request
import uuid

from tests.postgres import PostgresLayer
from tests.postgres import needs_postgres
from tests.test_keystore_pg import poll


def cli(*argv):
    from zodbkmi.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class TokenCommandTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.tokens = os.path.join(self.tmp, 'var', 'tokens.json')
        self.flags = ('--tokens-file', self.tokens)

    def table(self):
        from zodbkmi.rest import TokenTable
        return TokenTable.load(self.tokens)

    def read(self, path):
        with open(path) as f:
            return f.read().strip()

    def test_add_list_remove(self):
        code, out, err = cli('token', 'add', 'prometheus', '--role',
                             'metrics', *self.flags)
        self.assertEqual((code, err), (0, ''))
        path = os.path.join(self.tmp, 'var', 'prometheus.token')
        # the first use makes the admin and client tokens, as a first
        # start of the server does
        self.assertEqual(out.splitlines(), [
            'created token file %s' % os.path.join(self.tmp, 'var', f)
            for f in ('admin.token', 'client.token')] + [
            'created token prometheus (metrics) in %s' % path])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        token = self.read(path)
        self.assertNotIn(token, out)
        self.assertNotIn(token, self.read(self.tokens))   # its hash only
        self.assertEqual(self.table().lookup(token),
                         ('prometheus', 'metrics'))
        code, out, err = cli('token', 'list', *self.flags)
        self.assertEqual(out.splitlines(), ['admin admin', 'client client',
                                            'prometheus metrics'])
        code, out, err = cli('token', 'remove', 'prometheus', *self.flags)
        self.assertEqual((code, out.strip()), (
            0, 'removed token prometheus from %s' % self.tokens))
        self.assertIsNone(self.table().lookup(token))
        self.assertEqual(stat.S_IMODE(os.stat(self.tokens).st_mode), 0o600)

    def test_out_and_config(self):
        config = os.path.join(self.tmp, 'server.toml')
        with open(config, 'w') as f:
            f.write('tokens_file = %s\n' % json.dumps(self.tokens))
        out_path = os.path.join(self.tmp, 'secrets', 'app1.token')
        code, out, err = cli('token', 'add', 'app1', '--role', 'client',
                             '--out', out_path, '--config', config)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.table().lookup(self.read(out_path)),
                         ('app1', 'client'))

    def test_refusals_change_nothing(self):
        cli('token', 'add', 'app1', '--role', 'client', *self.flags)
        before = self.read(self.tokens)
        taken = os.path.join(self.tmp, 'taken')
        with open(taken, 'w') as f:
            f.write('mine')
        for argv, message in [
                (('add', 'app1', '--role', 'admin'),
                 'a token named app1 exists in %s: remove it first'
                 % self.tokens),
                (('add', 'bad name', '--role', 'client'),
                 'invalid token name'),
                (('add', 'app2', '--role', 'client', '--out', taken),
                 '%s exists: give another --out' % taken),
                (('remove', 'nobody'), 'no token named nobody'),
                (('remove', 'admin'), 'admin is the last admin token: add '
                                      'another admin token first')]:
            code, out, err = cli('token', *(argv + self.flags))
            self.assertEqual((code, err.count('\n')), (2, 1), err)
            self.assertIn(message, err)
            self.assertEqual(self.read(self.tokens), before)
        self.assertEqual(self.read(taken), 'mine')
        # with a second admin token, the first can go
        cli('token', 'add', 'admin2', '--role', 'admin', *self.flags)
        code, out, err = cli('token', 'remove', 'admin', *self.flags)
        self.assertEqual(code, 0, err)

    def test_list_and_remove_need_the_token_file(self):
        for argv in (('list',), ('remove', 'app1')):
            code, out, err = cli('token', *(argv + self.flags))
            self.assertEqual((code, err.strip()), (
                2, 'zodbkmi token: error: token file %s does not exist (the '
                   'first start of the server, or zodbkmi token add, makes '
                   'it)' % self.tokens))
        self.assertFalse(os.path.exists(os.path.dirname(self.tokens)))

    def test_key_store_needs_postgresql(self):
        code, out, err = cli('token', 'list', '--tokens-in-key-store',
                             'true', *self.flags)
        self.assertEqual((code, err.strip()), (
            2, 'zodbkmi token: error: tokens_in_key_store needs a '
               'postgresql:// key_store'))


class TokenFileTests(unittest.TestCase):
    """The server's table follows its file."""

    def setUp(self):
        from zodbkmi.server import ensure_tokens
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.path = os.path.join(self.tmp, 'tokens.json')
        ensure_tokens(self.path)
        with open(os.path.join(self.tmp, 'admin.token')) as f:
            self.admin = f.read().strip()

    def _makeOne(self):
        from zodbkmi.rest import TokenFile
        return TokenFile(self.path, check=0)

    def test_added_and_removed_tokens_count_at_once(self):
        from zodbkmi.server import add_token, remove_token
        tokens = self._makeOne()
        settings = {'tokens_file': self.path}
        out = io.StringIO()
        path = add_token(settings, 'prom', 'metrics', out=out)
        with open(path) as f:
            token = f.read().strip()
        self.assertEqual(tokens.lookup(token), ('prom', 'metrics'))
        remove_token(settings, 'prom', out=out)
        self.assertIsNone(tokens.lookup(token))
        self.assertEqual(tokens.lookup(self.admin), ('admin', 'admin'))

    def test_unreadable_file_keeps_the_tokens_read_before(self):
        tokens = self._makeOne()
        with open(self.path, 'w') as f:
            f.write('{"tokens": [')
        with self.assertLogs('zodbkmi.server', 'WARNING') as logged:
            self.assertEqual(tokens.lookup(self.admin), ('admin', 'admin'))
        self.assertIn('cannot read the token file again', logged.output[0])
        # a file others could write is refused the same way
        with open(self.path, 'w') as f:
            f.write('{"tokens": []}')
        os.chmod(self.path, 0o666)
        with self.assertLogs('zodbkmi.server', 'WARNING') as logged:
            self.assertEqual(tokens.lookup(self.admin), ('admin', 'admin'))
        self.assertIn('accessible by group or others', logged.output[0])


class RunningServerTests(unittest.TestCase):
    """A metrics token added to the token file of a running ``zodbkmi
    serve`` reads /v1/metrics within a second or so, and no key; once
    removed it is refused."""

    def setUp(self):
        from zodbkmi.testing import ServerProcess
        self.server = ServerProcess()
        self.addCleanup(self.server.cleanup)
        self.addCleanup(self.server.stop)
        self.ctx = ssl.create_default_context(cafile=self.server.ca)

    def status(self, path, token):
        request = urllib.request.Request(self.server.url + path)
        request.add_header('Authorization', 'Bearer ' + token)
        try:
            with urllib.request.urlopen(request, timeout=30,
                                        context=self.ctx) as r:
                return r.status
        except urllib.error.HTTPError as e:
            with e:
                return e.code

    def test_metrics_token(self):
        flags = ('--tokens-file',
                 os.path.join(self.server.dir, 'var', 'tokens.json'))
        code, out, err = cli('token', 'add', 'prometheus', '--role',
                             'metrics', *flags)
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.server.dir, 'var',
                               'prometheus.token')) as f:
            token = f.read().strip()
        poll(lambda: self.status('/v1/metrics', token) == 200)
        self.assertEqual(self.status('/v1/keys', token), 403)
        code, out, err = cli('token', 'remove', 'prometheus', *flags)
        self.assertEqual(code, 0, err)
        poll(lambda: self.status('/v1/metrics', token) == 401)


class StoredTokenTests(unittest.TestCase):
    """The same commands on the token table of a PostgreSQL key store."""

    layer = PostgresLayer

    def setUp(self):
        needs_postgres(self)
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        name = 'tk_' + uuid.uuid4().hex[:12]
        PostgresLayer.server.createdb(name)
        self.url = 'postgresql://postgres@127.0.0.1:%d/%s' % (
            PostgresLayer.server.port, name)
        self.flags = ('--key-store', self.url, '--tokens-in-key-store',
                      'true', '--tokens-file',
                      os.path.join(self.tmp, 'tokens.json'))

    def test_add_list_remove(self):
        from zodbkmi.keystore_pg import PostgresKeyStore
        from zodbkmi.rest import StoredTokenTable
        store = PostgresKeyStore(self.url)
        self.addCleanup(store.close)
        code, out, err = cli('token', 'add', 'prometheus', '--role',
                             'metrics', *self.flags)
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.tmp, 'prometheus.token')) as f:
            token = f.read().strip()
        self.assertEqual(StoredTokenTable(store).lookup(token),
                         ('prometheus', 'metrics'))
        code, out, err = cli('token', 'list', *self.flags)
        self.assertEqual(out.splitlines(), ['prometheus metrics'])
        code, out, err = cli('token', 'remove', 'prometheus', *self.flags)
        self.assertEqual(code, 0, err)
        self.assertIn('removed token prometheus from key store '
                      'postgresql://', out)
        self.assertIsNone(StoredTokenTable(store).lookup(token))
        code, out, err = cli('token', 'remove', 'prometheus', *self.flags)
        self.assertEqual(code, 2)
        self.assertIn('no token named prometheus in key store', err)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
