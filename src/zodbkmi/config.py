"""ZConfig factories of the storage wrappers (``%import zodbkmi``)."""
import os

from zodbkmi.exceptions import SettingsError
from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.keyholder import read_key_file
from zodbkmi.storage import MODES
from zodbkmi.storage import EncryptingStorage
from zodbkmi.storage import ServerEncryptingStorage
from zodbkmi.storage import parse_migrate_since
from zodbkmi.storage.keys import AUTO
from zodbkmi.storage.keys import parse_create_key


def mode(value):
    """ZConfig datatype of the ``mode`` key."""
    value = value.strip().lower()
    if value not in MODES:
        raise ValueError('mode must be one of %s, not %r'
                         % (', '.join(MODES), value))
    return value


def migrate_since(value):
    """ZConfig datatype of the ``migrate-since`` key: a transaction id (16
    hex digits) or ``unchecked``."""
    parse_migrate_since(value)      # ValueError for anything else
    return value.strip()


def create_key(value):
    """ZConfig datatype of the ``create-key`` key: ``auto``, ``true`` or
    ``false``."""
    return parse_create_key(value)


def key_server_policy(value):
    """ZConfig datatype of the ``key-server-policy`` key."""
    from zodbkmi.client import POLICIES
    value = value.strip().lower()
    if value not in POLICIES:
        raise ValueError('key-server-policy must be %s, not %r'
                         % (' or '.join(POLICIES), value))
    return value


#: The key server options of a storage: (ZConfig attribute and zodburi
#: parameter, keyword of LocalKeyManagementFacility).
KEY_SERVER_OPTIONS = (
    ('key_server', 'url'),
    ('key_server_token_file', 'token_file'),
    ('key_server_ca_file', 'ca_file'),
    ('key_server_client_cert', 'client_cert'),
    ('key_server_client_key', 'client_key'),
    ('key_server_policy', 'policy'),
    ('key_server_grace', 'grace'),
)


def key_store_options(key_dir, server, names=('key-dir', 'key-server')):
    """Check where the wrapped data keys of a storage live: the directory
    ``key_dir`` or the key server of ``server`` (a dict of the
    ``key_server*`` options, see :data:`KEY_SERVER_OPTIONS`), exactly one.
    Returns ``server``'s keywords for
    :class:`~zodbkmi.client.LocalKeyManagementFacility` (None with
    ``key_dir``).  Raises :class:`~zodbkmi.exceptions.SettingsError`."""
    dir_name, server_name = names
    url = server.get('key_server')
    given = sorted(name for name, value in server.items()
                   if name not in ('key_server', 'key_server_policy',
                                   'key_server_grace')
                   and value is not None)
    if key_dir is not None and url is not None:
        raise SettingsError('give %s or %s, not both'
                            % (dir_name, server_name))
    if key_dir is None and url is None:
        raise SettingsError('give %s (a directory of wrapped data keys) or '
                            '%s (a key server)' % (dir_name, server_name))
    if url is None:
        if given:
            # the option's name as the configuration spells it
            sep = '-' if '-' in server_name else '_'
            raise SettingsError('%s goes with %s' % (
                given[0].replace('_', sep), server_name))
        return None
    keywords = {kw: server.get(name) for name, kw in KEY_SERVER_OPTIONS
                if server.get(name) is not None}
    # the URLs, the policy and the grace period are checked now
    from zodbkmi.client import POLICIES
    from zodbkmi.client import check_url
    from zodbkmi.client import split_urls
    for u in split_urls(url):
        check_url(u)
    if keywords.get('policy', 'prefer') not in POLICIES:
        raise SettingsError('%s-policy must be %s, not %r' % (
            server_name, ' or '.join(POLICIES), keywords['policy']))
    from zodbkmi.cache import MAX_GRACE
    grace = keywords.get('grace', 0)
    if not 0 <= grace <= MAX_GRACE:
        raise SettingsError('%s-grace must be 0 to %d seconds, not %r'
                            % (server_name, MAX_GRACE, grace))
    return keywords


