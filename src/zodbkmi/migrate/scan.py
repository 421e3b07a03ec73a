"""The current records of a storage, in oid order."""
from ZODB.POSException import POSKeyError

from zodbkmi.migrate import fsinternals
from zodbkmi.migrate.kinds import MigrationError


def iter_records(storage, start=None):
    """Yield ``(oid, tid, data)`` for the current record of every object,
    in oid order, from ``start`` on.

    Uses ``record_iternext`` (FileStorage, ZEO, RelStorage, MappingStorage
    keep an index; memory stays constant).  Objects whose creation was
    undone are skipped.
    """
    if fsinternals.is_filestorage(storage):
        yield from iter_filestorage(storage, start)
        return
    iternext = getattr(storage, 'record_iternext', None)
    if iternext is None:
        yield from _iter_by_history(storage, start)
        return
    nxt = start
    if nxt is None and not len(storage):
        return
    while True:
        try:
            oid, tid, data, nxt = iternext(nxt)
        except POSKeyError as e:
            # undone creation: step over it
            oid = e.args[0] if e.args else None
            if not isinstance(oid, bytes) or len(oid) != 8:
                raise
            nxt = next_oid(oid)
            continue
        except ValueError:   # empty index
            return
        if data:
            yield oid, tid, data
        if nxt is None:
            return


def _iter_by_history(storage, start):
    """For storages without record_iternext (MappingStorage, DemoStorage):
    the oids are collected from the transaction history (memory grows with
    the number of objects), then loaded."""
    from ZODB.utils import load_current
    iterator = getattr(storage, 'iterator', None)
    if iterator is None:
        raise MigrationError('%s cannot list its records (neither '
                             'record_iternext nor iterator)'
                             % type(storage).__name__)
    oids = set()
    for txn in iterator():
        for record in txn:
            oids.add(record.oid)
    for oid in sorted(oids):
        if start is not None and oid < start:
            continue
        try:
            data, tid = load_current(storage, oid)
        except POSKeyError:
            continue
        if data:
            yield oid, tid, data


#: At most this many record positions are remembered (see
#: ``iter_filestorage``); a chunk whose positions were dropped is written
#: with ``store``.
MAX_POSITIONS = 8192


def iter_filestorage(storage, start=None, batch_size=256, seen=None):
    """record_iternext for FileStorage without its per-record overhead
    (through :mod:`zodbkmi.migrate.fsinternals`):
    the index gives the position of the current record of each oid, read
    under the storage lock, ``batch_size`` oids at a time.  Records that
    point back to older data (undo) are loaded with ``load``.  ``seen``, a
    dict, gets the position of each record read and the last transaction
    id of the storage when it was read (the most recent ``MAX_POSITIONS``
    or more)."""
    from ZODB.FileStorage.format import DATA_HDR_LEN
    from ZODB.FileStorage.format import DataHeaderFromString
    index = fsinternals.index(storage)
    nxt = start if start is not None else b'\0' * 8
    while nxt is not None:
        batch = []
        if seen is not None and len(seen) >= MAX_POSITIONS:
            seen.clear()
        with fsinternals.lock(storage):
            f = fsinternals.data_file(storage)
            ltid = fsinternals.last_tid(storage)
            positions = _index_batch(index, nxt, batch_size)
            nxt = (next_oid(positions[-1][0])
                   if len(positions) == batch_size else None)
            for oid, pos in positions:
                f.seek(pos)
                h = DataHeaderFromString(f.read(DATA_HDR_LEN))
                if h.oid != oid or not h.plen:
                    batch.append((oid, None, None))
                else:
                    batch.append((oid, h.tid, f.read(h.plen)))
                    if seen is not None:
                        seen[oid] = pos, ltid
        for oid, tid, data in batch:
            if data is None:
                try:
                    data, tid = storage.load(oid)
                except POSKeyError:   # undone creation
                    continue
            if data:
                yield oid, tid, data


def _index_batch(index, start, n):
    """Up to ``n`` ``(oid, position)`` of a FileStorage index, in oid order
    from ``start`` on.  The caller holds the storage lock, so the index
    does not change meanwhile.  An ``fsIndex`` is a tree of 6-byte oid
    prefixes to buckets of 2-byte suffixes: walking them once costs much
    less than a ``minKey`` per oid, which other indexes fall back to."""
    data = fsinternals.index_buckets(index)
    out = []
    if data is None:
        nxt = start
        while len(out) < n:
            try:
                oid = index.minKey(nxt)
            except ValueError:   # no oid left
                break
            out.append((oid, index[oid]))
            nxt = next_oid(oid)
        return out
    from ZODB.fsIndex import str2num
    prefix = start[:6]
    for p, bucket in data.items(min=prefix):
        lo = int.from_bytes(start[6:], 'big') if p == prefix else 0
        last = int.from_bytes(bucket.maxKey(), 'big')
        while lo <= last:
            # a bucket's items() builds a list: ask for a range that
            # holds at most the oids still wanted
            hi = min(last, lo + n - len(out) - 1)
            for s, pos in bucket.items(min=lo.to_bytes(2, 'big'),
                                       max=hi.to_bytes(2, 'big')):
                out.append((p + s, str2num(pos)))
            if len(out) == n:
                return out
            lo = hi + 1
    return out


def next_oid(oid):
    return (int.from_bytes(oid, 'big') + 1).to_bytes(8, 'big')
