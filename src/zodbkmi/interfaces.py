"""The contracts of zodbkmi's components.

Vocabulary (NIST SP 800-57 envelope encryption):

KEK
    A key encrypting key.  It wraps and unwraps data keys and never leaves
    its holder: the application (an RSA private key or an AES-256 master
    key), a key management service or an HSM.

DEK
    A data encrypting key: 32 random bytes for AES-256-GCM.  It is stored
    only wrapped by a KEK, in a key store, under a random *DEK id*.

Key id
    In the keas.kmi compatible API "key id" means DEK id: the facility is a
    mapping of DEK ids to wrapped DEKs.

Key lifecycle (the states of a DEK in a key store):

============  ===========================  ==============================
state         encrypts new data            decrypts existing data
============  ===========================  ==============================
``active``    yes (one per KEK)            yes
``retired``   no                           yes
destroyed     no                           no (the entry is gone)
============  ===========================  ==============================

Transitions: ``active -> retired`` (rotation or retire), ``active ->
destroyed`` and ``retired -> destroyed`` (delete).  There is no way back.
"""
import zope.interface
from zope.interface.common import mapping


class IEncryptionService(zope.interface.Interface):
    """Encrypts and decrypts data for the holder of a key encrypting key.

    ``key`` is always a key encrypting key: the PEM bytes of an RSA private
    key, 32 bytes of an AES-256 master key, or an object providing
    :class:`IKeyEncryptingKey`.  The service finds the data key that ``key``
    guards and never stores or sends ``key`` anywhere.
    """

    def encrypt(key, data):
        """Return ``data`` (bytes) encrypted under the active DEK of ``key``.

        The result is a record envelope (see ``docs/format.rst``) of the
        data context naming the DEK id; only :meth:`decrypt` opens it.  Two
        calls with the same arguments give different results.

        Raises :class:`~zodbkmi.exceptions.InvalidKeyError` when ``key`` is
        not a key, :class:`~zodbkmi.exceptions.UnknownKeyError` when ``key``
        guards no active DEK, ``TypeError`` when ``data`` is not bytes.
        """

    def decrypt(key, data):
        """Return the plaintext of the record envelope ``data``.

        The DEK is the one named in ``data``; it must be wrapped by ``key``
        (or by a previous KEK known to the service).

        Raises :class:`~zodbkmi.exceptions.UnsupportedFormatError`,
        :class:`~zodbkmi.exceptions.TruncatedDataError`,
        :class:`~zodbkmi.exceptions.AuthenticationError` (tampered data or
        wrong key), :class:`~zodbkmi.exceptions.UnknownKeyError` (the DEK or
        its KEK is not available); never returns unauthenticated bytes.
        """

    def encrypt_state(key, data):
        """Return the pickled object state ``data`` encrypted under the
        active DEK of ``key``, for
        :class:`zodbkmi.persistent.EncryptedPersistent`.

        The result is a record envelope of the object state context: it
        opens with :meth:`decrypt_state` only, never with :meth:`decrypt`,
        and :meth:`decrypt_state` opens no envelope that :meth:`encrypt`
        made (except version 1 data envelopes, which zodbkmi wrote for
        states before version 2).  Raises the errors of :meth:`encrypt`.
        """

    def decrypt_state(key, data):
        """Return the plaintext of the object state envelope ``data``.

        Raises the errors of :meth:`decrypt`;
        :class:`~zodbkmi.exceptions.UnsupportedFormatError` for an envelope
        of another context (a data envelope of version 2, a storage
        record).
        """

    def encrypt_file(key, fsrc, fdst):
        """Encrypt the binary file object ``fsrc`` into ``fdst``.

        Streams in constant memory (pipes work); see the stream format in
        ``docs/format.rst``.
        """

    def decrypt_file(key, fsrc, fdst, oid=None, self_contained=False):
        """Decrypt the binary file object ``fsrc`` into ``fdst``.

        ``oid`` (8 bytes) is the oid a blob file is bound to.  Only a
        stream that names its DEK by id (a DEK of the service's key store)
        opens, unless ``self_contained`` is true: a self-contained stream
        (its wrapped DEK embedded, which anyone holding the public half of
        an RSA KEK can make) is refused with
        :class:`~zodbkmi.exceptions.SelfContainedStreamError`.  Storages
        and migrations never pass ``self_contained``.

        Raises the errors of :meth:`decrypt`; no plaintext of a chunk that
        did not authenticate is written.
        """


