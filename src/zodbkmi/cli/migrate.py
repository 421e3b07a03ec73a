"""``zodbkmi migrate``: encrypt, rekey, decrypt or scan a database."""
import argparse
import io
import os
import sys

from zodbkmi import migrate
from zodbkmi.cli.progress import Progress
from zodbkmi.migrate import fsinternals
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import ZodbKmiError

DESCRIPTION = """\
Migrate a whole database, chunk by chunk, each chunk one transaction.
Killed at any moment, nothing is lost; run the same command again to finish.

Keys, from the first that is given: --key-settings (JSON encryption
settings); --key-file (the KEK that encrypts) and --old-key-file (KEKs that
may decrypt); the environment: ENCRYPTION_ALGORITHM (mandatory,
aes256-gcm), NEW_ENCRYPTION_KEY and OLD_ENCRYPTION_KEY (base64 of 32 bytes,
may be empty; encrypt needs only the new key, rekey and rotate-kek both,
decrypt only the old one); the key settings of an encrypting storage in the
ZConfig file or zodburi URI.  Data keys live in --key-dir.
"""


ENV_NAMES = ('ENCRYPTION_ALGORITHM', 'NEW_ENCRYPTION_KEY',
             'OLD_ENCRYPTION_KEY')


def register(subparsers):
    parser = subparsers.add_parser(
        'migrate', help='encrypt, rekey, decrypt or scan a database',
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('mode', choices=migrate.MODES + ('rotate-kek',),
                        help='what to do')
    parser.add_argument('database', nargs='?',
                        help='a ZConfig file (a storage or <zodb> section, '
                             'a Zope zope.conf or a ZEO zeo.conf), a zodburi '
                             'URI or a FileStorage file (not for '
                             'rotate-kek)')
    parser.add_argument('--database', metavar='NAME', dest='db_name',
                        help='the database of a Zope configuration file '
                             '(a <zodb_db NAME> section; default main) or '
                             'the storage of a ZEO configuration file '
                             '(default: the only one)')
    parser.add_argument('--blob-dir',
                        help='the blob directory of a FileStorage file '
                             'given by path (blob files are migrated with '
                             'their records)')
    parser.add_argument('--level', choices=('storage', 'object'),
                        default='storage',
                        help='storage records (EncryptingStorage, default) '
                             'or object states (EncryptedPersistent)')
    parser.add_argument('--key-dir', help='the directory of wrapped data '
                                          'keys (created if missing)')
    parser.add_argument('--key-settings', metavar='FILE',
                        help='encryption settings (JSON): the current key '
                             'encrypts, the previous ones may decrypt')
    parser.add_argument('--key-file', help='file of the KEK that encrypts')
    parser.add_argument('--old-key-file', action='append', default=[],
                        help='file of a KEK that may decrypt (repeatable)')
    parser.add_argument('--new-dek', action='store_true',
                        help='rekey: create a new data key for the KEK '
                             'first (only on the first run)')
    parser.add_argument('--keas-kek',
                        help='import: the keas.kmi KEK file (key holder)')
    parser.add_argument('--keas-dek-dir',
                        help='import: the keas.kmi facility directory')
    parser.add_argument('--python-path', action='append', default=[],
                        metavar='DIR',
                        help='object level: where the classes of the '
                             'application are found (repeatable)')
    parser.add_argument('--chunk-size', type=int,
                        default=migrate.DEFAULT_CHUNK_SIZE,
                        help='records per transaction (default %(default)s)')
    parser.add_argument('--by-tenant', action='store_true',
                        help='scan: objects and bytes per tenant key '
                             '(what a shred of each would make '
                             'unreadable); needs --tenant-registry')
    parser.add_argument('--tenant-registry', metavar='DIR',
                        help='the tenant registry (docs/tenants.rst)')
    parser.add_argument('--dry-run', action='store_true',
                        help='classify and count, write nothing')
    parser.add_argument('--pack', action='store_true',
                        help='pack the storage at the end')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='one line per chunk')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar, even on a terminal')
    parser.set_defaults(func=run, extra_arguments=_database_after_options)


def _read_kek(path):
    from zodbkmi.keyholder import read_key_file
    from zodbkmi.kek import as_kek
    return as_kek(read_key_file(path))


