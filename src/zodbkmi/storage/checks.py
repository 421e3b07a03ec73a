"""Migrate mode: plaintext records that may be a downgrade are refused.

In migrate mode a plaintext record is read only when it is not newer than
the start of the migration nor than an encrypted revision of its object
(see ``docs/storage.rst``).  :class:`DowngradeChecks` holds the checks of
:class:`~zodbkmi.storage.EncryptingStorage`.
"""
import itertools

from zodbkmi.storage.common import MAGIC as _MAGIC
from zodbkmi.storage.common import MAGIC_SIZE as _MAGIC_SIZE
from zodbkmi.storage.common import refused as _refused
from zodbkmi.storage.common import tid_text as _tid_text
from zodbkmi.storage.oids import undone_tid


#: ``migrate_since`` value that switches the downgrade checks of migrate
#: mode off (the window of a rolling upgrade, see ``docs/storage.rst``).
UNCHECKED = 'unchecked'
#: Revisions searched for a plaintext record given without its transaction
#: id (conflict resolution) before it is refused.
MAX_SEARCHED_REVISIONS = 100
#: Revisions found to be clean that a storage remembers (then it forgets
#: them all and starts again).
MAX_CHECKED = 65536


def parse_migrate_since(value):
    """The start of a migration from a setting: None (the storage's last
    transaction when it is opened), :data:`UNCHECKED`, a transaction id of
    8 bytes or its 16 hex digits (``0x`` and leading zeros may be left
    out).  Raise ValueError for anything else."""
    if value is None or isinstance(value, bytes) and len(value) == 8:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == UNCHECKED:
            return UNCHECKED
        digits = text[2:] if text.startswith('0x') else text
        if 0 < len(digits) <= 16 and all(
                c in '0123456789abcdef' for c in digits):
            return bytes.fromhex(digits.rjust(16, '0'))
    raise ValueError('migrate_since is a transaction id (16 hex digits) or '
                     '%r, not %r' % (UNCHECKED, value))


def _is_filestorage(base):
    try:
        from ZODB.FileStorage import FileStorage
    except ImportError:   # pragma: no cover
        return False
    return isinstance(base, FileStorage) and all(
        hasattr(base, name) for name in (
            '_lock', '_file', '_index', '_lookup_pos', '_read_data_header',
            '_loadBack_impl'))


def _filestorage_revisions(fs, oid, full):
    """``(key, tid, data)`` of the revisions of ``oid`` in the FileStorage
    ``fs``, from the current one back, in the order of the file (whatever
    their transaction ids say); ``data`` is the first bytes of the record
    unless ``full``, ``b''`` for a deletion.  The caller holds ``fs._lock``
    (``loadSerial`` reads the same way)."""
    from ZODB.POSException import POSKeyError
    try:
        pos = fs._lookup_pos(oid)
    except POSKeyError:
        return
    while pos:
        h = fs._read_data_header(pos, oid)
        if h.plen:
            data = fs._file.read(h.plen if full else
                                 min(h.plen, _MAGIC_SIZE))
        elif h.back:
            try:
                data = fs._loadBack_impl(oid, h.back)[0]
            except POSKeyError:
                data = b''
        else:
            data = b''
        yield (pos, h.tid), h.tid, data
        pos = h.prev


def _revisions_before(base, oid, tid):
    """``(key, tid, data)`` of the revisions of ``oid`` older than ``tid``
    in any storage, newest first, through ``loadBefore``."""
    from ZODB.POSException import POSKeyError
    while True:
        try:
            r = base.loadBefore(oid, tid)
        except POSKeyError:
            return
        if r is None or r[1] >= tid:
            return
        data, tid, _ = r
        yield tid, tid, data or b''


def _revisions(base, oid):
    """``(key, tid, data)`` of every revision of ``oid``, newest first."""
    from ZODB.POSException import POSKeyError
    try:
        data, tid = base.load(oid)
    except POSKeyError:
        return
    yield tid, tid, data
    yield from _revisions_before(base, oid, tid)


