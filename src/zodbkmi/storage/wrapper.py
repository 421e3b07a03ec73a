"""EncryptingStorage: a ZODB storage wrapper that encrypts every record.

:class:`EncryptingStorage` wraps any ZODB storage (FileStorage, a ZEO
client, RelStorage, ...) the way ``zc.zlibstorage`` does: records are
sealed on their way down (``store``, ``restore``, ``storeBlob``,
``restoreBlob``) and opened on their way up (``load``, ``loadBefore``,
``loadSerial``, ``iterator``, ``record_iternext``), so the wrapped storage
only ever sees ciphertext.  Each record is a record envelope (see
``docs/format.rst``) bound to its 8 byte oid: a record moved to another
object does not authenticate.

Three modes (see ``docs/storage.rst``):

``strict`` (the default)
    Records are written encrypted; a record that is not an envelope is
    refused with :class:`~zodbkmi.exceptions.NotEncryptedError`.
``migrate``
    Records are written encrypted; plaintext records written before the
    migration started are read as they are, but not plaintext newer than
    the start or than an encrypted revision of its object (a downgrade).
``decrypt-only``
    Records are written in plaintext; both plaintext and encrypted records
    are read.  The first step of a rolling upgrade of several clients.

The blob methods are in :mod:`zodbkmi.storage.blobs`, the checks of
migrate mode in :mod:`zodbkmi.storage.checks`, the oids of records given
without one in :mod:`zodbkmi.storage.oids`, the transaction metadata in
:mod:`zodbkmi.storage.metadata` and the storages of connections in
:mod:`zodbkmi.storage.connections`.
"""
import logging
import os
import threading

import ZODB._compat
import ZODB.blob
import ZODB.interfaces
import zope.interface

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import NotEncryptedError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.interfaces import IRecordFastPath
from zodbkmi.storage.blobs import BlobMethods
from zodbkmi.storage.blobcache import make_cache
from zodbkmi.storage.blobs import _PlaintextCopies
from zodbkmi.storage.checks import UNCHECKED
from zodbkmi.storage.checks import DowngradeChecks
from zodbkmi.storage.checks import _is_filestorage
from zodbkmi.storage.checks import parse_migrate_since
from zodbkmi.storage.common import DECRYPT_ONLY
from zodbkmi.storage.common import MAGIC
from zodbkmi.storage.common import MAGIC_SIZE
from zodbkmi.storage.common import MIGRATE
from zodbkmi.storage.common import MODES
from zodbkmi.storage.common import STRICT
from zodbkmi.storage.common import annotate
from zodbkmi.storage.common import is_sealed
from zodbkmi.storage.common import oid_text
from zodbkmi.storage.metadata import MetadataSealing
from zodbkmi.storage.keys import check_keys
from zodbkmi.storage.keys import parse_create_key
from zodbkmi.storage.oids import OidRecovery
from zodbkmi.storage.oids import stored_records
from zodbkmi.storage.oids import undone_oids
from zodbkmi.storage.registration import register_with_base

_logger = logging.getLogger('zodbkmi.storage')

#: Storage interfaces the wrapper provides when its base storage does.
#: Every data-carrying method of these is implemented by the wrapper
#: itself (``tests/test_storage.py`` walks them to prove it).
CONDITIONAL_INTERFACES = (
    ZODB.interfaces.IStorageRestoreable,
    ZODB.interfaces.IStorageIteration,
    ZODB.interfaces.IStorageUndoable,
    ZODB.interfaces.IStorageCurrentRecordIteration,
    ZODB.interfaces.IExternalGC,
    ZODB.interfaces.IBlobStorage,
    ZODB.interfaces.IBlobStorageRestoreable,
    ZODB.interfaces.IMVCCStorage,
    ZODB.interfaces.IMVCCPrefetchStorage,
    ZODB.interfaces.IMVCCAfterCompletionStorage,
    ZODB.interfaces.IPrefetchStorage,
    ZODB.interfaces.IMultiCommitStorage,
)

#: Methods of the provided interfaces that carry no record data and go to
#: the base storage unchanged (with the reason in ``docs/storage.rst``).
PASS_THROUGH = frozenset((
    'close', 'getName', 'getSize', 'isReadOnly',
    'lastTransaction', 'new_oid', 'sortKey', 'tpc_vote',
    'supportsUndo', 'checkCurrentSerialInTransaction',
    'deleteObject', 'prefetch', 'afterCompletion',
))


