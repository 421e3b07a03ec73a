"""The storage-level transformer: raw records under ``EncryptingStorage``."""
import os
import shutil
import tempfile

from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.POSException import POSKeyError
from ZODB.interfaces import IBlobStorage
from ZODB.utils import oid_repr
from zope.interface import implementer

from zodbkmi import threads
from zodbkmi.exceptions import DecryptionError
from zodbkmi.format import envelope
from zodbkmi.format import stream
from zodbkmi.migrate import fsinternals
from zodbkmi.migrate.engine import Migration
from zodbkmi.migrate.interfaces import IBlobTransformer
from zodbkmi.migrate.keys import MigrationKeys
from zodbkmi.migrate.kinds import DECRYPT
from zodbkmi.migrate.kinds import ENCRYPT
from zodbkmi.migrate.kinds import ENCRYPTED
from zodbkmi.migrate.kinds import INVALID
from zodbkmi.migrate.kinds import LEGACY
from zodbkmi.migrate.kinds import LEGACY_PREFIX
from zodbkmi.migrate.kinds import MigrationError
from zodbkmi.migrate.kinds import PLAINTEXT
from zodbkmi.migrate.kinds import REKEY
from zodbkmi.migrate.scan import iter_records
from zodbkmi.migrate.scan import iter_filestorage


