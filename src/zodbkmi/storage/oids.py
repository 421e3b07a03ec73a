"""Oid recovery: the oid of a record handed to the wrapper without one.

ZODB's conflict resolution, undo and pack hand records to a storage
wrapper without their oids (``transform_record_data``,
``untransform_record_data``, the ``referencesf`` of pack).  A record
envelope is bound to its oid, so the wrapper must find that oid; whatever
the guess, a record only opens with the oid it was sealed for, so a wrong
guess fails and can never open a record as another object.
:class:`OidRecovery` keeps what the guesses are made from; it needs no
storage (``tests/test_storage_oids.py`` tests it alone).
"""
import base64
import threading

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.storage.common import annotate
from zodbkmi.storage.common import is_sealed
from zodbkmi.storage.common import unique_part


class OidRecovery:
    """Where the oid of a record given without one is found, in order:

    1. among the records sealed in the running transactions (the new
       state of a conflict), by their unique part (salt and nonce, see
       ``envelope.unique_part``): :meth:`remember` until :meth:`forget`,
       and the resolved states sealed for them
       (:meth:`remember_resolved`: a ZEO server whose clients resolve
       conflicts hands a resolved state back when it conflicts again);
    2. during a pack (:meth:`packing`), in an index of the unique part of
       every stored record to its oid, built on first use from the
       ``records`` the pack was started with (a record stored under two
       oids is refused);
    3. else the oid of the conflict being resolved in this thread: the
       oid found last by 1 in this thread, or set by :meth:`resolving`.

    During an undo (:meth:`undoing`) the oids of the undone transaction
    are the candidates tried in turn (:meth:`open_candidates`).
    """

    def __init__(self):
        self._pending = {}          # unique part -> (oid, transaction)
        self._txn_parts = {}        # transaction -> its unique parts
        self._pack_records = None   # a callable: (oid, data) of the pack
        self._pack_index = None
        self._local = threading.local()

    # -- records sealed in running transactions ----------------------------

    def remember(self, sealed, oid, transaction):
        """Remember that the envelope ``sealed`` is a record of ``oid``
        stored in ``transaction``."""
        part = unique_part(sealed)
        self._pending[part] = (oid, transaction)
        self._txn_parts.setdefault(transaction, []).append(part)

    def remember_resolved(self, sealed, oid):
        """Remember that the envelope ``sealed`` is the resolved state of
        the conflict on ``oid`` resolved in this thread (sealed by
        ``transform_record_data``, which gets no oid), as a record of the
        transaction whose new state was found last in this thread; nothing
        is remembered when there is none (then nothing would forget it).
        """
        transaction = getattr(self._local, 'transaction', None)
        if transaction is None:
            return
        part = unique_part(sealed)
        self._pending[part] = (oid, transaction)
        self._txn_parts.setdefault(transaction, []).append(part)

    def forget(self, transaction):
        """Forget the records of ``transaction`` (it ended)."""
        for part in self._txn_parts.pop(transaction, ()):
            self._pending.pop(part, None)
        self._local.oid = None
        self._local.transaction = None
        self._local.candidates = ()

    def resolving(self, oid):
        """Set the oid of the conflict resolved in this thread."""
        self._local.oid = oid

    # -- pack -------------------------------------------------------------

    def packing(self, records):
        """Start a pack; ``records()`` yields the ``(oid, data)`` of every
        stored record (read once, when a record has no other hint)."""
        self._pack_index = None
        self._pack_records = records

    def packed(self):
        """The pack ended."""
        self._pack_records = None
        self._pack_index = None

    def _index(self):
        index = self._pack_index
        if index is None:
            index = {}
            for oid, data in self._pack_records():
                if is_sealed(data):
                    part = unique_part(data)
                    if index.setdefault(part, oid) != oid:
                        index[part] = None   # under two oids: refused
            self._pack_index = index
        return index

    # -- undo -------------------------------------------------------------

    @property
    def candidates(self):
        """The oids tried for a record given without one in this thread
        (during an undo)."""
        return getattr(self._local, 'candidates', ())

    @candidates.setter
    def candidates(self, oids):
        self._local.candidates = tuple(oids)

    # -- finding ----------------------------------------------------------

    def oid_for(self, data):
        """The oid the record ``data`` (given without one) belongs to, or
        None when there is no hint and ``data`` is not an envelope."""
        sealed = is_sealed(data)
        if sealed:
            part = unique_part(data)
            pending = self._pending.get(part)
            if pending is not None:
                self._local.oid, self._local.transaction = pending
                return pending[0]
            if self._pack_records is not None:
                index = self._index()
                if part in index:
                    oid = index[part]
                    if oid is None:
                        raise annotate(DecryptionError(
                            'a record is stored under more than one oid'),
                            None)
                    return oid
        oid = getattr(self._local, 'oid', None)
        if oid is None and sealed:
            raise DecryptionError(
                'an encrypted record was given without its oid outside of '
                'conflict resolution and pack; it cannot be opened')
        return oid

    def open_candidates(self, data, unseal):
        """Open the envelope ``data`` with ``unseal(data, oid)`` for the
        oid of a record sealed in a running transaction, then for each
        candidate; the oid that opens it becomes the thread's oid.  Raise
        the first error when none does."""
        candidates = self.candidates
        first = self._pending.get(unique_part(data))
        if first is not None:
            candidates = (first[0],) + candidates
        error = None
        for oid in candidates:
            try:
                plain = unseal(data, oid)
            except (DecryptionError, UnknownKeyError) as e:
                error = error or e
                continue
            self._local.oid = oid
            return plain
        raise error


def stored_records(base):
    """Yield ``(oid, data)`` of every record of the storage ``base``,
    through its iterator or else ``record_iternext``."""
    try:
        it = base.iterator()
    except (AttributeError, NotImplementedError):
        it = None
    if it is not None:
        try:
            for txn in it:
                for record in txn:
                    yield record.oid, record.data
        finally:
            getattr(it, 'close', lambda: None)()
    elif hasattr(base, 'record_iternext'):
        next = None
        while True:
            oid, tid, data, next = base.record_iternext(next)
            yield oid, data
            if next is None:
                break


def undone_tid(transaction_id):
    """The transaction id of an undo log id (base64 of it in most
    storages), or None."""
    try:
        tid = base64.decodebytes(transaction_id + b'\n')
    except Exception:
        return None
    return tid if len(tid) == 8 else transaction_id


def undone_oids(base, transaction_id):
    """The oids of the records of the transaction an undo undoes."""
    tid = undone_tid(transaction_id)
    if tid is None:
        return ()
    oids = []
    try:
        it = base.iterator(tid, tid)
    except Exception:
        return ()
    try:
        for txn in it:
            oids.extend(r.oid for r in txn)
    finally:
        getattr(it, 'close', lambda: None)()
    return tuple(oids)
