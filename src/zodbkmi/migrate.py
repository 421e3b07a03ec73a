"""Migrations of whole databases: encrypt, rekey, decrypt, scan, rotate-kek.

One engine, two record transformers.  The engine (:class:`Migration`)
walks the current record of every object of a storage in oid order, in
chunks of ``chunk_size`` records; each chunk that needs work is written as
one transaction.  A process killed at any moment loses at most the chunk
it was writing: every record is, at all times, either in its old form or
in its new form, both readable.  Nothing is remembered between runs:
every record is classified each time (plaintext, under DEK *x*, legacy,
invalid) and only what needs work is rewritten, so running a migration
again is harmless and resuming is running again.

Transformers say how a chunk is read and written:

- :class:`RecordTransformer` (storage level, the records an
  ``EncryptingStorage`` writes): works on the raw records of the storage
  under the wrapper and writes them back with ``tpc_begin`` / ``store`` /
  ``tpc_vote`` / ``tpc_finish``, with the serial it read, so a concurrent
  write by the application makes the chunk conflict; the chunk is then
  read again and retried.  On FileStorage, ``restore`` takes the place of
  ``store`` after the same check, made on the index under the commit lock
  (see :meth:`RecordTransformer._restore_unchanged`).

Keys come from :class:`MigrationKeys`: an encryption service (usually a
:class:`zodbkmi.facility.KeyManagementFacility`), the KEK that encrypts
(``new``) and the KEKs that may decrypt (``old``).
:func:`keys_from_environ` builds them from ``OLD_ENCRYPTION_KEY`` /
``NEW_ENCRYPTION_KEY`` / ``ENCRYPTION_ALGORITHM``.
"""
import io
import os
import shutil
import sys
import tempfile
import time

from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import oid_repr

from zodbkmi import threads
from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.format import envelope
from zodbkmi.format import stream
from zodbkmi.interfaces import IDataKeyCreation
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.sources.local import decode_key
from zodbkmi.kek import as_kek

ENCRYPT = 'encrypt'
REKEY = 'rekey'
DECRYPT = 'decrypt'
SCAN = 'scan'
MODES = (ENCRYPT, REKEY, DECRYPT, SCAN)

#: Record kinds found by classification.
PLAINTEXT = 'plaintext'
ENCRYPTED = 'encrypted'
LEGACY = 'legacy'
INVALID = 'invalid'

#: Records of cipher.encryptingstorage start with this prefix.
LEGACY_PREFIX = b'.e'

ALGORITHMS = ('aes256-gcm',)
DEFAULT_CHUNK_SIZE = 1000
MAX_RETRIES = 10
#: At most this many failed oids are kept in a report (the count is exact).
MAX_FAILED_LISTED = 100

BACKUP_WARNING = """\
WARNING: make sure a backup of this database exists before you go on.
FileStorage appends: the old (plaintext or old-key) revisions of every
record stay in the file until it is packed (use --pack, or pack later), and
packing leaves them in the '.old' file next to it. Destroy that file, and
every copy or backup made before the migration, once you have checked the
result (e.g. shred -u Data.fs.old)."""


class MigrationError(ZodbKmiError):
    """A migration cannot start or could not finish (bad keys, refused
    environment, records that failed to authenticate)."""


# -- keys -----------------------------------------------------------------