def _keys_from_args(args):
    """Return ``(old_keks, new_kek)`` from key files or the environment."""
    mode = args.mode
    if args.key_settings:
        if args.key_file or args.old_key_file:
            raise InvalidKeyError('give --key-settings or key files, not '
                                  'both')
        from zodbkmi.sources import SettingsKeyHolder
        from zodbkmi.sources import load_settings
        holder = SettingsKeyHolder(load_settings(args.key_settings))
        if mode in (migrate.DECRYPT, migrate.SCAN):
            return holder.keys, None
        if mode == 'rotate-kek' and not holder.previous_keys:
            raise InvalidKeyError('rotate-kek needs previous keys in the '
                                  'key settings')
        return holder.previous_keys, holder.key
    if args.key_file or args.old_key_file:
        new = _read_kek(args.key_file) if args.key_file else None
        old = tuple(_read_kek(p) for p in args.old_key_file)
        if mode in (migrate.ENCRYPT, migrate.REKEY) and new is None:
            raise InvalidKeyError('%s needs --key-file (the KEK that '
                                  'encrypts)' % mode)
        if mode == 'rotate-kek' and (new is None or len(old) != 1):
            raise InvalidKeyError('rotate-kek needs --key-file (the new '
                                  'KEK) and one --old-key-file')
        return old, new
    if not any(os.environ.get(name, '').strip() for name in ENV_NAMES):
        # the keys of the database configuration (EncryptingStorage), or
        # none (scan, keas.kmi import to plaintext)
        return (), None
    old, new = migrate.keys_from_environ(mode)
    return ((old,) if old is not None else ()), new


def _facility(args, required=True):
    from zodbkmi.facility import KeyManagementFacility
    if not args.key_dir:
        if required:
            raise InvalidKeyError('--key-dir (the directory of data keys) '
                                  'is required')
        return None
    # the directory is made with its first key: a mistyped --key-dir
    # leaves nothing behind
    return KeyManagementFacility(args.key_dir)


def _provide_keys(facility, new, old):
    """Register the keys for EncryptedPersistent: a key holder with the new
    KEK (old ones as previous keys) and the facility."""
    import zope.component
    from zope.interface import implementer
    from zodbkmi.interfaces import IEncryptionService
    from zodbkmi.interfaces import IKeyHolder

    @implementer(IKeyHolder)
    class MigrationKeyHolder:
        key = new if new is not None else old[0]
        previous_keys = tuple(old)

        def __repr__(self):
            return '<MigrationKeyHolder>'
    zope.component.provideUtility(MigrationKeyHolder(), IKeyHolder)
    zope.component.provideUtility(facility, IEncryptionService)


def _database_after_options(args, extra):
    """``migrate encrypt --dry-run Data.fs``: argparse gives the database
    positional its (empty) value when it meets the mode, before the
    options; the database is then left over.  Take it; True when the
    leftovers were understood."""
    if args.database is None and len(extra) == 1 and \
            not extra[0].startswith('-'):
        args.database = extra[0]
        return True
    return False


def open_storage(spec, blob_dir=None, read_only=False, database=None):
    """Open the storage named by ``spec``: a zodburi URI, a ZConfig file
    (a storage section such as ``<filestorage>``, a ``<zodb>`` section
    as ``ZODB.config`` reads it, or a Zope or ZEO configuration file, of
    which ``database`` names the database: see
    :mod:`zodbkmi.cli.appconfig`) or the path of a FileStorage file (with
    its ``blob_dir``, if it has blobs; opened read-only when
    ``read_only``).  The mistakes users make (a file that is not a
    database, an unknown setting, a database a running application holds)
    raise one :class:`~zodbkmi.exceptions.ZodbKmiError` naming the
    database."""
    try:
        return _open_storage(spec, blob_dir, read_only, database)
    except ZodbKmiError:
        raise
    except Exception as e:
        raise ZodbKmiError('cannot open %s: %s' % (spec, _reason(e))) \
            from None


def _reason(error):
    """What was wrong, in one line, for the errors of opening a storage."""
    import zc.lockfile
    if isinstance(error, zc.lockfile.LockError):
        return ('it is locked by another process (stop the application, '
                'or migrate through a ZEO client or RelStorage)')
    try:
        from ZODB.FileStorage.FileStorage import FileStorageFormatError
    except ImportError:          # pragma: no cover
        FileStorageFormatError = ()
    if isinstance(error, FileStorageFormatError):
        return 'not a FileStorage file'
    text = ' '.join(str(error).split()) or type(error).__name__
    if type(error).__name__ == 'UnknownDatabaseKeywords':
        text = text.strip("'\"")
    return text


