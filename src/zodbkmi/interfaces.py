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
The methods that make them are those of :class:`IKeyLifecycle`:

======================  =====================================================
method                  transition
======================  =====================================================
``create_key(kek)``     new DEK ``active``; the previous active DEK of the
                        KEK ``retired``
``rotate(kek)``         the same (DEK rotation)
``retire(dek_id)``      ``active -> retired`` (a retired key: no change)
``delete(dek_id)``      ``active`` or ``retired`` ``-> destroyed``
``rewrap(old, new)``    none: every DEK of KEK ``old`` is wrapped by ``new``
                        instead, its state kept (KEK rotation,
                        :class:`IKeyRewrapping`)
``upgrade(kek)``        none: version 1 entries of the KEK rewritten in
                        version 2, their state kept
======================  =====================================================

The state of a DEK is stored in its key store entry
(:class:`IKeyStoreEntry`); it is not authenticated, so it only ever
restricts: a key store takes the active DEK of a KEK to be its newest
entry, and none when that one is retired.
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

    def encrypt(key, data, oid=None):
        """Return ``data`` (bytes) encrypted under the active DEK of ``key``.

        The result is a record envelope (see ``docs/format.rst``) naming
        the DEK id; only :meth:`decrypt` opens it.  Without ``oid`` it is
        an envelope of the data context (what keas.kmi callers get).  With
        ``oid`` (8 bytes, a ZODB object id) it is a storage record bound
        to that oid: :meth:`decrypt` then needs the same oid, so a record
        moved to another object does not open.  Two calls with the same
        arguments give different results.

        Raises :class:`~zodbkmi.exceptions.InvalidKeyError` when ``key`` is
        not a key, :class:`~zodbkmi.exceptions.UnknownKeyError` when ``key``
        guards no active DEK, ``TypeError`` when ``data`` is not bytes.
        """

    def decrypt(key, data, oid=None):
        """Return the plaintext of the record envelope ``data``.

        The DEK is the one named in ``data``; it must be wrapped by ``key``
        or, when ``key`` is a list or tuple of KEKs (the current one and
        previous ones after a KEK rotation), by one of them, found by id.
        ``oid``: the oid ``data`` was bound to by :meth:`encrypt` (None for
        a data envelope); an envelope opens only with the oid it was
        sealed with.

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

    def encrypt_file(key, fsrc, fdst, chunk_size=None, oid=None):
        """Encrypt the binary file object ``fsrc`` (read to its end) into
        ``fdst`` under the active DEK of ``key``; return the number of
        plaintext bytes.

        Streams in constant memory (pipes work); see the stream format in
        ``docs/format.rst``.  ``chunk_size`` is the plaintext size of a
        chunk (default 64 KiB).  With ``oid`` (8 bytes: blob files) the
        stream is bound to that oid and :meth:`decrypt_file` needs the
        same one.  Raises the errors of :meth:`encrypt`.
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

    def generate(kind=None):
        """Create a new KEK and a new DEK wrapped by it; return the KEK.

        The KEK is returned as PEM bytes: by default (``kind`` ``'hybrid'``)
        a hybrid ML-KEM-768 + X25519 private key, with ``kind='rsa'`` an
        RSA private key of at least 3072 bits; only the wrapped DEK is
        kept by the service.  The caller must keep the KEK: without it the
        data encrypted under the new DEK cannot be read.
        """


