"""Key encrypting keys held by the application: hybrid post-quantum
(ML-KEM-768 + X25519 through HPKE), RSA and AES-256.

All provide :class:`zodbkmi.interfaces.IKeyEncryptingKey`.  Keys held by a
KMS or an HSM live in :mod:`zodbkmi.sources`.
"""
import base64
import binascii
import hashlib
import hmac
import os
import threading

from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from zope.interface import implementer

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IKeyEncryptingKey

RSA_MIN_BITS = 3072
RSA_DEFAULT_BITS = 3072
AES_KEY_SIZE = 32
AES_WRAPPED_SIZE = 12 + AES_KEY_SIZE + 16   # nonce || ciphertext || tag
PEM_PREFIX = b'-----BEGIN '
KEK_ID_LABEL = b'zodbkmi/kek-id/v1'


def _oaep(label):
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()),
                        algorithm=hashes.SHA256(), label=label)


# RSA-PSS with SHA-256, MGF1-SHA-256 and a 32 byte salt (RFC 8017, 8.1):
# the signature of a version 2 wrapped DEK
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                   salt_length=padding.PSS.DIGEST_LENGTH)


def rsa_public_key_id(public_key):
    """The KEK id of an RSA key: ``rsa-`` + 32 hex digits of the SHA-256 of
    its DER SubjectPublicKeyInfo (public data only)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo)
    return 'rsa-' + hashlib.sha256(der).hexdigest()[:32]


@implementer(IKeyEncryptingKey)
class RSAPublicKeyEncryptingKey:
    """The public half of an RSA KEK: it can wrap, not unwrap.

    Lets a machine create data keys (or backups) that only the holder of the
    private key can open.
    """

    suite = wrapped.SUITE_RSA_OAEP_SHA256

    def __init__(self, public_key):
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise InvalidKeyError('not an RSA public key')
        if public_key.key_size < RSA_MIN_BITS:
            raise InvalidKeyError(
                'RSA key of %d bits refused: at least %d bits are required'
                % (public_key.key_size, RSA_MIN_BITS))
        self._public = public_key
        self.key_id = rsa_public_key_id(public_key)

    @classmethod
    def from_pem(cls, pem):
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise InvalidKeyError('not a PEM RSA public key') from None
        return cls(key)

    def public_pem(self):
        return self._public.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo)

    def wrap(self, dek, aad):
        return self._public.encrypt(dek, _oaep(aad))

    def unwrap(self, blob, aad):
        raise InvalidKeyError(
            'KEK %s is a public key: it wraps, it cannot unwrap'
            % self.key_id)

    def wrap_signed(self, dek, aad):
        raise InvalidKeyError(
            'KEK %s is a public key: only the holder of its private key can '
            'create data keys (a public key can only wrap self-contained '
            'streams)' % self.key_id)

    unwrap_signed = unwrap

    @property
    def _size(self):
        return (self._public.key_size + 7) // 8

    def _verify(self, signed, signature):
        """Check the RSA-PSS ``signature`` of ``signed``; raise
        AuthenticationError."""
        try:
            self._public.verify(signature, signed, _PSS, hashes.SHA256())
        except InvalidSignature:
            raise AuthenticationError(
                'wrapped DEK is not signed by KEK %s (made without its '
                'private key, or altered)' % self.key_id) from None

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)


class RSAKeyEncryptingKey(RSAPublicKeyEncryptingKey):
    """An RSA private key (>= 3072 bits) wrapping DEKs with OAEP-SHA256.

    The OAEP label is the wrapped-DEK header, which binds the DEK id and the
    KEK id.  This is the keas.kmi model, with its weaknesses removed
    (PKCS#1 v1.5, 2048 bits, md5 ids).
    """

    def __init__(self, private_key):
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise InvalidKeyError('not an RSA private key')
        super().__init__(private_key.public_key())
        self._private = private_key

    @classmethod
    def generate(cls, bits=RSA_DEFAULT_BITS):
        if bits < RSA_MIN_BITS:
            raise InvalidKeyError('at least %d bits are required'
                                  % RSA_MIN_BITS)
        return cls(rsa.generate_private_key(public_exponent=65537,
                                            key_size=bits))

    @classmethod
    def from_pem(cls, pem, password=None):
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError):
            raise InvalidKeyError(
                'not a PEM RSA private key (or a wrong password)') from None
        except Exception:   # cryptography's UnsupportedAlgorithm and kin
            raise InvalidKeyError('unsupported private key format') from None
        return cls(key)

    def private_pem(self):
        """The private key as unencrypted PKCS#8 PEM: store it 0600."""
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def public(self):
        return RSAPublicKeyEncryptingKey(self._public)

    def wrap_signed(self, dek, aad):
        """The version 2 wrapping: the OAEP ciphertext of ``dek`` (label
        ``aad``, the header) followed by the RSA-PSS signature of ``aad ||
        ciphertext``, which only the private key can make."""
        ciphertext = self.wrap(dek, aad)
        return ciphertext + self._private.sign(aad + ciphertext, _PSS,
                                               hashes.SHA256())

    def unwrap_signed(self, blob, aad):
        """Check the signature of a version 2 wrapping, then unwrap it."""
        size = self._size
        if len(blob) < 2 * size:
            raise TruncatedDataError(
                'wrapped DEK truncated: %d of %d bytes of signed RSA-OAEP '
                'for KEK %s' % (len(blob), 2 * size, self.key_id))
        if len(blob) != 2 * size:
            raise AuthenticationError(
                'wrapped DEK has a wrong size for KEK %s' % self.key_id)
        self._verify(aad + blob[:size], blob[size:])
        return self.unwrap(blob[:size], aad)

    def unwrap(self, blob, aad):
        size = self._size
        if len(blob) < size:
            raise TruncatedDataError(
                'wrapped DEK truncated: %d of %d bytes of RSA-OAEP for KEK %s'
                % (len(blob), size, self.key_id))
        try:
            return self._private.decrypt(blob, _oaep(aad))
        except ValueError:
            raise AuthenticationError(
                'wrapped DEK did not authenticate under KEK %s'
                % self.key_id) from None


def aes_key_id(key):
    """The KEK id of an AES master key: ``aes-`` + 32 hex digits of
    HMAC-SHA256(key, "zodbkmi/kek-id/v1"), a key check value that reveals
    nothing of the key."""
    return 'aes-' + hmac.new(key, KEK_ID_LABEL,
                             hashlib.sha256).hexdigest()[:32]


@implementer(IKeyEncryptingKey)
class AESKeyEncryptingKey:
    """An AES-256 master key wrapping DEKs with AES-256-GCM.

    The wrapping is ``nonce (12) || ciphertext (32) || tag (16)`` with the
    wrapped-DEK header as associated data.
    """

    suite = wrapped.SUITE_AES256_GCM

    def __init__(self, key, key_id=None):
        if not isinstance(key, bytes) or len(key) != AES_KEY_SIZE:
            raise InvalidKeyError('an AES-256 master key has %d bytes'
                                  % AES_KEY_SIZE)
        self._aead = AESGCM(key)
        self.key_id = key_id or aes_key_id(key)

    @classmethod
    def generate(cls):
        return cls(os.urandom(AES_KEY_SIZE))

    def wrap(self, dek, aad, _nonce=None):
        """``_nonce`` is a private seam for the fixed test vectors; never
        pass it in real code."""
        nonce = _nonce or os.urandom(12)
        return nonce + self._aead.encrypt(nonce, dek, aad)

    def unwrap(self, blob, aad):
        if len(blob) < AES_WRAPPED_SIZE:
            raise TruncatedDataError(
                'wrapped DEK truncated: %d of %d bytes of AES-GCM for KEK %s'
                % (len(blob), AES_WRAPPED_SIZE, self.key_id))
        if len(blob) != AES_WRAPPED_SIZE:
            raise AuthenticationError(
                'wrapped DEK has a wrong size for KEK %s' % self.key_id)
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except InvalidTag:
            raise AuthenticationError(
                'wrapped DEK did not authenticate under KEK %s'
                % self.key_id) from None

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)


