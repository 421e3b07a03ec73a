"""Per-connection storages: each connection's plaintext blob copies.

:meth:`EncryptingStorage.new_instance
<zodbkmi.storage.EncryptingStorage.new_instance>` gives each connection a
storage of its own, which removes the connection's plaintext blob copies
when its transaction ends, whatever its transaction manager.  Over an MVCC
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
    connection's own directory, removed when its transaction ends."""

    def loadBlob(self, oid, serial):
        return self._copies.load(oid, serial)[0]

    def openCommittedBlobFile(self, oid, serial, blob=None):
        return self._copies.open(oid, serial, blob)

    def afterCompletion(self):
        # called by the connection at the end of each transaction of its
        # transaction manager, and when it is closed
        self._copies.remove()


class _InstanceStorage(_CopiesOfConnection, EncryptingStorage):
    """The wrapper of an instance of an MVCC base storage (RelStorage): the
    storage of one connection.  Its plaintext blob copies are removed when
    the connection's transaction ends (``afterCompletion``, called by the
    connection whatever its transaction manager, and when it is closed),
    when it syncs and when it is released."""

    _checks_keys = False    # checked when the storage was opened

    def afterCompletion(self):
        _CopiesOfConnection.afterCompletion(self)
        after = getattr(self.base, 'afterCompletion', None)
        if after is not None:
            after()

    def sync(self, force=True):
        self._copies.remove()
        return self.base.sync(force)

    def release(self):
        self._copies.close()
        return self.base.release()


class _HistoricalInstance(HistoricalStorageAdapter):
    """ZODB's historical adapter around an :class:`_InstanceStorage`,
    passing on the end of each transaction."""

    def afterCompletion(self):
        self._storage.afterCompletion()


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

    def sync(self, force=True):
        self._copies.remove()
        MVCCAdapterInstance.sync(self, force)

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

    def release(self):
        self._copies.close()
        HistoricalStorageAdapter.release(self)

    close = release

