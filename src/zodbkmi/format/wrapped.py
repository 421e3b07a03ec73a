"""The wrapped-DEK format: a data key sealed by a key encrypting key.

Layout, version 1 (specified in ``docs/format.rst``)::

    offset  size  field
    0       3     magic   b"zkw"
    3       1     version 0x01
    4       1     suite   the KEK's wrapping suite (see SUITES)
    5       16    DEK id
    21      1     n = length of the KEK id (1..255)
    22      n     KEK id, ASCII
    22+n    ...   the KEK's wrapping of the 32 byte DEK

    aad = bytes 0..22+n-1 (the whole header)

The header is the associated data of the wrapping (the OAEP label for RSA,
the GCM associated data for AES), so a wrapped DEK cannot be moved to
another DEK id or presented as the work of another KEK.
"""
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.exceptions import UnsupportedFormatError
from zodbkmi.exceptions import WrongKeyError

MAGIC = b'zkw'
VERSION = 1
DEK_SIZE = 32
DEK_ID_SIZE = 16

SUITE_RSA_OAEP_SHA256 = 1
SUITE_AES256_GCM = 2
SUITE_VAULT_TRANSIT = 3
SUITE_PKCS11_AES_GCM = 4
SUITES = {
    SUITE_RSA_OAEP_SHA256: 'RSA-OAEP-SHA256',
    SUITE_AES256_GCM: 'AES-256-GCM',
    SUITE_VAULT_TRANSIT: 'Vault/OpenBao Transit',
    SUITE_PKCS11_AES_GCM: 'PKCS#11 AES-GCM',
}


class WrappedKey:
    """A parsed wrapped DEK: ``suite``, ``dek_id``, ``kek_id``, ``header``
    (the associated data) and ``blob`` (the KEK's output)."""

    __slots__ = ('suite', 'dek_id', 'kek_id', 'header', 'blob')

    def __init__(self, suite, dek_id, kek_id, header, blob):
        self.suite = suite
        self.dek_id = dek_id
        self.kek_id = kek_id
        self.header = header
        self.blob = blob

    def __repr__(self):
        return '<WrappedKey DEK %s by KEK %s (%s)>' % (
            self.dek_id.hex(), self.kek_id, SUITES[self.suite])


def build_header(suite, dek_id, kek_id):
    """Return the header (and associated data) of a wrapped DEK."""
    if suite not in SUITES:
        raise ValueError('unknown wrapping suite %r' % (suite,))
    if not isinstance(dek_id, bytes) or len(dek_id) != DEK_ID_SIZE:
        raise ValueError('a DEK id has %d bytes' % DEK_ID_SIZE)
    raw = kek_id.encode('ascii')
    if not 0 < len(raw) < 256:
        raise ValueError('a KEK id has 1 to 255 ASCII characters')
    return MAGIC + bytes([VERSION, suite]) + dek_id + bytes([len(raw)]) + raw


def wrap(kek, dek_id, dek):
    """Wrap ``dek`` under ``kek`` (an IKeyEncryptingKey); return bytes."""
    if not isinstance(dek, bytes) or len(dek) != DEK_SIZE:
        raise ValueError('a data encrypting key has %d bytes' % DEK_SIZE)
    header = build_header(kek.suite, dek_id, kek.key_id)
    return header + kek.wrap(dek, header)


def parse(data):
    """Parse a wrapped DEK; validates the header only.

    Checks, in this order: the type, the magic, the version, the suite, the
    header length, the KEK id length, that a wrapping follows, and that the
    KEK id is ASCII.  Raises :class:`UnsupportedFormatError` for a bad magic,
    version, suite or KEK id and :class:`TruncatedDataError` for data ending
    inside the magic or the header or with an empty wrapping.
    """
    if not isinstance(data, bytes):
        raise TypeError('a wrapped DEK is bytes, not %s' % type(data).__name__)
    if data[:3] != MAGIC:
        if len(data) < 3 and MAGIC.startswith(data):
            raise TruncatedDataError('wrapped DEK truncated inside its magic')
        raise UnsupportedFormatError('not a zodbkmi wrapped DEK (bad magic)')
    # the version and the suite are checked as soon as they are present:
    # another version may have a shorter header
    if len(data) > 3 and data[3] != VERSION:
        raise UnsupportedFormatError(
            'unsupported wrapped DEK version %d (this zodbkmi reads version '
            '%d)' % (data[3], VERSION))
    if len(data) > 4 and data[4] not in SUITES:
        raise UnsupportedFormatError('unknown wrapping suite %d' % data[4])
    if len(data) < 22:
        raise TruncatedDataError(
            'wrapped DEK truncated inside its header (%d bytes)' % len(data))
    suite = data[4]
    n = data[21]
    end = 22 + n
    if n == 0:
        raise UnsupportedFormatError('wrapped DEK has an empty KEK id')
    if len(data) <= end:
        raise TruncatedDataError('wrapped DEK truncated (%d bytes)'
                                 % len(data))
    try:
        kek_id = data[22:end].decode('ascii')
    except UnicodeDecodeError:
        raise UnsupportedFormatError('wrapped DEK KEK id is not ASCII') \
            from None
    return WrappedKey(suite, data[5:21], kek_id, data[:end], data[end:])


def unwrap(kek, data):
    """Return ``(dek_id, dek)`` from the wrapped DEK ``data``.

    Raises :class:`WrongKeyError` when ``data`` names another KEK (before
    any cryptographic work), the KEK's :class:`AuthenticationError` when it
    does not authenticate, and the errors of :func:`parse`.
    """
    wk = parse(data)
    if wk.kek_id != kek.key_id or wk.suite != kek.suite:
        raise WrongKeyError(
            'DEK %s is wrapped by KEK %s, not by KEK %s'
            % (wk.dek_id.hex(), wk.kek_id, kek.key_id))
    dek = kek.unwrap(wk.blob, wk.header)
    if len(dek) != DEK_SIZE:   # pragma: no cover (authenticated input)
        raise UnsupportedFormatError('unwrapped DEK has a wrong size')
    return wk.dek_id, dek
