"""The cache of plaintext blob copies, on a RAM-backed file system.

Loading a blob through an encrypting storage decrypts it into a file,
because ZODB hands blobs to applications as file names.  A blob revision
(an oid and a serial) never changes, so the decrypted file of a revision
can serve every later load of it, in any connection of the process.
:class:`BlobCache` keeps such files, bounded in bytes, least recently used
first out, in a private directory (mode 0700, files mode 0400) on a
RAM-backed file system only (tmpfs or ramfs: never on a disk).  A file a
connection's blob object holds is pinned and never evicted while held.

The cache directory is named like the private directories of plaintext
copies (``zodbkmi-blobs-<pid>-cache-...``), so that
:func:`~zodbkmi.storage.sweep_plaintext_dirs` removes it after its
process was killed.
"""
import collections
import os
import shutil
import stat
import tempfile
import threading


#: The default size of the cache: 256 MiB.
DEFAULT_SIZE = 256 * 1024 * 1024

#: The default directory of the cache, used when it is RAM-backed.
DEFAULT_DIR = '/dev/shm'

#: The file system types held in RAM.
RAM_FILE_SYSTEMS = frozenset(('tmpfs', 'ramfs'))


def _unescape(field):
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo
    out = []
    i = 0
    while i < len(field):
        if field[i] == '\\' and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return ''.join(out)


def file_system_type(path, mounts='/proc/self/mounts'):
    """The type of the file system holding ``path`` (from ``mounts``), or
    None when it cannot be told."""
    path = os.path.realpath(path)
    best, kind = '', None
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        if point != '/' and not (path == point or
                                 path.startswith(point.rstrip('/') + '/')):
            continue
        if len(point) >= len(best):       # the last mount on top wins
            best, kind = point, fields[2]
    return kind


def is_ram_backed(path):
    """Whether ``path`` is on a RAM-backed file system (tmpfs, ramfs)."""
    return file_system_type(path) in RAM_FILE_SYSTEMS


def default_directory():
    """:data:`DEFAULT_DIR` when it is a RAM-backed directory, else None
    (the cache is then off unless a RAM-backed directory is given)."""
    if os.path.isdir(DEFAULT_DIR) and is_ram_backed(DEFAULT_DIR):
        return DEFAULT_DIR
    return None


class NotRAMBackedError(ValueError):
    """The directory given for the blob cache is not on a RAM-backed file
    system."""