class MigrationKeys:
    """The keys of a migration.

    ``service`` is an encryption service (``encrypt(key, data, oid)``,
    ``decrypt(key, data, oid)``, ``key_id_of``), ``new`` the KEK that
    encrypts (None for decrypt and scan), ``old`` a sequence of KEKs that
    may decrypt besides ``new``.  :attr:`target_dek_id` is the active DEK
    of ``new``: records under it need no rekey.
    """

    def __init__(self, service, new=None, old=()):
        self.service = service
        self.new = new
        self.old = tuple(old)
        self._target = None
        self._decrypt_keys = None
        self.create = True

    @property
    def decrypt_keys(self):
        """The KEK, or the tuple of KEKs, that may decrypt (the same object
        each time, which the facility's per-key lookups need)."""
        keys = ((self.new,) if self.new is not None else ()) + self.old
        keys = keys[0] if len(keys) == 1 else keys
        if keys != self._decrypt_keys:
            self._decrypt_keys = keys
        return self._decrypt_keys

    @property
    def can_decrypt(self):
        return self.new is not None or bool(self.old)

    @property
    def target_dek_id(self):
        """The DEK id (hex) new records are encrypted under."""
        if self._target is None:
            if self.new is None:
                raise MigrationError('no new key given: cannot encrypt')
            creates = IDataKeyCreation.providedBy(self.service)
            if not self.create:
                # dry run: look, do not create
                if not creates:
                    return None
                return self.service.active_key_id(self.new)
            if creates:
                self._target = self.service.ensure_key(self.new)
            else:
                self._target = self.service.key_id_of(
                    self.service.encrypt(self.new, b''))
        return self._target

    def kek_of(self, dek_id):
        """The KEK id that wraps ``dek_id``, or None when unknown."""
        entry = getattr(self.service, 'entry', None)
        if entry is None:
            return None
        try:
            return entry(dek_id).kek_id
        except UnknownKeyError:
            return None


def _env_key(environ, name):
    value = environ.get(name, '').strip()
    if not value:
        return None
    return AESKeyEncryptingKey(decode_key(value, name))


#: Which of OLD_ENCRYPTION_KEY / NEW_ENCRYPTION_KEY each mode needs
#: (True: required, False: refused, None: optional).
ENV_RULES = {
    ENCRYPT: {'old': False, 'new': True},
    REKEY: {'old': True, 'new': True},
    DECRYPT: {'old': True, 'new': False},
    SCAN: {'old': None, 'new': None},
    'rotate-kek': {'old': True, 'new': True},
}


def keys_from_environ(mode, environ=None):
    """Return ``(old, new)`` AES KEKs (or None) from the environment.

    ``ENCRYPTION_ALGORITHM`` is mandatory and must be ``aes256-gcm``;
    ``OLD_ENCRYPTION_KEY`` and ``NEW_ENCRYPTION_KEY`` are base64 of 32 bytes
    or empty.  ``encrypt`` needs only the new key, ``rekey`` and
    ``rotate-kek`` both (and different), ``decrypt`` only the old one,
    ``scan`` either.  Anything else raises :class:`InvalidKeyError` with a
    one-line message.
    """
    environ = os.environ if environ is None else environ
    algorithm = environ.get('ENCRYPTION_ALGORITHM', '').strip()
    if not algorithm:
        raise InvalidKeyError('ENCRYPTION_ALGORITHM is not set (it must be '
                              'one of: %s)' % ', '.join(ALGORITHMS))
    if algorithm.lower() not in ALGORITHMS:
        raise InvalidKeyError('ENCRYPTION_ALGORITHM %r is not supported '
                              '(supported: %s)'
                              % (algorithm, ', '.join(ALGORITHMS)))
    old = _env_key(environ, 'OLD_ENCRYPTION_KEY')
    new = _env_key(environ, 'NEW_ENCRYPTION_KEY')
    rules = ENV_RULES[mode]
    given = (('old', old), ('new', new))
    for name, key in given:
        if rules[name] and key is None:
            raise InvalidKeyError('%s needs %s (%s_ENCRYPTION_KEY is empty)'
                                  % (mode, _needs(mode), name.upper()))
    for name, key in given:
        if rules[name] is False and key is not None:
            raise InvalidKeyError('%s needs %s (%s_ENCRYPTION_KEY must be '
                                  'empty)' % (mode, _needs(mode),
                                              name.upper()))
    if old is not None and new is not None and old.key_id == new.key_id:
        raise InvalidKeyError('OLD_ENCRYPTION_KEY and NEW_ENCRYPTION_KEY '
                              'are the same key')
    return old, new


