"""Exceptions raised by zodbkmi.

Every error zodbkmi raises on purpose derives from :class:`ZodbKmiError`.
Messages name key ids, object ids and file names, never key bytes, tokens
or plaintext.  Each leaf below lists the reasons it is raised.
"""
from zope.interface.interfaces import ComponentLookupError


class ZodbKmiError(Exception):
    """Base class of every error raised by zodbkmi on purpose."""


class InvalidKeyError(ZodbKmiError, ValueError):
    """Something given as a key is not a usable key.

    Raised when a key encrypting key (KEK) is not a PEM RSA private key of
    at least 3072 bits nor a 32 byte AES-256 key, when a data encrypting key
    (DEK) does not have 32 bytes, and when a key file cannot be parsed.
    """


class UnknownKeyError(ZodbKmiError, LookupError):
    """The key needed for an operation is not available.

    Raised when a key id names no key in the key store, when a data key was
    destroyed, when the key encrypting key that wrapped a data key is not
    held by the caller, and when a key encrypting key has no active data key
    yet.  ``key_id`` holds the id that was looked up.
    """

    def __init__(self, message, key_id=None):
        super().__init__(message)
        self.key_id = key_id


class KeyDestroyedError(UnknownKeyError):
    """The data key that sealed an object was destroyed (crypto-shredding).

    Raised when an object's state names a DEK that ``zodbkmi shred``
    (:func:`zodbkmi.tenants.shred`) destroyed: the object cannot be read
    any more, by anyone, and never will be.  ``oid`` is the object's oid
    (8 bytes, or None when unknown), ``key_id`` the destroyed DEK id,
    ``tenant`` the tenant it belonged to.  Also raised when an object is
    committed under a tenant that was shredded.  An
    :class:`UnknownKeyError`, so code that catches that one still does.
    """

    def __init__(self, message, key_id=None, oid=None, tenant=None):
        super().__init__(message, key_id)
        self.oid = oid
        self.tenant = tenant


class TenantError(ZodbKmiError, ValueError):
    """A tenant cannot be created or shredded as asked.

    Raised by :mod:`zodbkmi.tenants` (and ``zodbkmi tenant`` / ``zodbkmi
    shred``) for an unknown tenant, a tenant id that exists already or is
    malformed, a shred of a key shared with another tenant or of the
    default key, and a shred that was not confirmed.  Nothing was changed
    when it is raised.  ``tenant`` names the tenant.
    """

    def __init__(self, message, tenant=None):
        super().__init__(message)
        self.tenant = tenant


class DatabaseKeyError(UnknownKeyError):
    """A database is opened with keys that cannot open it.

    Raised by :class:`zodbkmi.storage.EncryptingStorage` when it is opened
    (:meth:`~zodbkmi.storage.EncryptingStorage.check_keys`), before
    anything is created or written, when a sealed record of the database
    names a data key that none of the key encrypting keys given can open:
    the wrong KEK file, or a key directory that is not the database's
    (mistyped, or empty).  The message names the KEK ids given, the data
    key the database needs (and its KEK when the key store knows it) and the
    oid of the record; never key material.  ``key_id`` holds the DEK id,
    ``kek_ids`` the ids of the KEKs given and ``oid`` the oid.  Not a
    ``KeyError``: an application catching ``KeyError`` around a mapping
    does not swallow it.
    """

    def __init__(self, message, key_id=None, kek_ids=(), oid=None):
        super().__init__(message, key_id)
        self.kek_ids = tuple(kek_ids)
        self.oid = oid


class NoKeyHolderError(UnknownKeyError, ComponentLookupError):
    """No key holder or no encryption service is registered.

    Raised by :class:`zodbkmi.persistent.EncryptedPersistent` when it needs
    the ``IKeyHolder`` or the ``IEncryptionService`` utility and none is
    registered; the message says what to register.  A
    ``ComponentLookupError`` too, as keas.kmi raised.
    """


class DecryptionError(ZodbKmiError):
    """Base class of the errors raised while opening ciphertext.

    No partial plaintext is ever returned when one of its leaves is raised.
    """


class AuthenticationError(DecryptionError):
    """The ciphertext did not authenticate.

    The data was altered (a flipped bit, a spliced header, a record moved to
    another object id) or it is opened with the wrong key.  AES-GCM cannot
    tell those causes apart, so neither does this exception.
    """


class WrongKeyError(AuthenticationError):
    """A wrapped data key belongs to another key encrypting key.

    Raised before any cryptographic work, when the key encrypting key id
    recorded in a wrapped data key differs from the id of the key given.
    """


class UnauthenticatedKeyError(AuthenticationError):
    """A data key's origin cannot be proven, so it is never used.

    Raised for a key store entry whose wrapped data key is in version 1 of the
    format with the RSA suite: anyone holding the public half of the RSA
    KEK can make one (a planted key).  ``zodbkmi upgrade-keys`` (or
    ``migrate rotate-kek``), run by the holder of the private key, rewrites
    the entries of a key store it trusts in version 2, which only the private
    key can make.  ``key_id`` holds the DEK id.
    """

    def __init__(self, message, key_id=None):
        super().__init__(message)
        self.key_id = key_id


class TruncatedDataError(DecryptionError):
    """The ciphertext is shorter than its format requires.

    Raised for input that ends inside a header, a nonce or an
    authentication tag, and for a stream that ends before its final chunk.
    """


class UnsupportedFormatError(DecryptionError):
    """The data does not start with a format and version we can read.

    Raised for an unknown magic, an unknown version (for example data
    written by a newer zodbkmi), an unknown cipher suite or a malformed
    header field.
    """