@implementer(IBlobTransformer)
class RecordTransformer:
    """Storage level: raw records of the storage under ``EncryptingStorage``.

    A record is an envelope bound to its oid
    (``service.encrypt(key, data, oid=oid)``), or plaintext (any record not
    starting with the envelope magic, nor with a legacy prefix when
    ``legacy`` is given).  ``legacy`` is a reader of older formats (see
    :mod:`zodbkmi.migrate.legacy`): its records are decrypted and
    rewritten like records under an old key.
    """

    level = 'storage'
    _mode = None        # set by the engine (ITransformer)

    def __init__(self, keys, legacy=None):
        self.keys = keys
        self.legacy = legacy
        self._blob_support = None    # known once records() is called
        self._legacy_oids = set()    # of records imported (blobs are not)
        self._positions = None       # FileStorage: oid -> position read

    def check(self, mode):
        """Refuse a mode the keys cannot carry out."""
        if mode in (ENCRYPT, REKEY) and self.keys.new is None:
            raise MigrationError('%s needs the new key' % mode)
        if mode in (REKEY, DECRYPT) and not self.keys.can_decrypt and (
                self.legacy is None):
            raise MigrationError('%s needs the old key' % mode)

    def classify(self, oid, data):
        """Return ``(kind, dek_id)`` of a record (dek_id hex or None)."""
        if envelope.is_envelope(data):
            try:
                return ENCRYPTED, envelope.read_dek_id(
                    data, envelope.CONTEXT_RECORD).hex()
            except DecryptionError:
                return INVALID, None
        if data[:2] == LEGACY_PREFIX:
            return LEGACY, None
        return PLAINTEXT, None

    def needs_work(self, mode, kind, dek_id, oid=None, data=None):
        if kind == INVALID:
            return False
        if mode == ENCRYPT:
            return kind in (PLAINTEXT, LEGACY)
        if mode == REKEY:
            return (kind == LEGACY or
                    (kind == ENCRYPTED and
                     dek_id != self.keys.target_dek_id))
        if mode == DECRYPT:
            return kind in (ENCRYPTED, LEGACY)
        return False

    def plaintext(self, oid, data, kind):
        """The plaintext of a record (raises DecryptionError)."""
        if kind == ENCRYPTED:
            if not self.keys.can_decrypt:
                raise MigrationError('no key given that may decrypt')
            return self.keys.service.decrypt(self.keys.decrypt_keys, data,
                                             oid=oid)
        if kind == LEGACY:
            if self.legacy is None:
                raise MigrationError(
                    'oid %s is a cipher.encryptingstorage record: give the '
                    'keas.kmi keys to import it' % oid_repr(oid))
            return self.legacy.decrypt_record(data)
        return data

    def verify(self, oid, data, kind):
        """Check that a record opens (scan, dry run), when the keys to open
        it were given; raise DecryptionError."""
        if ((kind == ENCRYPTED and self.keys.can_decrypt) or
                (kind == LEGACY and self.legacy is not None)):
            self.plaintext(oid, data, kind)

    def rewrite(self, mode, oid, data, kind):
        """The new form of a record that needs work."""
        plain = self.plaintext(oid, data, kind)
        if self._blob_support is False and _is_blob_record(plain):
            # rewriting it without its file would lose the blob
            raise MigrationError(
                'oid %s is a blob, and the storage was opened without its '
                'blob directory: give --blob-dir (or a ZConfig file or URI '
                'naming it)' % oid_repr(oid))
        if kind == LEGACY:
            self._legacy_oids.add(oid)
        if mode == DECRYPT:
            return plain
        return self.keys.service.encrypt(self.keys.new, plain, oid=oid)

    def records(self, storage, start=None):
        """Yield ``(oid, tid, data)`` of current records from oid
        ``start`` on."""
        self._blob_support = IBlobStorage.providedBy(storage)
        if fsinternals.is_filestorage(storage):
            self._positions = {}
            return iter_filestorage(storage, start, seen=self._positions)
        self._positions = None
        return iter_records(storage, start)

    def reload(self, storage, oid):
        """The current ``(tid, data)`` of ``oid`` (after a conflict)."""
        data, tid = storage.load(oid)
        return tid, data

    def write(self, storage, items, description):
        """Write ``[(oid, tid_read, new_data)]`` as one transaction; return
        ``[(oid, reason)]`` of the records left alone because their blob
        file did not open.

        A record that has a blob file gets a new blob file with it,
        transformed like the record (see :meth:`rewrite_blob`): the new
        revision of a blob object needs a file of its own.
        """
        blobs = IBlobStorage.providedBy(storage)
        positions = (self._positions if fsinternals.is_filestorage(storage)
                     else None)
        failed = []
        txn = TransactionMetaData(
            user='zodbkmi migrate', description=description)
        storage.tpc_begin(txn)
        try:
            for oid, serial, data in items:
                legacy = oid in self._legacy_oids
                self._legacy_oids.discard(oid)
                source = _blob_file(storage, oid, serial) if blobs else None
                if source is None:
                    seen = positions.pop(oid, None) if positions else None
                    if seen is None:
                        storage.store(oid, serial, data, '', txn)
                    else:
                        self._restore_unchanged(storage, oid, seen, data,
                                                txn)
                    continue
                if legacy:
                    failed.append((oid, 'the blob file of a '
                                        'cipher.encryptingstorage record is '
                                        'not imported'))
                    continue
                try:
                    name = self.rewrite_blob(storage, oid, source)
                except DecryptionError as e:
                    failed.append((oid, 'blob file: %s' % e))
                    continue
                storage.storeBlob(oid, serial, data, name, '', txn)
            storage.tpc_vote(txn)
        except BaseException:
            storage.tpc_abort(txn)
            raise
        storage.tpc_finish(txn)
        return failed

    @staticmethod
    def _restore_unchanged(storage, oid, seen, data, txn):
        """FileStorage: write ``data`` as the new record of ``oid`` if the
        record read is still its current one, else raise ConflictError
        (the chunk is read again).  ``seen`` is ``(position, last
        transaction id)`` of the storage when the record was read.  The
        commit lock, held from ``tpc_begin`` to ``tpc_finish``, keeps the
        storage as it is meanwhile: if no transaction was committed since
        the read, nothing changed; else the record's position in the index
        tells.  That is the serial check ``store`` makes, without reading
        the record's header from the file again."""
        pos, ltid = seen
        if (ltid != fsinternals.last_tid(storage) and
                fsinternals.current_position(storage, oid) != pos):
            raise ConflictError(oid=oid)
        storage.restore(oid, fsinternals.committing_tid(storage), data, '',
                        None, txn)

    def verify_blob(self, storage, oid, serial, report):
        """Count the blob file of ``oid`` (if any) in ``report.blobs`` and
        check that it opens when the keys to open it were given (scan);
        raise DecryptionError."""
        if not IBlobStorage.providedBy(storage):
            return
        source = _blob_file(storage, oid, serial)
        if source is None:
            return
        with open(source, 'rb') as src:
            encrypted = src.read(len(stream.MAGIC)) == stream.MAGIC
            report.blobs[ENCRYPTED if encrypted else PLAINTEXT] += 1
            if encrypted and self.keys.can_decrypt:
                src.seek(0)
                try:
                    self.keys.service.decrypt_file(
                        self.keys.decrypt_keys, src, _Discard(), oid=oid)
                except DecryptionError as e:
                    raise type(e)('blob file: %s' % e) from None

    def rewrite_blob(self, storage, oid, source):
        """Write the new form of the blob file ``source`` of ``oid`` into a
        new file of the storage's temporary directory; return its name.

        ``encrypt`` encrypts a plaintext file, ``rekey`` moves a file under
        another DEK to the target DEK (decryption feeding encryption
        through a pipe: no plaintext touches the disk), ``decrypt``
        decrypts; any other file is copied as it is.  Files are bound to
        their oid as ``EncryptingStorage`` binds them.
        """
        service = self.keys.service
        fd, name = tempfile.mkstemp(suffix='.blob',
                                    dir=storage.temporaryDirectory())
        try:
            with open(source, 'rb') as src, os.fdopen(fd, 'wb') as dst:
                encrypted = src.read(len(stream.MAGIC)) == stream.MAGIC
                src.seek(0)
                if encrypted:
                    dek_id = stream.read_header(src).dek_id.hex()
                    src.seek(0)
                if self._mode == ENCRYPT and not encrypted:
                    service.encrypt_file(self.keys.new, src, dst, oid=oid)
                elif self._mode == DECRYPT and encrypted:
                    service.decrypt_file(self.keys.decrypt_keys, src, dst,
                                         oid=oid)
                elif (self._mode == REKEY and encrypted and
                        dek_id != self.keys.target_dek_id):
                    self._reencrypt_blob(oid, src, dst)
                elif self._mode == REKEY and not encrypted:
                    service.encrypt_file(self.keys.new, src, dst, oid=oid)
                else:
                    shutil.copyfileobj(src, dst)
        except BaseException:
            os.remove(name)
            raise
        return name

    def _reencrypt_blob(self, oid, src, dst):
        """Decrypt ``src`` into a pipe in a thread while encrypting what
        comes out of the pipe into ``dst``."""
        service = self.keys.service
        r, w = os.pipe()
        failure = []

        def decrypt():
            try:
                with os.fdopen(w, 'wb') as out:
                    service.decrypt_file(self.keys.decrypt_keys, src, out,
                                         oid=oid)
            except BaseException as e:   # reported to the caller below
                failure.append(e)

        thread = threads.spawn(decrypt)
        try:
            with os.fdopen(r, 'rb') as plain:
                service.encrypt_file(self.keys.new, plain, dst, oid=oid)
        finally:
            thread.join()
        if failure:
            raise failure[0]


