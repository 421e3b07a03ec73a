"""The private parts of ZODB's FileStorage that migrations rely on, named once.

Migrations read FileStorage without its public per-record API where that
API costs too much (``record_iternext`` reads each record's header twice
and walks the index with a ``minKey`` per oid) and check, under the
commit lock, that a record read is still current without reading it
again.  Both need attributes ZODB does not declare public.  This module
is the only place that touches them: every access goes through a
function here, each attribute is listed in :data:`ATTRIBUTES` with the
reason it is needed, and ``tests/test_migrate_fsinternals.py`` checks them
against the installed ZODB, naming the attribute that changed.

If ZODB changes one of them, only this module changes (or
:func:`is_filestorage` returns False and migrations fall back to the
public ``record_iternext`` / ``store`` path, which is slower but needs
nothing private).
"""
#: ``(object, attribute, type, reason)`` of each private name used.
#: ``object`` is ``'storage'`` (a ``ZODB.FileStorage.FileStorage``) or
#: ``'index'`` (its ``fsIndex``); ``type`` is what the attribute holds
#: on an open storage (dotted names of classes separated by ``|``, as
#: the test checks it; ``'lock'`` stands for anything with ``acquire``,
#: ``release`` and ``__enter__``).
ATTRIBUTES = (
    ('storage', '_index', 'ZODB.fsIndex.fsIndex',
     # oid -> position of the current record: the oids in order without
     # a load per oid, and the position that tells whether a record read
     # is still current (the serial check of store, without a read)
     'the position of the current record of each oid'),
    ('storage', '_file', 'io.BufferedRandom|io.BufferedReader',
     # the open data file: records are read from it at the index's
     # positions, under _lock, as FileStorage.load itself does
     'reading records at the positions the index gives'),
    ('storage', '_lock', 'lock',
     # FileStorage's own lock around _file and _index: held while a batch
     # of positions is read and the records are read from _file
     'keeps _index and _file still while a batch is read'),
    ('storage', '_ltid', 'builtins.bytes',
     # the id of the last committed transaction: unchanged since a record
     # was read means nothing was written since, so no index lookup
     'tells whether anything was committed since a record was read'),
    ('storage', '_tid', 'builtins.bytes',
     # the id of the transaction being committed (set by tpc_begin):
     # restore() needs it as the serial of the records it writes
     'the serial of records written with restore() in the current '
     'transaction'),
    ('storage', '_file_name', 'builtins.str',
     # the absolute path of the data file: the command line names the
     # '.old' file a pack leaves beside it
     'names the data file (and its .old file after a pack)'),
    ('index', '_data', 'BTrees.OOBTree.OOBTree',
     # fsIndex keeps 6-byte oid prefixes -> buckets of 2-byte suffixes;
     # walking them costs much less than a minKey per oid
     'walking the index in oid order, a bucket at a time'),
)


def is_filestorage(storage):
    """Tell whether ``storage`` is a plain ``ZODB.FileStorage.FileStorage``
    with the private attributes this module reads (not a subclass, whose
    reads and writes may differ)."""
    try:
        from ZODB.FileStorage import FileStorage
    except ImportError:   # pragma: no cover
        return False
    return type(storage) is FileStorage and all(
        hasattr(storage, name) for name in ('_index', '_file', '_lock',
                                            '_ltid', '_tid'))


def index(storage):
    """The ``fsIndex`` of ``storage`` (oid -> position of its current
    record)."""
    return storage._index


def index_buckets(index):
    """The ``OOBTree`` of 6-byte oid prefixes to buckets inside an
    ``fsIndex``, or None for another kind of index."""
    data = getattr(index, '_data', None)
    if data is None or not hasattr(data, 'items'):
        return None
    return data


def lock(storage):
    """The lock that keeps the index and the data file of ``storage``
    still (a context manager)."""
    return storage._lock


def data_file(storage):
    """The open data file of ``storage`` (read it under :func:`lock`)."""
    return storage._file


def last_tid(storage):
    """The id of the last transaction committed to ``storage``."""
    return storage._ltid


def current_position(storage, oid):
    """The position of the current record of ``oid``, or None."""
    return storage._index.get(oid)


def committing_tid(storage):
    """The id of the transaction ``storage`` is committing (between
    ``tpc_begin`` and ``tpc_finish``)."""
    return storage._tid


def file_name(storage, default=None):
    """The path of the data file of ``storage`` (``default`` for a storage
    that is not a FileStorage)."""
    return getattr(storage, '_file_name', default)