class IInPlaceFileEncryption(zope.interface.Interface):
    """An encryption service that can encrypt a file into itself (the
    plaintext pages overwritten rather than copied)."""

    def encrypt_file_in_place(key, fd, chunk_size=None, oid=None):
        """Encrypt the regular file open for reading and writing on the file
        descriptor ``fd`` into itself, byte for byte as
        :meth:`IEncryptionService.encrypt_file` would into another file; return
        the number of plaintext bytes.  On an error the file holds a mix of
        plaintext and ciphertext and must be discarded.
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


class IKeyLifecycle(zope.interface.Interface):
    """A facility that manages the lifecycle of its data keys (the table
    of this module): rotation, retirement, destruction, upgrade.

    Every change evicts the DEK from every cache of this process; other
    processes see it within their cache timeout.
    """

    def entry(dek_id):
        """Return the :class:`IKeyStoreEntry` of ``dek_id`` (state, KEK
        id, creation time, wrapped DEK).

        Raises :class:`~zodbkmi.exceptions.UnknownKeyError` when there is
        no such key (or ``dek_id`` is not 32 lowercase hex digits)."""

    def rotate(key):
        """DEK rotation: create a new DEK for the KEK ``key`` and make it
        active (as :meth:`IDataKeyCreation.create_key`); the previous one
        becomes retired, decrypt-only.  Return the new DEK id."""

    def retire(dek_id):
        """Make ``dek_id`` retired: it decrypts, it never encrypts again.
        Retiring a retired key changes nothing.  Raises
        :class:`~zodbkmi.exceptions.UnknownKeyError` when there is no
        such key."""

    def delete(dek_id):
        """Destroy ``dek_id``: the data encrypted under it becomes
        unreadable, for good.  Raises
        :class:`~zodbkmi.exceptions.UnknownKeyError` when there is no
        such key."""

    def upgrade(key):
        """Rewrite every version 1 entry of the KEK ``key`` in version 2
        (same DEK, id, state and creation time); return how many.  Only
        the holder of ``key``'s secret can; it vouches for the entries
        the key store holds at that moment (``docs/keys.rst``)."""


class IKeyManagementFacility(IEncryptionService, IKeyGenerationService):
    """A key management facility: generation plus encryption services."""


class IExtendedKeyManagementFacility(IKeyManagementFacility,
                                     IDataKeyCreation,
                                     IKeyLifecycle,
                                     IInPlaceFileEncryption,
                                     IRecordFastPath,
                                     IMetadataEncryption,
                                     mapping.IEnumerableMapping):
    """A facility that is also a read-only mapping of DEK ids to wrapped DEKs.

    Values are wrapped-DEK blobs (``docs/format.rst``); they are useless
    without the KEK that wrapped them.
    """

    def key_id_of(data, oid=None):
        """Return the DEK id (hex) named by the envelope ``data`` (a data,
        object state or transaction metadata envelope, or a storage record
        when ``oid`` is given), after validating its header; nothing is
        decrypted.  Raises the header errors of
        :meth:`IEncryptionService.decrypt`."""

    def decrypt_file_range(key, fsrc, fdst, offset, length=None, oid=None,
                           self_contained=False):
        """Decrypt ``length`` plaintext bytes from ``offset`` (to the end
        when None) of the stream that fills the *seekable* binary file
        ``fsrc`` (from its first byte) into ``fdst``, reading only the
        chunks that hold them; return the number of bytes written (fewer
        when the range passes the end).

        Every chunk read is authenticated; ``oid`` and ``self_contained`` as
        for :meth:`IEncryptionService.decrypt_file`, whose errors it raises,
        and ``ValueError`` for a negative range or a source that cannot seek.
        """


class IKeyHolder(zope.interface.Interface):
    """Holds the application's key encrypting key.

    Registered as a utility; :class:`zodbkmi.persistent.EncryptedPersistent`
    encrypts with ``key`` and decrypts with ``key`` or any of
    ``previous_keys``; :class:`zodbkmi.storage.EncryptingStorage` given a
    ``keyholder`` does the same.  A key holder written for keas.kmi has
    only ``key``: zodbkmi then reads with ``key`` alone.
    """

    key = zope.interface.Attribute(
        'The current key encrypting key (PEM bytes, 32 AES bytes, or an '
        'IKeyEncryptingKey); it encrypts all new data.')

    previous_keys = zope.interface.Attribute(
        'A tuple of older key encrypting keys (same forms as ``key``), '
        'kept after a KEK rotation so that data whose DEKs they wrap can '
        'still be read; never used to encrypt.  Empty when there was no '
        'rotation.')


class ITenant(zope.interface.Interface):
    """A marker for the root object of a tenant (a site, a customer's
    folder): every :class:`~zodbkmi.persistent.EncryptedPersistent`
    object at or below it along ``__parent__`` is sealed under the key
    of the tenant (``docs/tenants.rst``).

    Declare it on the class (``@implementer(ITenant)``): selection checks
    the class, so a ghost is never loaded to learn that it is no tenant.
    """

    tenant_id = zope.interface.Attribute(
        'The tenant id (letters, digits, ``_`` and ``-``, at most 64): '
        'the name of the tenant in the tenant registry and of its key '
        'holder, a named IKeyHolder utility ``"tenant:" + tenant_id``.')


class IKeySelector(zope.interface.Interface):
    """Chooses the key holder that seals an object's state.

    An application may register one utility; without one the default rule
    applies (``docs/tenants.rst``): the nearest object along ``__parent__``
    (the object itself first) whose class implements :class:`ITenant` or
    :class:`IKeyHolder`, else the default key holder.  Called on commit
    only: loading opens with the key the envelope names.
    """

    def __call__(obj):
        """Return the IKeyHolder whose ``key`` seals the state of ``obj``,
        or None for the default key holder."""


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
        """Destroy the entry; raises
        :class:`~zodbkmi.exceptions.UnknownKeyError` if absent."""

    def ids():
        """Return the DEK ids of all entries, sorted."""

    def entries():
        """Return every entry (:class:`IKeyStoreEntry`), sorted by DEK
        id."""

    def active_for(kek_id):
        """Return the entry of the active DEK wrapped by ``kek_id`` or None.

        When several are active (two processes rotated at once), the newest
        wins.
        """

    def rotate(entry):
        """DEK rotation in one step: store the new, active ``entry`` and
        retire every other active entry of its KEK; return the retired
        entries.

        Atomic for the readers of this key store: they see the old active
        DEK or the new one, never none.  Raises ``ValueError`` when the
        DEK id exists already, and
        :class:`~zodbkmi.exceptions.KeyStateError` when another writer
        rotated the same KEK at the same moment and won (nothing of this
        call was stored); a key store that serializes its writers never
        does.
        """


class IKeyStoreSweep(zope.interface.Interface):
    """A key store whose writers may leave temporary copies of entries
    (a writer killed before its rename), and that can remove them."""

    def sweep(dek_ids):
        """Remove the leftover copies of the entries of ``dek_ids``; return
        how many.  Called after those keys were destroyed or rewrapped, so
        that no copy outlives a destroyed key nor a KEK rotation."""


class IKeyStoreCheck(zope.interface.Interface):
    """A key store that lives outside the process (a database) and can be
    unreachable for a while."""

    def check():
        """Return if the key store answers; else raise
        :class:`~zodbkmi.exceptions.KeyStoreError` saying why (never with a
        password).  The key server's ``/v1/health`` calls it."""


