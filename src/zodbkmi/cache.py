"""The cache of unwrapped data keys.

Thread-safe, bounded in size, with a time to live per key.
Entries hold a :class:`zodbkmi.format.envelope.Sealer` (the AES-GCM
context), never the DEK as an attribute.

There is no use limit any more: the record envelope (version 2) seals
under subkeys of the DEK, a new one every ``SUBKEY_LIMIT`` seals and in
every process (``docs/format.rst``), so the number of records under one DEK
needs no counting; a stream has a key of its own.  ``use_limit`` is still
accepted (and checked to be >= 1) for compatibility, and ignored.

Every cache registers itself, so that :func:`evict_everywhere` (called when
a key is retired or destroyed) reaches all caches of the process.
"""
import threading
import time
import weakref

DEFAULT_TTL = 3600
DEFAULT_MAXSIZE = 4096
DEFAULT_USE_LIMIT = 2 ** 28

_monotonic = time.monotonic
_caches = weakref.WeakSet()
_caches_lock = threading.Lock()


_EVICTED = float('-inf')   # the expiry time of an evicted entry


class CachedKey:
    """One cached DEK: ``dek_id`` (hex), ``raw_id`` (16 bytes), ``kek_id``,
    ``sealer``, ``expires`` (monotonic seconds; an evicted entry expires
    at minus infinity, so that hot paths test ``expires`` alone).

    ``_dek`` holds the DEK bytes for the formats that derive keys from it
    (the stream format); it is never shown.
    """

    __slots__ = ('dek_id', 'raw_id', 'kek_id', 'sealer', 'expires',
                 '_dek', '__weakref__')

    def __init__(self, raw_id, kek_id, sealer, expires, dek=None):
        self._dek = dek
        self.raw_id = raw_id
        self.dek_id = raw_id.hex()
        self.kek_id = kek_id
        self.sealer = sealer
        self.expires = expires

    def __repr__(self):
        return '<CachedKey %s by KEK %s>' % (self.dek_id, self.kek_id)

    @property
    def evicted(self):
        return self.expires == _EVICTED

    def alive(self):
        return _monotonic() < self.expires

    def evict(self):
        self.expires = _EVICTED


class DEKCache:
    """A mapping of raw DEK id (16 bytes) to :class:`CachedKey`.

    ``evict`` takes the hex id, as the rest of the API does.
    """

    def __init__(self, ttl=DEFAULT_TTL, maxsize=DEFAULT_MAXSIZE,
                 use_limit=DEFAULT_USE_LIMIT):
        if ttl < 0 or maxsize < 1 or use_limit < 1:
            raise ValueError('ttl >= 0, maxsize >= 1 and use_limit >= 1 '
                             'are required')
        self.ttl = ttl
        self.maxsize = maxsize
        self.use_limit = use_limit      # ignored (see the module)
        self._data = {}
        self._lock = threading.Lock()
        with _caches_lock:
            _caches.add(self)

    def __repr__(self):
        return '<DEKCache %d keys, ttl %ss>' % (len(self._data), self.ttl)

    def __len__(self):
        return len(self._data)

    def get(self, raw_id):
        """Return the live entry for ``raw_id`` or None (expired entries are
        dropped)."""
        entry = self._data.get(raw_id)
        if entry is None:
            return None
        if _monotonic() < entry.expires:
            return entry
        with self._lock:
            if self._data.get(raw_id) is entry:
                del self._data[raw_id]
        return None

    def put(self, raw_id, kek_id, sealer, dek=None):
        entry = CachedKey(raw_id, kek_id, sealer, _monotonic() + self.ttl,
                          dek)
        with self._lock:
            if raw_id not in self._data and len(self._data) >= self.maxsize:
                self._shrink()
            self._data[raw_id] = entry
        return entry

    def _shrink(self):
        now = _monotonic()
        for k in [k for k, e in self._data.items() if e.expires <= now]:
            self._data.pop(k).evict()
        while len(self._data) >= self.maxsize:
            oldest = min(self._data, key=lambda k: self._data[k].expires)
            self._data.pop(oldest).evict()

    def evict(self, dek_id):
        """Evict the key of hex id ``dek_id``."""
        with self._lock:
            entry = self._data.pop(bytes.fromhex(dek_id), None)
            if entry is not None:
                entry.evict()

    def clear(self):
        with self._lock:
            for entry in self._data.values():
                entry.evict()
            self._data.clear()


def evict_everywhere(dek_id):
    """Evict ``dek_id`` from every DEK cache of this process."""
    with _caches_lock:
        caches = list(_caches)
    for cache in caches:
        cache.evict(dek_id)