def _no_fast_path(data, oid):
    return None


class EncryptingStorage(BlobMethods, DowngradeChecks):
    """Encrypt every record of ``base`` with keys found through ``facility``.

    ``facility`` is an :class:`~zodbkmi.interfaces.IEncryptionService`;
    ``key`` the key encrypting key whose active data key seals new records
    and ``previous_keys`` older KEKs kept for reading after a KEK rotation.
    ``keyholder`` (an :class:`~zodbkmi.interfaces.IKeyHolder`) may be given
    instead of ``key`` and ``previous_keys``.  ``mode`` is one of
    :data:`STRICT`, :data:`MIGRATE` and :data:`DECRYPT_ONLY`.
    ``plaintext_dir`` is the directory in which the storage makes its
    private directory of plaintext blob copies (default: the system's
    temporary directory; a RAM-backed file system keeps them off disks).
    ``blob_cache_size`` (bytes; None: 256 MiB, 0: off) and
    ``blob_cache_dir`` (default ``/dev/shm`` when it is RAM-backed, else
    no cache) set the cache of plaintext blob copies kept for repeated
    loads (see :mod:`zodbkmi.storage.blobcache`).

    ``create_key`` says whether opening creates the active data key of
    ``key`` (``False``, the default: never; ``'auto'``: for a database
    without encrypted records; ``True``: when missing); whatever it says,
    a database whose records the keys cannot open raises
    :class:`~zodbkmi.exceptions.DatabaseKeyError` first, before anything
    is created (:meth:`check_keys`).

    ``migrate_since`` (migrate mode only) is the start of the migration:
    the transaction id (8 bytes or 16 hex digits) after which plaintext
    records are refused, default the storage's last transaction when it
    is opened (see :func:`parse_migrate_since`, and :data:`UNCHECKED`).
    In migrate mode a plaintext record is read only when it is not newer
    than the start nor than an encrypted revision of its object; else
    :class:`~zodbkmi.exceptions.NotEncryptedError` (see
    ``docs/storage.rst``).  The start in effect is :attr:`migrate_since`.
    """

    #: The start of the migration in migrate mode (a transaction id), or
    #: None when plaintext records are not checked.
    migrate_since = None

    # the MVCC layer for a base without one (ServerEncryptingStorage: no)
    _own_mvcc = True
    # seals and opens the transaction metadata (ServerEncryptingStorage: no)
    _seals_metadata = True

    #: Whether opening checks the keys (see check_keys); the storages of
    #: connections do not.
    _checks_keys = True

    def __init__(self, base, facility, key=None, previous_keys=(),
                 keyholder=None, mode=STRICT, plaintext_dir=None,
                 migrate_since=None, create_key=False, blob_cache_size=None,
                 blob_cache_dir=None):
        if keyholder is not None:
            if key is not None:
                raise TypeError('give key or keyholder, not both')
            key = keyholder.key
            previous_keys = tuple(keyholder.previous_keys or ())
        if key is None:
            raise TypeError('EncryptingStorage needs a key or a keyholder')
        if mode not in MODES:
            raise ValueError('unknown mode %r (one of %s)'
                             % (mode, ', '.join(MODES)))
        migrate_since = parse_migrate_since(migrate_since)
        create_key = parse_create_key(create_key)
        if migrate_since is not None and mode != MIGRATE:
            raise ValueError('migrate_since is a setting of migrate mode '
                             '(the mode is %s)' % mode)
        self.base = base
        self.facility = facility
        self.mode = mode
        self._key = key
        self._previous_keys = tuple(previous_keys)
        self._decrypt_keys = ((key,) + self._previous_keys
                              if self._previous_keys else key)
        self._seal = facility.encrypt
        self._unseal = facility.decrypt
        self._open_fast = (
            facility.record_fast_path(self._decrypt_keys)
            if IRecordFastPath.providedBy(facility) else _no_fast_path)
        self._write_plaintext = mode == DECRYPT_ONLY
        self._read_plaintext = mode != STRICT
        # transaction metadata (user, description, extension)
        self._metadata = (MetadataSealing(facility, key,
                                          self._decrypt_keys,
                                          self._write_plaintext)
                          if self._seals_metadata else None)
        # migrate mode: (oid, revision) pairs found clean, and the layout
        # the history of an oid is read in
        self._checked = {}
        self._filestorage = _is_filestorage(base)
        if mode == MIGRATE and migrate_since != UNCHECKED:
            if migrate_since is None:
                # None: a ZEO client that has not reached its server yet
                migrate_since = base.lastTransaction() or b'\0' * 8
                _logger.info(
                    'migrate mode: plaintext records written after '
                    'transaction %s are refused (to keep this start when '
                    'the storage is opened again, set migrate-since %s)',
                    migrate_since.hex(), migrate_since.hex())
            self.migrate_since = migrate_since
        # the oids of records given without one (conflict resolution,
        # undo, pack)
        self._oids = OidRecovery()
        self._local = threading.local()
        self._plaintext_dir = (os.path.abspath(plaintext_dir)
                               if plaintext_dir else None)
        self._copies = _PlaintextCopies(self)
        self._blob_cache = make_cache(blob_cache_size, blob_cache_dir)
        self.db = None

        # Held around the calls that write blob files into the base storage
        # and around the ends of transactions.  ZODB's BlobStorage proxy
        # keeps the blob files of the transaction being committed in one
        # list shared by every transaction (``dirty_oids``), and clears it
        # in tpc_finish only after the storage inside it has released its
        # commit lock: a transaction that gets the lock in between and
        # aborts removes the files of the one just committed (a blob
        # record without its file: POSKeyError for good; plain ZODB loses
        # them the same way).  Ending transactions one at a time through
        # this wrapper closes that window (tests/test_storage_blobproxy.py).
        # Commits are serialised by the base storage anyway.
        self._ending = threading.RLock()

        self._base_mvcc = ZODB.interfaces.IMVCCStorage.providedBy(base)
        self._mvcc = None
        self._adapter_lock = threading.Lock()

        provided = [ZODB.interfaces.IStorageWrapper,
                    ZODB.interfaces.IStorage]
        provided.extend(i for i in CONDITIONAL_INTERFACES
                        if i.providedBy(base))
        if self._own_mvcc and not self._base_mvcc:
            provided.append(ZODB.interfaces.IMVCCStorage)
        zope.interface.directlyProvides(self, *provided)
        if self._checks_keys:
            try:
                self.check_keys(create_key)
            except BaseException:
                # refused: nothing of this storage stays behind
                self._copies.close()
                self._close_blob_cache()
                raise
        self.register_with_base()

    def __repr__(self):
        return '<%s (%s) around %r>' % (type(self).__name__, self.mode,
                                        self.base)

    def __getattr__(self, name):
        # Methods without record data (see PASS_THROUGH) and attributes
        # such as fshelper go to the base storage.
        return getattr(self.base, name)

    def __len__(self):
        return len(self.base)

    # -- sealing and opening ---------------------------------------------

    def seal(self, data, oid):
        """Return the record stored for the plaintext ``data`` of ``oid``
        (plaintext in decrypt-only mode)."""
        if self._write_plaintext or not data:
            return data
        return self._seal(self._key, data, oid)

    def unseal(self, data, oid, serial=None):
        """Return the plaintext of the stored record ``data`` of ``oid``
        (its revision ``serial``, the transaction id, when known).

        Raises a :class:`~zodbkmi.exceptions.DecryptionError` naming the
        oid (``NotEncryptedError`` for plaintext in strict mode, and for
        plaintext that may be a downgrade in migrate mode) or
        :class:`~zodbkmi.exceptions.UnknownKeyError` for a missing key.
        """
        if not data:
            return data   # deletion or undone creation: no state
        if type(data) is not bytes:
            data = bytes(data)   # RelStorage hands out memoryviews
        plaintext = self._open_fast(data, oid)
        if plaintext is not None:
            return plaintext
        if data[:MAGIC_SIZE] == MAGIC:
            try:
                return self._unseal(self._decrypt_keys, data, oid)
            except (DecryptionError, UnknownKeyError) as e:
                raise annotate(e, oid)
        if self._read_plaintext:
            if (self.migrate_since is not None and
                    not getattr(self._local, 'references_only', False)):
                self._check_plaintext(oid, serial, data)
            return data
        raise NotEncryptedError(
            'oid %s: the record is not encrypted (strict mode; open the '
            'storage in migrate mode to read plaintext records)'
            % oid_text(oid))

    def _sealed(self, data, oid, transaction):
        sealed = self.seal(data, oid)
        if sealed is not data:
            # remembered for conflict resolution, which has no oid
            self._oids.remember(sealed, oid, transaction)
        return sealed

    # -- IStorage: reading -----------------------------------------------

    def load(self, oid, version=''):
        data, serial = self.base.load(oid, version)
        return self.unseal(data, oid, serial), serial

    def loadBefore(self, oid, tid):
        r = self.base.loadBefore(oid, tid)
        if r is None:
            return r
        data, serial, after = r
        return self.unseal(data, oid, serial), serial, after

    def loadSerial(self, oid, serial):
        return self.unseal(self.base.loadSerial(oid, serial), oid, serial)

    # -- IStorage: writing -----------------------------------------------

    def store(self, oid, serial, data, version, transaction):
        return self.base.store(oid, serial,
                               self._sealed(data, oid, transaction),
                               version, transaction)

    def restore(self, oid, serial, data, version, prev_txn, transaction):
        sealed = self._same_as_before(oid, data, prev_txn)
        if sealed is None:
            sealed = self._sealed(data, oid, transaction)
        return self.base.restore(oid, serial, sealed, version, prev_txn,
                                 transaction)

    def _same_as_before(self, oid, data, prev_txn):
        # restore() with prev_txn lets a storage write a backpointer when
        # the data equals the record of prev_txn: reuse that record (same
        # oid, so the binding holds) rather than sealing a fresh copy.
        if not prev_txn or not data:
            return None
        try:
            old = self.base.loadSerial(oid, prev_txn)
            if self.unseal(old, oid, prev_txn) == data:
                return old
        except Exception:
            pass
        return None

    def undo(self, transaction_id, transaction):
        """Undo in the base storage; the records it must read (conflict
        resolution, blob records) are opened with the oids of the undone
        transaction.  In migrate mode an undo that would restore a
        plaintext revision is refused (it would be a plaintext record newer
        than the start of the migration)."""
        oids = self._oids
        oids.candidates = undone_oids(self.base, transaction_id)
        if self.migrate_since is not None:
            self._refuse_plaintext_undo(transaction_id, oids.candidates)
        try:
            with self._ending:
                return self.base.undo(transaction_id, transaction)
        finally:
            oids.candidates = ()

    def close(self):
        try:
            return self.base.close()
        finally:
            self._copies.close()
            self._close_blob_cache()

    def tpc_finish(self, transaction, func=lambda tid: None):
        try:
            with self._ending:
                return self.base.tpc_finish(transaction, func)
        finally:
            self._oids.forget(transaction)
            self._metadata_ended(transaction)

    def tpc_abort(self, transaction):
        try:
            with self._ending:
                return self.base.tpc_abort(transaction)
        finally:
            self._oids.forget(transaction)
            self._metadata_ended(transaction)

    # -- transaction metadata (zodbkmi.storage.metadata) -------------------

    def tpc_begin(self, transaction, *args, **kw):
        """Begin in the base storage with the metadata of ``transaction``
        (user, description, extension) sealed; ``transaction`` gets its
        own back when it ends."""
        return self._metadata.tpc_begin(self.base.tpc_begin, transaction,
                                        *args, **kw)

    def _metadata_ended(self, transaction):
        if self._metadata is not None:
            self._metadata.ended(transaction)

    def undoLog(self, first=0, last=-20, filter=None):
        """The base storage's undo log with the metadata opened; a
        ``filter`` sees the opened metadata."""
        return self._metadata.undoLog(self.base.undoLog, first, last, filter)

    def undoInfo(self, first=0, last=-20, specification=None):
        """As :meth:`undoLog`, with a ``specification`` matched against
        the opened metadata."""
        return self._metadata.undoInfo(self.base.undoLog, self.base.undoInfo,
                                       first, last, specification)

    def history(self, oid, size=1):
        """The base storage's history of ``oid`` with the metadata
        opened."""
        return self._metadata.open_entries(self.base.history(oid, size))

    # -- iteration -------------------------------------------------------

    def iterator(self, start=None, stop=None):
        return _Iterator(self, self.base.iterator(start, stop))

    def record_iternext(self, next=None):
        oid, tid, data, next = self.base.record_iternext(next)
        return oid, tid, self.unseal(data, oid, tid), next

    def copyTransactionsFrom(self, other):
        ZODB.blob.copyTransactionsFromTo(other, self)

    # -- pack ------------------------------------------------------------

    def pack(self, pack_time, referencesf, gc=None):
        """Pack the base storage; its garbage collection reads references
        through an index of the records' nonces (with their salts:
        ``envelope.unique_part``) to their oids, so every
        record is opened with its own oid."""
        def refs(data, oids=None):
            return referencesf(self.untransform_record_data(data), oids)
        self._oids.packing(lambda: stored_records(self.base))
        # garbage collection reads the references of plaintext records
        # unchecked (see references)
        self._local.references_only = True
        try:
            if gc is None:
                return self.base.pack(pack_time, refs)
            return self.base.pack(pack_time, refs, gc)
        finally:
            self._local.references_only = False
            self._oids.packed()
            self._checked.clear()     # revisions moved in the file

    def check_keys(self, create_key=False):
        """Check, when the storage is opened, that the keys open its
        database: a sealed record that none of them can open raises
        :class:`~zodbkmi.exceptions.DatabaseKeyError` before anything is
        created.  Then create the active data key of the KEK if
        ``create_key`` asks for it: ``True`` (when missing), ``'auto'``
        (only for a database without encrypted records) or ``False``
        (never).  See ``zodbkmi.storage.keys``."""
        return check_keys(self, create_key)

    # -- IStorageWrapper -------------------------------------------------

    def register_with_base(self):
        """Register as the database of the base storage, and of the
        storage inside ZODB's ``BlobStorage`` proxy, so that conflict
        resolution reads records through this wrapper (see
        ``zodbkmi.storage.registration``)."""
        register_with_base(self, self.base)

    def registerDB(self, db):
        self.db = db
        self._db_transform = db.transform_record_data
        self._db_untransform = db.untransform_record_data

    def _db_transform(self, data):
        return data

    _db_untransform = _db_transform

    # A ZEO client calls these from its own thread as soon as it is
    # registered with (in __init__), which may be before a database is
    # registered with this wrapper: then there is no cache to invalidate.

    def invalidateCache(self):
        db = self.db
        if db is not None:
            return db.invalidateCache()

    def invalidate(self, transaction_id, oids, version=''):
        db = self.db
        if db is not None:
            return db.invalidate(transaction_id, oids)

    def references(self, record, oids=None):
        """The references of ``record``.  In migrate mode the references of
        a plaintext record are read without the downgrade checks: they
        serve garbage collection, which a writer of the storage could
        defeat anyway by removing records."""
        before = getattr(self._local, 'references_only', False)
        self._local.references_only = True
        try:
            return self.db.references(self.untransform_record_data(record),
                                      oids)
        finally:
            self._local.references_only = before

    def transform_record_data(self, data, oid=None):
        """Seal ``data`` after the transforms of the wrappers above."""
        data = self._db_transform(data)
        if oid is not None:
            return self.seal(data, oid)
        # a resolved conflict: the oid of the conflict resolved in this
        # thread; remembered, as the state may come back without its oid
        oid = self._oids.oid_for(data)
        if oid is None:
            if self._write_plaintext:
                return data
            raise DecryptionError('cannot seal a record without its oid')
        sealed = self.seal(data, oid)
        if sealed is not data:
            self._oids.remember_resolved(sealed, oid)
        return sealed

    def untransform_record_data(self, data, oid=None):
        """Open ``data``, then apply the transforms of the wrappers above."""
        if data and type(data) is not bytes:
            data = bytes(data)
        if oid is None:
            if self._oids.candidates and is_sealed(data):
                return self._db_untransform(
                    self._oids.open_candidates(data, self.unseal))
            oid = self._oids.oid_for(data)
        return self._db_untransform(self.unseal(data, oid))

    # -- IMVCCStorage ----------------------------------------------------
    #
    # Each connection gets a storage of its own from new_instance() (see
    # zodbkmi.storage.connections, imported here when first needed: its
    # classes subclass this one).

    def new_instance(self, *args, **kw):
        """The storage of a new connection (see above)."""
        if self._base_mvcc:
            return self._instance(self.base.new_instance(*args, **kw))
        return self._adapter().new_instance()

    def before_instance(self, before=None):
        """The storage of a historical connection reading the state
        before the transaction id ``before``."""
        if not self._base_mvcc:
            return self._adapter().before_instance(before)
        if getattr(self.base, 'before_instance', None) is None:
            instance = self.new_instance()
        else:
            # what RelStorage's before_instance wraps (a read-only
            # instance), here wrapped by this storage first
            instance = self.new_instance(before=before)
        from zodbkmi.storage.connections import _HistoricalInstance
        return _HistoricalInstance(instance, before)

    def undo_instance(self):
        """The storage ``DB.undo`` commits with."""
        if self._base_mvcc:
            return self.new_instance()
        return self._adapter().undo_instance()

    def _instance(self, base_instance):
        from zodbkmi.storage.connections import _InstanceStorage
        since = None
        if self.mode == MIGRATE:
            since = self.migrate_since or UNCHECKED
        other = _InstanceStorage(
            base_instance, self.facility, self._key, self._previous_keys,
            mode=self.mode, plaintext_dir=self._plaintext_dir,
            migrate_since=since, blob_cache_size=0)
        other._checked = self._checked
        other._blob_cache = self._blob_cache       # one cache, shared
        other._owns_blob_cache = False
        other._copies.parent = self._copies
        if self.db is not None:
            other.registerDB(self.db)
        return other

    def _adapter(self):
        with self._adapter_lock:
            if self._mvcc is None:
                # the outermost wrapper registered above this one (each
                # wrapper calls registerDB on the one below it)
                top = self
                seen = {id(self)}
                while True:
                    above = vars(top).get('db')
                    if (above is None or id(above) in seen
                            or not hasattr(above, 'loadBefore')):
                        break
                    seen.add(id(above))
                    top = above
                from zodbkmi.storage.connections import _MVCCAdapter
                self._mvcc = _MVCCAdapter(top, self)
            return self._mvcc

    def sync(self, force=True):
        if self._base_mvcc:
            return self.base.sync(force)
        sync = getattr(self.base, 'sync', None)    # ZEO's ClientStorage
        if sync is not None:
            sync()

    def poll_invalidations(self):
        if self._base_mvcc:
            return self.base.poll_invalidations()
        return []       # the storage itself always reads the newest data

    def release(self):
        if self._base_mvcc:
            return self.base.release()


