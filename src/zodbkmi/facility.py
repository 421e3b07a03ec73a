"""Key management facilities: the keas.kmi API over envelope encryption.

:class:`KeyManagementFacility` is the master facility: a key store (a
directory) of data keys wrapped by key encrypting keys that the callers
hold.  ``generate()`` creates a hybrid (or RSA) KEK and a DEK wrapped by
it and returns the KEK; ``encrypt(key, data)`` / ``decrypt(key, data)``
unwrap the DEK with the caller's KEK (once, then from the cache) and seal
or open a record envelope.  :class:`EncryptionService` is what it shares
with the key server's client,
:class:`zodbkmi.client.LocalKeyManagementFacility`, which keas.kmi users
import from here (it stays importable from here).
"""
import hmac
import os
import threading
import time

from cryptography.exceptions import InvalidTag
from zope.interface import implementer

from zodbkmi import keystore
from zodbkmi.cache import DEFAULT_MAXSIZE
from zodbkmi.cache import DEFAULT_TTL
from zodbkmi.cache import DEFAULT_USE_LIMIT
from zodbkmi.cache import DEKCache
from zodbkmi.cache import evict_everywhere
from zodbkmi.exceptions import EvictedKeyError
from zodbkmi.exceptions import KeyStateError
from zodbkmi.exceptions import SelfContainedStreamError
from zodbkmi.exceptions import UnauthenticatedKeyError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.exceptions import UnsupportedFormatError
from zodbkmi.exceptions import WrongKeyError
from zodbkmi.format import envelope
from zodbkmi.format import stream
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IExtendedKeyManagementFacility
from zodbkmi.interfaces import IKeyStoreSweep
from zodbkmi.kek import DEFAULT_KEK_KIND
from zodbkmi.kek import RSA_DEFAULT_BITS
from zodbkmi.kek import as_kek
from zodbkmi.kek import generate_kek

_CONTEXT_DATA = envelope.CONTEXT_DATA
_CONTEXT_RECORD = envelope.CONTEXT_RECORD
_CONTEXT_STATE = envelope.CONTEXT_STATE
_CONTEXT_METADATA = envelope.CONTEXT_METADATA
_monotonic = time.monotonic
_read_dek_id = envelope.read_dek_id
# the keys of the tables of opened envelopes (see Sealer.opener): the
# envelope's prefix (format .. salt in version 2, format .. DEK id in
# version 1), data[:_KEYED_SIZES[data[3]]]
_KEYED_SIZES = envelope.KEYED_PREFIX_SIZES
_TAG_SIZE = envelope.TAG_SIZE
# prefixes remembered per key and context (the table is emptied when full)
_OPENED_TABLE_SIZE = 4096


def _no_fast_path(data, oid):
    return None


def _file_aad(oid):
    """The associated data of a stream bound to ``oid`` (or of none)."""
    if oid is None:
        return b''
    if not isinstance(oid, bytes) or len(oid) != envelope.OID_SIZE:
        raise ValueError('an oid has 8 bytes')
    return oid


def _entry_and_dek(lookup, *args):
    """``lookup(*args)`` and the DEK bytes of the entry it returns, looked
    up once more if another thread evicted the entry in between."""
    for _ in range(3):
        entry = lookup(*args)
        dek = entry._dek
        if dek is not None:
            return entry, dek
    raise EvictedKeyError('DEK %s keeps being evicted while in use'
                          % entry.dek_id)


