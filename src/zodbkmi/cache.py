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

Eviction (retirement, destruction, KEK rotation, the size bound, the end
of the time to live) drops the entry's AES context and DEK bytes, so that
no table that still refers to the entry keeps key material; the callbacks
of :meth:`DEKCache.on_evict` let the facilities drop their own references.
Expired entries are evicted by a reaper thread at their expiry time
(:func:`_reaper`), not only when they are next looked up.

A grace period (``grace`` seconds, 0 by default) keeps expired entries
that long after their time to live, for one use only: :meth:`DEKCache.stale`
hands them to a facility that cannot reach its key server (the outage
policy of :class:`zodbkmi.client.LocalKeyManagementFacility`,
``docs/server.rst``).  :meth:`DEKCache.get` never returns them.
"""
import os
import threading
import time
import weakref

from zodbkmi import threads
from zodbkmi.exceptions import EvictedKeyError

DEFAULT_TTL = 3600
DEFAULT_MAXSIZE = 4096
DEFAULT_USE_LIMIT = 2 ** 28
#: The longest grace period a cache accepts (seconds): one day.
MAX_GRACE = 86400

_monotonic = time.monotonic
_caches = weakref.WeakSet()
_caches_lock = threading.Lock()


_EVICTED = float('-inf')   # the expiry time of an evicted entry


class _EvictedSealer:
    """Stands in for the sealer of an evicted entry; holds no key."""

    __slots__ = ('dek_id',)

    def __init__(self, dek_id):
        self.dek_id = dek_id

    def __getattr__(self, name):
        raise EvictedKeyError('DEK %s was evicted from the cache'
                              % self.dek_id)

    def __repr__(self):
        return '<evicted sealer of DEK %s>' % self.dek_id


class CachedKey:
    """One cached DEK: ``dek_id`` (hex), ``raw_id`` (16 bytes), ``kek_id``,
    ``sealer``, ``expires`` (monotonic seconds; an evicted entry expires
    at minus infinity, so that hot paths test ``expires`` alone).

    ``_dek`` holds the DEK bytes for the formats that derive keys from it
    (the stream format); it is never shown.  ``authorized`` holds the KEK
    objects that unwrapped this DEK themselves: a caller may use the entry
    only through one of them (an object that merely carries the same KEK
    id, or the public half of an RSA KEK, must unwrap first, and cannot).

    :meth:`evict` drops the sealer, the DEK bytes and the KEK objects.
    """

    __slots__ = ('dek_id', 'raw_id', 'kek_id', 'sealer', 'expires',
                 'authorized', '_dek', '__weakref__')

    def __init__(self, raw_id, kek_id, sealer, expires, dek=None):
        self._dek = dek
        self.raw_id = raw_id
        self.dek_id = raw_id.hex()
        self.kek_id = kek_id
        self.sealer = sealer
        self.expires = expires
        self.authorized = ()

    def __repr__(self):
        return '<CachedKey %s by KEK %s>' % (self.dek_id, self.kek_id)

    @property
    def evicted(self):
        return self.expires == _EVICTED

    def alive(self):
        return _monotonic() < self.expires

    def authorizes(self, kek):
        """Whether the KEK object ``kek`` unwrapped this DEK itself."""
        for k in self.authorized:
            if k is kek:
                return True
        return False

    def authorize(self, kek):
        """Record that ``kek`` unwrapped this DEK (the caller checked)."""
        if not self.authorizes(kek):
            self.authorized += (kek,)

    def evict(self):
        """Make the entry unusable and drop its key material.  The expiry
        goes first: a reader that finds the dead sealer finds the entry
        expired too."""
        self.expires = _EVICTED
        self.sealer = _EvictedSealer(self.dek_id)
        self._dek = None
        self.authorized = ()


class DEKCache:
    """A mapping of raw DEK id (16 bytes) to :class:`CachedKey`.

    ``evict`` takes the hex id, as the rest of the API does.
    """

    def __init__(self, ttl=DEFAULT_TTL, maxsize=DEFAULT_MAXSIZE,
                 use_limit=DEFAULT_USE_LIMIT, grace=0):
        if ttl < 0 or maxsize < 1 or use_limit < 1:
            raise ValueError('ttl >= 0, maxsize >= 1 and use_limit >= 1 '
                             'are required')
        if not 0 <= grace <= MAX_GRACE:
            raise ValueError('the grace period is 0 to %d seconds, not %r'
                             % (MAX_GRACE, grace))
        self.ttl = ttl
        self.grace = grace
        self.maxsize = maxsize
        self.use_limit = use_limit      # ignored (see the module)
        self._data = {}
        self._lock = threading.Lock()
        self._on_evict = []
        with _caches_lock:
            _caches.add(self)

    def on_evict(self, callback):
        """Call ``callback(entry)`` after an entry is evicted (its key
        material already dropped), so that the owner drops its own
        references to it.  Called without the cache's lock held."""
        self._on_evict.append(callback)

    def _evicted(self, entries):
        for entry in entries:
            entry.evict()
        for entry in entries:
            for callback in self._on_evict:
                callback(entry)

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
        now = _monotonic()
        if now < entry.expires:
            return entry
        if now < entry.expires + self.grace:
            return None     # kept for stale()
        with self._lock:
            if self._data.get(raw_id) is entry:
                del self._data[raw_id]
        self._evicted([entry])
        return None

    def stale(self, raw_id):
        """Return the entry for ``raw_id`` if it expired less than
        ``grace`` seconds ago (or is still alive), else None.  Only for a
        facility that cannot reach its key server."""
        entry = self._data.get(raw_id)
        if entry is not None and _monotonic() < entry.expires + self.grace:
            return entry
        return None

    def sweep(self):
        """Evict every entry past its time to live and grace period;
        return how many."""
        now = _monotonic() - self.grace
        with self._lock:
            dead = [e for e in self._data.values() if e.expires <= now]
            for entry in dead:
                del self._data[entry.raw_id]
        self._evicted(dead)
        return len(dead)

    def next_expiry(self):
        """The earliest time an entry is due for eviction (its expiry time
        plus the grace period, monotonic seconds), or None."""
        with self._lock:
            due = min((e.expires for e in self._data.values()),
                      default=None)
        return None if due is None else due + self.grace

    def put(self, raw_id, kek_id, sealer, dek=None):
        entry = CachedKey(raw_id, kek_id, sealer, _monotonic() + self.ttl,
                          dek)
        with self._lock:
            dropped = []
            if raw_id not in self._data and len(self._data) >= self.maxsize:
                dropped = self._shrink()
            previous = self._data.get(raw_id)
            if previous is not None:
                dropped.append(previous)
            self._data[raw_id] = entry
        self._evicted(dropped)
        _reaper.wake(entry.expires + self.grace)
        return entry

    def _shrink(self):
        """Remove expired entries, then the oldest, until one more fits;
        return them (the caller evicts them outside the lock)."""
        now = _monotonic()
        dropped = [self._data.pop(k) for k in
                   [k for k, e in self._data.items() if e.expires <= now]]
        while len(self._data) >= self.maxsize:
            oldest = min(self._data, key=lambda k: self._data[k].expires)
            dropped.append(self._data.pop(oldest))
        return dropped

    def evict(self, dek_id):
        """Evict the key of hex id ``dek_id``."""
        with self._lock:
            entry = self._data.pop(bytes.fromhex(dek_id), None)
        if entry is not None:
            self._evicted([entry])

    def clear(self):
        with self._lock:
            entries = list(self._data.values())
            self._data.clear()
        self._evicted(entries)