# --- the hybrid post-quantum KEK: ML-KEM-768 + X25519 through HPKE ---------
#
# Key files (docs/format.rst, "Hybrid key files"): a PEM-style armour
# around a versioned body that ends with a check value, so that a truncated
# or altered file is refused instead of read as another key.

HYBRID_PRIVATE_LABEL = b'ZODBKMI HYBRID PRIVATE KEY'
HYBRID_PUBLIC_LABEL = b'ZODBKMI HYBRID PUBLIC KEY'
HYBRID_MAGIC = b'zkh'
HYBRID_FILE_VERSION = 1
HYBRID_PRIVATE = 1           # body type: ML-KEM-768 seed + X25519 private
HYBRID_PUBLIC = 2            # body type: ML-KEM-768 + X25519 public keys
HYBRID_CHECK_SIZE = 16
HYBRID_CHECK_LABEL = b'zodbkmi/hybrid-key-file/v1'
HYBRID_KEK_ID_LABEL = b'zodbkmi/hybrid-kek-id/v1'
HYBRID_MAC_LABEL = b'zodbkmi/hybrid-wrap-mac/v1'
MLKEM768_SEED_SIZE = 64
MLKEM768_PUBLIC_SIZE = 1184
X25519_SIZE = 32
HYBRID_PRIVATE_BODY_SIZE = 5 + MLKEM768_SEED_SIZE + X25519_SIZE \
    + HYBRID_CHECK_SIZE                                     # 117