class _Iterator:
    """Iterate the base storage's transactions, opening their records."""

    def __init__(self, storage, base_it):
        self._storage = storage
        self._base_it = base_it

    def __iter__(self):
        return self

    def __next__(self):
        return _Transaction(self._storage, next(self._base_it))

    def close(self):
        try:
            close = self._base_it.close
        except AttributeError:
            pass
        else:
            close()
        finally:
            self._base_it = iter(())

    def __getattr__(self, name):
        return getattr(self._base_it, name)


class _Transaction:
    """One transaction of an iteration; its records and its metadata are
    opened (when its metadata does not open, the iteration raises the
    facility's error, naming the transaction id)."""

    def __init__(self, storage, txn):
        self._storage = storage
        self._txn = txn
        metadata = storage._metadata
        opened = None if metadata is None else metadata.opened(txn)
        if opened is not None:
            # attributes of its own: tpc_begin (copyTransactionsFrom)
            # replaces and restores them
            self.user, self.description, self.extension_bytes = opened
            self.extension = (ZODB._compat.loads(self.extension_bytes)
                              if self.extension_bytes else {})

    @property
    def _extension(self):
        # ZODB's deprecated name, still read by some tools
        return self.extension

    def __iter__(self):
        unseal = self._storage.unseal
        for record in self._txn:
            if record.data:
                record.data = unseal(record.data, record.oid, record.tid)
            yield record

    def __getattr__(self, name):
        return getattr(self._txn, name)