def _open_storage(spec, blob_dir, read_only, database):
    if '://' in spec:
        _no_database(database)
        _no_blob_dir(blob_dir)
        try:
            import zodburi
        except ImportError:
            raise ZodbKmiError('zodburi is not installed: give a ZConfig '
                               'file or a FileStorage path') from None
        factory, _ = zodburi.resolve_uri(spec)
        return factory()
    if not os.path.exists(spec):
        raise ZodbKmiError('no such database: %s' % spec)
    with open(spec, 'rb') as f:
        head = f.read(64).lstrip()
    config = head.startswith(b'<') or head.startswith(b'%')
    if config or _is_config_text(head):
        from zodbkmi.cli import appconfig
        try:
            top = appconfig.read(spec)
        except Exception:
            top = None      # ZODB.config says what is wrong below
        if top is not None and appconfig.kind(top) is not None:
            _no_blob_dir(blob_dir)
            return appconfig.open_storage(spec, top, database, read_only)
    _no_database(database)
    if config:
        _no_blob_dir(blob_dir)
        return _storage_from_config(spec)
    import ZODB.FileStorage
    with open(spec, 'rb') as f:
        magic = f.read(4)
    if magic and magic != ZODB.FileStorage.packed_version:
        # refused before FileStorage makes its .lock and .tmp files
        raise ZodbKmiError('cannot open %s: not a FileStorage file' % spec)
    return ZODB.FileStorage.FileStorage(spec, blob_dir=blob_dir,
                                        read_only=read_only)


def _storage_from_config(spec):
    """The storage of a ZConfig file: a storage section, or the storage of
    the (first) ``<zodb>`` section."""
    import ZConfig
    import ZODB.config
    with open(spec) as f:
        text = f.read()
    try:
        return ZODB.config.storageFromString(text)
    except ZConfig.ConfigurationSyntaxError as e:
        if "type='zodb'" not in str(e):
            raise
    schema = ZODB.config.getDbSchema()
    config, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    if not config.database:
        raise ZodbKmiError('cannot open %s: no <zodb> section' % spec)
    return config.database[0].config.storage.open()


def _check_keys(storage, facility, keys):
    """Raise DatabaseKeyError when the database has a sealed record that
    none of the keys given opens."""
    from zodbkmi.storage.keys import check_record
    from zodbkmi.storage.keys import first_sealed
    sealed = first_sealed(storage)
    if sealed is not None:
        check_record(facility, keys.decrypt_keys,
                     ((keys.new,) if keys.new is not None else ())
                     + tuple(keys.old), *sealed)


def _is_config_text(head):
    """Tell whether the first bytes of a file may be those of a ZConfig
    file that opens with a comment or a key (as a Zope or ZEO
    configuration file may), not those of a FileStorage file."""
    import ZODB.FileStorage
    if head.startswith(ZODB.FileStorage.packed_version):
        return False
    try:
        text = head.decode('ascii')
    except UnicodeDecodeError:
        return False
    return text[:1] == '#' or text.split(' ', 1)[0].isidentifier()


def _no_database(database):
    if database is not None:
        raise ZodbKmiError('--database goes with a Zope or ZEO '
                           'configuration file')


def _no_blob_dir(blob_dir):
    if blob_dir is not None:
        raise ZodbKmiError('--blob-dir goes with a FileStorage path; a '
                           'ZConfig file or URI names its blob directory '
                           'itself')