HYBRID_PUBLIC_BODY_SIZE = 5 + MLKEM768_PUBLIC_SIZE + X25519_SIZE \
    + HYBRID_CHECK_SIZE                                     # 1237
# HPKE (RFC 9180) base mode, the suite of wrapped-DEK suite 5
HPKE_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256,
                        hpke.AEAD.AES_256_GCM)
HPKE_ENC_SIZE = hpke.KEM.MLKEM768_X25519.enc_length()       # 1120
HYBRID_WRAPPED_SIZE = HPKE_ENC_SIZE + 32 + 16               # enc || ct || tag
HYBRID_MAC_SIZE = 32


def _check_value(body):
    return hashlib.sha256(HYBRID_CHECK_LABEL + body).digest()[
        :HYBRID_CHECK_SIZE]


def _armour(label, body):
    text = base64.b64encode(body)
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return b'\n'.join([b'-----BEGIN ' + label + b'-----'] + lines
                      + [b'-----END ' + label + b'-----']) + b'\n'


def hybrid_key_label(pem):
    """The label of the hybrid key file ``pem`` (its BEGIN line), or
    None."""
    first = pem.lstrip()[:64]
    for label in (HYBRID_PRIVATE_LABEL, HYBRID_PUBLIC_LABEL):
        if first.startswith(b'-----BEGIN ' + label + b'-----'):
            return label
    return None


