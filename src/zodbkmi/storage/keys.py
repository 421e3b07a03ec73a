"""Opening a database with keys: checked before anything is created.

:meth:`EncryptingStorage.check_keys
<zodbkmi.storage.EncryptingStorage.check_keys>` runs when the wrapper is
opened.  It looks at a few sealed records of the base storage (the root
record, else the records of the last transaction) and opens the first one
it finds with the keys given: when none of them can open its data key
(the wrong KEK file, a mistyped key directory) it raises
:class:`~zodbkmi.exceptions.DatabaseKeyError` before anything is created
or written.  Then, only if asked (``create_key``), it creates the active
data key of the KEK through the facility's
:class:`~zodbkmi.interfaces.IDataKeyCreation`:

``False`` (the default of the Python API)
    never: the caller made the key (``facility.ensure_key(kek)``);
:data:`AUTO` (the default of ZConfig and zodburi)
    when the database has no encrypted record yet (a new database, or one
    whose records are all plaintext, migrate mode);
``True``
    whenever the KEK has no active data key (after the check).
"""
import logging

from ZODB.interfaces import IMVCCStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import z64

from zodbkmi.exceptions import DatabaseKeyError
from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.exceptions import WrongKeyError
from zodbkmi.format import envelope
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IDataKeyCreation
from zodbkmi.interfaces import IExtendedKeyManagementFacility
from zodbkmi.kek import as_kek
from zodbkmi.storage.common import is_sealed
from zodbkmi.storage.common import oid_text

_logger = logging.getLogger('zodbkmi.storage')

#: ``create_key`` value: create the active data key of a database that has
#: no encrypted record yet.
AUTO = 'auto'
#: Records of the last transaction looked at when the root record is not
#: encrypted.
MAX_SAMPLED = 100

_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def parse_create_key(value):
    """``create_key`` from a setting: a bool, :data:`AUTO`, or the text
    of one (``true``/``yes``/``on``/``1``, ``false``/``no``/``off``/``0``,
    ``auto``).  Raise ValueError for anything else."""
    if value is True or value is False:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError('create_key is true, false or %r, not %r'
                     % (AUTO, value))


def _disconnected():
    try:
        from ZEO.Exceptions import ClientDisconnected
    except ImportError:     # pragma: no cover
        return ()
    return ClientDisconnected


def sampled_records(base):
    """Yield ``(oid, data)``: the root record, then the records of the last
    transaction (at most :data:`MAX_SAMPLED`), of the storage ``base``.
    An MVCC storage (RelStorage) is read through a new instance."""
    reader = base
    instance = None
    if IMVCCStorage.providedBy(base):
        reader = instance = base.new_instance()
        reader.poll_invalidations()
    try:
        try:
            yield z64, reader.load(z64)[0]
        except (POSKeyError, KeyError):
            pass
        if instance is not None:
            return      # RelStorage: the root is always written first
        last = base.lastTransaction()
        if not last or last == z64 or \
                getattr(base, 'iterator', None) is None:
            return
        try:
            it = base.iterator(last, last)
        except Exception:      # a storage without iteration
            return
        try:
            n = 0
            for txn in it:
                for record in txn:
                    yield record.oid, record.data
                    n += 1
                    if n >= MAX_SAMPLED:
                        return
        finally:
            getattr(it, 'close', lambda: None)()
    finally:
        if instance is not None:
            instance.release()


def first_sealed(base):
    """``(oid, data)`` of the first sealed record among the
    :func:`sampled_records` of ``base``, or None.  A ZEO client not
    connected yet raises its ``ClientDisconnected``."""
    for oid, data in sampled_records(base):
        if data is not None and type(data) is not bytes:
            data = bytes(data)
        if is_sealed(data):
            return oid, data
    return None


def check_record(facility, decrypt_keys, keks, oid, data):
    """Open the sealed record ``data`` of ``oid`` with ``decrypt_keys`` (a
    KEK or a tuple of KEKs, as ``facility.decrypt`` takes them); raise
    :class:`DatabaseKeyError` naming ``keks`` (the KEKs given) when none
    of them opens its data key."""
    try:
        facility.decrypt(decrypt_keys, data, oid)
    except (UnknownKeyError, WrongKeyError):
        raise database_key_error(facility, keks, oid, data) from None
    except DecryptionError:
        # altered, truncated, moved: not a matter of keys; loading the
        # record raises its error, naming the oid
        pass


def check_keys(storage, create_key=False):
    """Check that the keys of ``storage`` (an EncryptingStorage) open its
    database, then create the active data key if ``create_key`` asks for
    it (see the module docstring).  Return whether an encrypted record was
    found (None when the storage could not be read)."""
    try:
        sealed = first_sealed(storage.base)
    except _disconnected():
        # a ZEO client not connected yet: nothing to check, nothing
        # created unless asked
        _logger.warning('%r: the keys were not checked (the storage is '
                        'not connected)', storage)
        if create_key != True:    # noqa: E712 (AUTO is a string)
            return None
        sealed = None
    if sealed is not None:
        check_record(storage.facility, storage._decrypt_keys,
                     (storage._key,) + storage._previous_keys, *sealed)
    if storage._write_plaintext:
        return sealed is not None        # decrypt-only: never creates
    if create_key is True or (create_key == AUTO and sealed is None):
        facility = storage.facility
        if IDataKeyCreation.providedBy(facility):
            facility.ensure_key(storage._key)
        else:
            _logger.warning(
                '%r cannot create data keys: create the active data key '
                'of the KEK yourself', facility)
    return sealed is not None


def _kek_ids(keks):
    ids = []
    for key in keks:
        try:
            kek_id = as_kek(key).key_id
        except Exception:
            kek_id = '?'
        if kek_id not in ids:
            ids.append(kek_id)
    return ids


def database_key_error(facility, keks, oid, data):
    """The :class:`DatabaseKeyError` of the sealed record ``data`` of
    ``oid`` that none of ``keks`` (the KEKs given) can open."""
    try:
        dek_id = envelope.read_dek_id(data, envelope.CONTEXT_RECORD).hex()
    except Exception:
        dek_id = None
    owner = None
    if dek_id and IExtendedKeyManagementFacility.providedBy(facility):
        try:
            found = facility.get(dek_id)
            if found is not None:
                owner = wrapped.parse(found).kek_id
        except Exception:
            owner = None
    given = _kek_ids(keks)
    if owner is None:
        whose = 'not in the key store given'
    else:
        whose = 'wrapped by KEK %s' % owner
    message = (
        'the keys given cannot open this database: its record oid %s '
        'needs data key %s (%s); KEKs given: %s.  Check the key file and '
        'the key directory (nothing was created)'
        % (oid_text(oid), dek_id, whose, ', '.join(given)))
    return DatabaseKeyError(message, dek_id, given, oid)