def _needs(mode):
    rules = ENV_RULES[mode]
    if rules['old'] and rules['new']:
        return 'both OLD_ENCRYPTION_KEY and NEW_ENCRYPTION_KEY'
    if rules['new']:
        return 'NEW_ENCRYPTION_KEY only'
    return 'OLD_ENCRYPTION_KEY only'


def rotate_kek(facility, old, new):
    """Rewrap every DEK of KEK ``old`` under KEK ``new``; return the count.

    Data is not touched.  Each vault entry is replaced atomically, so an
    interruption leaves every DEK readable with one of the two KEKs and
    running it again finishes the job (DEKs already under ``new`` are not
    touched).
    """
    old, new = as_kek(old), as_kek(new)
    return facility.rewrap(old, new)


# -- reports and progress -------------------------------------------------

class Report:
    """What a migration found and did.

    ``records`` is the number of current records seen, ``kinds`` counts
    them by kind before the migration, ``by_dek`` counts encrypted records
    by DEK id and ``by_kek`` by the KEK id wrapping that DEK,
    ``rewritten`` the records written (or that would be, in a dry run),
    ``failed`` the number of records that could not be read (their oids,
    up to :data:`MAX_FAILED_LISTED`, in ``failed_oids`` with the reason).
    """

    def __init__(self, mode, level, dry_run=False):
        self.mode = mode
        self.level = level
        self.dry_run = dry_run
        self.records = 0
        self.kinds = {PLAINTEXT: 0, ENCRYPTED: 0, LEGACY: 0, INVALID: 0}
        self.blobs = {PLAINTEXT: 0, ENCRYPTED: 0}   # blob files seen (scan)
        self.by_dek = {}
        self.by_kek = {}
        self.rewritten = 0
        self.failed = 0
        self.failed_oids = []
        self.chunks = 0
        self.transactions = 0
        self.conflicts = 0
        self.elapsed = 0.0

    def fail(self, oid, reason):
        self.failed += 1
        if len(self.failed_oids) < MAX_FAILED_LISTED:
            self.failed_oids.append((oid_repr(oid), reason))

    def format(self):
        """The report as lines of text (no key material, only ids)."""
        lines = ['%s (%s level)%s: %d records in %.1f s'
                 % (self.mode, self.level,
                    ' [dry run]' if self.dry_run else '',
                    self.records, self.elapsed)]
        for kind in (PLAINTEXT, ENCRYPTED, LEGACY, INVALID):
            lines.append('  %-10s %d' % (kind, self.kinds[kind]))
        for dek_id, n in sorted(self.by_dek.items()):
            lines.append('    DEK %s: %d' % (dek_id, n))
        for kek_id, n in sorted(self.by_kek.items()):
            lines.append('    KEK %s: %d' % (kek_id or '(unknown)', n))
        if any(self.blobs.values()):
            lines.append('  blob files: %d plaintext, %d encrypted'
                         % (self.blobs[PLAINTEXT], self.blobs[ENCRYPTED]))
        if self.mode != SCAN:
            lines.append('  %s %d in %d transactions (%d conflicts retried)'
                         % ('would rewrite' if self.dry_run else 'rewritten',
                            self.rewritten, self.transactions,
                            self.conflicts))
        if self.failed:
            lines.append('  FAILED     %d' % self.failed)
            for oid, reason in self.failed_oids:
                lines.append('    oid %s: %s' % (oid, reason))
        return lines