def _unarmour(pem, label, kind, size):
    """The body of the hybrid key file ``pem``; refuses anything but the
    exact armour :func:`_armour` writes (surrounding white space and CRLF
    line ends aside) and a body whose check value does not match."""
    name = 'hybrid %s key' % ('private' if kind == HYBRID_PRIVATE
                              else 'public')
    if not isinstance(pem, bytes):
        raise InvalidKeyError('a %s is bytes, not %s'
                              % (name, type(pem).__name__))
    text = pem.replace(b'\r\n', b'\n').strip()
    lines = text.split(b'\n')
    if (len(lines) < 3 or lines[0] != b'-----BEGIN ' + label + b'-----'
            or lines[-1] != b'-----END ' + label + b'-----'):
        raise InvalidKeyError('not a %s file (its BEGIN and END lines)'
                              % name)
    try:
        body = base64.b64decode(b''.join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError('%s file damaged: its body is not base64'
                              % name) from None
    if _armour(label, body).strip() != text:
        raise InvalidKeyError('%s file damaged: not in the form zodbkmi '
                              'writes (lines of 64 characters)' % name)
    if body[:3] != HYBRID_MAGIC or len(body) < 5:
        raise InvalidKeyError('%s file damaged: bad magic' % name)
    if body[3] != HYBRID_FILE_VERSION:
        raise InvalidKeyError('%s file of version %d: this zodbkmi reads '
                              'version %d' % (name, body[3],
                                              HYBRID_FILE_VERSION))
    if body[4] != kind:
        raise InvalidKeyError('%s file damaged: body of type %d'
                              % (name, body[4]))
    if len(body) != size:
        raise InvalidKeyError('%s file damaged: %d of %d bytes'
                              % (name, len(body), size))
    if not hmac.compare_digest(body[-HYBRID_CHECK_SIZE:],
                               _check_value(body[:-HYBRID_CHECK_SIZE])):
        raise InvalidKeyError('%s file damaged: its check value does not '
                              'match' % name)
    return body[5:-HYBRID_CHECK_SIZE]


def hybrid_key_id(mlkem_public, x25519_public):
    """The KEK id of a hybrid key: ``hyb-`` + 32 hex digits of SHA-256 of
    ``"zodbkmi/hybrid-kek-id/v1" || ML-KEM-768 public key (1184 bytes) ||
    X25519 public key (32 bytes)`` (public data only)."""
    return 'hyb-' + hashlib.sha256(
        HYBRID_KEK_ID_LABEL + mlkem_public + x25519_public).hexdigest()[:32]


@implementer(IKeyEncryptingKey)
class HybridPublicKeyEncryptingKey:
    """The public half of a hybrid KEK (ML-KEM-768 + X25519): it can wrap,
    not unwrap.

    A DEK is sealed with HPKE (RFC 9180) base mode, KEM ML-KEM-768+X25519,
    HKDF-SHA256, AES-256-GCM, with the wrapped-DEK header as the HPKE
    ``info``: it stays closed to an attacker as long as either ML-KEM-768
    or X25519 holds.
    """

    suite = wrapped.SUITE_HPKE_MLKEM768_X25519

    def __init__(self, mlkem_public, x25519_public):
        if not isinstance(mlkem_public, mlkem.MLKEM768PublicKey) or \
                not isinstance(x25519_public, x25519.X25519PublicKey):
            raise InvalidKeyError('not the ML-KEM-768 and X25519 public keys '
                                  'of a hybrid KEK')
        self._mlkem_public = mlkem_public
        self._x25519_public = x25519_public
        self._hpke_public = hpke.MLKEM768X25519PublicKey(mlkem_public,
                                                         x25519_public)
        self.key_id = hybrid_key_id(mlkem_public.public_bytes_raw(),
                                    x25519_public.public_bytes_raw())

    @classmethod
    def from_pem(cls, pem):
        """Read a ``ZODBKMI HYBRID PUBLIC KEY`` file; raises
        :class:`~zodbkmi.exceptions.InvalidKeyError` for anything else."""
        if isinstance(pem, bytes) and \
                hybrid_key_label(pem) == HYBRID_PRIVATE_LABEL:
            raise InvalidKeyError(
                'KEK %s: a private key where a public key is expected (give '
                'its public half: zodbkmi public-key)'
                % HybridKeyEncryptingKey.from_pem(pem).key_id)
        body = _unarmour(pem, HYBRID_PUBLIC_LABEL, HYBRID_PUBLIC,
                         HYBRID_PUBLIC_BODY_SIZE)
        try:
            return cls(
                mlkem.MLKEM768PublicKey.from_public_bytes(
                    body[:MLKEM768_PUBLIC_SIZE]),
                x25519.X25519PublicKey.from_public_bytes(
                    body[MLKEM768_PUBLIC_SIZE:]))
        except ValueError:  # pragma: no cover (the check value matched)
            raise InvalidKeyError('hybrid public key file holds no valid '
                                  'key') from None

    def public_pem(self):
        """The public key file (``ZODBKMI HYBRID PUBLIC KEY``)."""
        body = (HYBRID_MAGIC + bytes([HYBRID_FILE_VERSION, HYBRID_PUBLIC])
                + self._mlkem_public.public_bytes_raw()
                + self._x25519_public.public_bytes_raw())
        return _armour(HYBRID_PUBLIC_LABEL, body + _check_value(body))

    def wrap(self, dek, aad):
        """HPKE base mode seal of ``dek`` with ``info = aad`` (the
        wrapped-DEK header): ``enc (1120) || ciphertext (32) || tag (16)``.
        Randomized: the KEM encapsulation is fresh every time."""
        return HPKE_SUITE.encrypt(dek, self._hpke_public, info=aad)

    def unwrap(self, blob, aad):
        raise InvalidKeyError(
            'KEK %s is a public key: it wraps, it cannot unwrap'
            % self.key_id)

    def wrap_signed(self, dek, aad):
        raise InvalidKeyError(
            'KEK %s is a public key: only the holder of its private key can '
            'create data keys (a public key can only wrap self-contained '
            'streams)' % self.key_id)

    unwrap_signed = unwrap

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)