class EncryptionService:
    """Encryption and decryption with DEKs found through the caller's KEK.

    Subclasses say where wrapped DEKs come from: ``_wrapped_key()``
    (by DEK id) and ``_active_key_id()`` (the active DEK of a KEK).

    ``key`` arguments are a KEK (see :func:`zodbkmi.kek.as_kek`) or, for
    decryption, a list or tuple of KEKs (the current one and previous ones
    after a KEK rotation): the one that wrapped the DEK is used, found by id
    (no trial decryption).

    ``use_limit`` is accepted for compatibility and ignored: no encryption
    is refused for a number of uses any more, because record envelopes of
    version 2 draw a new subkey of the DEK every
    :data:`zodbkmi.format.envelope.SUBKEY_LIMIT` seals and in every process
    (``docs/format.rst``), and streams have a key of their own.
    """

    def __init__(self, timeout=DEFAULT_TTL, cache_size=DEFAULT_MAXSIZE,
                 use_limit=DEFAULT_USE_LIMIT):
        self._cache = DEKCache(timeout, cache_size, use_limit)
        # Per key object given by callers (usually the same bytes object of
        # a key holder): the entry of its active DEK, and the KEK ids it
        # stands for.  Keeps as_kek() and id lookups off the hot path.
        self._active = {}
        self._owners = {}
        # key -> {envelope prefix -> (AEAD, entry checked against key,
        # nonce start, header size)}, one table per context (data, storage
        # record, object state, transaction metadata): a hit both
        # validates the header and finds the AES-GCM context (the DEK's,
        # or a version 2 subkey's: the prefix holds the salt) in one
        # lookup.
        self._opened = ({}, {}, {}, {})
        self._load_lock = threading.Lock()
        self._cache.on_evict(self._drop_entry)

    @property
    def timeout(self):
        """Seconds an unwrapped DEK stays in the cache (default 3600)."""
        return self._cache.ttl

    @timeout.setter
    def timeout(self, value):
        self._cache.ttl = value
        self.clear_cache()

    def clear_cache(self):
        """Forget every unwrapped DEK (they are fetched again when needed)."""
        self._cache.clear()
        for table in self._opened:
            table.clear()
        self._forget_active()

    def _forget_active(self):
        """Called when an active DEK changes: the next encryption looks the
        active DEK up again."""
        self._active.clear()

    # -- to be provided by subclasses ------------------------------------

    def _wrapped_key(self, dek_id):
        """Return the wrapped DEK (bytes) of ``dek_id`` (hex) or raise
        UnknownKeyError."""
        raise NotImplementedError

    def _active_key_id(self, kek_id):
        """Return the id of the active DEK of ``kek_id`` or None."""
        raise NotImplementedError

    def active_key_id(self, key):
        """Return the id of the active DEK of the KEK ``key``, or None;
        creates nothing (see
        :class:`~zodbkmi.interfaces.IDataKeyCreation`)."""
        return self._active_key_id(as_kek(key).key_id)

    # -- key lookup ------------------------------------------------------

    def _unwrap(self, raw_id, keks):
        """Fetch and unwrap the DEK ``raw_id`` with the KEK of ``keks``
        ({KEK id: KEK object}) that wrapped it; return ``(kek, dek)``.

        Refuses, before any use of the DEK, a wrapped DEK stored under another
        id, one that does not prove its maker held the KEK's secret
        (:class:`~zodbkmi.exceptions.UnauthenticatedKeyError`), one wrapped by
        a KEK not given, and one that does not authenticate under it."""
        dek_id = raw_id.hex()
        data = self._wrapped_key(dek_id)
        parsed = wrapped.parse(data)
        if parsed.dek_id != raw_id:
            raise UnknownKeyError(
                'wrapped DEK stored as %s names DEK %s'
                % (dek_id, parsed.dek_id.hex()), dek_id)
        if not parsed.proves_maker:
            raise UnauthenticatedKeyError(
                'DEK %s is a version 1 RSA-wrapped key, which anyone holding '
                'the public key of KEK %s can make: it is not used.  If this '
                'key store is yours, rewrite it with "zodbkmi upgrade-keys" '
                '(docs/keys.rst)' % (dek_id, parsed.kek_id), dek_id)
        kek = keks.get(parsed.kek_id)
        if kek is None:
            raise WrongKeyError(
                'DEK %s is wrapped by KEK %s, which was not given (given: '
                '%s)' % (dek_id, parsed.kek_id, ', '.join(sorted(keks))))
        _, dek = wrapped.unwrap(kek, data)
        return kek, dek

    def _authorized_entry(self, raw_id, keks):
        """The cache entry of the DEK ``raw_id`` for a caller holding
        ``keks`` ({KEK id: KEK object}).

        A cached DEK is handed only to a KEK object that unwrapped it
        itself.  Any other object, even one that names the same KEK id,
        unwraps it first: the public half of an RSA KEK cannot, nor can an
        AES KEK with other bytes, so neither gets the cached DEK."""
        entry = self._cache.get(raw_id)
        if entry is not None:
            kek = keks.get(entry.kek_id)
            if kek is not None and entry.authorizes(kek):
                return entry
        kek, dek = self._unwrap(raw_id, keks)
        if entry is not None and entry.kek_id == kek.key_id:
            cached = entry._dek
            if cached is not None and hmac.compare_digest(cached, dek):
                entry.authorize(kek)
                if _monotonic() < entry.expires:
                    return entry
        entry = self._cache.put(
            raw_id, kek.key_id, envelope.Sealer(raw_id, dek), dek)
        entry.authorize(kek)
        return entry

    def _drop_entry(self, entry):
        """Forget every reference to the evicted ``entry`` (called by the
        cache); it holds no key material any more, this drops the rest."""
        for k, e in list(self._active.items()):
            if e is entry:
                self._active.pop(k, None)
        for tables in self._opened:
            for table in list(tables.values()):
                for prefix, hit in list(table.items()):
                    if hit[1] is entry:     # (aead, entry, ...)
                        table.pop(prefix, None)

    def _keks(self, key):
        if isinstance(key, (list, tuple)):
            keks = {}
            for k in key:
                kek = as_kek(k)
                keks[kek.key_id] = kek
            return keks
        kek = as_kek(key)
        return {kek.key_id: kek}

    def _remember(self, table, key, value):
        try:
            if len(table) >= 1024:
                table.clear()
            table[key] = value
        except TypeError:   # an unhashable key (a list): not remembered
            pass

    def _encryption_entry(self, key):
        """The cache entry of the active DEK of ``key``."""
        kek = as_kek(key)
        with self._load_lock:
            dek_id = self._active_key_id(kek.key_id)
            if dek_id is None:
                raise UnknownKeyError(
                    'KEK %s has no active data key: create one first '
                    '(generate() or create_key(kek)); keys made before '
                    'wrapped-DEK format 2 become active again after '
                    '"zodbkmi upgrade-keys"' % kek.key_id)
            entry = self._authorized_entry(bytes.fromhex(dek_id),
                                           {kek.key_id: kek})
            self._remember(self._active, key, entry)
            return entry

    def _owned_keks(self, key):
        """{KEK id: KEK object} for ``key`` (remembered per key object)."""
        try:
            keks = self._owners.get(key)
        except TypeError:
            keks = None
        if keks is None:
            keks = self._keks(key)
            self._remember(self._owners, key, keks)
        return keks

    def _decryption_entry(self, key, raw_id):
        """The cache entry of ``raw_id``, checked against ``key``."""
        return self._authorized_entry(raw_id, self._owned_keks(key))

    # -- IEncryptionService ----------------------------------------------

    def encrypt(self, key, data, oid=None):
        """Seal ``data`` under the active DEK of ``key``.

        With ``oid`` (8 bytes) the result is a storage record envelope bound
        to that oid; :meth:`decrypt` then needs the same oid.  Without, a
        data envelope, which only :meth:`decrypt` opens (not
        :meth:`decrypt_state`).
        """
        try:
            entry = self._active[key]
        except (KeyError, TypeError):
            entry = self._encryption_entry(key)
        else:
            if _monotonic() >= entry.expires:     # expired or evicted
                entry = self._encryption_entry(key)
        try:
            if oid is None:
                return entry.sealer.seal_data(data)
            return entry.sealer.seal_record(data, oid)
        except EvictedKeyError:   # evicted by another thread meanwhile
            return self._encryption_entry(key).sealer.seal(
                data, _CONTEXT_DATA if oid is None else _CONTEXT_RECORD, oid)

    def encrypt_state(self, key, data):
        """Seal the pickled state ``data`` of an ``EncryptedPersistent``
        object under the active DEK of ``key``: an object state envelope,
        which only :meth:`decrypt_state` opens."""
        try:
            entry = self._active[key]
        except (KeyError, TypeError):
            entry = self._encryption_entry(key)
        else:
            if _monotonic() >= entry.expires:     # expired or evicted
                entry = self._encryption_entry(key)
        try:
            return entry.sealer.seal_state(data)
        except EvictedKeyError:   # evicted by another thread meanwhile
            return self._encryption_entry(key).sealer.seal_state(data)

    def decrypt(self, key, data, oid=None):
        """Open the envelope ``data``; see :meth:`encrypt` for ``oid``.

        A version 1 data envelope (written before object states had a
        context of their own) opens here and in :meth:`decrypt_state`.
        """
        context = _CONTEXT_DATA if oid is None else _CONTEXT_RECORD
        try:
            aead, entry, n, h = self._opened[context][key][
                data[:_KEYED_SIZES[data[3]]]]
        except (KeyError, TypeError, IndexError):
            aead, entry, n, h = self._opened_entry(key, data, context)
        else:
            if _monotonic() >= entry.expires:     # expired or evicted
                aead, entry, n, h = self._opened_entry(key, data, context)
        if oid is None:
            try:
                return aead.decrypt(data[n:h], data[h:], data[:h])
            except (InvalidTag, ValueError):
                # a cut envelope gets its own error, any other its own
                _read_dek_id(data, context)
                return entry.sealer.open_data(data)   # raises its error
        if type(oid) is bytes and len(oid) == 8:
            try:
                return aead.decrypt(data[n:h], data[h:], data[:h] + oid)
            except (InvalidTag, ValueError):
                _read_dek_id(data, context)
        return entry.sealer.open_record(data, oid)    # raises its error

    def decrypt_state(self, key, data):
        """Open the object state envelope ``data`` (made by
        :meth:`encrypt_state`, or a version 1 data envelope)."""
        try:
            aead, entry, n, h = self._opened[_CONTEXT_STATE][key][
                data[:_KEYED_SIZES[data[3]]]]
        except (KeyError, TypeError, IndexError):
            aead, entry, n, h = self._opened_entry(key, data, _CONTEXT_STATE)
        else:
            if _monotonic() >= entry.expires:     # expired or evicted
                aead, entry, n, h = self._opened_entry(key, data,
                                                       _CONTEXT_STATE)
        try:
            return aead.decrypt(data[n:h], data[h:], data[:h])
        except (InvalidTag, ValueError):
            # a cut envelope gets its own error, any other its own
            _read_dek_id(data, _CONTEXT_STATE)
            return entry.sealer.open_state(data)      # raises its error

    # -- IMetadataEncryption ---------------------------------------------

    def encrypt_metadata(self, key, data):
        """Seal the encoded transaction metadata ``data`` (see
        :mod:`zodbkmi.format.txnmeta`) under the active DEK of ``key``: a
        transaction metadata envelope, which only :meth:`decrypt_metadata`
        opens."""
        try:
            entry = self._active[key]
        except (KeyError, TypeError):
            entry = self._encryption_entry(key)
        else:
            if _monotonic() >= entry.expires:     # expired or evicted
                entry = self._encryption_entry(key)
        try:
            return entry.sealer.seal_metadata(data)
        except EvictedKeyError:   # evicted by another thread meanwhile
            return self._encryption_entry(key).sealer.seal_metadata(data)

    def decrypt_metadata(self, key, data):
        """Open the transaction metadata envelope ``data`` (made by
        :meth:`encrypt_metadata`); ``key`` as for :meth:`decrypt`."""
        if type(data) is not bytes:
            data = bytes(data)
        try:
            aead, entry, n, h = self._opened[_CONTEXT_METADATA][key][
                data[:_KEYED_SIZES[data[3]]]]
        except (KeyError, TypeError, IndexError):
            aead, entry, n, h = self._opened_entry(key, data,
                                                   _CONTEXT_METADATA)
        else:
            if _monotonic() >= entry.expires:     # expired or evicted
                aead, entry, n, h = self._opened_entry(key, data,
                                                       _CONTEXT_METADATA)
        try:
            return aead.decrypt(data[n:h], data[h:], data[:h])
        except (InvalidTag, ValueError):
            _read_dek_id(data, _CONTEXT_METADATA)
            return entry.sealer.open_metadata(data)   # raises its error

    def record_fast_path(self, key):
        """Return ``open_fast(data, oid)``: the plaintext of the storage
        record ``data`` of ``oid`` when it is a hit of the table that
        :meth:`decrypt` keeps for ``key``, else None (then call
        :meth:`decrypt`, which validates, raises the documented errors and
        fills the table).

        For :class:`~zodbkmi.storage.EncryptingStorage`, which opens every
        record it loads: no frame besides the AEAD call, and no lookup of
        ``key``.  What a hit checks is what :meth:`decrypt` checks on a
        hit: the envelope prefix (format, context, DEK id and, in version
        2, the salt) names an AES-GCM context of a DEK already checked
        against ``key``, its entry has not expired nor been evicted, the
        record is long enough; the AEAD call authenticates the rest, and a
        record that does not authenticate returns None (:meth:`decrypt`
        then raises).
        """
        tables = self._opened[_CONTEXT_RECORD]
        try:
            hash(key)
        except TypeError:     # a list of keys: decrypt() keeps no table
            return _no_fast_path
        sizes, tag = _KEYED_SIZES, _TAG_SIZE
        monotonic = _monotonic
        # the table's get, refreshed on a miss: clear_cache() and the size
        # bound of decrypt()'s tables replace the table of ``key``, and an
        # entry left in an old one has expired when its DEK was evicted
        current = [{}.get]

        def open_fast(data, oid):
            if type(data) is not bytes or len(data) < 4:
                return None
            prefix = data[:sizes[data[3]]]
            hit = current[0](prefix)
            if hit is None or monotonic() >= hit[1].expires:
                table = tables.get(key)
                if table is None:
                    return None
                current[0] = table.get
                hit = table.get(prefix)
                if hit is None or monotonic() >= hit[1].expires:
                    return None
            aead, _, n, h = hit
            if len(data) < h + tag:
                return None
            try:
                return aead.decrypt(data[n:h], data[h:], data[:h] + oid)
            except (InvalidTag, TypeError):
                return None

        return open_fast

    def _opened_entry(self, key, data, context):
        """The slow path of the decryptions: validate the header (raising
        its documented errors), find the DEK, remember its AES-GCM context
        for ``key`` under the envelope's prefix; return the table's value
        ``(aead, entry, nonce start, header size)``."""
        raw_id = _read_dek_id(data, context)
        entry = self._decryption_entry(key, raw_id)
        try:
            prefix, aead, n, h = entry.sealer.opener(data)
        except EvictedKeyError:   # evicted by another thread meanwhile
            entry = self._decryption_entry(key, raw_id)
            prefix, aead, n, h = entry.sealer.opener(data)
        hit = (aead, entry, n, h)
        tables = self._opened[context]
        try:
            table = tables[key]
        except KeyError:
            table = {}
            self._remember(tables, key, table)
        except TypeError:   # an unhashable key (a list): not remembered
            return hit
        if len(table) >= _OPENED_TABLE_SIZE:
            table.clear()
        table[prefix] = hit
        return hit

    def key_id_of(self, data, oid=None):
        """Return the DEK id (hex) named by the envelope ``data``: a data,
        object state or transaction metadata envelope, or a storage record
        when ``oid`` is given.  The header is validated (its errors are
        those of :meth:`decrypt`); nothing is decrypted."""
        if oid is not None:
            return _read_dek_id(data, _CONTEXT_RECORD).hex()
        try:
            return _read_dek_id(data, _CONTEXT_DATA).hex()
        except UnsupportedFormatError as e:
            for context in (_CONTEXT_STATE, _CONTEXT_METADATA):
                try:
                    return _read_dek_id(data, context).hex()
                except UnsupportedFormatError:
                    pass
            raise e from None

    def encrypt_file(self, key, fsrc, fdst, chunk_size=None, oid=None):
        """Encrypt the binary file object ``fsrc`` (read to its end) into
        ``fdst`` as a stream (see ``docs/format.rst``) under the active DEK
        of ``key``; one pass, constant memory.  Return the number of
        plaintext bytes.  With ``oid`` (8 bytes: blob files) the stream
        is bound to that oid and :meth:`decrypt_file` needs the same one.
        """
        dek, header = self._new_stream(key, chunk_size)
        return stream.encrypt(fsrc, fdst, dek, header, _file_aad(oid))

    def encrypt_file_in_place(self, key, fd, chunk_size=None, oid=None):
        """Encrypt the regular file open for reading and writing on the
        file descriptor ``fd`` into itself, as :meth:`encrypt_file` would
        into another file (see
        :func:`zodbkmi.format.stream.encrypt_in_place` for what an error
        leaves); return the number of plaintext bytes."""
        dek, header = self._new_stream(key, chunk_size)
        return stream.encrypt_in_place(fd, dek, header, _file_aad(oid))

    def _new_stream(self, key, chunk_size):
        """The DEK and header of a new stream under the active DEK of
        ``key`` (its random 16 byte salt gives the stream a key of its
        own: nothing to count)."""
        entry, dek = _entry_and_dek(self._encryption_entry, key)
        return dek, stream.build_header(
            entry.raw_id, chunk_size=chunk_size or stream.DEFAULT_CHUNK_SIZE)

    def decrypt_file(self, key, fsrc, fdst, oid=None, self_contained=False):
        """Decrypt the stream ``fsrc`` into ``fdst``; return the number of
        plaintext bytes.  ``oid``: see :meth:`encrypt_file`.  See
        :func:`zodbkmi.format.stream.decrypt` for the errors and for what
        was written when one is raised.

        Only a stream that names a DEK of this facility's key store opens,
        unless ``self_contained`` is true: a self-contained stream (its
        wrapped DEK embedded, ``encrypt-file --recipient``), which anyone
        holding the public half of an RSA KEK can make, is refused with
        :class:`~zodbkmi.exceptions.SelfContainedStreamError` before
        anything is written.  With ``self_contained`` it opens with the KEK
        of ``key`` that wrapped it.
        """
        header = stream.read_header(fsrc)
        dek = self._stream_dek(key, header, self_contained)
        return stream.decrypt(fsrc, fdst, dek, header, _file_aad(oid))

    def decrypt_file_range(self, key, fsrc, fdst, offset, length=None,
                           oid=None, self_contained=False):
        """Decrypt ``length`` bytes from ``offset`` of the stream in the
        seekable file ``fsrc`` (see
        :meth:`~zodbkmi.interfaces.IExtendedKeyManagementFacility.decrypt_file_range`);
        ``oid`` and ``self_contained``: see :meth:`decrypt_file`."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError('offset and length must be >= 0')
        if not fsrc.seekable():
            raise ValueError('decrypt_file_range needs a seekable source; '
                             'use decrypt_file for pipes')
        fsrc.seek(0)
        header = stream.read_header(fsrc)
        dek = self._stream_dek(key, header, self_contained)
        return stream.decrypt_range(fsrc, fdst, dek, header, offset, length,
                                    _file_aad(oid))

    def _stream_dek(self, key, header, self_contained=False):
        """The DEK of a stream: found by id in the key store, or embedded (a
        self-contained stream, unwrapped with the KEK of ``key`` that
        wrapped it) when ``self_contained`` allows it."""
        if header.wrapped is not None and not self_contained:
            raise SelfContainedStreamError(
                'stream embeds its wrapped DEK %s (a self-contained stream, '
                'which anyone holding the public key can make): only a '
                'stream naming a DEK of the key store opens here'
                % header.dek_id.hex())
        if header.wrapped is None:
            return _entry_and_dek(self._decryption_entry, key,
                                  header.dek_id)[1]
        kek_id = wrapped.parse(header.wrapped).kek_id
        kek = self._keks(key).get(kek_id)
        if kek is None:
            raise WrongKeyError(
                'stream DEK %s is wrapped by KEK %s, which was not given'
                % (header.dek_id.hex(), kek_id))
        _, dek = wrapped.unwrap(kek, header.wrapped)
        return dek


@implementer(IExtendedKeyManagementFacility)
class KeyManagementFacility(EncryptionService):
    """The master facility: wrapped DEKs in ``storage_dir``, a
    :class:`~zodbkmi.keystore.DirectoryKeyStore` (its ``key_store``;
    ``vault`` is the deprecated old name of that attribute).  Besides
    :class:`~zodbkmi.interfaces.IExtendedKeyManagementFacility` it has
    :meth:`rewrap`, the method of
    :class:`~zodbkmi.interfaces.IKeyRewrapping` (not declared: a
    utility registered without ``provides`` must provide one interface).

    A read-only mapping of DEK ids to wrapped DEKs; keys are created with
    :meth:`generate` or :meth:`create_key`, rotated with :meth:`rotate` and
    :meth:`rewrap`, and ended with :meth:`retire` and :meth:`delete`.
    """

    rsa_bits = RSA_DEFAULT_BITS
    kek_kind = DEFAULT_KEK_KIND

    def __init__(self, storage_dir, timeout=DEFAULT_TTL,
                 cache_size=DEFAULT_MAXSIZE, use_limit=DEFAULT_USE_LIMIT,
                 create=keystore.ON_FIRST_KEY):
        super().__init__(timeout, cache_size, use_limit)
        self.storage_dir = storage_dir
        # by default the directory is made with the first key: opening a
        # facility at a mistyped path creates nothing
        self.key_store = keystore.DirectoryKeyStore(storage_dir,
                                                    create=create)
        self._write_lock = threading.RLock()

    def __repr__(self):
        return '<%s (%i)>' % (type(self).__name__, len(self))

    @property
    def vault(self):
        """Deprecated: the old name of ``key_store``."""
        return self.key_store

    @vault.setter
    def vault(self, value):
        self.key_store = value

    # -- read-only mapping -----------------------------------------------

    def keys(self):
        return self.key_store.ids()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.key_store.ids())

    def __contains__(self, dek_id):
        return self.key_store.get(dek_id) is not None

    def __getitem__(self, dek_id):
        entry = self.key_store.get(dek_id)
        if entry is None:
            raise KeyError(dek_id)
        return entry.wrapped

    def get(self, dek_id, default=None):
        entry = self.key_store.get(dek_id)
        return default if entry is None else entry.wrapped

    def values(self):
        return [e.wrapped for e in self.key_store.entries()]

    def items(self):
        return [(e.dek_id, e.wrapped) for e in self.key_store.entries()]

    def entry(self, dek_id):
        """Return the :class:`zodbkmi.keystore.KeyStoreEntry` (state, KEK id,
        creation time) of ``dek_id``; raise UnknownKeyError."""
        entry = self.key_store.get(dek_id)
        if entry is None:
            raise UnknownKeyError('no key %s in %s'
                                  % (dek_id, self.key_store.path), dek_id)
        return entry

    # -- EncryptionService -----------------------------------------------

    def _wrapped_key(self, dek_id):
        return self.entry(dek_id).wrapped

    def _active_key_id(self, kek_id):
        entry = self.key_store.active_for(kek_id)
        return None if entry is None else entry.dek_id

    # -- key lifecycle ---------------------------------------------------

    def generate(self, kind=None):
        """Create a KEK and an active DEK wrapped by it; return the KEK
        as PEM.  Keep it: it is stored nowhere.

        ``kind`` (default ``self.kek_kind``, ``'hybrid'``) is ``'hybrid'``
        (ML-KEM-768 + X25519 through HPKE, a ``ZODBKMI HYBRID PRIVATE
        KEY``) or ``'rsa'`` (RSA of ``self.rsa_bits`` bits, PKCS#8)."""
        kek = generate_kek(kind or self.kek_kind, self.rsa_bits)
        self.create_key(kek)
        return kek.private_pem()

    def create_key(self, key, _dek=None, _dek_id=None):
        """Create a new DEK wrapped by ``key`` and make it the active DEK
        of ``key``; the previous active DEK becomes retired.  Return the new
        DEK id.

        ``key`` must hold the KEK's secret: the wrapped DEK (format version
        2) proves that its maker held it, and the public half of an RSA KEK
        raises :class:`~zodbkmi.exceptions.InvalidKeyError`."""
        kek = as_kek(key)
        dek = _dek or os.urandom(32)
        raw_id = _dek_id or os.urandom(16)
        with self._write_lock:
            created = keystore.next_created(self.key_store.entries(),
                                            kek.key_id)
            entry = keystore.KeyStoreEntry(
                raw_id.hex(), kek.key_id,
                wrapped.wrap(kek, raw_id, dek, created=created))
            # all of them: a crash between add and retire may have left two
            previous = keystore.active_entries(self.key_store, kek.key_id)
            self.key_store.add(entry)
            for old in previous:
                self._retire_entry(old)
            self._forget_active()
        return entry.dek_id

    def rotate(self, key):
        """DEK rotation: new writes go to a new DEK; the old one stays
        decrypt-only (retired).  Return the new DEK id."""
        return self.create_key(key)

    def ensure_key(self, key):
        """Return the active DEK id of ``key``, creating one if needed."""
        kek = as_kek(key)
        with self._write_lock:
            current = self.key_store.active_for(kek.key_id)
            if current is not None:
                return current.dek_id
            return self.create_key(kek)

    def _retire_entry(self, entry):
        entry = keystore.KeyStoreEntry(entry.dek_id, entry.kek_id,
                                       entry.wrapped, keystore.RETIRED,
                                       entry.created)
        self.key_store.update(entry)
        self._forget_active()

    def retire(self, dek_id):
        """Make ``dek_id`` decrypt-only.  Retiring a retired key is a
        no-op."""
        with self._write_lock:
            entry = self.entry(dek_id)
            if entry.state != keystore.RETIRED:
                self._retire_entry(entry)
        evict_everywhere(dek_id)

    def delete(self, dek_id):
        """Destroy ``dek_id``: data encrypted under it becomes unreadable.

        This cannot be undone.  The key is evicted from every cache of this
        process; other processes forget it within their cache timeout.
        """
        with self._write_lock:
            self.key_store.remove(dek_id)   # UnknownKeyError when absent
            self._forget_active()
        evict_everywhere(dek_id)

    def rewrap(self, old_key, new_key):
        """KEK rotation: rewrap every DEK of ``old_key`` under ``new_key``.

        Data is not touched; the cost is one unwrap and one wrap per DEK.
        Each entry is replaced atomically, so an interruption leaves every
        DEK readable with either KEK; running it again finishes the job.
        Return the number of DEKs rewrapped.
        """
        old, new = as_kek(old_key), as_kek(new_key)
        if old.key_id == new.key_id:
            raise KeyStateError('old and new KEK are the same key (%s)'
                                % old.key_id)
        return self._rewrite(old, new, lambda entry: True)

    def upgrade(self, key):
        """Rewrite every version 1 entry of the KEK ``key`` in version 2
        (same DEK, id, state and creation time); return how many.

        A version 1 RSA-wrapped DEK can be made by anyone holding the public
        key, so it is refused
        (:class:`~zodbkmi.exceptions.UnauthenticatedKeyError`) until the
        holder of the private key runs this, vouching for the entries the
        key store holds at that moment (``docs/keys.rst``, "Upgrading a key
        store").  Running it twice is harmless.  :meth:`rewrap` upgrades
        too."""
        kek = as_kek(key)
        return self._rewrite(
            kek, kek, lambda entry: entry.version == wrapped.VERSION_1)

    def _rewrite(self, old, new, wanted):
        """Rewrap the ``wanted`` entries of ``old`` under ``new`` (format
        version 2, creation time kept); return how many."""
        rewrapped = []
        with self._write_lock:
            for entry in self.key_store.entries():
                if entry.kek_id != old.key_id or not wanted(entry):
                    continue
                raw_id, dek = wrapped.unwrap(old, entry.wrapped)
                self.key_store.update(keystore.KeyStoreEntry(
                    entry.dek_id, new.key_id,
                    wrapped.wrap(new, raw_id, dek, created=entry.created),
                    entry.state, entry.created))
                evict_everywhere(entry.dek_id)
                rewrapped.append(entry.dek_id)
            self._forget_active()
            # copies wrapped by the old KEK that killed writers left behind
            if IKeyStoreSweep.providedBy(self.key_store):
                self.key_store.sweep(rewrapped)
        return len(rewrapped)


def __getattr__(name):
    # The key server client lives in zodbkmi.client (it imports this
    # module for EncryptionService, so it cannot be imported here at the
    # top); keas.kmi users import it from here, which keeps working.
    if name == 'LocalKeyManagementFacility':
        from zodbkmi.client import LocalKeyManagementFacility
        return LocalKeyManagementFacility
    raise AttributeError('module %r has no attribute %r' % (__name__, name))


def __dir__():
    return sorted(list(globals()) + ['LocalKeyManagementFacility'])