class Progress:
    """A progress line with rate and ETA, redrawn in place on a terminal.

    Off a terminal nothing is drawn unless ``verbose``, then one line per
    chunk is printed (what tests and logs read).
    """

    def __init__(self, total, stream=None, verbose=False, tty=None,
                 width=30):
        self.total = max(total or 0, 0)
        self.stream = sys.stderr if stream is None else stream
        self.tty = (getattr(self.stream, 'isatty', lambda: False)()
                    if tty is None else tty)
        self.verbose = verbose
        self.width = width
        self.start = time.monotonic()
        self.done = 0
        self._drawn = 0.0

    def line(self, done):
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        if self.total and done <= self.total:
            frac = done / self.total
            filled = int(frac * self.width)
            bar = '#' * filled + '-' * (self.width - filled)
            eta = (self.total - done) / rate if rate else 0
            return '[%s] %d/%d %5.1f%% %.0f rec/s ETA %s' % (
                bar, done, self.total, frac * 100, rate, _hms(eta))
        return '%d records %.0f rec/s' % (done, rate)

    def update(self, done, chunk=None, rewritten=None):
        self.done = done
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.2 or done >= self.total:
                self._drawn = now
                self.stream.write('\r' + self.line(done))
                self.stream.flush()
        if self.verbose:
            if self.tty:
                self.stream.write('\n')
            self.stream.write('chunk %d: %d records seen, %d rewritten\n'
                              % (chunk, done, rewritten))
            self.stream.flush()

    def finish(self):
        if self.tty:
            self.stream.write('\r' + self.line(self.done) + '\n')
            self.stream.flush()


def _hms(seconds):
    seconds = int(seconds)
    return '%d:%02d:%02d' % (seconds // 3600, seconds // 60 % 60,
                             seconds % 60)


# -- the storage level ----------------------------------------------------

class RecordTransformer:
    """Storage level: raw records of the storage under ``EncryptingStorage``.

    A record is an envelope bound to its oid
    (``service.encrypt(key, data, oid=oid)``), or plaintext (any record not
    starting with the envelope magic, nor with a legacy prefix when
    ``legacy`` is given).  ``legacy`` is a reader of older formats (see
    :mod:`zodbkmi.legacy`): its records are decrypted and rewritten like
    records under an old key.
    """

    level = 'storage'

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
        if _is_filestorage(storage):
            self._positions = {}
            return _iter_filestorage(storage, start, seen=self._positions)
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
        positions = self._positions if _is_filestorage(storage) else None
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
        if ltid != storage._ltid and storage._index.get(oid) != pos:
            raise ConflictError(oid=oid)
        storage.restore(oid, storage._tid, data, '', None, txn)

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


# -- the object level -----------------------------------------------------

class _Opaque:
    """Stands for any global while a state is peeked at (nothing of the
    application is imported or run)."""

    def __init__(self, *args, **kw):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Ref:
    """A persistent reference met while a state is peeked at."""

    def __init__(self, ref):
        self.ref = ref


def peek_state(record):
    """The state pickled in a ZODB record, with every global replaced by an
    opaque stand-in and every persistent reference by a :class:`_Ref`.

    Enough to see the shape of an encrypted state without importing the
    application's classes.
    """
    from zodbpickle import pickle as zpickle

    class Unpickler(zpickle.Unpickler):

        def find_class(self, module, name):
            return type(name, (_Opaque,), {'__module__': module})

        def persistent_load(self, ref):
            return _Ref(ref)

    unpickler = Unpickler(io.BytesIO(record))
    unpickler.load()            # the class metadata
    return unpickler.load()


