"""The wrapped-DEK format: a data key sealed by a key encrypting key.

Version 2 (written since the review of 2026-12-04) proves who made it: its
header carries the creation time, and every suite's wrapping can only be
made with the KEK's secret (AES-GCM, Transit and PKCS#11 authenticate the
header with the KEK; an RSA wrapping adds an RSA-PSS signature by the
private key over the header and the OAEP ciphertext)::

    offset  size  field
    0       3     magic   b"zkw"
    3       1     version 0x02
    4       1     suite   the KEK's wrapping suite (see SUITES)
    5       16    DEK id
    21      8     created, ns since the epoch, unsigned big endian
    29      1     n = length of the KEK id (1..255)
    30      n     KEK id, ASCII
    30+n    ...   the KEK's wrapping of the 32 byte DEK; for suite 1 the
                  OAEP ciphertext followed by the RSA-PSS signature of
                  header || OAEP ciphertext (each as long as the modulus);
                  for suite 5 the HPKE ciphertext (1168 bytes) followed by
                  the HMAC-SHA256 (32 bytes) of header || HPKE ciphertext
                  under a key derived from the private key

Version 1, still read (anyone holding the public half of an RSA KEK can make
a version 1 suite 1 wrapping; self-contained streams use it)::

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
the GCM associated data for AES, the HPKE ``info`` for the hybrid suite 5),
so a wrapped DEK cannot be moved to
another DEK id or presented as the work of another KEK.
"""
import time

from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.exceptions import UnsupportedFormatError
from zodbkmi.exceptions import WrongKeyError

MAGIC = b'zkw'
VERSION_1 = 1
VERSION_2 = 2
VERSION = VERSION_2     # the version writers write
VERSIONS = (VERSION_1, VERSION_2)
DEK_SIZE = 32
DEK_ID_SIZE = 16

SUITE_RSA_OAEP_SHA256 = 1
SUITE_AES256_GCM = 2
SUITE_VAULT_TRANSIT = 3
SUITE_PKCS11_AES_GCM = 4
SUITE_HPKE_MLKEM768_X25519 = 5
SUITE_KMIP_AES_GCM = 6
SUITES = {
    SUITE_RSA_OAEP_SHA256: 'RSA-OAEP-SHA256',
    SUITE_AES256_GCM: 'AES-256-GCM',
    SUITE_VAULT_TRANSIT: 'Vault/OpenBao Transit',
    SUITE_PKCS11_AES_GCM: 'PKCS#11 AES-GCM',
    SUITE_HPKE_MLKEM768_X25519: 'HPKE ML-KEM-768+X25519',
    SUITE_KMIP_AES_GCM: 'KMIP AES-GCM',
}
# the suites whose wrapping needs only a public key: their version 2
# wrapping adds a proof made with the private key (a signature or a MAC)
PUBLIC_SUITES = (SUITE_RSA_OAEP_SHA256, SUITE_HPKE_MLKEM768_X25519)


_CREATED_SIZE = 8
_MAX_CREATED = 2 ** 64 - 1
# the offset of the KEK id length byte in each version
_KEK_ID_LENGTH_AT = {VERSION_1: 21, VERSION_2: 29}


class WrappedKey:
    """A parsed wrapped DEK: ``version``, ``suite``, ``dek_id``, ``kek_id``,
    ``created`` (ns since the epoch, authenticated; None in version 1),
    ``header`` (the associated data) and ``blob`` (the KEK's output)."""

    __slots__ = ('version', 'suite', 'dek_id', 'kek_id', 'created',
                 'header', 'blob')

    def __init__(self, suite, dek_id, kek_id, header, blob,
                 version=VERSION_1, created=None):
        self.version = version
        self.suite = suite
        self.dek_id = dek_id
        self.kek_id = kek_id
        self.created = created
        self.header = header
        self.blob = blob

    @property
    def proves_maker(self):
        """True when only the holder of the KEK's secret can have made this
        wrapped DEK: every version 2 wrapping, and version 1 wrappings of
        the suites that authenticate with a secret key (2, 3, 4).  A
        version 1 RSA or hybrid wrapping (suites 1 and 5) can be made by
        anyone holding the public key."""
        return self.version == VERSION_2 or self.suite not in PUBLIC_SUITES

    def __repr__(self):
        return '<WrappedKey v%d DEK %s by KEK %s (%s)>' % (
            self.version, self.dek_id.hex(), self.kek_id, SUITES[self.suite])


def build_header(suite, dek_id, kek_id, version=VERSION, created=None):
    """Return the header (and associated data) of a wrapped DEK.

    ``created`` (version 2 only; default now) is the creation time in
    nanoseconds since the epoch."""
    if suite not in SUITES:
        raise ValueError('unknown wrapping suite %r' % (suite,))
    if version not in VERSIONS:
        raise ValueError('unknown wrapped DEK version %r' % (version,))
    if not isinstance(dek_id, bytes) or len(dek_id) != DEK_ID_SIZE:
        raise ValueError('a DEK id has %d bytes' % DEK_ID_SIZE)
    raw = kek_id.encode('ascii')
    if not 0 < len(raw) < 256:
        raise ValueError('a KEK id has 1 to 255 ASCII characters')
    head = MAGIC + bytes([version, suite]) + dek_id
    if version == VERSION_2:
        if created is None:
            created = time.time_ns()
        if not isinstance(created, int) or not 0 <= created <= _MAX_CREATED:
            raise ValueError('created is a 64-bit count of nanoseconds')
        head += created.to_bytes(_CREATED_SIZE, 'big')
    elif created is not None:
        raise ValueError('a version 1 wrapped DEK has no creation time')
    return head + bytes([len(raw)]) + raw


