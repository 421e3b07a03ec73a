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
"""
import itertools
import logging
import os
import shutil
import stat
import tempfile
import threading

import transaction

import ZODB.blob
import ZODB.interfaces
import zope.interface
from ZODB.mvccadapter import HistoricalStorageAdapter
from ZODB.mvccadapter import MVCCAdapter
from ZODB.mvccadapter import MVCCAdapterInstance
from ZODB.utils import oid_repr

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import NotEncryptedError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.format import envelope
from zodbkmi.format import stream

_STREAM_MAGIC = stream.MAGIC
_STREAM_MAGIC_SIZE = len(_STREAM_MAGIC)

STRICT = 'strict'
MIGRATE = 'migrate'
DECRYPT_ONLY = 'decrypt-only'
MODES = (STRICT, MIGRATE, DECRYPT_ONLY)

_MAGIC = envelope.MAGIC
_MAGIC_SIZE = len(_MAGIC)
# the part of a record envelope unique per sealed record (salt and nonce,
# or the nonce of version 1): the key of the oid hints
_unique_part = envelope.unique_part

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
    'close', 'getName', 'getSize', 'history', 'isReadOnly',
    'lastTransaction', 'new_oid', 'sortKey', 'tpc_begin', 'tpc_vote',
    'supportsUndo', 'undoLog', 'undoInfo', 'checkCurrentSerialInTransaction',
    'deleteObject', 'prefetch', 'temporaryDirectory', 'afterCompletion',
))


def _oid_text(oid):
    return oid_repr(oid) if isinstance(oid, bytes) else repr(oid)


def _remove(name):
    try:
        os.remove(name)
    except OSError:
        pass


#: Prefix of the private directories of plaintext blob copies, followed by
#: the process id and a random suffix.
PRIVATE_PREFIX = 'zodbkmi-blobs-'
_swept = set()


def sweep_plaintext_dirs(parent=None):
    """Remove the private directories of plaintext blob copies that
    processes of this user left in ``parent`` (default: the system's
    temporary directory) when they were killed: those whose process no
    longer runs.  Return the paths removed.  The first
    ``EncryptingStorage`` of a process that makes its private directory in
    ``parent`` calls it first."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        if not name.startswith(PRIVATE_PREFIX):
            continue
        pid = name[len(PRIVATE_PREFIX):].partition('-')[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except (OSError, OverflowError):
            continue     # alive under another user, or gone meanwhile
    return removed


def _no_fast_path(data, oid):
    return None


def _annotate(error, oid):
    """Name ``oid`` in ``error`` (a zodbkmi error) and keep its type."""
    error.oid = oid
    if error.args:
        error.args = ('oid %s: %s' % (_oid_text(oid), error.args[0]),
                      ) + error.args[1:]
    return error


# -- migrate mode: plaintext that may be a downgrade is refused ---------------

#: ``migrate_since`` value that switches the downgrade checks of migrate
#: mode off (the window of a rolling upgrade, see ``docs/storage.rst``).
UNCHECKED = 'unchecked'
#: Revisions searched for a plaintext record given without its transaction
#: id (conflict resolution) before it is refused.
MAX_SEARCHED_REVISIONS = 100
#: Revisions found to be clean that a storage remembers (then it forgets
#: them all and starts again).
MAX_CHECKED = 65536

_logger = logging.getLogger(__name__)


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


def _tid_text(tid):
    return tid.hex() if isinstance(tid, bytes) else repr(tid)


def _refused(oid, message):
    """The NotEncryptedError of a plaintext record refused in migrate
    mode."""
    if oid is not None:
        message = 'oid %s: %s' % (_oid_text(oid), message)
    error = NotEncryptedError(message)
    error.oid = oid
    return error


class _PlaintextCopies:
    """The plaintext copies of blob files made for one storage, or for one
    connection, in a private directory (mode 0700) of their own.

    The storage's directory is made in its ``plaintext_dir`` (named
    ``PRIVATE_PREFIX`` + process id, so that :func:`sweep_plaintext_dirs`
    finds it after a crash); a connection's directory is made inside the
    storage's (``parent``).  A copy is named by oid and serial: loading a
    blob twice in one scope decrypts it once.
    """

    def __init__(self, storage, parent=None):
        self.storage = storage      # the EncryptingStorage that decrypts
        self.parent = parent
        self.path = None
        self.names = {}             # the copies made (an ordered set)

    def directory(self):
        path = self.path
        if path is None or not os.path.isdir(path):
            if self.parent is not None:
                path = tempfile.mkdtemp(prefix='connection-',
                                        dir=self.parent.directory())
            else:
                where = self.storage._plaintext_dir
                parent = where or tempfile.gettempdir()
                if parent not in _swept:
                    # once per directory and process
                    _swept.add(parent)
                    sweep_plaintext_dirs(parent)
                path = tempfile.mkdtemp(
                    prefix='%s%d-' % (PRIVATE_PREFIX, os.getpid()), dir=where)
            self.path = path
        return path

    def _name(self, oid, serial):
        return os.path.join(self.directory(),
                            '%s-%s.blob' % (oid.hex(), serial.hex()))

    def load(self, oid, serial):
        """Return the name of the copy of the blob and whether it was made
        by this call."""
        name = self._name(oid, serial)
        if os.path.exists(name):
            return name, False
        self.storage._open_blob_plain(oid, serial, None, name)
        self.names[name] = None
        return name, True

    def open(self, oid, serial, blob=None):
        """An open file on the plaintext of the blob: the copy when there
        is one, else a new copy whose name is removed at once."""
        name = self._name(oid, serial)
        temporary = not os.path.exists(name)
        if temporary:
            name = self.storage._open_blob_plain(oid, serial,
                                                 self.directory())
        try:
            if blob is None:
                return open(name, 'rb')
            return ZODB.blob.BlobFile(name, 'r', blob)
        finally:
            if temporary:
                _remove(name)

    def remove(self, names=None):
        """Remove the copies ``names`` (default: all)."""
        for name in list(self.names) if names is None else names:
            self.names.pop(name, None)
            _remove(name)

    def close(self):
        """Remove every copy and the directory."""
        self.remove()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


class EncryptingStorage:
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

    def __init__(self, base, facility, key=None, previous_keys=(),
                 keyholder=None, mode=STRICT, plaintext_dir=None,
                 migrate_since=None):
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
        fast = getattr(facility, 'record_fast_path', None)
        self._open_fast = (fast(self._decrypt_keys) if fast is not None
                           else _no_fast_path)
        self._write_plaintext = mode == DECRYPT_ONLY
        self._read_plaintext = mode != STRICT
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
        # oid hints for the paths that get no oid (conflict resolution,
        # pack): unique part (envelope.unique_part: salt and nonce) -> oid
        # of records sealed in running transactions
        self._pending = {}
        self._txn_nonces = {}
        self._pack_index = None
        self._in_pack = False
        self._local = threading.local()
        self._plaintext_dir = (os.path.abspath(plaintext_dir)
                               if plaintext_dir else None)
        self._copies = _PlaintextCopies(self)
        self.db = None

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
        base.registerDB(self)

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
        if data[:_MAGIC_SIZE] == _MAGIC:
            try:
                return self._unseal(self._decrypt_keys, data, oid)
            except (DecryptionError, UnknownKeyError) as e:
                raise _annotate(e, oid)
        if self._read_plaintext:
            if (self.migrate_since is not None and
                    not getattr(self._local, 'references_only', False)):
                self._check_plaintext(oid, serial, data)
            return data
        raise NotEncryptedError(
            'oid %s: the record is not encrypted (strict mode; open the '
            'storage in migrate mode to read plaintext records)'
            % _oid_text(oid))

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

    def _sealed(self, data, oid, transaction):
        sealed = self.seal(data, oid)
        if sealed is not data:
            # remembered for conflict resolution, which has no oid
            nonce = _unique_part(sealed)
            self._pending[nonce] = oid
            self._txn_nonces.setdefault(transaction, []).append(nonce)
        return sealed

    def _forget(self, transaction):
        for nonce in self._txn_nonces.pop(transaction, ()):
            self._pending.pop(nonce, None)
        self._local.oid = None
        self._local.candidates = ()

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
        self._local.candidates = self._undone_oids(transaction_id)
        if self.migrate_since is not None:
            self._refuse_plaintext_undo(transaction_id,
                                        self._local.candidates)
        try:
            return self.base.undo(transaction_id, transaction)
        finally:
            self._local.candidates = ()

    @staticmethod
    def _undone_tid(transaction_id):
        import base64
        try:
            tid = base64.decodebytes(transaction_id + b'\n')
        except Exception:
            return None
        return tid if len(tid) == 8 else transaction_id

    def _refuse_plaintext_undo(self, transaction_id, oids):
        tid = self._undone_tid(transaction_id)
        for oid in oids:
            try:
                r = self.base.loadBefore(oid, tid)
            except Exception:
                continue        # the base's undo says what is wrong
            if r is not None and r[0] and r[0][:_MAGIC_SIZE] != _MAGIC:
                self._local.candidates = ()
                raise _refused(
                    oid, 'undoing transaction %s would restore a plaintext '
                         'revision, which migrate mode refuses (it is newer '
                         'than the start of the migration): refused'
                         % _tid_text(tid))

    def _undone_oids(self, transaction_id):
        tid = self._undone_tid(transaction_id)
        if tid is None:
            return ()
        oids = []
        try:
            it = self.base.iterator(tid, tid)
        except Exception:
            return ()
        try:
            for txn in it:
                oids.extend(r.oid for r in txn)
        finally:
            getattr(it, 'close', lambda: None)()
        return tuple(oids)

    def storeBlob(self, oid, oldserial, data, blobfilename, version,
                  transaction):
        return self.base.storeBlob(oid, oldserial,
                                   self._sealed(data, oid, transaction),
                                   self._seal_blob(blobfilename, oid), version,
                                   transaction)

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        return self.base.restoreBlob(oid, serial,
                                     self._sealed(data, oid, transaction),
                                     self._seal_blob(blobfilename, oid), prev_txn,
                                     transaction)

    # -- blobs -----------------------------------------------------------

    def _seal_blob(self, filename, oid):
        """Encrypt the blob file ``filename`` of ``oid`` (which the storage
        owns from now on), bound to the oid: in place when it is a regular
        file of one name that the facility can encrypt in place (its
        plaintext pages are overwritten), else into a new file next to it
        (the plaintext removed).  Return the name of the encrypted file."""
        if self._write_plaintext or filename is None:
            return filename
        if self._seal_blob_in_place(filename, oid):
            return filename
        fd, sealed = tempfile.mkstemp(
            suffix='.zks', dir=os.path.dirname(os.path.abspath(filename)))
        try:
            with open(filename, 'rb') as src, os.fdopen(fd, 'wb') as dst:
                self.facility.encrypt_file(self._key, src, dst, oid=oid)
        except BaseException:
            os.remove(sealed)
            raise
        ZODB.blob.remove_committed(filename)
        return sealed

    def _seal_blob_in_place(self, filename, oid):
        in_place = getattr(self.facility, 'encrypt_file_in_place', None)
        if in_place is None:
            return False
        try:
            fd = os.open(filename, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return False          # read-only, or a symbolic link
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return False      # another name may expect the plaintext
            try:
                in_place(self._key, fd, oid=oid)
            except BaseException:
                _remove(filename)     # half encrypted: useless
                raise
            return True
        finally:
            os.close(fd)

    def _open_blob_plain(self, oid, serial, directory, name=None):
        """Decrypt the blob of ``oid``/``serial`` into a new file (``name``
        or a new name in ``directory``); return its name.  Nothing is left
        behind when decryption fails."""
        source = self.base.loadBlob(oid, serial)
        if name is None:
            fd, name = tempfile.mkstemp(prefix=oid.hex() + '-' + serial.hex(),
                                        suffix='.blob', dir=directory)
            os.fchmod(fd, stat.S_IRUSR)
        else:
            # read-only for later opens; this descriptor may write
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         stat.S_IRUSR)
        try:
            # unbuffered: the stream format reads and writes in batches
            with open(source, 'rb', buffering=0) as src, \
                    open(fd, 'wb', buffering=0) as dst:
                if src.read(_STREAM_MAGIC_SIZE) == _STREAM_MAGIC:
                    src.seek(0)
                    try:
                        self.facility.decrypt_file(self._decrypt_keys, src,
                                                   dst, oid=oid)
                    except (DecryptionError, UnknownKeyError) as e:
                        raise _annotate(e, oid)
                elif self._read_plaintext:
                    if self.migrate_since is not None:
                        self._check_plaintext_blob(oid, serial)
                    src.seek(0)
                    shutil.copyfileobj(src, dst)
                else:
                    raise NotEncryptedError(
                        'oid %s: the blob file is not encrypted (strict '
                        'mode)' % _oid_text(oid))
        except BaseException:
            os.remove(name)
            raise
        return name

    def loadBlob(self, oid, serial):
        """The name of a plaintext copy of the blob, in a private
        temporary directory (mode 0700).

        A connection's storage (see :meth:`new_instance`) removes its
        copies when the connection's transaction ends.  Called on the
        storage itself, the copy is removed at the end of the current
        transaction of the thread's default transaction manager, and when
        the storage is closed.
        """
        name, made = self._copies.load(oid, serial)
        if not made:
            return name
        try:
            txn = transaction.get()
        except Exception:
            return name     # an explicit manager between transactions
        try:
            names = txn.data(self)
        except KeyError:
            # one pair of hooks per transaction, however many blobs
            names = []
            txn.set_data(self, names)
            txn.addAfterCommitHook(lambda ok: self._remove_copies(names))
            txn.addAfterAbortHook(lambda: self._remove_copies(names))
        names.append(name)
        return name

    def _remove_copies(self, names):
        self._copies.remove(names)
        del names[:]

    def openCommittedBlobFile(self, oid, serial, blob=None):
        """An open file on the plaintext of the blob; its name is removed
        at once, so no plaintext file stays behind when it is closed."""
        return self._copies.open(oid, serial, blob)

    def close(self):
        try:
            return self.base.close()
        finally:
            self._copies.close()

    def tpc_finish(self, transaction, func=lambda tid: None):
        try:
            return self.base.tpc_finish(transaction, func)
        finally:
            self._forget(transaction)

    def tpc_abort(self, transaction):
        try:
            return self.base.tpc_abort(transaction)
        finally:
            self._forget(transaction)

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
        self._pack_index = None
        self._in_pack = True
        # garbage collection reads the references of plaintext records
        # unchecked (see references)
        self._local.references_only = True
        try:
            if gc is None:
                return self.base.pack(pack_time, refs)
            return self.base.pack(pack_time, refs, gc)
        finally:
            self._local.references_only = False
            self._in_pack = False
            self._pack_index = None
            self._checked.clear()     # revisions moved in the file

    def _build_pack_index(self):
        index = {}
        try:
            it = self.base.iterator()
        except (AttributeError, NotImplementedError):
            it = None
        if it is not None:
            try:
                for txn in it:
                    for record in txn:
                        self._index_record(index, record.oid, record.data)
            finally:
                getattr(it, 'close', lambda: None)()
        elif hasattr(self.base, 'record_iternext'):
            next = None
            while True:
                oid, tid, data, next = self.base.record_iternext(next)
                self._index_record(index, oid, data)
                if next is None:
                    break
        self._pack_index = index
        return index

    @staticmethod
    def _index_record(index, oid, data):
        if data and data[:_MAGIC_SIZE] == _MAGIC:
            nonce = _unique_part(data)
            if index.setdefault(nonce, oid) != oid:
                index[nonce] = None   # one record under two oids: refuse

    # -- IStorageWrapper -------------------------------------------------

    def registerDB(self, db):
        self.db = db
        self._db_transform = db.transform_record_data
        self._db_untransform = db.untransform_record_data

    def _db_transform(self, data):
        return data

    _db_untransform = _db_transform

    def invalidateCache(self):
        return self.db.invalidateCache()

    def invalidate(self, transaction_id, oids, version=''):
        return self.db.invalidate(transaction_id, oids)

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

    def _oid_for(self, data):
        """The oid a record given without one belongs to.

        Conflict resolution and pack hand records to the wrapper without
        their oid.  The oid is found by the record's nonce (with its salt:
        ``envelope.unique_part``) among the records
        sealed in running transactions (the new state in a conflict), in
        the pack index, or else it is the oid of the conflict being resolved
        in this thread.  Whatever the guess, the record only opens with the
        oid it was sealed for.
        """
        if data and data[:_MAGIC_SIZE] == _MAGIC:
            nonce = _unique_part(data)
            oid = self._pending.get(nonce)
            if oid is not None:
                self._local.oid = oid
                return oid
            if self._in_pack:
                index = self._pack_index
                if index is None:
                    index = self._build_pack_index()
                if nonce in index:
                    oid = index[nonce]
                    if oid is None:
                        raise _annotate(DecryptionError(
                            'a record is stored under more than one oid'),
                            None)
                    return oid
        oid = getattr(self._local, 'oid', None)
        if oid is None and data and data[:_MAGIC_SIZE] == _MAGIC:
            raise DecryptionError(
                'an encrypted record was given without its oid outside of '
                'conflict resolution and pack; it cannot be opened')
        return oid

    def transform_record_data(self, data, oid=None):
        """Seal ``data`` after the transforms of the wrappers above."""
        data = self._db_transform(data)
        if oid is None:
            oid = self._oid_for(data)
            if oid is None:
                if self._write_plaintext:
                    return data
                raise DecryptionError(
                    'cannot seal a record without its oid')
        return self.seal(data, oid)

    def untransform_record_data(self, data, oid=None):
        """Open ``data``, then apply the transforms of the wrappers above."""
        if data and type(data) is not bytes:
            data = bytes(data)
        if oid is None:
            candidates = getattr(self._local, 'candidates', ())
            if candidates and data and data[:_MAGIC_SIZE] == _MAGIC:
                return self._db_untransform(
                    self._unseal_candidates(data, candidates))
            oid = self._oid_for(data)
        return self._db_untransform(self.unseal(data, oid))

    def _unseal_candidates(self, data, candidates):
        nonce = _unique_part(data)
        first = self._pending.get(nonce)
        if first is not None:
            candidates = (first,) + tuple(candidates)
        error = None
        for oid in candidates:
            try:
                plain = self.unseal(data, oid)
            except (DecryptionError, UnknownKeyError) as e:
                error = error or e
                continue
            self._local.oid = oid
            return plain
        raise error

    # -- IMVCCStorage ----------------------------------------------------
    #
    # Each connection gets a storage of its own from new_instance(), which
    # removes the connection's plaintext blob copies when its transaction
    # ends, whatever its transaction manager.  Over an MVCC base
    # (RelStorage) that is a wrapper of a new base instance; over any
    # other base, the wrapper is the MVCC layer itself, with ZODB's
    # MVCCAdapter reading through the outermost wrapper stacked on it.

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
        return _HistoricalInstance(instance, before)

    def undo_instance(self):
        """The storage ``DB.undo`` commits with."""
        if self._base_mvcc:
            return self.new_instance()
        return self._adapter().undo_instance()

    def _instance(self, base_instance):
        since = None
        if self.mode == MIGRATE:
            since = self.migrate_since or UNCHECKED
        other = _InstanceStorage(
            base_instance, self.facility, self._key, self._previous_keys,
            mode=self.mode, plaintext_dir=self._plaintext_dir,
            migrate_since=since)
        other._checked = self._checked
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
    """One transaction of an iteration; its records are opened."""

    def __init__(self, storage, txn):
        self._storage = storage
        self._txn = txn

    def __iter__(self):
        unseal = self._storage.unseal
        for record in self._txn:
            if record.data:
                record.data = unseal(record.data, record.oid, record.tid)
            yield record

    def __getattr__(self, name):
        return getattr(self._txn, name)


class ServerEncryptingStorage(EncryptingStorage):
    """The server side of a ZEO deployment whose clients encrypt.

    Records travel as ciphertext in both directions (the clients seal and
    open them); the server only opens records for the two jobs that run
    on the server: conflict resolution and the garbage collection of pack.
    Use it only where the server may hold the keys; otherwise configure the
    server storage with ``pack-gc false`` (see ``docs/storage.rst``).
    """

    _own_mvcc = False      # the ZEO server reads the storage itself

    def load(self, oid, version=''):
        return self.base.load(oid, version)

    def loadBefore(self, oid, tid):
        return self.base.loadBefore(oid, tid)

    def loadSerial(self, oid, serial):
        return self.base.loadSerial(oid, serial)

    def record_iternext(self, next=None):
        return self.base.record_iternext(next)

    def iterator(self, start=None, stop=None):
        return self.base.iterator(start, stop)

    def loadBlob(self, oid, serial):
        return self.base.loadBlob(oid, serial)

    def openCommittedBlobFile(self, oid, serial, blob=None):
        return self.base.openCommittedBlobFile(oid, serial, blob)

    def _seal_blob(self, filename, oid):
        return filename

    def _sealed(self, data, oid, transaction):
        # already sealed by the client: only remember its oid
        if data and data[:_MAGIC_SIZE] == _MAGIC:
            nonce = _unique_part(data)
            self._pending[nonce] = oid
            self._txn_nonces.setdefault(transaction, []).append(nonce)
        return data
