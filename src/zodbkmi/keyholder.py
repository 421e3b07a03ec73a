"""Key holders: the application's key encrypting key, read from a file.

A key file holds either the PEM of an RSA private key (what
``facility.generate()`` returns) or one line of base64 encoding a 32 byte
AES-256 master key.  Group and others must have no access to it.
:func:`read_secret_file` is the one reader of every key, PIN, token and
password file in zodbkmi.
"""
import base64
import binascii
import os
import stat

from zope.interface import implementer

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import SecretFileError
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.kek import PEM_PREFIX
from zodbkmi.kek import as_kek
from zodbkmi.vault import write_atomic


#: The largest key, PIN, token or password file read (bytes).
MAX_SECRET_FILE = 1 << 20


def read_secret_file(path, role='key'):
    """Return the bytes of the secret file ``path``: a key, PIN, token or
    password file (``role`` says which, for the messages).

    This is the one reader of such files in zodbkmi.  It refuses, with
    :class:`~zodbkmi.exceptions.SecretFileError` (a ``KeyStoreError`` and a
    ``KeySourceError``) naming the file, its role and its mode, a file that
    cannot be read, one larger than 1 MiB, and one that group or others
    can access in any way (any bit of ``0o077``: readable leaks the
    secret, writable lets another user plant one); the message gives the
    ``chmod`` that fixes it.  The mode is checked on the open file, so a
    file swapped after the check is not read.  The content is never
    shown.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
    except OSError as e:
        raise SecretFileError('%s file %s cannot be read: %s'
                              % (role, path, e.strerror), path) from None
    with os.fdopen(fd, 'rb') as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                '%s file %s is accessible by group or others (mode %04o); '
                'run: chmod 600 %s'
                % (role, path, stat.S_IMODE(mode), path), path)
        try:
            data = f.read(MAX_SECRET_FILE + 1)
        except OSError as e:
            raise SecretFileError('%s file %s cannot be read: %s'
                                  % (role, path, e.strerror), path) from None
    if len(data) > MAX_SECRET_FILE:
        raise SecretFileError('%s file %s is larger than %d bytes: not a %s '
                              'file' % (role, path, MAX_SECRET_FILE, role),
                              path)
    return data


def read_secret_text(path, role='token', encoding='ascii'):
    """Return the text of the secret file ``path`` (a token, a PIN, a
    password), stripped, read by :func:`read_secret_file`.  Text that is
    not ``encoding``, and an empty file, raise
    :class:`~zodbkmi.exceptions.SecretFileError`: a secret is never changed
    by a lossy decoding."""
    data = read_secret_file(path, role).strip()
    if not data:
        raise SecretFileError('%s file %s is empty' % (role, path), path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise SecretFileError('%s file %s does not hold %s text'
                              % (role, path, encoding.upper()), path) \
            from None


def parse_key_file(data, path):
    """Return the KEK in ``data``, the content of the key file ``path``: PEM
    bytes as they are, or the 32 bytes of one base64 line.  Raises
    :class:`~zodbkmi.exceptions.InvalidKeyError` (naming ``path``, never the
    content)."""
    if data.lstrip().startswith(PEM_PREFIX):
        key = data
    else:
        try:
            key = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKeyError('key file %s holds neither a PEM key nor a '
                                  'base64 AES-256 key' % path) from None
    try:
        as_kek(key)  # validates
    except InvalidKeyError as e:
        raise InvalidKeyError('key file %s: %s' % (path, e)) from None
    return key


def read_key_file(path):
    """Return the KEK stored in ``path`` (PEM bytes or 32 AES bytes).

    Reads through :func:`read_secret_file`: raises
    :class:`~zodbkmi.exceptions.SecretFileError` (a
    :class:`~zodbkmi.exceptions.KeyStoreError`) when the file cannot be read or
    group or others can access it, :class:`~zodbkmi.exceptions.InvalidKeyError`
    when it holds no key.
    """
    return parse_key_file(read_secret_file(path, 'key'), path)


def write_key_file(path, key):
    """Store ``key`` (PEM bytes or 32 AES bytes) in ``path``, atomically, mode
    0600.  Raises :class:`~zodbkmi.exceptions.InvalidKeyError` (writing
    nothing) when ``key`` is not a key encrypting key."""
    as_kek(key)  # validates
    if not key.lstrip().startswith(PEM_PREFIX):
        key = base64.b64encode(key) + b'\n'
    write_atomic(path, key, 0o600)


@implementer(IKeyHolder)
class KeyHolder:
    """The KEK read from ``filename``; ``previous`` names older key files
    kept for decryption after a KEK rotation."""

    def __init__(self, filename, previous=()):
        self.filename = filename
        self.key = read_key_file(filename)
        self.previous_keys = tuple(read_key_file(p) for p in previous)
        self.key_id = as_kek(self.key).key_id

    def __repr__(self):
        return '<%s %s (KEK %s)>' % (type(self).__name__, self.filename,
                                      self.key_id)