def _signed(header):
    """Whether the wrapping of ``header`` carries a signature by the KEK."""
    return header[3] == VERSION_2 and header[4] in PUBLIC_SUITES


def wrap(kek, dek_id, dek, created=None, version=VERSION):
    """Wrap ``dek`` under ``kek`` (an IKeyEncryptingKey); return bytes.

    Version 2 (the default) needs the KEK's secret for every suite: the public
    half of an RSA KEK raises
    :class:`~zodbkmi.exceptions.InvalidKeyError`.  Version 1 is written only
    for self-contained streams (``encrypt-file --recipient``), where the public
    key is all the writer has."""
    if not isinstance(dek, bytes) or len(dek) != DEK_SIZE:
        raise ValueError('a data encrypting key has %d bytes' % DEK_SIZE)
    header = build_header(kek.suite, dek_id, kek.key_id, version, created)
    if _signed(header):
        return header + kek.wrap_signed(dek, header)
    return header + kek.wrap(dek, header)


def parse(data):
    """Parse a wrapped DEK; validates the header only.

    Checks, in this order: the type, the magic, the version, the suite, the
    header length, the KEK id length, that a wrapping follows, and that the KEK
    id is ASCII.  Raises :class:`~zodbkmi.exceptions.UnsupportedFormatError`
    for a bad magic, version, suite or KEK id and
    :class:`~zodbkmi.exceptions.TruncatedDataError` for data ending inside the
    magic or the header or with an empty wrapping.
    """
    if not isinstance(data, bytes):
        raise TypeError('a wrapped DEK is bytes, not %s' % type(data).__name__)
    if data[:3] != MAGIC:
        if len(data) < 3 and MAGIC.startswith(data):
            raise TruncatedDataError('wrapped DEK truncated inside its magic')
        raise UnsupportedFormatError('not a zodbkmi wrapped DEK (bad magic)')
    # the version and the suite are checked as soon as they are present:
    # versions have headers of different sizes
    if len(data) > 3 and data[3] not in VERSIONS:
        raise UnsupportedFormatError(
            'unsupported wrapped DEK version %d (this zodbkmi reads versions '
            '1 and 2)' % data[3])
    if len(data) > 4 and data[4] not in SUITES:
        raise UnsupportedFormatError('unknown wrapping suite %d' % data[4])
    at = _KEK_ID_LENGTH_AT[data[3]] if len(data) > 3 else 21
    if len(data) <= at:
        raise TruncatedDataError(
            'wrapped DEK truncated inside its header (%d bytes)' % len(data))
    version, suite = data[3], data[4]
    n = data[at]
    end = at + 1 + n
    if n == 0:
        raise UnsupportedFormatError('wrapped DEK has an empty KEK id')
    if len(data) <= end:
        raise TruncatedDataError('wrapped DEK truncated (%d bytes)'
                                 % len(data))
    try:
        kek_id = data[at + 1:end].decode('ascii')
    except UnicodeDecodeError:
        raise UnsupportedFormatError('wrapped DEK KEK id is not ASCII') \
            from None
    created = (int.from_bytes(data[21:29], 'big')
               if version == VERSION_2 else None)
    return WrappedKey(suite, data[5:21], kek_id, data[:end], data[end:],
                      version, created)


def unwrap(kek, data):
    """Return ``(dek_id, dek)`` from the wrapped DEK ``data``.

    Raises :class:`~zodbkmi.exceptions.WrongKeyError` when ``data`` names
    another KEK (before any cryptographic work), the KEK's
    :class:`~zodbkmi.exceptions.AuthenticationError` when it does not
    authenticate (for a version 2 RSA wrapping: when its signature does not
    verify, before the private key decrypts), and the errors of :func:`parse`.
    """
    wk = parse(data)
    if wk.kek_id != kek.key_id:
        raise WrongKeyError(
            'DEK %s is wrapped by KEK %s, not by KEK %s'
            % (wk.dek_id.hex(), wk.kek_id, kek.key_id))
    if wk.suite != kek.suite:
        raise WrongKeyError(
            'DEK %s names KEK %s with wrapping suite %d (%s), but that KEK '
            'wraps with suite %d' % (wk.dek_id.hex(), wk.kek_id, wk.suite,
                                     SUITES.get(wk.suite, 'unknown'),
                                     kek.suite))
    if _signed(wk.header):
        dek = kek.unwrap_signed(wk.blob, wk.header)
    else:
        dek = kek.unwrap(wk.blob, wk.header)
    if len(dek) != DEK_SIZE:   # pragma: no cover (authenticated input)
        raise UnsupportedFormatError('unwrapped DEK has a wrong size')
    return wk.dek_id, dek