class IKeyGenerationService(zope.interface.Interface):
    """Creates key encrypting keys together with their data key."""

    def generate():
        """Create a new KEK and a new DEK wrapped by it; return the KEK.

        The KEK is returned as PEM bytes (an RSA private key of at least
        3072 bits); only the wrapped DEK is kept by the service.  The caller
        must keep the KEK: without it the data encrypted under the new DEK
        cannot be read.
        """


class IInPlaceFileEncryption(zope.interface.Interface):
    """An encryption service that can encrypt a file into itself (the
    plaintext pages overwritten rather than copied)."""

    def encrypt_file_in_place(key, fd, chunk_size=None, oid=None):
        """Encrypt the regular file open for reading and writing on the
        file descriptor ``fd`` into itself, byte for byte as
        :meth:`encrypt_file` would into another file; return the number
        of plaintext bytes.  On an error the file holds a mix of plaintext
        and ciphertext and must be discarded.
        """


class IRecordFastPath(zope.interface.Interface):
    """An encryption service with a fast way to open the storage records
    it decrypted before (used by :class:`~zodbkmi.storage.EncryptingStorage`
    for every record it loads)."""

    def record_fast_path(key):
        """Return ``open_fast(data, oid)``: the plaintext of the storage
        record ``data`` of ``oid`` when it can be opened without the
        checks that :meth:`IEncryptionService.decrypt` makes the first
        time (it made them before for ``key``), else None; then call
        ``decrypt``, which raises the documented errors."""


class IMetadataEncryption(zope.interface.Interface):
    """An encryption service that seals the metadata of ZODB transactions
    (user, description, extension) in an envelope context of their own,
    used by :class:`~zodbkmi.storage.EncryptingStorage` in ``tpc_begin``
    and in the listings that show it (``undoLog``, ``undoInfo``,
    ``history``, iterators).  A storage whose facility does not provide
    it refuses to open (it could not keep the metadata out of the
    storage)."""

    def encrypt_metadata(key, data):
        """Return ``data`` (bytes: the encoded metadata of one transaction,
        see ``docs/format.rst``) sealed under the active DEK of ``key``.

        The result is a record envelope of the transaction metadata
        context (version 2, context 3), not bound to anything beyond its
        header: it opens with :meth:`decrypt_metadata` only, and
        :meth:`decrypt_metadata` opens no envelope of another context.
        Raises the errors of :meth:`IEncryptionService.encrypt`.
        """

    def decrypt_metadata(key, data):
        """Return the plaintext of the transaction metadata envelope
        ``data``; ``key`` is a KEK or a list of KEKs, as for
        :meth:`IEncryptionService.decrypt`, whose errors it raises
        (:class:`~zodbkmi.exceptions.UnsupportedFormatError` for an
        envelope of another context)."""


class IDataKeyCreation(zope.interface.Interface):
    """A facility that creates data keys for a KEK its caller holds.

    :class:`~zodbkmi.storage.EncryptingStorage` creates the active DEK of
    its KEK through this ability, and only for a database that has no
    encrypted record yet or when asked (``create_key``); a facility
    without it never gets a DEK created by the storage.
    """

    def create_key(key):
        """Create a new DEK wrapped by the KEK ``key`` and make it the
        active DEK of ``key`` (the previous one is retired); return its
        id."""

    def ensure_key(key):
        """Return the id of the active DEK of ``key``, creating one (as
        :meth:`create_key`) when there is none."""

    def active_key_id(key):
        """Return the id of the active DEK of ``key``, or None; creates
        nothing."""


class IKeyManagementFacility(IEncryptionService, IKeyGenerationService):
    """A key management facility: generation plus encryption services."""


