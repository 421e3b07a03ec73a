"""Tests of zodbkmi.cache."""
import threading
import unittest


DEK = bytes(range(1, 33))


def raw_id(i):
    return i.to_bytes(16, 'big')


def sealer(i=0):
    from zodbkmi.format.envelope import Sealer
    return Sealer(raw_id(i), DEK)


class FakeClock:
    """Replaces zodbkmi.cache's monotonic clock: no sleeping, no timing."""

    def __init__(self, test):
        from zodbkmi import cache
        self.now = 1000.0
        old = cache._monotonic
        cache._monotonic = self
        test.addCleanup(setattr, cache, '_monotonic', old)

    def __call__(self):
        return self.now


class DEKCacheTests(unittest.TestCase):

    def _getTargetClass(self):
        from zodbkmi.cache import DEKCache
        return DEKCache

    def _makeOne(self, **kw):
        return self._getTargetClass()(**kw)

    def _put(self, cache, i, kek_id='aes-k'):
        return cache.put(raw_id(i), kek_id, sealer(i), DEK)

    def test_defaults(self):
        cache = self._makeOne()
        self.assertEqual((cache.ttl, cache.maxsize, cache.use_limit),
                         (3600, 4096, 2 ** 28))
        self.assertLess(cache.use_limit, 2 ** 32)

    def test_bad_arguments(self):
        for kw in ({'ttl': -1}, {'maxsize': 0}, {'use_limit': 0}):
            with self.assertRaises(ValueError):
                self._makeOne(**kw)

    def test_put_get(self):
        cache = self._makeOne()
        entry = self._put(cache, 1)
        self.assertIs(cache.get(raw_id(1)), entry)
        self.assertIsNone(cache.get(raw_id(2)))
        self.assertEqual(len(cache), 1)
        self.assertEqual(entry.raw_id, raw_id(1))
        self.assertEqual(entry.dek_id, raw_id(1).hex())
        self.assertEqual(entry.kek_id, 'aes-k')

    def test_ttl(self):
        clock = FakeClock(self)
        cache = self._makeOne(ttl=10)
        entry = self._put(cache, 1)
        clock.now += 9.9
        self.assertIs(cache.get(raw_id(1)), entry)
        self.assertTrue(entry.alive())
        clock.now += 0.1
        self.assertFalse(entry.alive())
        self.assertIsNone(cache.get(raw_id(1)))
        self.assertEqual(len(cache), 0)

    def test_ttl_zero_caches_nothing(self):
        FakeClock(self)
        cache = self._makeOne(ttl=0)
        self._put(cache, 1)
        self.assertIsNone(cache.get(raw_id(1)))

    def test_size_bound_evicts_oldest(self):
        clock = FakeClock(self)
        cache = self._makeOne(maxsize=3)
        entries = []
        for i in range(5):
            entries.append(self._put(cache, i))
            clock.now += 1
            self.assertLessEqual(len(cache), 3)
        self.assertEqual(len(cache), 3)
        self.assertTrue(entries[0].evicted and entries[1].evicted)
        self.assertIsNone(cache.get(raw_id(0)))
        for i in (2, 3, 4):
            self.assertIs(cache.get(raw_id(i)), entries[i])

    def test_size_bound_drops_expired_first(self):
        clock = FakeClock(self)
        cache = self._makeOne(maxsize=3, ttl=10)
        old = self._put(cache, 0)
        clock.now += 5
        keep = [self._put(cache, 1), self._put(cache, 2)]
        clock.now += 6      # entry 0 expired
        self._put(cache, 3)
        self.assertTrue(old.evicted)
        self.assertFalse(any(e.evicted for e in keep))

    def test_put_same_id_does_not_evict_others(self):
        cache = self._makeOne(maxsize=2)
        a = self._put(cache, 1)
        self._put(cache, 2)
        self._put(cache, 2)
        self.assertIs(cache.get(raw_id(1)), a)

    def test_use_limit_is_ignored(self):
        # accepted for compatibility; nothing counts uses any more (the
        # record envelope draws subkeys, docs/format.rst)
        cache = self._makeOne(use_limit=3)
        self.assertEqual(cache.use_limit, 3)
        entry = self._put(cache, 1)
        self.assertFalse(hasattr(entry, 'count_use'))
        self.assertFalse(hasattr(entry, '_uses'))

    def test_evict(self):
        cache = self._makeOne()
        entry = self._put(cache, 1)
        cache.evict(raw_id(1).hex())
        self.assertTrue(entry.evicted)
        self.assertFalse(entry.alive())
        self.assertIsNone(cache.get(raw_id(1)))
        cache.evict(raw_id(1).hex())   # evicting twice is harmless

    def test_clear(self):
        cache = self._makeOne()
        entries = [self._put(cache, i) for i in range(3)]
        cache.clear()
        self.assertEqual(len(cache), 0)
        self.assertTrue(all(e.evicted for e in entries))

    def test_evict_everywhere(self):
        from zodbkmi.cache import evict_everywhere
        a, b = self._makeOne(), self._makeOne()
        ea, eb = self._put(a, 1), self._put(b, 1)
        other = self._put(b, 2)
        evict_everywhere(raw_id(1).hex())
        self.assertTrue(ea.evicted and eb.evicted)
        self.assertIsNone(a.get(raw_id(1)))
        self.assertIsNone(b.get(raw_id(1)))
        self.assertIs(b.get(raw_id(2)), other)

    def test_caches_are_not_kept_alive(self):
        import gc
        import weakref
        from zodbkmi import cache as cachemod
        cache = self._makeOne()
        ref = weakref.ref(cache)
        del cache
        gc.collect()
        self.assertIsNone(ref())
        self.assertNotIn(None, list(cachemod._caches))

    def test_repr_shows_no_key(self):
        cache = self._makeOne(ttl=60)
        entry = self._put(cache, 1)
        self.assertEqual(repr(cache), '<DEKCache 1 keys, ttl 60s>')
        self.assertEqual(repr(entry), '<CachedKey %s by KEK aes-k>'
                         % raw_id(1).hex())
        for text in (repr(cache), repr(entry), repr(entry.sealer)):
            self.assertNotIn(DEK.hex(), text)

    def test_thread_safe_put_get_evict(self):
        cache = self._makeOne(maxsize=16)
        errors = []
        sizes = []

        def work(n):
            try:
                for i in range(300):
                    k = (i * 7 + n) % 40
                    self._put(cache, k)
                    entry = cache.get(raw_id(k))
                    if entry is not None and entry.raw_id != raw_id(k):
                        errors.append('wrong entry')
                    if i % 5 == 0:
                        cache.evict(raw_id((k + 1) % 40).hex())
                    sizes.append(len(cache))
            except Exception as e:   # pragma: no cover
                errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(n,))
                   for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertLessEqual(max(sizes), 16)