def run(args, stdout=None, stderr=None):
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    old, new = _keys_from_args(args)
    if args.mode == 'rotate-kek':
        facility = _facility(args)
        if new is None or not old:
            raise InvalidKeyError('rotate-kek needs the old and the new KEK')
        for previous in old:
            count = migrate.rotate_kek(facility, previous, new)
            print('rotate-kek: %d data keys rewrapped from KEK %s to KEK %s'
                  % (count, previous.key_id, new.key_id), file=stdout)
        return 0
    if not args.database:
        raise ZodbKmiError('%s needs a database' % args.mode)
    facility = _facility(args, required=bool(old or new))
    keys = migrate.MigrationKeys(facility, new, old)
    keas = None
    if args.keas_kek or args.keas_dek_dir:
        if not (args.keas_kek and args.keas_dek_dir):
            raise InvalidKeyError('import needs both --keas-kek and '
                                  '--keas-dek-dir')
        from zodbkmi.migrate import legacy as legacymod
        keas = legacymod.KeasKMIKeys.from_files(args.keas_kek,
                                                args.keas_dek_dir)
    for path in reversed(args.python_path):
        sys.path.insert(0, os.path.abspath(path))
    if args.by_tenant and (args.mode != migrate.SCAN
                           or not args.tenant_registry):
        raise InvalidKeyError('--by-tenant goes with scan and '
                              '--tenant-registry')
    writes = args.mode != migrate.SCAN and not args.dry_run
    storage = open_storage(args.database, args.blob_dir,
                           read_only=not writes, database=args.db_name)
    db = None
    try:
        if args.by_tenant:
            return _scan_by_tenant(args, storage, facility, stdout)
        wrapped = migrate.unwrap(storage)[1] is not None
        explicit = new is not None or bool(old)
        if args.level == 'storage' and not explicit and not wrapped and (
                args.mode in (migrate.ENCRYPT, migrate.REKEY) or
                (keas is None and args.mode == migrate.DECRYPT)):
            raise InvalidKeyError(
                '%s needs keys: set ENCRYPTION_ALGORITHM and the keys, give '
                '--key-settings or key files, or a ZConfig file with an '
                'encrypting storage' % args.mode)
        if args.level == 'storage' and explicit and not wrapped and \
                keys.can_decrypt:
            # a wrong key fails here, before a data key is created
            _check_keys(storage, facility, keys)
        if writes:
            print(migrate.BACKUP_WARNING, file=stderr)
        if args.new_dek and writes and args.mode == migrate.REKEY:
            dek_id = facility.rotate(new)
            print('rekey: new data key %s for KEK %s'
                  % (dek_id, new.key_id), file=stderr)
        progress = None
        if not args.no_progress:
            progress = Progress(len(storage), stderr, args.verbose)
        if args.level == 'object':
            import ZODB
            if new is not None or old:
                _provide_keys(facility, new, old)
            db = ZODB.DB(storage)
            transformer = migrate.ObjectTransformer(db, keys, keas)
            migration = migrate.Migration(
                storage, transformer, args.mode, chunk_size=args.chunk_size,
                dry_run=args.dry_run, progress=progress)
        else:
            legacy = None
            if keas is not None:
                from zodbkmi.migrate.legacy import EncryptingStorageReader
                legacy = EncryptingStorageReader(keas)
            migration = migrate.storage_migration(
                storage, args.mode, keys if explicit or not wrapped
                else None, legacy, chunk_size=args.chunk_size,
                dry_run=args.dry_run, progress=progress)
        report = migration.run()
        for line in report.format():
            print(line, file=stdout)
        if args.pack and writes:
            base = migrate.unwrap(storage)[0]
            migrate.pack(base)
            print('packed; destroy %s.old and every earlier copy'
                  % fsinternals.file_name(storage, 'the old file'),
                  file=stdout)
            blob_dir = getattr(base, 'blob_dir', None)
            if blob_dir and os.path.isdir(blob_dir + '.old'):
                # FileStorage's pack hard-links every current blob file
                # into blobs.old beside the revisions it dropped:
                # shredding them all would destroy the current blobs
                print('and the dropped blob revisions: the files of %s.old '
                      'with one link only (the others are current blobs)'
                      % blob_dir, file=stdout)
    finally:
        if db is not None:
            db.close()
        else:
            storage.close()
    if report.failed:
        print('zodbkmi migrate: %d records could not be read; they were '
              'left as they are' % report.failed, file=stderr)
        return 1
    return 0


def _scan_by_tenant(args, storage, facility, stdout):
    """``migrate scan --by-tenant``: one line per tenant key."""
    from zodbkmi.tenants import TenantRegistry
    from zodbkmi.tenants import scan_by_tenant
    registry = TenantRegistry(args.tenant_registry, create=False)
    rows = scan_by_tenant(storage, registry, facility)
    print('%-24s %-9s %9s %12s %9s' % ('tenant', 'state', 'objects',
                                       'bytes', 'shredded'), file=stdout)
    for name in sorted(rows):
        row = rows[name]
        print('%-24s %-9s %9d %12d %9d' % (
            name, row['state'] or '-', row['objects'], row['bytes'],
            row['shredded']), file=stdout)
    return 0