class IKeyStoreEntry(zope.interface.Interface):
    """One wrapped data key in a key store, with its lifecycle state.

    Only ``wrapped`` is authenticated (by the KEK): it binds ``dek_id``,
    ``kek_id`` and, in version 2, ``created``, and a key store refuses an
    entry whose fields differ from it.  ``state`` is not authenticated
    (see the lifecycle table of this module).
    """

    dek_id = zope.interface.Attribute('The DEK id: 32 lowercase hex digits.')
    kek_id = zope.interface.Attribute(
        'The id of the KEK that wrapped the DEK.')
    state = zope.interface.Attribute(
        '``"active"`` or ``"retired"``; a destroyed key has no entry.')
    created = zope.interface.Attribute(
        'Creation time, in nanoseconds since the Unix epoch.')
    wrapped = zope.interface.Attribute(
        'The wrapped DEK (bytes, ``docs/format.rst``).')
    version = zope.interface.Attribute(
        'The version of the wrapped-DEK format of ``wrapped`` (1 or 2).')


class IKeyRewrapping(zope.interface.Interface):
    """A facility that holds its key store itself and rotates KEKs: the
    master facility, :class:`zodbkmi.facility.KeyManagementFacility`.

    It has this method without declaring the interface, so that it still
    provides one interface only (what ``provideUtility(facility)``
    without ``provides`` needs, as in keas.kmi)."""

    def rewrap(old_key, new_key):
        """KEK rotation: wrap every DEK of ``old_key`` with ``new_key``
        instead (states and creation times kept); return how many.

        Data is not touched.  Each entry is replaced atomically, so an
        interruption leaves every DEK readable with either KEK; running it
        again finishes the job.  Raises
        :class:`~zodbkmi.exceptions.KeyStateError` when both are the same
        key."""


#: Deprecated: the old name of :class:`IKeyStore`.
IKeyVault = IKeyStore
