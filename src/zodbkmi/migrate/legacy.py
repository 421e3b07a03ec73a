"""Readers of the keas.kmi 3.x and cipher.encryptingstorage formats.

These formats are read only, to import old databases; zodbkmi never writes
them.  They are weak (see ``docs/migration.rst``): AES-256-CBC with a fixed
IV and no authentication, a DEK wrapped with RSA PKCS#1 v1.5, key ids that
are the md5 of the private key.  A tampered record may decrypt to garbage
that passes the padding check: import from a copy you trust.

keas.kmi 3.x (``keas.kmi.facility.KeyManagementFacility``):

- The KEK is an RSA private key as PEM, encrypted (traditional OpenSSL
  PEM encryption) with the passphrase ``key management facility``; the
  key holder's file holds these PEM bytes.
- The DEK of a KEK is 128 random bytes, RSA PKCS#1 v1.5 encrypted with
  the KEK, stored in ``<dek dir>/<md5 hex of the PEM bytes>.dek``.
- ``encrypt(key, data)`` is AES-256-CBC with IV ``0123456789ABCDEF`` of
  ``data`` padded as PKCS#7, under the key ``md5(d) || md5(md5(d) || d)``
  where ``d = DEK || b'12345678'`` (OpenSSL's EVP_BytesToKey, one round).
- An ``EncryptedPersistent`` state is the tuple ``(ciphertext, refs)``:
  the ciphertext of a protocol 2 pickle of the object state in which every
  persistent object, class and weak reference was replaced by its index in
  ``refs`` (a persistent id), and ``refs`` the list of these objects,
  pickled by ZODB as ordinary references.

cipher.encryptingstorage 1.x: a storage record is ``b'.e'`` followed by
keas.kmi's ``encrypt`` of the record, itself compressed first as
``b'.z' + zlib.compress(record)`` when that is shorter.
"""
import hashlib
import io
import os
import zlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.exceptions import UnknownKeyError

KEAS_PASSPHRASE = b'key management facility'
KEAS_IV = b'0123456789ABCDEF'
KEAS_SALT = b'12345678'
KEAS_DEK_SIZE = 128
CES_PREFIX = b'.e'
CES_ZLIB_PREFIX = b'.z'


def keas_key_id(kek_pem):
    """The name keas.kmi gives the DEK of ``kek_pem`` (md5 hex of the PEM
    bytes; an identifier, not a secret)."""
    return hashlib.md5(kek_pem, usedforsecurity=False).hexdigest()


def _bytes_to_key(dek):
    data = dek + KEAS_SALT
    first = hashlib.md5(data, usedforsecurity=False).digest()
    return first + hashlib.md5(first + data, usedforsecurity=False).digest()