def _is_blob_record(data, _known={}):
    """Tell whether the plaintext record ``data`` is the state of a blob
    (``ZODB.blob.Blob`` or a subclass), without unpickling the state.

    The answer is remembered per record prefix up to the second newline:
    in the protocol 3 pickles ZODB writes, that is the class pickle's
    GLOBAL opcode with module and class name; in any case two records
    with the same prefix start with the same class pickle.
    """
    end = data.find(b'\n', data.find(b'\n') + 1)
    key = data[:end] if 0 < end <= 300 else None
    found = _known.get(key)
    if found is not None:
        return found
    from ZODB.utils import get_pickle_metadata
    try:
        module, name = get_pickle_metadata(data)
    except Exception:
        return False
    import ZODB.blob
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
    except Exception:
        found = name == 'Blob'
    else:
        found = isinstance(cls, type) and issubclass(cls, ZODB.blob.Blob)
    if key is not None and len(_known) < 10000:
        _known[key] = found
    return found


class _Discard:
    """A binary sink that drops what it is given."""

    def write(self, data):
        return len(data)


def _blob_file(storage, oid, serial):
    """The name of the blob file of ``oid`` at ``serial``, or None."""
    try:
        return storage.loadBlob(oid, serial)
    except POSKeyError:
        return None


def unwrap(storage):
    """Return ``(raw, wrapper)``: the storage under an ``EncryptingStorage``
    and the wrapper, or ``(storage, None)``."""
    try:
        from zodbkmi.storage import EncryptingStorage
    except ImportError:   # pragma: no cover
        return storage, None
    if isinstance(storage, EncryptingStorage):
        return storage.base, storage
    return storage, None


def storage_migration(storage, mode, keys=None, legacy=None, **kw):
    """A storage-level :class:`Migration` of ``storage``.

    ``storage`` may be an ``EncryptingStorage`` (as a ZConfig file or a
    zodburi URI opens it): the migration then works on the storage under
    it, with the wrapper's facility and keys unless ``keys`` is given.
    """
    raw, wrapper = unwrap(storage)
    if keys is None:
        if wrapper is None:
            raise MigrationError('no keys given, and %r is not an '
                                 'EncryptingStorage' % (storage,))
        keys = MigrationKeys(wrapper.facility, wrapper._key,
                             wrapper._previous_keys)
    return Migration(raw, RecordTransformer(keys, legacy), mode, **kw)
