"""Key holders: the application's key encrypting key, read from a file.

A key file holds either the PEM of an RSA private key (what
``facility.generate()`` returns) or one line of base64 encoding a 32 byte
AES-256 master key.  It must not be readable by group or others.
"""
import base64
import binascii
import os
import stat

from zope.interface import implementer

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.kek import PEM_PREFIX
from zodbkmi.kek import as_kek
from zodbkmi.vault import write_atomic


def read_key_file(path):
    """Return the KEK stored in ``path`` (PEM bytes or 32 AES bytes).

    Raises :class:`KeyStoreError` when the file cannot be read or others can
    read it, :class:`InvalidKeyError` when it holds no key.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise KeyStoreError('cannot read key file %s: %s'
                            % (path, e.strerror)) from None
    with os.fdopen(fd, 'rb') as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyStoreError(
                'key file %s is accessible by group or others (mode %04o); '
                'run: chmod 600 %s' % (path, stat.S_IMODE(mode), path))
        data = f.read(1 << 20)
    if data.lstrip().startswith(PEM_PREFIX):
        key = data
    else:
        try:
            key = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKeyError('key file %s holds neither a PEM key nor a '
                                  'base64 AES-256 key' % path) from None
    as_kek(key)  # validates
    return key


def write_key_file(path, key):
    """Store ``key`` (PEM bytes or 32 AES bytes) in ``path``, atomically,
    mode 0600.  Raises :class:`InvalidKeyError` (writing nothing) when
    ``key`` is not a key encrypting key."""
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