class BlobCache:
    """Plaintext copies of blob revisions, keyed by (oid, serial), in a
    private directory made in ``directory`` (a RAM-backed file system;
    else :class:`NotRAMBackedError`), at most ``size`` bytes.

    :meth:`acquire` returns the name of the copy of a revision, making it
    with ``fill(name)`` when missing, and pins it until :meth:`release`;
    a copy is evicted (least recently used first) only when unpinned.
    """

    def __init__(self, directory, size=DEFAULT_SIZE):
        directory = os.path.abspath(directory)
        if not os.path.isdir(directory):
            raise NotRAMBackedError(
                'blob cache directory %r is not a directory' % directory)
        if not is_ram_backed(directory):
            raise NotRAMBackedError(
                'blob cache directory %r is not on a RAM-backed file system '
                '(tmpfs or ramfs): the cache holds plaintext and is never '
                'kept on a disk; give a tmpfs directory or set the cache '
                'size to 0' % directory)
        self.parent = directory
        from zodbkmi.storage.blobs import sweep_plaintext_dirs
        sweep_plaintext_dirs(directory)     # caches of killed processes
        self.size = int(size)
        self.path = None
        self.used = 0                       # bytes of the copies
        self.pinned = 0                     # bytes of the pinned ones
        self._entries = collections.OrderedDict()  # key -> [name, size, pins]
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __repr__(self):
        return '<BlobCache %s: %d of %d bytes in %d copies>' % (
            self.path or self.parent, self.used, self.size,
            len(self._entries))

    @property
    def limit(self):
        """The size limit in bytes."""
        return self.size

    def directory(self):
        path = self.path
        if path is None or not os.path.isdir(path):
            from zodbkmi.storage.blobs import PRIVATE_PREFIX
            path = self.path = tempfile.mkdtemp(
                prefix='%s%d-cache-' % (PRIVATE_PREFIX, os.getpid()),
                dir=self.parent)
            self._entries.clear()
            self.used = self.pinned = 0
        return path

    def __contains__(self, key):
        return key in self._entries

    def acquire(self, oid, serial, fill, expected_size=None):
        """The name of the copy of ``oid``/``serial``, pinned; made by
        ``fill(name)`` (which creates the file ``name``) when missing.
        None when the copy cannot be kept within the size (the caller
        makes a copy of its own); ``expected_size`` is an upper bound of
        its size known in advance."""
        key = (oid, serial)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._pin(entry)
                self.hits += 1
                return entry[0]
            self.misses += 1
            if expected_size is not None and expected_size > self.size:
                return None
            directory = self.directory()
        # decrypted outside the lock, into a name of its own
        fd, tmp = tempfile.mkstemp(prefix='new-', dir=directory)
        os.close(fd)
        os.remove(tmp)
        fill(tmp)
        size = os.stat(tmp).st_size
        name = os.path.join(directory,
                            '%s-%s.blob' % (oid.hex(), serial.hex()))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:          # another thread was faster
                os.remove(tmp)
                self._entries.move_to_end(key)
                self._pin(entry)
                return entry[0]
            if not self._make_room(size):
                os.remove(tmp)
                return None
            # a rename in one directory; a copy where renaming fails
            # (ZODB's own blob tests make every rename fail)
            try:
                os.rename(tmp, name)
            except OSError:
                shutil.copyfile(tmp, name)
                os.chmod(name, stat.S_IRUSR)
                os.remove(tmp)
            self._entries[key] = [name, size, 1]
            self.used += size
            self.pinned += size
            return name

    def _pin(self, entry):
        if not entry[2]:
            self.pinned += entry[1]
        entry[2] += 1

    def _make_room(self, size):
        if size > self.size:
            return False
        if self.used + size <= self.size:
            return True
        for key, entry in list(self._entries.items()):
            if entry[2]:
                continue
            self._evict(key)
            if self.used + size <= self.size:
                return True
        return False

    def _evict(self, key):
        name, size, _ = self._entries.pop(key)
        self.used -= size
        try:
            os.remove(name)
        except OSError:
            pass

    def release(self, oid, serial):
        """Unpin the copy of ``oid``/``serial``."""
        with self._lock:
            entry = self._entries.get((oid, serial))
            if entry is not None and entry[2] > 0:
                entry[2] -= 1
                if not entry[2]:
                    self.pinned -= entry[1]

    def crowded(self):
        """Whether pinned copies take more than half the size: connections
        then release the copies their blob objects keep across
        transactions."""
        return self.pinned * 2 > self.size

    def pins(self, oid, serial):
        entry = self._entries.get((oid, serial))
        return entry[2] if entry is not None else 0

    def clear(self):
        """Remove every unpinned copy."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if not entry[2]:
                    self._evict(key)

    def close(self):
        """Remove every copy and the directory."""
        with self._lock:
            self._entries.clear()
            self.used = self.pinned = 0
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None


def make_cache(size=None, directory=None):
    """The cache for the settings ``size`` (bytes; None: the default, 0:
    off) and ``directory`` (None: :func:`default_directory`).  None when
    the cache is off: size 0, or no directory given and no RAM-backed
    default.  A directory given that is not RAM-backed raises
    :class:`NotRAMBackedError`."""
    if size is None:
        size = DEFAULT_SIZE
    size = int(size)
    if size < 0:
        raise ValueError('blob cache size must be >= 0 (0: off), not %d'
                         % size)
    if size == 0:
        return None
    if directory is None:
        directory = default_directory()
        if directory is None:
            return None
    return BlobCache(directory, size)
