"""ZConfig factories of the storage wrappers (``%import zodbkmi``)."""
import os

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


def open_keys(key_file, key_dir, previous_key_files=(), mode='strict'):
    """Return ``(facility, key, previous_keys)`` for the key settings.

    Nothing is created: the key directory is made with its first key, and
    the storage creates the active data key when it is opened, if its
    ``create_key`` says so (see :mod:`zodbkmi.storage.keys`).  ``mode`` is
    accepted for compatibility and ignored.
    """
    key = read_key_file(key_file)
    previous = tuple(read_key_file(p) for p in previous_key_files or ())
    facility = KeyManagementFacility(os.path.abspath(key_dir))
    return facility, key, previous


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

    def open(self):
        c = self.config
        facility, key, previous = open_keys(
            c.key_file, c.key_dir, c.previous_key_files, c.mode)
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
URI_PARAMETERS = ('key_file', 'key_dir', 'previous_key_file', 'mode',
                  'plaintext_dir', 'migrate_since', 'create_key',
                  'blob_cache_size', 'blob_cache_dir')


def uri_resolver(uri):
    """zodburi resolver of ``zodbkmi+<scheme>://...``.

    The URI is the URI of the storage to wrap with ``zodbkmi+`` in front
    and the key settings in its query: ``key_file`` and ``key_dir``
    (required), ``previous_key_file`` (repeatable), ``mode``,
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
    for name in ('key_file', 'key_dir'):
        if not ours.get(name):
            raise ValueError('zodbkmi URI without %s' % name)
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
        facility, key, prev = open_keys(ours['key_file'], ours['key_dir'],
                                        previous, wanted)
        return _wrap(EncryptingStorage, base_factory(), facility, key,
                     prev, mode=wanted, plaintext_dir=plaintext_dir,
                     migrate_since=since, create_key=creates, **cache)
    return factory, dbkw