class PersistentStateCodec:
    """Reads the states that ``zodbkmi.persistent.EncryptedPersistent``
    writes (``envelope`` or ``(envelope, ref_1, ..., ref_n)``), for
    ``decrypt`` and ``scan`` at the object level.

    The keys are those of ``keys`` (:class:`MigrationKeys`) when it can
    decrypt, else the registered ``IKeyHolder`` and
    ``IEncryptionService`` utilities.
    """

    def __init__(self, keys=None):
        self.keys = keys

    def classify(self, state):
        return None, None     # the envelope says it all: see _state_kind

    def _service_and_keys(self):
        keys = self.keys
        if keys is not None and keys.service is not None and \
                keys.can_decrypt:
            return keys.service, keys.decrypt_keys
        import zope.component
        from zodbkmi.interfaces import IEncryptionService
        from zodbkmi.interfaces import IKeyHolder
        holder = zope.component.getUtility(IKeyHolder)
        previous = tuple(getattr(holder, 'previous_keys', None) or ())
        return (zope.component.getUtility(IEncryptionService),
                (holder.key,) + previous if previous else holder.key)

    def decrypt(self, state):
        from zodbkmi.persistent import _unpickle_state
        if type(state) is bytes:
            sealed, refs = state, ()
        else:
            sealed, refs = state[0], state[1:]
        service, keys = self._service_and_keys()
        return _unpickle_state(service.decrypt_state(keys, sealed), refs)

    def verify(self, state):
        """Check that the state authenticates (nothing is unpickled)."""
        sealed = state if type(state) is bytes else state[0]
        service, keys = self._service_and_keys()
        service.decrypt_state(keys, sealed)


def _envelope_dek_id(state):
    """The DEK id (hex) of a state holding a zodbkmi envelope, or None.
    The envelope is the state, or the first item of a tuple: an object
    state envelope (``EncryptedPersistent``) or a data envelope (a class
    of the application that seals its state with ``facility.encrypt``).
    This only tells which DEK; opening checks the context."""
    if isinstance(state, tuple) and state:
        state = state[0]
    if isinstance(state, bytes) and envelope.is_envelope(state):
        for context in (envelope.CONTEXT_STATE, envelope.CONTEXT_DATA):
            try:
                return envelope.read_dek_id(state, context).hex()
            except DecryptionError:
                pass
        return INVALID
    return None