class IExtendedKeyManagementFacility(IKeyManagementFacility,
                                     IDataKeyCreation,
                                     IInPlaceFileEncryption,
                                     IRecordFastPath,
                                     IMetadataEncryption,
                                     mapping.IEnumerableMapping):
    """A facility that is also a read-only mapping of DEK ids to wrapped DEKs.

    Values are wrapped-DEK blobs (``docs/format.rst``); they are useless
    without the KEK that wrapped them.
    """

    def decrypt_file_range(key, fsrc, fdst, offset, length=None, oid=None,
                           self_contained=False):
        """Decrypt ``length`` plaintext bytes from ``offset`` (to the end
        when None) of the stream that fills the *seekable* binary file
        ``fsrc`` (from its first byte) into ``fdst``, reading only the
        chunks that hold them; return the number of bytes written (fewer
        when the range passes the end).

        Every chunk read is authenticated; ``oid`` and ``self_contained``
        as for :meth:`decrypt_file`, whose errors it raises, and
        ``ValueError`` for a negative range or a source that cannot seek.
        """


class IKeyHolder(zope.interface.Interface):
    """Holds the application's key encrypting key.

    Registered as a utility; :class:`zodbkmi.persistent.EncryptedPersistent`
    encrypts with ``key`` and decrypts with ``key`` or any of
    ``previous_keys``.
    """

    key = zope.interface.Attribute(
        'The current key encrypting key (PEM bytes, 32 AES bytes, or an '
        'IKeyEncryptingKey); it encrypts all new data.')


class IKeyEncryptingKey(zope.interface.Interface):
    """A key encrypting key: wraps and unwraps data keys.

    Implementations keep the key material private: their ``repr`` shows the
    id only, and keys held by a KMS or an HSM never enter the process.

    :meth:`wrap` must need the key's secret (an AEAD under the key), so
    that a wrapped DEK proves who made it (wrapped-DEK format version 2,
    ``docs/format.rst``).  RSA, whose encryption is public, adds
    ``wrap_signed(dek, aad)`` and ``unwrap_signed(blob, aad)``: the OAEP
    wrapping followed by an RSA-PSS signature of the private key, used by
    :func:`zodbkmi.format.wrapped.wrap` for suite 1 in version 2.
    """

    key_id = zope.interface.Attribute(
        'A public, stable identifier (ASCII text, at most 255 bytes) that '
        'names this KEK in every DEK it wraps.  Never derived from key '
        'bytes with a fast unkeyed hash.')

    suite = zope.interface.Attribute(
        'The wrapping suite number of the wrapped-DEK format.')

    def wrap(dek, aad):
        """Return ``dek`` (32 bytes) wrapped and bound to ``aad`` (bytes).

        ``aad`` is the wrapped-DEK header; it is authenticated, not stored
        by the KEK.
        """

    def unwrap(blob, aad):
        """Return the DEK from ``blob`` produced by :meth:`wrap`.

        Raises :class:`~zodbkmi.exceptions.AuthenticationError` when
        ``blob`` or ``aad`` was altered or another key wrapped it, and
        :class:`~zodbkmi.exceptions.TruncatedDataError` when ``blob`` is
        shorter than the suite's wrapping.
        """


class IKeyStore(zope.interface.Interface):
    """Stores wrapped data keys with their lifecycle state.

    Called the "key vault" (``IKeyVault``) before 2026-12; "Vault" now
    names HashiCorp Vault/OpenBao only.  A key store never sees an
    unwrapped DEK nor a KEK.  Writes are atomic: after a crash an entry is
    either complete or absent.
    """

    def add(entry):
        """Store a new :class:`zodbkmi.keystore.KeyStoreEntry`.

        Raises :class:`~zodbkmi.exceptions.KeyStoreError` when it cannot be
        written and ``ValueError`` when the DEK id exists already.
        """

    def get(dek_id):
        """Return the entry for ``dek_id`` or ``None``."""

    def update(entry):
        """Replace the stored entry of ``entry.dek_id`` (state or wrapping)."""

    def remove(dek_id):
        """Destroy the entry; raises :class:`UnknownKeyError` if absent."""

    def ids():
        """Return the DEK ids of all entries, sorted."""

    def active_for(kek_id):
        """Return the entry of the active DEK wrapped by ``kek_id`` or None.

        When several are active (two processes rotated at once), the newest
        wins.
        """


#: Deprecated: the old name of :class:`IKeyStore`.
IKeyVault = IKeyStore