class SelfContainedStreamError(UnsupportedFormatError):
    """A self-contained stream was given where only a stream naming a DEK
    of the key store may open.

    A self-contained stream embeds its wrapped DEK (``encrypt-file
    --recipient``); anyone holding the public half of an RSA KEK can make
    one, so it proves nothing about who wrote it.  Blob files of the
    storage wrapper and the blob files a migration reads must name their
    DEK by id; ``decrypt_file(..., self_contained=True)``,
    :func:`zodbkmi.files.decrypt_with_private_key` and ``zodbkmi
    decrypt-file`` open self-contained streams.  Raised before any
    plaintext is written.  An :class:`UnsupportedFormatError`: the stream
    is well formed, but of a kind the caller does not accept.
    """


class NotEncryptedError(DecryptionError):
    """Plaintext was found where ciphertext is required.

    zodbkmi fails closed: unmarked data is never returned as if it had been
    decrypted, unless a migration mode was switched on explicitly.
    """


class KeyStoreError(ZodbKmiError, OSError):
    """The key store cannot be read or written.

    Raised when the storage directory is missing and cannot be created, is
    not writable, holds an entry that cannot be parsed, or is an existing
    directory that group or others can write or that another user owns;
    and (as :class:`SecretFileError`) for a key, PIN or token file that
    cannot be read or that group or others can access.
    """


class KeyStateError(ZodbKmiError):
    """A key is used in a way its lifecycle state forbids.

    Raised when a retired data key is asked to encrypt, when a data key
    reached its usage limit, and for transitions the lifecycle does not have
    (for example reactivating a destroyed key).
    """


class EvictedKeyError(KeyStateError):
    """A data key was evicted from the cache while it was in use.

    Its key material is gone (retired, destroyed, rewrapped or expired).
    The facilities meet it when another thread evicts a key between their
    lookup and its use, and look the key up again; an application sees it
    only when that keeps happening.
    """


class KeyServerError(ZodbKmiError, ConnectionError):
    """The key server cannot be reached or refused a request.

    Raised by :class:`zodbkmi.client.LocalKeyManagementFacility` when the
    server does not answer within the timeout after the retries, when TLS
    verification of the server fails, and when the server answers with an
    error other than "unknown key" (for example 401 or 403: missing or wrong
    credentials).  ``status`` holds the HTTP status (None when no answer
    came) and ``reason`` a short reason; the response body is never kept.
    """

    def __init__(self, message, status=None, reason=None):
        super().__init__(message)
        self.status = status
        self.reason = reason


class SettingsError(ZodbKmiError, ValueError):
    """Settings are malformed.

    Raised by :mod:`zodbkmi.sources.settings` for an unknown or missing
    setting, a value of the wrong type, an unknown key source or algorithm,
    and a settings file or environment variable that is not JSON; by
    :mod:`zodbkmi.server` for a key server setting that is unknown or of
    the wrong type; by :mod:`zodbkmi.tls` for a TLS certificate, key or CA
    file that cannot be used (the message names the setting and the file);
    and by :class:`zodbkmi.client.LocalKeyManagementFacility` for a key
    server URL that is not ``https://`` (``http://`` needs
    ``allow_http=True``).  The message is one line naming the setting,
    never its secret value.
    """


class UsageError(ZodbKmiError):
    """A command line that cannot be carried out.

    Raised by the ``zodbkmi`` command line (``zodbkmi.cli``) for
    options that contradict each other or name nothing usable: no
    credentials for the key server, a plain ``http://`` URL without
    ``--allow-http``, a key directory that does not exist, an output file
    that exists without ``--force``.  The command prints its one-line
    message and exits with status 2.
    """


class KeySourceError(ZodbKmiError):
    """A key source or an external KMS/HSM cannot deliver its service.

    Raised when a key file or environment variable is missing or readable
    by others (for files: :class:`SecretFileError`), when Vault/OpenBao is
    down, sealed, times out, refuses the token (403), has no such secret or
    Transit key (404 and kin), and when a PKCS#11 library, token or key is
    missing or the PIN is wrong.
    ``source`` names the source (a URL and path, a file name, a token
    label), never a key, a token or a PIN.
    """

    def __init__(self, message, source=None):
        super().__init__(message)
        self.source = source


class SecretFileError(KeyStoreError, KeySourceError):
    """A key, PIN, token or password file cannot be used.

    Raised by :func:`zodbkmi.fileutil.read_secret_file`, the one reader of
    such files, when the file cannot be read, is larger than 1 MiB, or when
    group or others have any access to it (any bit of ``0o077`` in its
    mode); the message names the file, its role, its mode and the
    ``chmod`` that fixes it, never its content.  Both a
    :class:`KeyStoreError` and a :class:`KeySourceError`, so each caller's
    documented exception still catches it.  ``source`` is the path.
    """

    def __init__(self, message, source=None):
        # Not OSError's (errno, strerror) form: one message.
        KeySourceError.__init__(self, message, source)


class KmipError(KeySourceError):
    """A KMIP server cannot deliver its service (:mod:`zodbkmi.sources.kmip`).

    Raised when the server is down or does not answer within the timeout,
    when the TLS handshake fails (a wrong client certificate or CA), when
    the key object is unknown, is not an AES-256 symmetric key or is in a
    state that forbids its use (Pre-Active, Deactivated, Compromised,
    Destroyed), and when the server refuses an operation.  ``source`` is
    the server (``kmip://host:port``); ``reason`` the KMIP result reason
    (a ``kmip.core.enums.ResultReason``, e.g. ``ITEM_NOT_FOUND`` or
    ``PERMISSION_DENIED``) when the server answered with one, else None.
    """

    def __init__(self, message, source=None, reason=None):
        super().__init__(message, source)
        self.reason = reason
