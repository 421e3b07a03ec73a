"""Blob files: sealing committed blobs, plaintext copies for loads."""
import os
import shutil
import stat
import tempfile
import weakref

import transaction

import ZODB.blob

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import NotEncryptedError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.format import stream
from zodbkmi.interfaces import IInPlaceFileEncryption
from zodbkmi.storage.common import annotate as _annotate
from zodbkmi.storage.common import oid_text as _oid_text
from zodbkmi.storage.common import remove as _remove

_STREAM_MAGIC = stream.MAGIC
_STREAM_MAGIC_SIZE = len(_STREAM_MAGIC)

PRIVATE_PREFIX = 'zodbkmi-blobs-'


def sweep_plaintext_dirs(parent=None):
    """Remove the private directories of plaintext blob copies that
    processes of this user left in ``parent`` (default: the system's
    temporary directory) when they were killed: those whose process no
    longer runs.  Return the paths removed.  Each ``EncryptingStorage``
    calls it on its ``plaintext_dir`` when it opens, and the blob cache on
    its directory (:mod:`zodbkmi.storage.blobcache`)."""
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


class _PlaintextCopies:
    """The plaintext copies of blob files made for one storage, or for one
    connection, in a private directory (mode 0700) of their own.

    The storage's directory is made in its ``plaintext_dir`` (named
    ``PRIVATE_PREFIX`` + process id, so that :func:`sweep_plaintext_dirs`
    finds it after a crash); a connection's directory is made inside the
    storage's (``parent``).  A copy is named by oid and serial: loading a
    blob twice in one scope decrypts it once.  With a blob cache (see
    :mod:`zodbkmi.storage.blobcache`), a copy is the cache's file, pinned
    until it is removed here.

    A connection's copies are released when its transaction ends
    (:meth:`release_all`), but removed only once no blob object can use
    them: when the connection polls invalidations, :meth:`collect` removes
    the released copies and returns their oids for the connection to
    invalidate (so the blob objects become ghosts and load a fresh copy
    when used again), except those of blob objects still open for
    reading, kept until a later poll finds them closed, and the cache's
    files, kept pinned for their blob objects as long as the cache is not
    crowded (:meth:`~zodbkmi.storage.blobcache.BlobCache.crowded`).
    """

    def __init__(self, storage, parent=None):
        self.storage = storage      # the EncryptingStorage that decrypts
        self.parent = parent
        self.path = None
        self.names = {}             # the copies made: name -> (oid, serial)
        self.keys = {}              # (oid, serial) -> name
        self.cached = set()         # names that are pinned cache files
        self.active = set()         # keys used since the transaction end
        self.released = set()       # keys released at a transaction end
        self.held = {}              # oid -> serials of cache files kept
        self.readers = {}           # oid -> weak reference to its blob
        if parent is None and getattr(storage, '_sweeps', True):
            # what killed processes left: swept when a storage opens
            sweep_plaintext_dirs(storage._plaintext_dir)

    def directory(self):
        path = self.path
        if path is None or not os.path.isdir(path):
            if self.parent is not None:
                path = tempfile.mkdtemp(prefix='connection-',
                                        dir=self.parent.directory())
            else:
                where = self.storage._plaintext_dir
                path = tempfile.mkdtemp(
                    prefix='%s%d-' % (PRIVATE_PREFIX, os.getpid()), dir=where)
            self.path = path
        return path

    def temporary(self):
        """The directory of uncommitted blob files (mode 0700), inside the
        private directory."""
        path = os.path.join(self.directory(), 'tmp')
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        return path

    def _name(self, oid, serial):
        return os.path.join(self.directory(),
                            '%s-%s.blob' % (oid.hex(), serial.hex()))

    def _known(self, key):
        name = self.keys.get(key)
        if name is not None and (name in self.cached or
                                 os.path.exists(name)):
            return name
        return None

    def _cache(self):
        return getattr(self.storage, '_blob_cache', None)

    def _fill(self, oid, serial):
        storage = self.storage
        return lambda name: storage._open_blob_plain(oid, serial, None, name)

    def load(self, oid, serial):
        """Return the name of the copy of the blob and whether it was made
        (or taken from the cache) by this call."""
        key = (oid, serial)
        name = self._known(key)
        if name is not None:
            self._use(key)
            return name, False
        cache = self._cache()
        if cache is not None:
            name = cache.acquire(oid, serial, self._fill(oid, serial))
            if name is not None:
                self.cached.add(name)
        if name is None:
            name = self._name(oid, serial)
            if not os.path.exists(name):
                self.storage._open_blob_plain(oid, serial, None, name)
        self.names[name] = key
        self.keys[key] = name
        self.active.add(key)
        return name, True

    def _use(self, key):
        self.active.add(key)
        self.released.discard(key)
        self._unhold(key)

    def _unhold(self, key):
        serials = self.held.get(key[0])
        if serials is not None:
            serials.discard(key[1])
            if not serials:
                del self.held[key[0]]

    def _open(self, name, blob):
        if blob is None:
            return open(name, 'rb')
        return ZODB.blob.BlobFile(name, 'r', blob)

    def open(self, oid, serial, blob=None):
        """An open file on the plaintext of the blob: the copy when there
        is one, else the cache's, else a new copy whose name is removed at
        once."""
        if blob is not None and self.parent is not None:
            # a connection's: its blob objects are invalidated at polls
            self.readers[oid] = weakref.ref(blob)
        name = self._known((oid, serial))
        if name is not None:
            return self._open(name, blob)
        cache = self._cache()
        if cache is not None:
            name = cache.acquire(oid, serial, self._fill(oid, serial))
            if name is not None:
                try:
                    return self._open(name, blob)
                finally:
                    cache.release(oid, serial)
        name = self.storage._open_blob_plain(oid, serial, self.directory())
        try:
            return self._open(name, blob)
        finally:
            _remove(name)

    def remove(self, names=None):
        """Remove the copies ``names`` (default: all)."""
        for name in list(self.names) if names is None else names:
            key = self.names.pop(name, None)
            if key is not None:
                self.keys.pop(key, None)
                self.active.discard(key)
                self.released.discard(key)
                self._unhold(key)
            if name in self.cached:
                self.cached.discard(name)
                cache = self._cache()
                if cache is not None and key is not None:
                    cache.release(*key)
            else:
                _remove(name)

    def release_all(self):
        """The connection's transaction ended: its copies may go once no
        blob object uses them (see :meth:`collect`)."""
        self.released.update(self.active)
        self.active.clear()

    def collect(self, invalidated=()):
        """Remove the released copies whose blob objects are not open
        (every released copy when ``invalidated`` is None: the connection
        then invalidates its whole cache), except the cache's files, kept
        pinned (held) while the cache is not crowded and their oids are not
        invalidated; return the oids to invalidate besides ``invalidated``
        so that the blob objects of the removed copies become ghosts."""
        everything = invalidated is None
        invalidated = set(invalidated or ())
        cache = self._cache()
        crowded = cache is not None and cache.crowded()
        candidates = set(self.released)
        if self.held:
            if everything or crowded:
                held = self.held
                self.held = {}
            else:
                held = {oid: self.held.pop(oid) for oid in invalidated
                        if oid in self.held}
            for oid, serials in held.items():
                candidates.update((oid, serial) for serial in serials)
        if not candidates:
            return []
        keep_cached = cache is not None and not everything and not crowded
        changed = frozenset(invalidated)
        oids = []
        for key in candidates:
            oid = key[0]
            name = self.keys.get(key)
            if name is None:
                self.released.discard(key)
                continue
            if not everything and oid not in changed:
                ref = self.readers.get(oid)
                blob = ref() if ref is not None else None
                if blob is not None and blob.opened():
                    # an open file would be closed: kept until a later poll
                    self.released.add(key)
                    continue
                if keep_cached and name in self.cached:
                    # the cache's file stays pinned for the blob object
                    self.released.discard(key)
                    self.held.setdefault(oid, set()).add(key[1])
                    continue
            self.remove([name])
            self.readers.pop(oid, None)
            if oid not in invalidated:
                invalidated.add(oid)
                oids.append(oid)
        return oids

    def close(self):
        """Remove every copy and the directory."""
        self.remove()
        self.readers.clear()
        self.held.clear()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


