"""Key encrypting keys held by the application: RSA and AES-256.

Both provide :class:`zodbkmi.interfaces.IKeyEncryptingKey`.  Keys held by a
KMS or an HSM live in :mod:`zodbkmi.sources`.
"""
import hashlib
import hmac
import os
import threading

from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa
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


_kek_cache = {}
_kek_lock = threading.Lock()


def as_kek(key):
    """Return the :class:`~zodbkmi.interfaces.IKeyEncryptingKey` for ``key``.

    ``key`` is an IKeyEncryptingKey (returned as is), PEM bytes of an RSA
    private key or 32 bytes of an AES-256 master key.  Parsed keys are
    cached per process (parsing an RSA key checks it and costs
    milliseconds; this is on the path of every encryption).

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
