"""Transaction metadata sealed on its way down, opened on its way up.

ZODB stores three pieces of metadata with every transaction, in the
clear: ``user``, ``description`` and the extension (a dict: Zope puts the
request path and the user name there).  ``MetadataSealing`` seals
them into one envelope of the transaction metadata context
(``docs/format.rst``, "Transaction metadata, version 1") in ``tpc_begin``:
the base storage is given an empty user and description and the extension
``{'zodbkmi-metadata': <envelope>}``.  The transaction object the caller
handed over (the storage's key for the transaction: it cannot be replaced
by another) is changed for the base storage to read, and given back its
own values when the transaction ends (``tpc_finish``, ``tpc_abort``), or
at once when the base storage refuses ``tpc_begin``.  Every base storage
we support (FileStorage, ZEO's ClientStorage, RelStorage) reads the
metadata in ``tpc_begin``.

The metadata is opened for ``undoLog``, ``undoInfo`` (a filter or a
specification sees the opened values), ``history`` and the transactions
of ``iterator()``.  An entry of a listing whose envelope does not open
(wrong key, altered) keeps its place, with the key
:data:`~zodbkmi.format.txnmeta.ERROR_KEY` holding a short message naming
the DEK id; a transaction of an iterator raises instead (see
``docs/storage.rst``, "Transaction metadata").  Metadata written in the
clear (before encryption, or in decrypt-only mode) is shown as it is.

The envelope is not bound to its transaction id, which most storages
choose only after ``tpc_begin`` (ZEO and RelStorage at the vote): see
``docs/security.rst`` for what that allows.
"""
import threading

from ZODB._compat import loads
from ZODB.Connection import TransactionMetaData
from ZODB.UndoLogCompatible import UndoLogCompatible
from ZODB.utils import tid_repr

from zodbkmi.exceptions import UnsupportedFormatError
from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.format import txnmeta
from zodbkmi.interfaces import IMetadataEncryption

EXTENSION_KEY = txnmeta.EXTENSION_KEY
ERROR_KEY = txnmeta.ERROR_KEY
# the attributes of a transaction object the base storage reads
_ATTRIBUTES = ('user', 'description', 'extension', 'extension_bytes')
# entries fetched at once when a filter is applied here (doubled per page)
_FIRST_PAGE = 32
_MAX_PAGE = 4096


def _extension_bytes(extension):
    """ZODB's encoding of the extension dict ``extension``."""
    return TransactionMetaData(extension=extension).extension_bytes


def metadata_of(txn):
    """``(user, description, extension_bytes)`` of the transaction object
    ``txn`` (ZODB's ``TransactionMetaData``, an iterator's transaction),
    as bytes, as ZODB would store them."""
    extension = getattr(txn, 'extension_bytes', None)
    if extension is None:
        extension = getattr(txn, 'extension', None) or {}
    meta = TransactionMetaData(txn.user or b'', txn.description or b'',
                               extension)
    return meta.user, meta.description, meta.extension_bytes


def error_text(error):
    """The short message of a listing entry whose metadata did not open:
    the exception's class and message (zodbkmi's messages name DEK ids and
    never key material)."""
    text = '%s: %s' % (type(error).__name__, error)
    return text if len(text) <= 300 else text[:297] + '...'