class BlobMethods:
    """The blob methods of the wrapper (a mix-in of
    :class:`~zodbkmi.storage.EncryptingStorage`)."""

    def storeBlob(self, oid, oldserial, data, blobfilename, version,
                  transaction):
        data = self._sealed(data, oid, transaction)
        sealed = self._seal_blob(blobfilename, oid)
        with self._ending:      # see EncryptingStorage.__init__
            return self.base.storeBlob(oid, oldserial, data, sealed, version,
                                       transaction)

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        data = self._sealed(data, oid, transaction)
        sealed = self._seal_blob(blobfilename, oid)
        with self._ending:
            return self.base.restoreBlob(oid, serial, data, sealed, prev_txn,
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
        elsewhere = self._base_temporary_elsewhere(filename)
        if elsewhere is None and self._seal_blob_in_place(filename, oid):
            return filename
        fd, sealed = tempfile.mkstemp(
            suffix='.zks',
            dir=elsewhere or os.path.dirname(os.path.abspath(filename)))
        try:
            with open(filename, 'rb') as src, os.fdopen(fd, 'wb') as dst:
                self.facility.encrypt_file(self._key, src, dst, oid=oid)
        except BaseException:
            os.remove(sealed)
            raise
        ZODB.blob.remove_committed(filename)
        return sealed

    def _base_temporary_elsewhere(self, filename):
        """The base storage's temporary directory when it is on another
        file system than ``filename`` (the base would copy a file sealed in
        place: it is sealed into a new file there instead), else None."""
        temporary = getattr(self.base, 'temporaryDirectory', None)
        if temporary is None:
            return None
        try:
            directory = temporary()
            if os.stat(directory).st_dev != os.stat(filename).st_dev:
                return directory
        except (OSError, TypeError, AttributeError):
            pass
        return None

    def temporaryDirectory(self):
        """The directory of blob files being written (uncommitted, in
        plaintext): ``tmp`` in the storage's private directory (mode 0700,
        swept after a killed process like the copies), not the base
        storage's.  The blob files are sealed when committed."""
        return self._copies.temporary()

    @property
    def blob_cache(self):
        """The cache of plaintext blob copies for repeated loads (a
        :class:`~zodbkmi.storage.blobcache.BlobCache`), or None when off."""
        return getattr(self, '_blob_cache', None)

    def _close_blob_cache(self):
        cache = getattr(self, '_blob_cache', None)
        if cache is not None and getattr(self, '_owns_blob_cache', True):
            cache.close()

    def _seal_blob_in_place(self, filename, oid):
        if not IInPlaceFileEncryption.providedBy(self.facility):
            return False
        in_place = self.facility.encrypt_file_in_place
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