class ObjectTransformer:
    """Object level: the states of ``EncryptedPersistent`` objects.

    Objects are loaded and stored through ZODB (``db``): their class
    encrypts the state on store (``__getstate__``).  So ``encrypt``
    rewrites the plaintext states of objects whose class now encrypts
    (``encrypting``: base classes, default
    ``zodbkmi.persistent.EncryptedPersistent``) and the states of keas.kmi
    objects (``legacy``: :class:`zodbkmi.legacy.KeasKMIKeys`); ``decrypt``
    rewrites encrypted states of objects whose class no longer encrypts
    (switch the class back to ``persistent.Persistent`` first); ``rekey``
    rewrites encrypted states whose DEK is not the target of ``keys``.

    While an object is loaded for its rewrite, its old state is decoded
    here (keas.kmi, zodbkmi or plaintext) and given to
    ``Persistent.__setstate__``, whatever its class does.
    """

    level = 'object'

    def __init__(self, db, keys=None, legacy=None, encrypting=None,
                 codec=None):
        self.db = db
        self.keys = keys if keys is not None else MigrationKeys(None)
        self.legacy = legacy
        if encrypting is None:
            try:
                from zodbkmi.persistent import EncryptedPersistent
                encrypting = (EncryptedPersistent,)
            except ImportError:
                encrypting = ()
        self.encrypting = tuple(encrypting)
        self.codec = codec if codec is not None else PersistentStateCodec(
            self.keys)
        self._class_encrypts = {}

    # -- classification ---------------------------------------------------

    def _state_kind(self, state):
        from zodbkmi.legacy import is_keas_state
        if self.codec is not None:
            kind, dek_id = self.codec.classify(state)
            if kind is not None:
                return kind, dek_id
        dek_id = _envelope_dek_id(state)
        if dek_id == INVALID:
            return INVALID, None
        if dek_id is not None:
            return ENCRYPTED, dek_id
        if is_keas_state(state):
            return LEGACY, None
        return PLAINTEXT, None

    def check(self, mode):
        """Every mode can start: the keys are those of the application."""

    def classify(self, oid, data):
        try:
            state = peek_state(data)
        except Exception:
            return INVALID, None
        return self._state_kind(state)

    def class_encrypts(self, data):
        """Tell whether the class of a record encrypts its state."""
        from ZODB.utils import get_pickle_metadata
        module, cname = name = get_pickle_metadata(data)
        encrypts = self._class_encrypts.get(name)
        if encrypts is None:
            try:
                klass = self.db.classFactory(None, module, cname)
            except Exception:
                klass = None
            encrypts = (isinstance(klass, type) and
                        issubclass(klass, self.encrypting)
                        if self.encrypting else False)
            self._class_encrypts[name] = encrypts
        return encrypts

    def needs_work(self, mode, kind, dek_id, oid=None, data=None):
        if kind == INVALID:
            return False
        if mode == ENCRYPT:
            return kind == LEGACY or (
                kind == PLAINTEXT and self.class_encrypts(data))
        if mode == REKEY:
            return kind == LEGACY or (
                kind == ENCRYPTED and dek_id != self.keys.target_dek_id)
        if mode == DECRYPT:
            return kind in (ENCRYPTED, LEGACY)
        return False

    def verify(self, oid, data, kind):
        if kind == LEGACY and self.legacy is not None:
            self.legacy.decrypt(peek_state(data)[0])
        elif kind == ENCRYPTED and self.codec is not None:
            self.codec.verify(peek_state(data))

    def rewrite(self, mode, oid, data, kind):
        if kind == LEGACY and self.legacy is None:
            raise MigrationError(
                'oid %s is a keas.kmi object: give the keas.kmi keys to '
                'import it' % oid_repr(oid))
        return kind         # the work is done by write(), through ZODB

    # -- reading and writing through ZODB ---------------------------------

    def records(self, storage, start=None):
        return iter_records(storage, start)

    def reload(self, storage, oid):
        data, tid = storage.load(oid)
        return tid, data

    def _set_state(self, obj, state):
        """Give ``obj`` its state, whatever form the state is in."""
        import persistent
        from zodbkmi.legacy import decrypt_keas_state
        kind, _ = self._state_kind(state)
        encrypting = isinstance(obj, self.encrypting)
        if kind == LEGACY and self.legacy is not None:
            state = decrypt_keas_state(self.legacy, state)
        elif kind == ENCRYPTED and not encrypting:
            if self.codec is None:
                raise MigrationError(
                    'oid %s: cannot decrypt the state of a %s here'
                    % (oid_repr(obj._p_oid), type(obj).__name__))
            state = self.codec.decrypt(state)
        elif not (kind == PLAINTEXT and encrypting):
            obj.__setstate__(state)     # the class reads its own state
            return
        persistent.Persistent.__setstate__(obj, state)

    def write(self, storage, items, description):
        """Load each object with its decoded state, mark it changed and
        commit: its class writes the new state."""
        import transaction
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        reader = conn._reader
        transformer = self

        def setGhostState(obj, pickle):
            transformer._set_state(obj, reader.getState(pickle))
        reader.setGhostState = setGhostState
        failed = []
        try:
            tm.begin()
            tm.get().note(description)
            for oid, _, _ in items:
                obj = conn.get(oid)
                try:
                    obj._p_activate()
                except DecryptionError as e:
                    failed.append((oid, str(e)))
                    continue
                problem = self._check_class(obj)
                if problem:
                    failed.append((oid, problem))
                    continue
                obj._p_changed = True
            tm.commit()
        except BaseException:
            tm.abort()
            raise
        finally:
            del reader.setGhostState
            conn.cacheMinimize()
            conn.close()
        return failed

    _mode = None

    def _check_class(self, obj):
        """Why the class of ``obj`` cannot write what the mode needs, or
        None.  Looks at what its ``__getstate__`` gives."""
        kind = self._state_kind(obj.__getstate__())[0]
        name = '%s.%s' % (type(obj).__module__, type(obj).__qualname__)
        if self._mode == DECRYPT and kind != PLAINTEXT:
            return ('class %s still encrypts its state: make it a plain '
                    'persistent class to decrypt' % name)
        if self._mode in (ENCRYPT, REKEY) and kind != ENCRYPTED:
            return ('class %s does not encrypt its state: make it a '
                    'subclass of zodbkmi.persistent.EncryptedPersistent'
                    % name)
        return None


