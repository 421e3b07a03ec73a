"""``zodbkmi migrate`` on the configuration files of Zope (a real
``mkwsgiinstance`` instance) and ZEO (zodbkmi.cli.appconfig): the database
is picked by name, or one line says what to pass."""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import ZODB
import ZODB.FileStorage

from zodbkmi.testing import child_environ

try:
    import Zope2.utilities.mkwsgiinstance   # noqa: F401
except ImportError:
    HAVE_ZOPE = False
else:
    HAVE_ZOPE = True

ZEO_CONF = """\
# a ZEO server serving two storages
%define VAR {var}

<zeo>
  address 127.0.0.1:0
  read-only false
</zeo>

<filestorage 1>
  path $VAR/Data.fs
</filestorage>

<filestorage catalog>
  path $VAR/Catalog.fs
</filestorage>

<eventlog>
  <logfile>
    path $VAR/zeo.log
  </logfile>
</eventlog>
"""


def make_database(path, **items):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    try:
        with db.transaction() as conn:
            conn.root().update(items)
    finally:
        db.close()
    # what a stopped application leaves, removed to see what the
    # migration itself makes
    for suffix in ('.lock', '.tmp'):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


class _Base(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-zopeconf-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def zodbkmi(self, *argv):
        """``(exit code, stdout, stderr)`` of ``zodbkmi ARGV``, run as a
        user runs it."""
        proc = subprocess.run(
            [sys.executable, '-m', 'zodbkmi.cli'] + list(argv),
            capture_output=True, text=True, timeout=300,
            env=child_environ(), cwd=self.tmp)
        self.assertNotIn('Traceback', proc.stderr)
        return proc.returncode, proc.stdout, proc.stderr

    def error(self, *argv):
        code, out, err = self.zodbkmi(*argv)
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.splitlines()), 1, err)
        return err.strip()

    def scanned(self, *argv):
        """The number of records ``migrate scan ARGV`` reports."""
        code, out, err = self.zodbkmi('migrate', 'scan', *argv)
        self.assertEqual(code, 0, err)
        first = out.splitlines()[0]
        self.assertTrue(first.startswith('scan (storage level): '), out)
        return int(first.split(': ')[1].split()[0])


@unittest.skipUnless(HAVE_ZOPE, 'Zope is not installed (no mkwsgiinstance)')
class ZopeConfTests(_Base):
    """A zope.conf as ``mkwsgiinstance`` writes it."""

    def setUp(self):
        super().setUp()
        self.instance = self.path('instance')
        subprocess.run(
            [sys.executable, '-c',
             'import sys; from Zope2.utilities.mkwsgiinstance import main; '
             'sys.exit(main())',
             '--dir', self.instance, '--user', 'admin:secret'],
            check=True, capture_output=True, timeout=300,
            env=child_environ())
        self.conf = os.path.join(self.instance, 'etc', 'zope.conf')
        self.data_fs = os.path.join(self.instance, 'var', 'Data.fs')
        with open(self.conf) as f:
            text = f.read()
        # what we rely on: Zope's own keys, and its main database
        self.assertIn('instancehome $INSTANCE', text)
        self.assertIn('<zodb_db main>', text)

    def add_database(self, name, path):
        with open(self.conf, 'a') as f:
            f.write('\n<zodb_db %s>\n  <filestorage>\n    path %s\n'
                    '  </filestorage>\n  mount-point /%s\n</zodb_db>\n'
                    % (name, path, name))

    def test_scan_reads_the_main_database(self):
        make_database(self.data_fs, a=1)
        self.assertEqual(self.scanned(self.conf), 1)

    def test_scan_opens_the_database_read_only(self):
        make_database(self.data_fs, a=1)
        before = os.path.getsize(self.data_fs)
        self.scanned(self.conf)
        self.assertFalse(os.path.exists(self.data_fs + '.lock'))
        self.assertEqual(os.path.getsize(self.data_fs), before)

    def test_database_by_name(self):
        make_database(self.data_fs, a=1)
        other = self.path('Catalog.fs')
        make_database(other, a=1, b=2, c=3)
        self.add_database('catalog', other)
        self.assertEqual(self.scanned(self.conf), 1)      # main, by default
        self.assertEqual(self.scanned(self.conf, '--database', 'catalog'),
                         1)
        # options before the database work too
        self.assertEqual(self.scanned('--database', 'main', self.conf), 1)

    def test_unknown_database_says_which_there_are(self):
        make_database(self.data_fs, a=1)
        self.add_database('catalog', self.path('Catalog.fs'))
        self.assertEqual(
            self.error('migrate', 'scan', self.conf, '--database', 'other'),
            "zodbkmi migrate: error: cannot open %s: the Zope configuration "
            "has no database 'other' (its databases: catalog, main); give "
            "--database NAME" % self.conf)

    def test_database_not_created_yet_leaves_nothing(self):
        var = os.path.dirname(self.data_fs)
        before = sorted(os.listdir(var))
        self.assertEqual(
            self.error('migrate', 'scan', self.conf),
            'zodbkmi migrate: error: cannot open %s: its database '
            "'main' has no file %s yet" % (self.conf, self.data_fs))
        self.assertEqual(sorted(os.listdir(var)), before)

    def test_encrypt_through_zope_conf(self):
        from zodbkmi.keyholder import write_key_file
        make_database(self.data_fs, a=1, b='clear text')
        write_key_file(self.path('kek.key'), os.urandom(32))
        code, out, err = self.zodbkmi(
            'migrate', 'encrypt', self.conf, '--key-file', 'kek.key',
            '--key-dir', 'keys', '--no-progress')
        self.assertEqual(code, 0, err)
        self.assertIn('rewritten 1 in 1 transactions', out)
        with open(self.data_fs, 'rb') as f:
            data = f.read()
        self.assertIn(b'clear text', data)    # the old revision, unpacked
        code, out, err = self.zodbkmi(
            'migrate', 'scan', self.conf, '--old-key-file', 'kek.key',
            '--key-dir', 'keys')
        self.assertEqual(code, 0, err)
        self.assertIn('encrypted  1', out)


