"""AES-256 master keys from local sources: raw base64, a file, the environment.

Each gives a :class:`MasterKey`: an AES-256-GCM key encrypting key with a
key id and a *key check value* (an HMAC of the algorithm under the key), so
a wrong key is detected before any data is touched.
"""
import base64
import binascii
import hashlib
import hmac
import os

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.fileutil import read_secret_file
from zodbkmi.kek import AES_KEY_SIZE
from zodbkmi.kek import AESKeyEncryptingKey

CHECK_VALUE_LABEL = b'zodbkmi/key-check/v1'


def key_check_value(key, algorithm='aes256-gcm'):
    """The key check value of ``key``: 32 hex digits of
    HMAC-SHA256(key, "zodbkmi/key-check/v1" || 0x00 || algorithm).

    It tells whether two keys are the same without revealing either.
    """
    msg = CHECK_VALUE_LABEL + b'\0' + algorithm.encode('ascii')
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]


def decode_key(text, source):
    """Decode a base64 AES-256 key strictly: canonical base64 of exactly 32
    bytes.  ``source`` names where it came from, for the error message."""
    if isinstance(text, bytes):
        try:
            text = text.decode('ascii')
        except UnicodeDecodeError:
            raise InvalidKeyError('%s: the key is not base64' % source) \
                from None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError('%s: the key is not base64' % source) from None
    if len(key) != AES_KEY_SIZE:
        raise InvalidKeyError('%s: an AES-256 key has %d bytes, not %d'
                              % (source, AES_KEY_SIZE, len(key)))
    if base64.b64encode(key).decode('ascii') != text:
        raise InvalidKeyError('%s: the key is not canonical base64' % source)
    return key


def encode_key(key):
    """Return ``key`` (32 bytes) as the base64 text the sources read."""
    if not isinstance(key, bytes) or len(key) != AES_KEY_SIZE:
        raise InvalidKeyError('an AES-256 key has %d bytes' % AES_KEY_SIZE)
    return base64.b64encode(key).decode('ascii')


class MasterKey(AESKeyEncryptingKey):
    """An AES-256 master key from a key source.

    ``source`` describes where it came from (``raw``, ``file /path``, ``env
    NAME``, ``vaultKV https://...``), ``version`` is the source's version of
    the key (Vault KV) or None, ``check_value`` its key check value.  When
    ``expected_check_value`` is given and differs,
    :class:`~zodbkmi.exceptions.InvalidKeyError` is raised at once.
    """

    def __init__(self, key, key_id=None, source='raw',
                 algorithm='aes256-gcm', version=None,
                 expected_check_value=None):
        super().__init__(key, key_id)
        self.source = source
        self.algorithm = algorithm
        self.version = version
        self.check_value = key_check_value(key, algorithm)
        if (expected_check_value is not None
                and not hmac.compare_digest(
                    expected_check_value.lower().encode('ascii', 'replace'),
                    self.check_value.encode('ascii'))):
            raise InvalidKeyError(
                '%s: the key does not match its key check value (expected '
                '%s, the key gives %s): wrong key'
                % (source, expected_check_value[:32], self.check_value))


def raw_key(params, algorithm='aes256-gcm'):
    """The master key given as base64 in ``params['key']``."""
    key = decode_key(params['key'], 'key source raw')
    return MasterKey(key, params.get('keyId'), 'raw', algorithm,
                     expected_check_value=params.get('checkValue'))


def file_key(params, algorithm='aes256-gcm'):
    """The master key in the file ``params['path']`` (base64, mode 0600),
    read by :func:`zodbkmi.fileutil.read_secret_file`."""
    path = params['path']
    source = 'key source file %s' % path
    key = decode_key(read_secret_file(path, 'key').strip(), source)
    return MasterKey(key, params.get('keyId'), 'file %s' % path, algorithm,
                     expected_check_value=params.get('checkValue'))


def env_key(params, algorithm='aes256-gcm', environ=None):
    """The master key in the environment variable ``params['variable']``."""
    environ = os.environ if environ is None else environ
    name = params['variable']
    value = environ.get(name)
    if value is None:
        raise KeySourceError('key source env: variable %s is not set' % name,
                             name)
    key = decode_key(value.strip(), 'key source env %s' % name)
    return MasterKey(key, params.get('keyId'), 'env %s' % name, algorithm,
                     expected_check_value=params.get('checkValue'))