class KeasKMIKeys:
    """The data key of a keas.kmi 3.x master facility.

    ``kek_pem`` is the content of the key holder's file (the encrypted PEM
    ``facility.generate()`` returned), ``dek_dir`` the facility's
    ``storage_dir``.  The DEK is unwrapped once, in the constructor.
    """

    def __init__(self, kek_pem, dek_dir, passphrase=KEAS_PASSPHRASE):
        if isinstance(kek_pem, str):
            kek_pem = kek_pem.encode('ascii')
        self.key_id = keas_key_id(kek_pem)
        path = os.path.join(dek_dir, self.key_id + '.dek')
        try:
            with open(path, 'rb') as f:
                wrapped = f.read()
        except FileNotFoundError:
            raise UnknownKeyError('no keas.kmi key %s in %s'
                                  % (self.key_id, dek_dir),
                                  self.key_id) from None
        try:
            private = serialization.load_pem_private_key(
                kek_pem, password=passphrase)
        except (ValueError, TypeError):
            raise InvalidKeyError('not a keas.kmi key encrypting key (PEM '
                                  'RSA key with the keas.kmi passphrase)'
                                  ) from None
        # PKCS#1 v1.5 is read here only, never written.  cryptography
        # answers a random key on a padding failure (implicit rejection),
        # so the size check below is the only signal.
        try:
            dek = private.decrypt(wrapped, padding.PKCS1v15())
        except ValueError:
            dek = b''
        if len(dek) != KEAS_DEK_SIZE:
            raise DecryptionError('keas.kmi key %s did not unwrap with the '
                                  'given KEK' % self.key_id)
        self._cipher = Cipher(algorithms.AES(_bytes_to_key(dek)),
                              modes.CBC(KEAS_IV))

    @classmethod
    def _from_dek(cls, dek, key_id='test'):
        """A reader for an already unwrapped DEK (tests and fuzzing)."""
        self = cls.__new__(cls)
        self.key_id = key_id
        self._cipher = Cipher(algorithms.AES(_bytes_to_key(dek)),
                              modes.CBC(KEAS_IV))
        return self

    @classmethod
    def from_files(cls, kek_file, dek_dir):
        """Read the keas.kmi KEK from ``kek_file`` (through
        :func:`zodbkmi.fileutil.read_secret_file`: mode 0600 or stricter)
        and the DEK from ``dek_dir``."""
        from zodbkmi.fileutil import read_secret_file
        return cls(read_secret_file(kek_file, 'key'), dek_dir)

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)

    def decrypt(self, data):
        """keas.kmi's ``decrypt``, with a strict padding check; raises
        :class:`DecryptionError`."""
        if not data or len(data) % 16:
            raise TruncatedDataError(
                'keas.kmi ciphertext of %d bytes is not whole AES blocks'
                % len(data))
        decryptor = self._cipher.decryptor()
        text = decryptor.update(bytes(data)) + decryptor.finalize()
        n = text[-1]
        if not 1 <= n <= 16 or text[-n:] != bytes([n]) * n:
            raise DecryptionError('keas.kmi ciphertext did not decrypt with '
                                  'key %s (bad padding: wrong key or damaged '
                                  'data)' % self.key_id)
        return text[:-n]


class EncryptingStorageReader:
    """Records of cipher.encryptingstorage (``.e`` prefix) in a storage."""

    def __init__(self, keys):
        self.keys = keys

    def recognizes(self, data):
        return data[:2] == CES_PREFIX

    def decrypt_record(self, data):
        plain = self.keys.decrypt(data[2:])
        if plain[:2] == CES_ZLIB_PREFIX:
            try:
                plain = zlib.decompress(plain[2:])
            except zlib.error:
                raise DecryptionError('cipher.encryptingstorage record did '
                                      'not decompress') from None
        return plain


def is_keas_state(state):
    """Tell whether an unpickled object state has keas.kmi's shape."""
    return (type(state) is tuple and len(state) == 2 and
            isinstance(state[0], bytes) and isinstance(state[1], list) and
            len(state[0]) % 16 == 0 and len(state[0]) >= 16)


def decrypt_keas_state(keys, state):
    """The plain object state of a keas.kmi ``EncryptedPersistent`` state.

    ``state`` is ``(ciphertext, refs)`` as ZODB unpickled it (``refs`` hold
    the referenced objects); the result is what keas.kmi would have given
    to ``Persistent.__setstate__``.
    """
    from zodbpickle import pickle as zpickle
    ciphertext, refs = state
    plain = keys.decrypt(ciphertext)
    unpickler = zpickle.Unpickler(io.BytesIO(plain))

    def persistent_load(ref):
        try:
            return refs[ref]
        except (IndexError, TypeError):
            raise DecryptionError('keas.kmi state names reference %r of %d'
                                  % (ref, len(refs))) from None
    unpickler.persistent_load = persistent_load
    try:
        return unpickler.load()
    except DecryptionError:
        raise
    except Exception as e:
        raise DecryptionError('keas.kmi state did not unpickle after '
                              'decryption (%s)' % type(e).__name__) from None