def key_options(key_file, key_settings, previous_key_files=(),
                names=('key-file', 'key-settings', 'previous-key-file')):
    """Check the key options of a storage and read its settings file.

    Exactly one of ``key_file`` (a local KEK) and ``key_settings`` (the
    path of a JSON file of encryption settings, see
    :mod:`zodbkmi.sources.settings`) is given; previous key files go with
    ``key_file`` only (the settings list their own previous keys).
    Returns the :class:`~zodbkmi.sources.settings.EncryptionSettings` of
    ``key_settings``, read and checked now (None for ``key_file``); the
    keys are fetched by :func:`open_keys`.  ``names`` are the option names
    of the messages.  Raises :class:`~zodbkmi.exceptions.SettingsError`
    (a ``ValueError``), one line naming the option and the file.
    """
    from zodbkmi.sources import load_settings
    file_name, settings_name, previous_name = names
    if key_file is not None and key_settings is not None:
        raise SettingsError('give %s or %s, not both'
                            % (file_name, settings_name))
    if key_file is None and key_settings is None:
        raise SettingsError('give %s (a local key encrypting key) or %s '
                            '(encryption settings, e.g. OpenBao Transit)'
                            % (file_name, settings_name))
    if key_settings is None:
        return None
    if previous_key_files:
        raise SettingsError('%s goes with %s: list the previous keys in the '
                            '"previous" of %s %s' % (previous_name, file_name,
                                                     settings_name,
                                                     key_settings))
    try:
        settings = load_settings(key_settings)
    except SettingsError as e:
        raise SettingsError('%s: %s' % (settings_name, e)) from None
    if not settings.enabled:
        raise SettingsError(
            '%s: %s says "enabled": false; an encrypting storage needs a key '
            '(to read the database in clear, decrypt it with "zodbkmi '
            'migrate decrypt")' % (settings_name, key_settings))
    return settings


def open_keys(key_file, key_dir, previous_key_files=(), mode='strict',
              settings=None, settings_file=None, server=None):
    """Return ``(facility, key, previous_keys)`` for the key settings: the
    KEK in ``key_file`` (with ``previous_key_files``), or else the keys of
    the encryption ``settings`` (see :func:`key_options`), fetched from
    their key sources by :class:`~zodbkmi.sources.SettingsKeyHolder`;
    ``settings_file`` names them in the messages.

    Nothing is created: the key directory is made with its first key, and
    the storage creates the active data key when it is opened, if its
    ``create_key`` says so (see :mod:`zodbkmi.storage.keys`).  ``mode`` is
    accepted for compatibility and ignored.  With ``server`` (the keywords
    :func:`key_store_options` returns) the wrapped data keys are on a key
    server, not in ``key_dir``.
    """
    if settings is not None:
        key, previous = _settings_keys(settings, settings_file)
    else:
        key = read_key_file(key_file)
        previous = tuple(read_key_file(p) for p in previous_key_files or ())
    if server is not None:
        from zodbkmi.client import LocalKeyManagementFacility
        facility = LocalKeyManagementFacility(**server)
    else:
        facility = KeyManagementFacility(os.path.abspath(key_dir))
    return facility, key, previous


def _settings_keys(settings, path):
    """The current and previous KEKs of ``settings``; an error of their key
    sources (server down, token refused, no such key, wrong key) is raised
    again, with the same class, naming the settings file."""
    from zodbkmi.sources import SettingsKeyHolder
    try:
        holder = SettingsKeyHolder(settings)
    except ZodbKmiError as e:
        raise _error_like(e, 'key-settings %s: cannot get the keys: %s'
                          % (path or '(given)', e)) from None
    return holder.key, holder.previous_keys


def _error_like(error, message):
    """A new error of the class of ``error`` with ``message`` (classes
    whose constructor takes more than the message: a ZodbKmiError)."""
    try:
        return type(error)(message)
    except TypeError:      # pragma: no cover
        return ZodbKmiError(message)


def _wrap(factory, base, *args, **kw):
    """``factory(base, ...)``; the base storage is closed when that fails
    (for example with DatabaseKeyError)."""
    try:
        return factory(base, *args, **kw)
    except BaseException:
        base.close()
        raise


class EncryptingStorageFactory:
    """Opens an ``<encryptingstorage>`` section."""

    _factory = EncryptingStorage

    def __init__(self, config):
        self.config = config
        self.name = config.getSectionName()
        # the settings file is read and checked with the configuration
        # (ValueError: ZConfig's DataConversionError); the keys are fetched
        # when the storage is opened
        self.settings = key_options(config.key_file, config.key_settings,
                                    config.previous_key_files)
        self.server = key_store_options(config.key_dir, {
            name: getattr(config, name) for name, _ in KEY_SERVER_OPTIONS})

    def open(self):
        c = self.config
        facility, key, previous = open_keys(
            c.key_file, c.key_dir, c.previous_key_files, c.mode,
            self.settings, c.key_settings, self.server)
        return _wrap(self._factory, c.base.open(), facility, key, previous,
                     mode=c.mode, plaintext_dir=c.plaintext_dir,
                     migrate_since=c.migrate_since,
                     create_key=c.create_key,
                     **blob_cache_settings(c.blob_cache_size,
                                           c.blob_cache_dir))