class MetadataSealing:
    """Seals and opens the transaction metadata of one storage wrapper.

    ``facility`` must provide
    :class:`~zodbkmi.interfaces.IMetadataEncryption` (else ``TypeError``:
    the storage could not keep the metadata out of its base); ``key``
    seals, ``decrypt_keys`` (a KEK or a tuple of KEKs) open.  With
    ``write_plaintext`` (decrypt-only mode) the metadata is written in the
    clear; sealed metadata is opened in every mode.
    """

    def __init__(self, facility, key, decrypt_keys, write_plaintext=False):
        if not IMetadataEncryption.providedBy(facility):
            raise TypeError(
                'the facility %s does not provide IMetadataEncryption '
                '(encrypt_metadata, decrypt_metadata): the transaction '
                'metadata could not be encrypted' % type(facility).__name__)
        self._encrypt = facility.encrypt_metadata
        self._decrypt = facility.decrypt_metadata
        self._key = key
        self._keys = decrypt_keys
        self._write_plaintext = write_plaintext
        # id(transaction) -> (transaction, its attributes before sealing)
        self._pending = {}
        self._lock = threading.Lock()

    # -- writing ---------------------------------------------------------

    def seal(self, user, description, extension):
        """The envelope of the metadata (bytes each)."""
        return self._encrypt(self._key,
                             txnmeta.encode(user, description, extension))

    def tpc_begin(self, begin, transaction, *args, **kw):
        """Call ``begin(transaction, *args, **kw)`` (the base storage's
        ``tpc_begin``) with the metadata of ``transaction`` sealed."""
        if self._write_plaintext:
            return begin(transaction, *args, **kw)
        with self._lock:
            duplicate = id(transaction) in self._pending
        if duplicate:   # the base storage refuses it: not sealed twice
            return begin(transaction, *args, **kw)
        user, description, extension = metadata_of(transaction)
        if not (user or description or extension):
            return begin(transaction, *args, **kw)
        sealed = {EXTENSION_KEY: self.seal(user, description, extension)}
        self._replace(transaction, sealed)
        try:
            return begin(transaction, *args, **kw)
        except BaseException:
            self.ended(transaction)
            raise

    def _replace(self, txn, extension):
        """Give ``txn`` an empty user and description and ``extension``;
        remember what it had."""
        try:
            attributes = vars(txn)
        except TypeError:
            raise TypeError('cannot seal the metadata of a transaction '
                            'object without attributes of its own (%s)'
                            % type(txn).__name__) from None
        saved = {name: attributes[name] for name in _ATTRIBUTES
                 if name in attributes}
        with self._lock:
            self._pending[id(txn)] = (txn, saved)
        # setattr, not the dict: a class may check or convert (bytes
        # stay bytes, text stays text)
        txn.user = b'' if isinstance(txn.user, bytes) else ''
        txn.description = (b'' if isinstance(txn.description, bytes)
                           else '')
        txn.extension = extension
        # both forms: TransactionMetaData computes one from the other
        # unless it was given that one, the base storage may read either
        txn.extension_bytes = _extension_bytes(extension)
        return saved

    def ended(self, transaction):
        """Give ``transaction`` back the metadata it had before
        :meth:`tpc_begin` (called when the transaction ends)."""
        with self._lock:
            pending = self._pending.pop(id(transaction), None)
        if pending is None:
            return
        txn, saved = pending
        attributes = vars(txn)
        for name in _ATTRIBUTES:
            attributes.pop(name, None)
        attributes.update(saved)

    # -- reading ---------------------------------------------------------

    def open(self, sealed):
        """``(user, description, extension_bytes)`` of the envelope
        ``sealed``; raises the facility's errors (and
        ``UnsupportedFormatError`` for what is not an envelope)."""
        if not isinstance(sealed, (bytes, bytearray, memoryview)):
            raise UnsupportedFormatError(
                'the transaction metadata is a %s, not an envelope'
                % type(sealed).__name__)
        return txnmeta.decode(self._decrypt(self._keys, bytes(sealed)))

    def open_entry(self, entry):
        """Open, in place, the metadata of ``entry`` (a dict of
        ``undoLog``, ``undoInfo`` or ``history``); return it.  Metadata that
        does not open leaves the key :data:`ERROR_KEY` (a short message)
        instead of the envelope; metadata in the clear is left as it is."""
        if not isinstance(entry, dict) or EXTENSION_KEY not in entry:
            return entry
        sealed = entry.pop(EXTENSION_KEY)
        try:
            user, description, extension = self.open(sealed)
            extension = loads(extension) if extension else {}
        except ZodbKmiError as e:
            entry[ERROR_KEY] = error_text(e)
            return entry
        except Exception as e:    # an authenticated extension ZODB cannot
            entry[ERROR_KEY] = error_text(e)        # read: a writer's bug
            return entry
        entry['user_name'] = user
        entry['description'] = description
        entry.update(extension)
        return entry

    def open_entries(self, entries):
        for entry in entries:
            self.open_entry(entry)
        return entries

    def opened(self, txn):
        """``(user, description, extension_bytes)`` of the transaction
        ``txn`` of an iterator when its metadata is sealed, else None.
        Raises the facility's error, naming the transaction id, when it
        does not open."""
        extension = getattr(txn, 'extension', None)
        if not extension or EXTENSION_KEY not in extension:
            return None
        try:
            return self.open(extension[EXTENSION_KEY])
        except ZodbKmiError as e:
            tid = getattr(txn, 'tid', None)
            if e.args and isinstance(tid, bytes):
                e.args = ('transaction %s: metadata: %s'
                          % (tid_repr(tid), e.args[0]),) + e.args[1:]
            e.tid = tid
            raise

    # -- listings ----------------------------------------------------------

    def undoLog(self, base_undo_log, first=0, last=-20, filter=None):
        """``undoLog`` of the base storage, opened; ``filter`` sees the
        opened entries.

        The base storage applies the filter, each entry opened before the
        filter sees it.  A base storage that never calls it (ZEO's client
        cannot send a filter to its server, and answers an empty list)
        is read in pages by :meth:`_search`, which applies the filter
        here."""
        if filter is None:
            return self.open_entries(base_undo_log(first, last))
        called = []

        def opened_filter(entry):
            if not called:
                called.append(True)
            return filter(self.open_entry(entry))

        found = base_undo_log(first, last, opened_filter)
        if found or called:
            return self.open_entries(found)   # opened already, as a rule
        return self._search(base_undo_log, first, last, filter)

    def _search(self, base_undo_log, first, last, filter):
        """The entries ``first`` to ``last`` of the undo log that
        ``filter`` accepts, read from the base storage's unfiltered undo
        log in pages (each page costs the base storage a search from the
        newest transaction: used where it does not apply filters)."""
        if last < 0:
            last = first - last
        wanted = last - first
        found, matched, seen, position = [], 0, set(), 0
        page = _FIRST_PAGE
        while len(found) < wanted:
            entries = base_undo_log(position, position + page)
            for entry in entries:
                # entries move down when transactions are committed
                # between two pages: each is considered once
                if entry.get('id') in seen:
                    continue
                seen.add(entry.get('id'))
                if not filter(self.open_entry(entry)):
                    continue
                if matched >= first:
                    found.append(entry)
                    if len(found) >= wanted:
                        break
                matched += 1
            if len(entries) < page:
                break
            position += len(entries)
            page = min(page * 2, _MAX_PAGE)
        return found

    def undoInfo(self, base_undo_log, base_undo_info, first=0, last=-20,
                 specification=None):
        """``undoInfo`` of the base storage, opened; a ``specification``
        is matched against the opened entries (through :meth:`undoLog`)."""
        if not specification:
            return self.open_entries(base_undo_info(first, last))
        log = UndoLogCompatible()
        log.undoLog = lambda first, last, filter=None: self.undoLog(
            base_undo_log, first, last, filter)
        return log.undoInfo(first, last, specification)
