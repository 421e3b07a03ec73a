"""Key holders: the application's key encrypting key, read from a file.

A key file holds either the PEM of an RSA private key (what
``facility.generate()`` returns) or one line of base64 encoding a 32 byte
AES-256 master key.  Group and others must have no access to it: key
files are read by :func:`zodbkmi.fileutil.read_secret_file`, the one
reader of every key, PIN, token and password file in zodbkmi.
"""
import base64
import binascii

from zope.interface import implementer

from zodbkmi.exceptions import InvalidKeyError
# the secret file reader lived here: kept importable from here
from zodbkmi.fileutil import MAX_SECRET_FILE  # noqa: F401
from zodbkmi.fileutil import read_secret_file
from zodbkmi.fileutil import read_secret_text  # noqa: F401
from zodbkmi.fileutil import write_atomic
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.kek import PEM_PREFIX
from zodbkmi.kek import as_kek


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

    Reads through :func:`zodbkmi.fileutil.read_secret_file`: raises
    :class:`~zodbkmi.exceptions.SecretFileError` (a
    :class:`~zodbkmi.exceptions.KeyStoreError`) when the file cannot be read
    or group or others can access it,
    :class:`~zodbkmi.exceptions.InvalidKeyError` when it holds no key.
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