def blob_cache_settings(size, directory):
    """The keywords of the blob cache settings given (unset: the
    defaults)."""
    kw = {}
    if size is not None:
        kw['blob_cache_size'] = size
    if directory is not None:
        kw['blob_cache_dir'] = directory
    return kw


class ServerEncryptingStorageFactory(EncryptingStorageFactory):
    """Opens a ``<serverencryptingstorage>`` section."""

    _factory = ServerEncryptingStorage


#: Query parameters of the zodburi scheme that belong to zodbkmi.
URI_PARAMETERS = ('key_file', 'key_settings', 'key_dir',
                  'previous_key_file', 'mode',
                  'plaintext_dir', 'migrate_since', 'create_key',
                  'blob_cache_size', 'blob_cache_dir') + tuple(
                      name for name, _ in KEY_SERVER_OPTIONS)


def uri_resolver(uri):
    """zodburi resolver of ``zodbkmi+<scheme>://...``.

    The URI is the URI of the storage to wrap with ``zodbkmi+`` in front
    and the key settings in its query: ``key_file`` (a local KEK) or
    ``key_settings`` (a JSON file of encryption settings, e.g. OpenBao
    Transit: read and checked now, the keys fetched when the storage is
    opened), ``key_dir`` or ``key_server`` (URLs separated by commas, with
    ``key_server_token_file``, ``key_server_ca_file``,
    ``key_server_client_cert``, ``key_server_client_key``,
    ``key_server_policy`` and ``key_server_grace`` as in ZConfig),
    ``previous_key_file`` (repeatable,
    with ``key_file``), ``mode``,
    ``plaintext_dir``, ``migrate_since``, ``create_key`` (``auto``,
    the default, ``true`` or ``false``), ``blob_cache_size`` (bytes, 0:
    off) and ``blob_cache_dir``.  Returns
    ``(factory, dbkw)`` as zodburi resolvers do.
    """
    import urllib.parse

    import zodburi

    scheme, sep, rest = uri.partition(':')
    if not scheme.startswith('zodbkmi+') or not sep:
        raise ValueError('not a zodbkmi URI: %r' % uri)
    inner_scheme = scheme[len('zodbkmi+'):]
    path, _, query = rest.partition('?')
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    ours = {}
    previous = []
    others = []
    for name, value in pairs:
        if name == 'previous_key_file':
            previous.append(value)
        elif name in URI_PARAMETERS:
            ours[name] = value
        else:
            others.append((name, value))
    server = {name: ours.get(name) or None
              for name, _ in KEY_SERVER_OPTIONS}
    try:
        server['key_server_policy'] = key_server_policy(
            server['key_server_policy'] or 'prefer')
        try:
            server['key_server_grace'] = int(
                server['key_server_grace'] or 0)
        except ValueError:
            raise SettingsError('key_server_grace %r is not a number of '
                                'seconds' % ours['key_server_grace']) from None
        settings = key_options(
            ours.get('key_file') or None, ours.get('key_settings') or None,
            previous, ('key_file', 'key_settings', 'previous_key_file'))
        server = key_store_options(ours.get('key_dir') or None, server,
                                   ('key_dir', 'key_server'))
    except (SettingsError, ValueError) as e:
        raise ValueError('zodbkmi URI: %s' % e) from None
    wanted = mode(ours.get('mode', 'strict'))
    plaintext_dir = ours.get('plaintext_dir') or None
    since = ours.get('migrate_since') or None
    creates = parse_create_key(ours.get('create_key') or AUTO)
    if since is not None:
        migrate_since(since)
    if plaintext_dir is not None and not os.path.isdir(plaintext_dir):
        raise ValueError('zodbkmi URI: plaintext_dir %r is not a directory'
                         % plaintext_dir)
    cache_size = ours.get('blob_cache_size') or None
    if cache_size is not None:
        try:
            cache_size = int(cache_size)
        except ValueError:
            raise ValueError('zodbkmi URI: blob_cache_size %r is not a '
                             'number of bytes' % cache_size) from None
    cache = blob_cache_settings(cache_size,
                                ours.get('blob_cache_dir') or None)
    inner = inner_scheme + ':' + path
    if others:
        inner += '?' + urllib.parse.urlencode(others)
    # the raw keywords: zodburi interprets them once, for the outer URI
    base_factory, dbkw = zodburi._get_uri_factory_and_dbkw(inner)

    def factory():
        facility, key, prev = open_keys(
            ours.get('key_file'), ours.get('key_dir'), previous, wanted,
            settings, ours.get('key_settings'), server)
        return _wrap(EncryptingStorage, base_factory(), facility, key,
                     prev, mode=wanted, plaintext_dir=plaintext_dir,
                     migrate_since=since, create_key=creates, **cache)
    return factory, dbkw