class HybridKeyEncryptingKey(HybridPublicKeyEncryptingKey):
    """A hybrid post-quantum KEK: an ML-KEM-768 key (its 64 byte seed) and
    an X25519 key, used together through HPKE (see
    :class:`HybridPublicKeyEncryptingKey`).

    Version 2 wrapped DEKs add an HMAC-SHA256 over ``header || HPKE
    ciphertext`` under a key derived from the private key, so that only
    the holder of the private key can make them (docs/format.rst).
    """

    def __init__(self, mlkem_private, x25519_private):
        if not isinstance(mlkem_private, mlkem.MLKEM768PrivateKey) or \
                not isinstance(x25519_private, x25519.X25519PrivateKey):
            raise InvalidKeyError('not the ML-KEM-768 and X25519 private '
                                  'keys of a hybrid KEK')
        super().__init__(mlkem_private.public_key(),
                         x25519_private.public_key())
        self._mlkem_private = mlkem_private
        self._x25519_private = x25519_private
        self._hpke_private = hpke.MLKEM768X25519PrivateKey(mlkem_private,
                                                           x25519_private)
        self._mac_key = hmac.new(self._secret(), HYBRID_MAC_LABEL,
                                 hashlib.sha256).digest()

    def _secret(self):
        return (self._mlkem_private.private_bytes_raw()
                + self._x25519_private.private_bytes_raw())

    @classmethod
    def generate(cls):
        return cls(mlkem.MLKEM768PrivateKey.generate(),
                   x25519.X25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem):
        """Read a ``ZODBKMI HYBRID PRIVATE KEY`` file; raises
        :class:`~zodbkmi.exceptions.InvalidKeyError` for anything else (a
        public key file: naming its KEK id)."""
        if isinstance(pem, bytes) and \
                hybrid_key_label(pem) == HYBRID_PUBLIC_LABEL:
            raise InvalidKeyError(
                'KEK %s: a public key where the private key is needed'
                % HybridPublicKeyEncryptingKey.from_pem(pem).key_id)
        body = _unarmour(pem, HYBRID_PRIVATE_LABEL, HYBRID_PRIVATE,
                         HYBRID_PRIVATE_BODY_SIZE)
        try:
            return cls(
                mlkem.MLKEM768PrivateKey.from_seed_bytes(
                    body[:MLKEM768_SEED_SIZE]),
                x25519.X25519PrivateKey.from_private_bytes(
                    body[MLKEM768_SEED_SIZE:]))
        except ValueError:  # pragma: no cover (the check value matched)
            raise InvalidKeyError('hybrid private key file holds no valid '
                                  'key') from None

    def private_pem(self):
        """The private key file (``ZODBKMI HYBRID PRIVATE KEY``): store it
        0600 (:func:`zodbkmi.keyholder.write_key_file`)."""
        body = (HYBRID_MAGIC + bytes([HYBRID_FILE_VERSION, HYBRID_PRIVATE])
                + self._secret())
        return _armour(HYBRID_PRIVATE_LABEL, body + _check_value(body))

    def public(self):
        return HybridPublicKeyEncryptingKey(self._mlkem_public,
                                            self._x25519_public)

    def unwrap(self, blob, aad):
        """Open an HPKE wrapping made by ``wrap`` with ``info = aad``."""
        if len(blob) < HYBRID_WRAPPED_SIZE:
            raise TruncatedDataError(
                'wrapped DEK truncated: %d of %d bytes of HPKE for KEK %s'
                % (len(blob), HYBRID_WRAPPED_SIZE, self.key_id))
        if len(blob) != HYBRID_WRAPPED_SIZE:
            raise AuthenticationError(
                'wrapped DEK has a wrong size for KEK %s' % self.key_id)
        try:
            return HPKE_SUITE.decrypt(blob, self._hpke_private, info=aad)
        except (InvalidTag, ValueError):
            raise AuthenticationError(
                'wrapped DEK did not authenticate under KEK %s (made for '
                'another recipient, or altered)' % self.key_id) from None

    def _mac(self, signed):
        return hmac.new(self._mac_key, signed, hashlib.sha256).digest()

    def wrap_signed(self, dek, aad):
        """The version 2 wrapping: the HPKE ciphertext followed by
        HMAC-SHA256(mac key, ``aad || ciphertext``), the mac key being
        HMAC-SHA256(ML-KEM seed || X25519 private key,
        "zodbkmi/hybrid-wrap-mac/v1"): only the private key can make it."""
        ciphertext = self.wrap(dek, aad)
        return ciphertext + self._mac(aad + ciphertext)

    def unwrap_signed(self, blob, aad):
        """Check the MAC of a version 2 wrapping, then open it."""
        size = HYBRID_WRAPPED_SIZE + HYBRID_MAC_SIZE
        if len(blob) < size:
            raise TruncatedDataError(
                'wrapped DEK truncated: %d of %d bytes of authenticated HPKE '
                'for KEK %s' % (len(blob), size, self.key_id))
        if len(blob) != size:
            raise AuthenticationError(
                'wrapped DEK has a wrong size for KEK %s' % self.key_id)
        ciphertext = blob[:HYBRID_WRAPPED_SIZE]
        if not hmac.compare_digest(blob[HYBRID_WRAPPED_SIZE:],
                                   self._mac(aad + ciphertext)):
            raise AuthenticationError(
                'wrapped DEK is not authenticated by KEK %s (made without '
                'its private key, or altered)' % self.key_id)
        return self.unwrap(ciphertext, aad)