class DowngradeChecks:
    """The checks of migrate mode, a mix-in of the wrapper (its
    ``base``, ``migrate_since``, ``_checked`` and ``_filestorage``)."""

    def _check_plaintext(self, oid, serial, data):
        """Migrate mode: refuse the plaintext revision ``serial`` (None:
        unknown, found by its bytes ``data``) of ``oid`` when it is newer
        than the start of the migration, or than an encrypted revision of
        ``oid``; else return.  The history is read in the storage's own
        order (for FileStorage the order of the file, which transaction
        ids written by someone else cannot change) and only back to a
        revision found clean before."""
        if oid is None:
            raise _refused(oid, 'a plaintext record given without its oid '
                                '(conflict resolution, undo) cannot be '
                                'checked in migrate mode: refused')
        if serial is not None and serial > self.migrate_since:
            raise self._after_start(oid, serial)
        if self._filestorage:
            fs = self.base
            if serial is not None and (
                    oid, (fs._index.get(oid), serial)) in self._checked:
                return      # the current record, found clean before
            with fs._lock:
                self._check_history(oid, serial, data, _filestorage_revisions(
                    fs, oid, serial is None))
        elif serial is None:
            self._check_history(oid, None, data, _revisions(self.base, oid))
        else:
            self._check_history(oid, serial, data, itertools.chain(
                ((serial, serial, data),),
                _revisions_before(self.base, oid, serial)))

    def _after_start(self, oid, serial):
        return _refused(
            oid, 'plaintext record of transaction %s, after the start of the '
                 'migration (transaction %s): refused (migrate mode reads '
                 'plaintext written before it started only)'
                 % (_tid_text(serial), _tid_text(self.migrate_since)))

    def _check_history(self, oid, serial, data, revisions):
        checked = self._checked
        found = found_tid = None
        n = 0
        for key, tid, head in revisions:
            if found is None:
                n += 1
                if (tid == serial if serial is not None else head == data):
                    found, found_tid = (oid, key), tid
                    if tid > self.migrate_since:
                        raise self._after_start(oid, tid)
                    if found in checked:
                        return
                elif serial is None and n >= MAX_SEARCHED_REVISIONS:
                    break
                continue
            if (oid, key) in checked:
                break           # it and everything before it is clean
            if head[:_MAGIC_SIZE] == _MAGIC:
                raise _refused(
                    oid, 'plaintext record of transaction %s over an '
                         'encrypted revision (transaction %s): refused (a '
                         'downgrade)' % (_tid_text(found_tid), _tid_text(tid)))
        if found is None:
            raise _refused(oid, 'plaintext record %s not found in the history '
                                'of the object: it cannot be checked in '
                                'migrate mode; refused' % (
                                    'of transaction %s' % _tid_text(serial)
                                    if serial is not None else
                                    'given without its transaction id'))
        if len(checked) >= MAX_CHECKED:
            checked.clear()
        checked[found] = None

    def _check_plaintext_blob(self, oid, serial):
        """Migrate mode: a plaintext blob file is read only with a plaintext
        record of the same revision that passes :meth:`_check_plaintext`."""
        record = self.base.loadSerial(oid, serial)
        if record[:_MAGIC_SIZE] == _MAGIC:
            raise _refused(oid, 'the blob file of transaction %s is not '
                                'encrypted, but its record is: refused'
                                % _tid_text(serial))
        self._check_plaintext(oid, serial, record)

    def _refuse_plaintext_undo(self, transaction_id, oids):
        tid = undone_tid(transaction_id)
        for oid in oids:
            try:
                r = self.base.loadBefore(oid, tid)
            except Exception:
                continue        # the base's undo says what is wrong
            if r is not None and r[0] and r[0][:_MAGIC_SIZE] != _MAGIC:
                self._oids.candidates = ()
                raise _refused(
                    oid, 'undoing transaction %s would restore a plaintext '
                         'revision, which migrate mode refuses (it is newer '
                         'than the start of the migration): refused'
                         % _tid_text(tid))