def iter_records(storage, start=None):
    """Yield ``(oid, tid, data)`` for the current record of every object,
    in oid order, from ``start`` on.

    Uses ``record_iternext`` (FileStorage, ZEO, RelStorage, MappingStorage
    keep an index; memory stays constant).  Objects whose creation was
    undone are skipped.
    """
    if _is_filestorage(storage):
        yield from _iter_filestorage(storage, start)
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
            nxt = _next_oid(oid)
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


def _is_filestorage(storage):
    try:
        from ZODB.FileStorage import FileStorage
    except ImportError:   # pragma: no cover
        return False
    return (type(storage) is FileStorage and
            all(hasattr(storage, a) for a in ('_index', '_file', '_lock')))


#: At most this many record positions are remembered (see
#: ``_iter_filestorage``); a chunk whose positions were dropped is written
#: with ``store``.
MAX_POSITIONS = 8192


def _iter_filestorage(storage, start, batch_size=256, seen=None):
    """record_iternext for FileStorage without its per-record overhead:
    the index gives the position of the current record of each oid, read
    under the storage lock, ``batch_size`` oids at a time.  Records that
    point back to older data (undo) are loaded with ``load``.  ``seen``, a
    dict, gets the position of each record read and the last transaction
    id of the storage when it was read (the most recent ``MAX_POSITIONS``
    or more)."""
    from ZODB.FileStorage.format import DATA_HDR_LEN
    from ZODB.FileStorage.format import DataHeaderFromString
    index = storage._index
    nxt = start if start is not None else b'\0' * 8
    while nxt is not None:
        batch = []
        if seen is not None and len(seen) >= MAX_POSITIONS:
            seen.clear()
        with storage._lock:
            f = storage._file
            ltid = storage._ltid
            positions = _index_batch(index, nxt, batch_size)
            nxt = (_next_oid(positions[-1][0])
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
    data = getattr(index, '_data', None)
    out = []
    if data is None or not hasattr(data, 'items'):
        nxt = start
        while len(out) < n:
            try:
                oid = index.minKey(nxt)
            except ValueError:   # no oid left
                break
            out.append((oid, index[oid]))
            nxt = _next_oid(oid)
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


def _next_oid(oid):
    return (int.from_bytes(oid, 'big') + 1).to_bytes(8, 'big')


# -- the engine -----------------------------------------------------------

class Migration:
    """Run ``mode`` over every current record of ``storage``.

    ``storage`` is the raw storage (for the storage level, the storage under
    the ``EncryptingStorage`` wrapper).  ``chunk_size`` records are read at a
    time; those that need work are written as one transaction.  With
    ``dry_run`` nothing is written.  ``progress`` is a :class:`Progress` or
    None.  ``start`` is the oid to start from (default: the first).
    """

    def __init__(self, storage, transformer, mode,
                 chunk_size=DEFAULT_CHUNK_SIZE, dry_run=False,
                 progress=None, start=None, max_retries=MAX_RETRIES):
        if mode not in MODES:
            raise MigrationError('unknown mode %r (one of %s)'
                                 % (mode, ', '.join(MODES)))
        if chunk_size < 1:
            raise MigrationError('chunk size must be at least 1')
        self.storage = storage
        self.transformer = transformer
        self.mode = mode
        self.chunk_size = chunk_size
        self.dry_run = dry_run or mode == SCAN
        self.progress = progress
        self.start = start
        self.max_retries = max_retries
        self.report = Report(mode, transformer.level, dry_run)
        transformer._mode = mode
        transformer.check(mode)
        if self.dry_run:
            transformer.keys.create = False
        elif mode in (ENCRYPT, REKEY) and transformer.keys.new is not None:
            transformer.keys.target_dek_id   # creates the DEK if needed

    def _count(self, kind, dek_id):
        report = self.report
        report.records += 1
        report.kinds[kind] += 1
        if dek_id is not None:
            report.by_dek[dek_id] = report.by_dek.get(dek_id, 0) + 1

    def _prepare(self, oid, tid, data, kind=None, dek_id=None):
        """Classify one record; return ``(oid, tid, new)`` or None."""
        t = self.transformer
        if kind is None:
            kind, dek_id = t.classify(oid, data)
        if kind == INVALID:
            self.report.fail(oid, 'malformed envelope')
            return None
        if self.mode == SCAN:
            try:
                t.verify(oid, data, kind)
                verify_blob = getattr(t, 'verify_blob', None)
                if verify_blob is not None:
                    verify_blob(self.storage, oid, tid, self.report)
            except DecryptionError as e:
                self.report.fail(oid, str(e))
            return None
        if not t.needs_work(self.mode, kind, dek_id, oid, data):
            return None
        try:
            if self.dry_run:
                t.verify(oid, data, kind)
                return oid, tid, None
            return oid, tid, t.rewrite(self.mode, oid, data, kind)
        except DecryptionError as e:
            self.report.fail(oid, str(e))
            return None

    def run(self):
        """Run the migration; return the :class:`Report`."""
        report = self.report
        started = time.monotonic()
        chunk = []
        for oid, tid, data in self.transformer.records(self.storage,
                                                       self.start):
            kind, dek_id = self.transformer.classify(oid, data)
            self._count(kind, dek_id)
            chunk.append((oid, tid, data, kind, dek_id))
            if len(chunk) >= self.chunk_size:
                self._chunk(chunk)
                chunk = []
        if chunk:
            self._chunk(chunk)
        report.elapsed = time.monotonic() - started
        if self.progress is not None:
            self.progress.finish()
        by_kek = {}
        for dek_id, n in report.by_dek.items():
            kek_id = self.transformer.keys.kek_of(dek_id)
            by_kek[kek_id] = by_kek.get(kek_id, 0) + n
        report.by_kek = by_kek
        return report

    def _chunk(self, chunk):
        report = self.report
        report.chunks += 1
        work = [w for w in (self._prepare(*r) for r in chunk)
                if w is not None]
        if work and not self.dry_run:
            self._write(work)
        report.rewritten += len(work)
        if self.progress is not None:
            self.progress.update(report.records, report.chunks,
                                 report.rewritten)

    def _write(self, work):
        description = 'zodbkmi migrate %s: %d records from oid %s' % (
            self.mode, len(work), oid_repr(work[0][0]))
        for attempt in range(self.max_retries + 1):
            try:
                failed = self.transformer.write(self.storage, work,
                                                description)
            except ConflictError:
                if attempt == self.max_retries:
                    raise MigrationError(
                        'chunk from oid %s still conflicts after %d '
                        'retries' % (oid_repr(work[0][0]), attempt))
                self.report.conflicts += 1
                work = self._reread(work)
                if not work:
                    return
            else:
                self.report.transactions += 1
                for oid, reason in failed or ():
                    self.report.fail(oid, reason)
                    self.report.rewritten -= 1
                return

    def _reread(self, work):
        """Read the records of a conflicting chunk again and prepare
        them again (the application wrote some meanwhile)."""
        fresh = []
        for oid, _, _ in work:
            tid, data = self.transformer.reload(self.storage, oid)
            item = self._prepare(oid, tid, data)
            if item is not None:
                fresh.append(item)
        self.report.rewritten -= len(work) - len(fresh)
        return fresh


def pack(storage):
    """Pack ``storage`` now, removing the revisions a migration replaced.

    Raw records may be ciphertext that only the wrapper can read, so the
    pack is done without garbage collection (``gc=False``) where the
    storage supports it; unreachable objects stay until a pack through the
    wrapper.
    """
    from ZODB.serialize import referencesf
    try:
        storage.pack(time.time(), referencesf, gc=False)
    except TypeError:
        storage.pack(time.time(), referencesf)