KEK_KINDS = ('hybrid', 'rsa')
DEFAULT_KEK_KIND = 'hybrid'


def generate_kek(kind=DEFAULT_KEK_KIND, rsa_bits=RSA_DEFAULT_BITS):
    """A new private KEK of ``kind``: ``'hybrid'`` (ML-KEM-768 + X25519,
    the default) or ``'rsa'`` (``rsa_bits`` bits); its ``private_pem()`` is
    the key file."""
    if kind == 'hybrid':
        return HybridKeyEncryptingKey.generate()
    if kind == 'rsa':
        return RSAKeyEncryptingKey.generate(rsa_bits)
    raise InvalidKeyError('unknown KEK kind %r: one of %s'
                          % (kind, ', '.join(KEK_KINDS)))


_kek_cache = {}
_kek_lock = threading.Lock()


def as_kek(key):
    """Return the :class:`~zodbkmi.interfaces.IKeyEncryptingKey` for ``key``.

    ``key`` is an IKeyEncryptingKey (returned as is), PEM bytes of a hybrid
    (``ZODBKMI HYBRID PRIVATE KEY``) or RSA private key or 32 bytes of an
    AES-256 master key.  Parsed keys are cached per process (parsing an
    RSA key checks it and costs milliseconds; this is on the path of every
    encryption).

    A ``str`` is refused with :class:`~zodbkmi.exceptions.InvalidKeyError`:
    text is no key.  Encoding it would make different non-ASCII texts one key,
    and would turn a 32 character passphrase into an AES KEK whose public key
    id lets anyone test guesses offline.  PEM text read as ``str`` must be
    encoded by its reader (``pem.encode('ascii')``).
    """
    kek = _kek_cache.get(key) if type(key) is bytes else None
    if kek is not None:
        return kek
    if IKeyEncryptingKey.providedBy(key):
        return key
    if isinstance(key, str):
        raise InvalidKeyError(
            'a key encrypting key given as text (str) is refused: pass '
            'bytes (32 random AES bytes or the PEM of an RSA private key, '
            'e.g. read from a key file in binary mode) or a key holder\'s '
            'key (IKeyEncryptingKey)')
    if not isinstance(key, bytes):
        raise InvalidKeyError('a key encrypting key is PEM bytes, 32 AES '
                              'bytes or an IKeyEncryptingKey, not %s'
                              % type(key).__name__)
    if key.lstrip().startswith(PEM_PREFIX):
        if hybrid_key_label(key) is not None:
            kek = HybridKeyEncryptingKey.from_pem(key)
        else:
            kek = RSAKeyEncryptingKey.from_pem(key)
    elif len(key) == AES_KEY_SIZE:
        kek = AESKeyEncryptingKey(key)
    else:
        raise InvalidKeyError('not a key encrypting key: neither PEM nor %d '
                              'AES bytes (%d bytes given)'
                              % (AES_KEY_SIZE, len(key)))
    with _kek_lock:
        if len(_kek_cache) >= 1024:
            _kek_cache.clear()
        _kek_cache[key] = kek
    return kek