class ZeoConfTests(_Base):
    """A zeo.conf written by hand: a <zeo> section and two storages."""

    def setUp(self):
        super().setUp()
        self.conf = self.path('zeo.conf')
        with open(self.conf, 'w') as f:
            f.write(ZEO_CONF.format(var=self.tmp))
        make_database(self.path('Data.fs'), a=1)
        make_database(self.path('Catalog.fs'), a=1, b=2)

    def test_two_storages_need_a_name(self):
        self.assertEqual(
            self.error('migrate', 'scan', self.conf),
            'zodbkmi migrate: error: cannot open %s: the ZEO configuration '
            'has 2 databases (1, catalog); give --database NAME'
            % self.conf)

    def test_storage_by_name(self):
        self.assertEqual(self.scanned(self.conf, '--database', '1'), 1)
        self.assertEqual(
            self.scanned(self.conf, '--database', 'catalog'), 1)

    def test_the_only_storage(self):
        with open(self.conf, 'w') as f:
            f.write(ZEO_CONF.format(var=self.tmp).split(
                '<filestorage catalog>')[0])
        self.assertEqual(self.scanned(self.conf), 1)

    def test_encrypting_storage_imported_by_the_file(self):
        # %import zodbkmi and an <encryptingstorage>: the storage opens
        # with its keys, and imports of packages not installed are left
        # out (they belong to other sections)
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.keyholder import write_key_file
        write_key_file(self.path('kek.key'), os.urandom(32))
        with open(self.conf, 'w') as f:
            f.write('%%import zodbkmi\n%%import no_such_package_here\n'
                    '<zeo>\n  address 8100\n</zeo>\n'
                    '<encryptingstorage 1>\n'
                    '  key-file %(d)s/kek.key\n  key-dir %(d)s/keys\n'
                    '  <filestorage>\n    path %(d)s/Enc.fs\n'
                    '  </filestorage>\n</encryptingstorage>\n'
                    % {'d': self.tmp})
        # an encrypted database, made through the same section
        import ZODB.config
        from zodbkmi.cli import appconfig
        top = appconfig.read(self.conf)
        self.assertEqual(sorted(appconfig.databases(top)), ['1'])
        db = ZODB.DB(ZODB.config.storageFromString(
            appconfig.render(appconfig.databases(top)['1'], top.imports[:1])))
        with db.transaction() as conn:
            conn.root()['a'] = 1
        db.close()
        self.assertEqual(len(KeyManagementFacility(self.path('keys'))), 1)
        code, out, err = self.zodbkmi('migrate', 'scan', self.conf)
        self.assertEqual(code, 0, err)
        self.assertIn('encrypted  1', out)

    def test_database_with_a_plain_file(self):
        self.assertEqual(
            self.error('migrate', 'scan', self.path('Data.fs'),
                       '--database', 'main'),
            'zodbkmi migrate: error: --database goes with a Zope or ZEO '
            'configuration file')


class AppConfigTests(_Base):
    """zodbkmi.cli.appconfig without a process of its own."""

    def _read(self, text):
        from zodbkmi.cli import appconfig
        with open(self.path('app.conf'), 'w') as f:
            f.write(text)
        return appconfig.read(self.path('app.conf'))

    def test_render_escapes_and_sets_read_only(self):
        from zodbkmi.cli import appconfig
        top = self._read('%define D /srv/a$$b\n<zeo>\n  address 1\n</zeo>\n'
                         '<filestorage>\n  path $D/Data.fs\n</filestorage>\n')
        self.assertEqual(appconfig.kind(top), 'zeo')
        section = appconfig.choose('app.conf', top, None)
        self.assertEqual(section['path'], ['/srv/a$b/Data.fs'])
        self.assertEqual(
            appconfig.render(section, read_only=True),
            '<filestorage>\n  path /srv/a$$b/Data.fs\n  read-only true\n'
            '</filestorage>')

    def test_include(self):
        from zodbkmi.cli import appconfig
        with open(self.path('db.conf'), 'w') as f:
            f.write('<zodb_db main>\n  <mappingstorage/>\n</zodb_db>\n')
        top = self._read('instancehome /x\n%include db.conf\n')
        self.assertEqual(appconfig.kind(top), 'zope')
        self.assertEqual(list(appconfig.databases(top)), ['main'])

    def test_storage_config_is_not_an_application_config(self):
        from zodbkmi.cli import appconfig
        top = self._read('<filestorage>\n  path Data.fs\n</filestorage>\n')
        self.assertIsNone(appconfig.kind(top))
