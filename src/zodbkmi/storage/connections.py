"""Per-connection storages: each connection's plaintext blob copies.

:meth:`EncryptingStorage.new_instance
<zodbkmi.storage.EncryptingStorage.new_instance>` gives each connection a
storage of its own, which keeps the connection's plaintext blob copies
apart.  A copy is released when the connection's transaction ends
(``afterCompletion``, whatever its transaction manager) and removed when
the connection next polls invalidations: its oid is then invalidated too,
so that the blob object, whose ``_p_blob_committed`` names the copy,
becomes a ghost and loads a fresh copy when used again (ZODB's ``'a'`` and
``'r+'`` open that name).  A blob object still open for reading keeps its
copy until a later poll finds it closed.  Over an MVCC
base (RelStorage) that is a wrapper of a new base instance
(:class:`_InstanceStorage`); over any other base, the wrapper is the MVCC
layer itself, with ZODB's MVCCAdapter reading through the outermost
wrapper stacked on it (:class:`_MVCCAdapter`).
"""
from ZODB.mvccadapter import HistoricalStorageAdapter
from ZODB.mvccadapter import MVCCAdapter
from ZODB.mvccadapter import MVCCAdapterInstance

from zodbkmi.storage.blobs import _PlaintextCopies
from zodbkmi.storage.wrapper import EncryptingStorage


class _CopiesOfConnection:
    """Blob methods of a connection's storage: plaintext copies in the
    connection's own directory, released when its transaction ends and
    removed, with their blob objects invalidated, when it polls."""

    def loadBlob(self, oid, serial):
        return self._copies.load(oid, serial)[0]

    def openCommittedBlobFile(self, oid, serial, blob=None):
        return self._copies.open(oid, serial, blob)

    def afterCompletion(self):
        # called by the connection at the end of each transaction of its
        # transaction manager, and when it is closed
        self._copies.release_all()

    def _with_released(self, invalidated):
        # the oids of the released copies, invalidated with those of the
        # storage (None: the whole cache)
        more = self._copies.collect(invalidated)
        if invalidated is None or not more:
            return invalidated
        return list(invalidated) + more


class _InstanceStorage(_CopiesOfConnection, EncryptingStorage):
    """The wrapper of an instance of an MVCC base storage (RelStorage): the
    storage of one connection.  Its plaintext blob copies are released
    when the connection's transaction ends (``afterCompletion``, called by
    the connection whatever its transaction manager, and when it is
    closed), removed when it polls invalidations and when it is
    released."""

    _sweeps = False     # its storage swept when it opened

    _checks_keys = False    # checked when the storage was opened

    def afterCompletion(self):
        _CopiesOfConnection.afterCompletion(self)
        after = getattr(self.base, 'afterCompletion', None)
        if after is not None:
            after()

    def sync(self, force=True):
        return self.base.sync(force)

    def poll_invalidations(self):
        return self._with_released(self.base.poll_invalidations())

    def release(self):
        self._copies.close()
        return self.base.release()


class _HistoricalInstance(HistoricalStorageAdapter):
    """ZODB's historical adapter around an :class:`_InstanceStorage`,
    passing on the end of each transaction."""

    def afterCompletion(self):
        self._storage.afterCompletion()

    def poll_invalidations(self):
        return self._storage._with_released([])


class _MVCCAdapter(MVCCAdapter):
    """ZODB's MVCC layer over a wrapper whose base has none; its
    connection storages keep their plaintext blob copies apart."""

    def __init__(self, top, storage):
        self._encrypting = storage
        MVCCAdapter.__init__(self, top)

    def new_instance(self):
        instance = _ConnectionStorage(self)
        with self._lock:
            self._instances.add(instance)
        return instance

    def before_instance(self, before=None):
        return _HistoricalConnectionStorage(self, before)


class _ConnectionStorage(_CopiesOfConnection, MVCCAdapterInstance):
    """The storage of one connection: ZODB's MVCC instance, with its
    plaintext blob copies (see :class:`_CopiesOfConnection`)."""

    def __init__(self, adapter):
        MVCCAdapterInstance.__init__(self, adapter)
        storage = adapter._encrypting
        self._copies = _PlaintextCopies(storage, storage._copies)

    def poll_invalidations(self):
        return self._with_released(
            MVCCAdapterInstance.poll_invalidations(self))

    def release(self):
        self._copies.close()
        MVCCAdapterInstance.release(self)

    close = release


class _HistoricalConnectionStorage(_CopiesOfConnection,
                                   HistoricalStorageAdapter):
    """The storage of a historical connection, with its plaintext blob
    copies (see :class:`_CopiesOfConnection`)."""

    def __init__(self, adapter, before):
        HistoricalStorageAdapter.__init__(self, adapter._storage, before)
        storage = adapter._encrypting
        self._copies = _PlaintextCopies(storage, storage._copies)

    def poll_invalidations(self):
        return self._with_released([])

    def release(self):
        self._copies.close()
        HistoricalStorageAdapter.release(self)

    close = release