class _Reaper:
    """One daemon thread per process that evicts expired entries of every
    cache at their expiry time, so that an idle process does not keep a
    DEK past its time to live.  Started on the first :meth:`DEKCache.put`
    of a process (and again in a forked child, where threads do not
    survive)."""

    def __init__(self):
        self._start()

    def _start(self):
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._due = None
        self._thread = None

    def wake(self, due):
        if self._pid != os.getpid():
            # a forked child (however it was forked): the parent's thread
            # is gone, and its lock may have been held at the fork
            self._start()
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._due = due
                # every signal blocked from its start (zodbkmi.threads)
                self._thread = threads.spawn(self._run,
                                             name='zodbkmi-dek-reaper')
            elif self._due is None or due < self._due:
                self._due = due
                self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while self._due is None:
                    self._cond.wait()
                delay = self._due - _monotonic()
                if delay > 0:
                    self._cond.wait(min(delay, 3600))
                    continue
                self._due = None
            caches = _all_caches()
            due = None
            for cache in caches:
                cache.sweep()
                when = cache.next_expiry()
                if when is not None and (due is None or when < due):
                    due = when
            if due is not None:
                with self._cond:
                    if self._due is None or due < self._due:
                        self._due = due


def _all_caches():
    """The live caches, without taking ``_caches_lock`` (the reaper must
    not hold a module lock that a fork could copy held)."""
    while True:
        try:
            return list(_caches)
        except RuntimeError:    # the set changed during the copy
            continue


_reaper = _Reaper()


def evict_everywhere(dek_id):
    """Evict ``dek_id`` from every DEK cache of this process."""
    with _caches_lock:
        caches = list(_caches)
    for cache in caches:
        cache.evict(dek_id)
