"""The wrapper registered as the database of every storage that reads records.

A storage that resolves conflicts (FileStorage, a ZEO client, DemoStorage,
RelStorage: ZODB's ``ConflictResolvingStorage``) opens the records it
reads with the ``untransform_record_data`` of the database registered with
it (``registerDB``) and seals the resolved state with its
``transform_record_data``.  :class:`~zodbkmi.storage.EncryptingStorage`
registers itself with its base storage, so these go through the wrapper.

ZODB's ``BlobStorage`` proxy (``ZODB.blob.BlobStorage``: what ZConfig's
``<blobstorage>`` and zodburi's ``file://...?blobstorage_dir=`` give)
takes ``registerDB`` for itself and does not pass it on: the FileStorage
inside it would resolve conflicts on ciphertext, and every resolution
fails (``UnpicklingError``, then ``ConflictError``).  So the wrapper also
registers with the storage inside each such proxy, found in the proxy's
private attribute :data:`BLOBSTORAGE_INNER` (``tests/
test_storage_conflicts.py`` fails loudly if ZODB renames it).
"""
import ZODB.blob

#: The attribute of ``ZODB.blob.BlobStorage`` holding the proxied storage
#: (its ``self.__storage``, name-mangled).  Private to ZODB: the only
#: private attribute of the proxy zodbkmi relies on.
BLOBSTORAGE_INNER = '_BlobStorage__storage'


def proxied(storage):
    """The storage inside the ``ZODB.blob.BlobStorage`` proxy ``storage``,
    or None when ``storage`` is not such a proxy.  Raise ``TypeError``
    when it is one without :data:`BLOBSTORAGE_INNER` (ZODB changed)."""
    if not isinstance(storage, ZODB.blob.BlobStorage):
        return None
    try:
        return vars(storage)[BLOBSTORAGE_INNER]
    except KeyError:
        raise TypeError(
            'ZODB.blob.BlobStorage has no attribute %s any more: zodbkmi '
            'cannot register with the storage it proxies, whose conflict '
            'resolution would read ciphertext' % BLOBSTORAGE_INNER) from None


def register_with_base(wrapper, base):
    """Register ``wrapper`` as the database of ``base`` and of the storage
    inside each ``BlobStorage`` proxy on the way down; return the storages
    registered with, outermost first."""
    registered = []
    storage = base
    while storage is not None:
        storage.registerDB(wrapper)
        registered.append(storage)
        storage = proxied(storage)
    return registered
