"""The server side of a ZEO deployment whose clients encrypt."""
from zodbkmi.storage.common import is_sealed
from zodbkmi.storage.wrapper import EncryptingStorage


class ServerEncryptingStorage(EncryptingStorage):
    """The server side of a ZEO deployment whose clients encrypt.

    Records travel as ciphertext in both directions (the clients seal and
    open them); the server only opens records for the two jobs that run
    on the server: conflict resolution and the garbage collection of pack.
    Use it only where the server may hold the keys; otherwise configure the
    server storage with ``pack-gc false`` (see ``docs/storage.rst``).
    """

    #: Methods carrying records or transaction metadata that the server
    #: takes from the base storage as they are (ciphertext and sealed
    #: metadata for the clients to open; the clients sealed the metadata
    #: of their transactions before ``tpc_begin`` reached the server).
    passed_through = ('load', 'loadBefore', 'loadSerial', 'record_iternext',
                      'iterator', 'loadBlob', 'openCommittedBlobFile',
                      'tpc_begin', 'undoLog', 'undoInfo', 'history',
                      'temporaryDirectory')

    _own_mvcc = False      # the ZEO server reads the storage itself
    _seals_metadata = False

    def __init__(self, base, *args, **kw):
        kw['blob_cache_size'] = 0       # the server opens no blob
        EncryptingStorage.__init__(self, base, *args, **kw)
        for name in self.passed_through:
            method = getattr(base, name, None)
            if method is not None:
                setattr(self, name, method)

    def _seal_blob(self, filename, oid):
        return filename

    def _sealed(self, data, oid, transaction):
        # already sealed by the client: only remember its oid
        if is_sealed(data):
            self._oids.remember(data, oid, transaction)
        return data
