"""Findings 1, 2 and 11 of the security review (issue 16), as attacks.

1. Nonce reuse after a fork made in C: version 1 handed out nonces from a
   batch that only ``os.register_at_fork`` reset, and those hooks do not
   run when a process is forked from C (uWSGI's pre-fork master, C
   extensions).  Parent and child then sealed with the same nonces under
   the same DEK.  :class:`ForkTests` forks with C (``fork()`` of libc
   through ctypes) and with ``os.fork``, shows that the old design repeats
   and the XOR of two ciphertexts gives the plaintext away, and that
   version 2 (a nonce from ``os.urandom`` per seal, a subkey per fork)
   repeats nothing.  :class:`ThreadTests`: threads sealing at once.
2. The nonce budget across processes: version 1 counted uses per process
   and failed writes at the limit.  :class:`SubkeyTests` shows that
   sealing goes on under new subkeys, that no ``KeyStateError`` comes any
   more, and that readers open every subkey.
11. Contexts: :class:`ContextTests` plants a ``facility.encrypt`` ciphertext
    as the state of an ``EncryptedPersistent`` object in the storage, and
    hands a state to ``facility.decrypt``: both are refused with
    ``UnsupportedFormatError``.

Also the size budget of ``EncryptedPersistent`` (at most 64 bytes per
object) in :class:`SizeTests`.
"""
import collections
import ctypes
import importlib.util
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import threading
import unittest
from unittest import mock

import transaction
import ZODB
import ZODB.FileStorage
import ZODB.POSException
import zope.component
import zope.component.testing
from persistent import Persistent

from zodbkmi import exceptions
from zodbkmi.facility import KeyManagementFacility
from zodbkmi.format import envelope
from zodbkmi.persistent import EncryptedPersistent
from zodbkmi.testing import StaticKeyHolder

NONCE = 12
SALT = 4
HEADER = 38


class Crypt(EncryptedPersistent):
    """Stored by the tests (same name length as Plain: sizes compare)."""

    def __init__(self, name='', value=''):
        self.name = name
        self.value = value


class Plain(Persistent):

    def __init__(self, name='', value=''):
        self.name = name
        self.value = value


# -- forking ------------------------------------------------------------------

def c_fork():
    """``fork()`` of libc, called from C: no ``os.register_at_fork`` hook
    runs, as in uWSGI's pre-fork master.  Through ``PyDLL``, which keeps
    the GIL across the call, so the child has it."""
    pid = ctypes.PyDLL(None).fork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), 'fork failed')
    return pid


FORKS = (('C fork()', c_fork), ('os.fork()', os.fork))


def in_child(fork, work):
    """Fork with ``fork``; the child calls ``work()`` (bytes), writes the
    result to a pipe and leaves with ``os._exit``: it does nothing else
    (no thread runs in it).  Return what it wrote."""
    r, w = os.pipe()
    pid = fork()
    if pid == 0:     # pragma: no cover (the child)
        code = 1
        try:
            os.close(r)
            view = memoryview(work())
            while view:
                view = view[os.write(w, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            # a guard against a child that hangs, not a timed assertion
            if not select.select([r], [], [], 300)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError('the child did not answer')
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise AssertionError('the child failed (status %d)' % status)
    return b''.join(chunks)


def split(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


class _OldNoncePool:
    """The nonce source of version 1 (zodbkmi before the review), kept
    here to show the attack: nonces from one ``os.urandom`` call per 1024,
    handed out through an iterator; only an ``os.register_at_fork`` hook
    makes a child forget the batch, and it is not registered here, as it
    does not run after a fork made in C."""

    BATCH = 1024

    def __init__(self):
        self.it = iter(())

    def refill(self):
        buf = os.urandom(NONCE * self.BATCH)
        it = iter([buf[i:i + NONCE] for i in range(0, len(buf), NONCE)])
        first = next(it)
        self.it = it
        return first

    def __call__(self):
        return next(self.it, None) or self.refill()


def xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


class FacilityCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.facility = self._facility()
        self.kek = os.urandom(32)
        self.dek_id = self.facility.create_key(self.kek)

    def _facility(self, **kw):
        return KeyManagementFacility(os.path.join(self.tmp, 'keys'), **kw)


@unittest.skipUnless(hasattr(os, 'fork'), 'needs fork')
class ForkTests(FacilityCase):

    N = 2000      # envelopes sealed by parent and child each

    def test_old_pool_repeats_nonces_after_a_c_fork(self):
        # The attack on version 1: the master seals one record, forks
        # from C; the child's next nonces are the parent's next ones.
        pool = _OldNoncePool()
        pool()
        child = split(in_child(c_fork, lambda: b''.join(
            pool() for _ in range(8))), NONCE)
        parent = [pool() for _ in range(8)]
        self.assertEqual(child, parent)     # the flaw of version 1
        # Under one DEK, a known plaintext in the parent gives the
        # child's secret away (GCM is CTR mode: same nonce, same stream)
        sealer = envelope.Sealer(os.urandom(16), os.urandom(32))
        known = b'a plaintext the attacker knows'
        secret = b'the child sealed this secret.!'
        pool = _OldNoncePool()
        pool()
        theirs = in_child(c_fork, lambda: sealer.seal(secret,
                                                      _nonce=pool()))
        ours = sealer.seal(known, _nonce=pool())
        self.assertEqual(theirs[22:34], ours[22:34])      # same nonce
        body = slice(34, 34 + len(secret))
        self.assertEqual(xor(xor(theirs[body], ours[body]), known), secret)

    def test_the_attack_fails_on_version_2(self):
        # The same attack through the public API, forking from C and with
        # os.fork: the child seals under a subkey of its own, with nonces
        # of its own, and the XOR gives nothing.
        known = b'a plaintext the attacker knows'
        secret = b'the child sealed this secret.!'
        for name, fork in FORKS:
            with self.subTest(name):
                self.facility.encrypt(self.kek, b'sealed before the fork')
                theirs = in_child(fork, lambda: self.facility.encrypt(
                    self.kek, secret))
                ours = self.facility.encrypt(self.kek, known)
                self.assertEqual(self.facility.decrypt(self.kek, theirs),
                                 secret)
                self.assertNotEqual(envelope.unique_part(theirs),
                                    envelope.unique_part(ours))
                self.assertNotEqual(theirs[22:26], ours[22:26])  # subkeys
                body = slice(HEADER, HEADER + len(secret))
                self.assertNotEqual(
                    xor(xor(theirs[body], ours[body]), known), secret)

    def _parent_and_child(self, fork, sealer=None):
        """Seal one envelope, fork; parent and child each seal N more.
        Return (parent salt, parent envelopes, child salt, child ones)."""
        if sealer is None:
            seal = lambda: self.facility.encrypt(self.kek, b'x')  # noqa
            salt = lambda: envelope.unique_part(seal())[:SALT]   # noqa
        else:
            seal = lambda: sealer.seal_data(b'x')                # noqa
            salt = lambda: sealer.current_salt                   # noqa
        seal()                              # the master seals before
        before = salt()

        def work():
            sealed = [seal() for _ in range(self.N)]
            return b''.join(sealed + [salt()])
        out = in_child(fork, work)
        size = len(seal())
        theirs = split(out[:-SALT], size)
        ours = [seal() for _ in range(self.N)]
        return before, ours, out[-SALT:], theirs

    def _check_no_repeat(self, before, ours, child_salt, theirs):
        self.assertEqual(len(theirs), self.N)
        parts = [envelope.unique_part(d) for d in ours + theirs]
        self.assertEqual(len(set(parts)), 2 * self.N)   # no (salt, nonce)
        self.assertEqual(len({p[SALT:] for p in parts}), 2 * self.N)
        # the child drew a subkey of its own at its first seal, and kept
        # it; the parent kept its own
        self.assertEqual({d[22:26] for d in theirs}, {child_salt})
        self.assertEqual({d[22:26] for d in ours}, {before})
        self.assertNotEqual(child_salt, before)

    def test_c_fork_no_nonce_twice_and_a_subkey_per_fork(self):
        self._check_no_repeat(*self._parent_and_child(c_fork))

    def test_os_fork_no_nonce_twice_and_a_subkey_per_fork(self):
        self._check_no_repeat(*self._parent_and_child(os.fork))

    def test_children_of_children(self):
        # a child that forks again: each generation has its own subkey
        sealer = envelope.Sealer(os.urandom(16), os.urandom(32))
        sealer.seal_data(b'x')

        def child():
            sealer.seal_data(b'x')
            grandchild = in_child(c_fork, lambda: sealer.seal_data(b'x')
                                  + sealer.current_salt)
            return sealer.current_salt + grandchild[-SALT:]
        out = in_child(os.fork, child)
        salts = {sealer.current_salt, out[:SALT], out[SALT:]}
        self.assertEqual(len(salts), 3)

    def test_every_sealer_of_the_child_draws_a_subkey(self):
        # the first seal of a child resets the subkeys of every DEK
        a = envelope.Sealer(os.urandom(16), os.urandom(32))
        b = envelope.Sealer(os.urandom(16), os.urandom(32))
        a.seal_data(b'x'), b.seal_state(b'x')
        salts = (a.current_salt, b.current_salt)

        def child():
            a.seal_data(b'x')
            b.seal_record(b'x', bytes(8))
            return a.current_salt + b.current_salt
        out = in_child(c_fork, child)
        self.assertNotEqual(out[:SALT], salts[0])
        self.assertNotEqual(out[SALT:], salts[1])

    def test_no_at_fork_hook_is_needed(self):
        # A copy of the envelope module imported while
        # os.register_at_fork does not exist (and would fail if called):
        # its children still draw their own subkeys after a C fork.
        spec = importlib.util.spec_from_file_location(
            'zodbkmi_envelope_copy', envelope.__file__)
        copy = importlib.util.module_from_spec(spec)

        def refuse(**kw):     # pragma: no cover
            raise AssertionError('an at-fork hook was registered')
        with mock.patch.object(os, 'register_at_fork', refuse):
            spec.loader.exec_module(copy)
        sealer = copy.Sealer(os.urandom(16), os.urandom(32))
        self._check_no_repeat(*self._parent_and_child(c_fork, sealer))

    def test_process_id_fallback(self):
        # where no wipe-on-fork page can be made, the process id tells
        marker = envelope._PidMarker()
        with mock.patch.object(envelope, '_marker', marker):
            sealer = envelope.Sealer(os.urandom(16), os.urandom(32))
            for name, fork in FORKS:
                with self.subTest(name):
                    self._check_no_repeat(
                        *self._parent_and_child(fork, sealer))

    @unittest.skipUnless(sys.platform.startswith('linux'), 'Linux only')
    def test_wipe_on_fork_page_is_used_on_linux(self):
        release = tuple(int(x) for x in
                        os.uname().release.split('-')[0].split('.')[:2])
        if release < (4, 14):    # pragma: no cover
            self.skipTest('MADV_WIPEONFORK needs Linux 4.14')
        self.assertEqual(envelope.FORK_DETECTION, 'wipe-on-fork page')
        page = envelope._marker
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        # the kernel lists the advice as "wf" in the page's VmFlags
        with open('/proc/self/smaps') as f:
            flags = None
            for line in f:
                head = line.split()[0]
                if '-' in head and ':' not in head:
                    lo, hi = (int(x, 16) for x in head.split('-'))
                    found = lo <= address < hi
                elif head == 'VmFlags:' and found:
                    flags = line.split()[1:]
                    break
        self.assertIn('wf', flags)


class ThreadTests(FacilityCase):

    def test_threads_never_share_a_nonce(self):
        # 8 threads sealing at once through the public API, the switch
        # interval at its smallest so that they interleave
        barrier = threading.Barrier(8)
        out = collections.defaultdict(list)

        def work(n):
            barrier.wait()
            for i in range(1000):
                out[n].append(self.facility.encrypt(self.kek, b'%d' % i))

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=work, args=(n,))
                       for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
        sealed = [d for n in out for d in out[n]]
        self.assertEqual(len(sealed), 8000)
        parts = {envelope.unique_part(d) for d in sealed}
        self.assertEqual(len(parts), 8000)
        self.assertEqual(len({p[SALT:] for p in parts}), 8000)

    def test_threads_renewing_subkeys_at_once(self):
        # with a tiny subkey limit the threads keep racing to renew: every
        # envelope still opens, no nonce repeats
        barrier = threading.Barrier(4)
        sealed = []
        lock = threading.Lock()

        def work():
            barrier.wait()
            mine = [self.facility.encrypt(self.kek, b'r') for _ in range(500)]
            with lock:
                sealed.extend(mine)

        with mock.patch.object(envelope, 'SUBKEY_LIMIT', 3):
            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.assertEqual(len({envelope.unique_part(d) for d in sealed}),
                         2000)
        self.assertGreater(len({d[22:26] for d in sealed}), 2000 // 3 // 2)
        fresh = self._facility()
        self.assertEqual({fresh.decrypt(self.kek, d) for d in sealed},
                         {b'r'})


class ThreadSubkeyTests(unittest.TestCase):

    def test_each_thread_seals_under_its_own_subkey(self):
        # no counter, IV or subkey is shared between threads: each thread
        # of a writer draws its own (free-threaded CPython included)
        sealer = envelope.Sealer(os.urandom(16), os.urandom(32))
        sealer.seal_data(b'')
        salts = {}
        barrier = threading.Barrier(6)

        def work(n):
            barrier.wait()
            mine = [sealer.seal_data(b'') for _ in range(200)]
            salts[n] = {d[22:26] for d in mine}

        threads = [threading.Thread(target=work, args=(n,))
                   for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([len(v) for v in salts.values()], [1] * 6)
        every = set().union(*salts.values()) | {sealer.current_salt}
        self.assertEqual(len(every), 7)


class SubkeyTests(FacilityCase):

    def test_sealing_goes_on_under_new_subkeys(self):
        # SUBKEY_LIMIT lowered through its documented seam: 22 envelopes
        # under a limit of 4 are 6 subkeys, and no error
        with mock.patch.object(envelope, 'SUBKEY_LIMIT', 4):
            sealed = [self.facility.encrypt(self.kek, b'%d' % i)
                      for i in range(22)]
        salts = [d[22:26] for d in sealed]
        self.assertEqual([len(set(salts[i:i + 4])) for i in range(0, 22, 4)],
                         [1] * 6)
        self.assertEqual(len(set(salts)), 6)
        self.assertEqual(collections.Counter(salts).most_common(1)[0][1], 4)
        for i, data in enumerate(sealed):
            self.assertEqual(self.facility.decrypt(self.kek, data),
                             b'%d' % i)
        # another process (a fresh facility) derives each subkey
        fresh = self._facility()
        self.assertEqual([fresh.decrypt(self.kek, d) for d in sealed],
                         [b'%d' % i for i in range(22)])

    def test_the_default_limit(self):
        self.assertEqual(envelope.SUBKEY_LIMIT, 2 ** 20)
        sealer = envelope.Sealer(os.urandom(16), os.urandom(32))
        sealer.seal_data(b'')
        salt = sealer.current_salt
        # its count: the next seal renews it exactly at the limit
        current = sealer._local.current
        self.assertEqual(next(current[0]), 2)
        sealer._local.current = (iter([envelope.SUBKEY_LIMIT,
                                       envelope.SUBKEY_LIMIT + 1]),) + \
            current[1:]
        self.assertEqual(sealer.seal_data(b'')[22:26], salt)
        self.assertNotEqual(sealer.seal_data(b'')[22:26], salt)

    def test_nonces_are_the_iv_xor_the_count(self):
        # a writer's nonces under one subkey are distinct by construction
        # (its random IV XOR 1, 2, 3, ...), not by chance
        sealer = envelope.Sealer(os.urandom(16), os.urandom(32))
        sealed = [sealer.seal_data(b'') for _ in range(1000)]
        nonces = [int.from_bytes(d[26:38], 'big') for d in sealed]
        iv = nonces[0] ^ 1
        self.assertEqual(nonces, [iv ^ i for i in range(1, 1001)])
        self.assertEqual(len({d[22:26] for d in sealed}), 1)
        # another writer of the same DEK: another salt and another IV
        other = envelope.Sealer(sealer.dek_id, os.urandom(32))
        self.assertNotEqual(other.seal_data(b'')[22:38], sealed[0][22:38])

    def test_no_use_limit_error_any_more(self):
        # Version 1 refused the 4th encryption with use_limit=3
        # (KeyStateError: "reached its limit of 3 encryptions in this
        # process; rotate it"): a writer failed.  Now the argument is
        # accepted and ignored, for records, states, storage records and
        # files.
        import io
        facility = self._facility(use_limit=3)
        for i in range(10):
            facility.encrypt(self.kek, b'x')
            facility.encrypt_state(self.kek, b'x')
            facility.encrypt(self.kek, b'x', oid=bytes(8))
            facility.encrypt_file(self.kek, io.BytesIO(b'x'), io.BytesIO())

    def test_many_writers_share_a_dek(self):
        # many writers (processes, here sealers of one DEK) each draw
        # their own subkey; one reader opens them all
        dek_id, dek = os.urandom(16), os.urandom(32)
        writers = [envelope.Sealer(dek_id, dek) for _ in range(50)]
        sealed = [w.seal_record(b'%d' % i, bytes(8))
                  for i, w in enumerate(writers)]
        self.assertEqual(len({d[22:26] for d in sealed}), 50)
        reader = envelope.Sealer(dek_id, dek)
        self.assertEqual([reader.open_record(d, bytes(8)) for d in sealed],
                         [b'%d' % i for i in range(50)])

    def test_readers_keep_a_bounded_number_of_subkeys(self):
        dek = os.urandom(32)
        sealer = envelope.Sealer(os.urandom(16), dek)
        with mock.patch.object(envelope, 'SUBKEY_LIMIT', 1):
            sealed = [sealer.seal_data(b'%d' % i) for i in range(40)]
        self.assertEqual(len({d[22:26] for d in sealed}), 40)
        reader = envelope.Sealer(sealer.dek_id, dek)
        with mock.patch.object(envelope, 'SUBKEY_CACHE_SIZE', 8):
            for i, d in enumerate(sealed):
                self.assertEqual(reader.open_data(d), b'%d' % i)
                self.assertLessEqual(len(reader._subkeys), 8)

    def test_facility_tables_stay_bounded(self):
        from zodbkmi import facility as facilitymod
        with mock.patch.object(envelope, 'SUBKEY_LIMIT', 1):
            sealed = [self.facility.encrypt(self.kek, b'%d' % i)
                      for i in range(30)]
        fresh = self._facility()
        with mock.patch.object(facilitymod, '_OPENED_TABLE_SIZE', 5):
            for i, d in enumerate(sealed):
                self.assertEqual(fresh.decrypt(self.kek, d), b'%d' % i)
            self.assertLessEqual(len(fresh._opened[0][self.kek]), 5)
        # a hit of the table is keyed by the salt: one entry per subkey
        self.assertEqual(fresh.decrypt(self.kek, sealed[-1]), b'29')
        self.assertIn(sealed[-1][:26], fresh._opened[0][self.kek])


class ContextTests(FacilityCase):
    """Finding 11: object states and facility.encrypt data are sealed in
    contexts of their own; neither is accepted as the other."""

    def setUp(self):
        super().setUp()
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        zope.component.provideUtility(self.facility)
        zope.component.provideUtility(StaticKeyHolder(self.kek))
        self.db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(self.tmp, 'Data.fs')))
        self.addCleanup(self.db.close)

    def _store(self, obj):
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        try:
            conn.root()['obj'] = obj
            tm.commit()
            return obj._p_oid
        finally:
            conn.close()

    def _load(self, oid):
        conn = self.db.open()
        try:
            conn.cacheMinimize()
            obj = conn.get(oid)
            obj._p_activate()
            return dict(obj.__dict__)
        finally:
            conn.close()

    def test_state_given_to_facility_decrypt_is_refused(self):
        oid = self._store(Crypt('alice', 'secret'))
        data, _ = self.db.storage.load(oid)
        # the state envelope, as anyone with the storage bytes finds it
        state = self._state_envelope(data)
        self.assertEqual(state[3:6], b'\x02\x01\x02')
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self.facility.decrypt(self.kek, state)
        self.assertIn('object state envelope where a data envelope',
                      str(cm.exception))
        self.assertIn(b'secret', self.facility.decrypt_state(self.kek,
                                                             state))

    def _state_envelope(self, record):
        at = record.index(b'.km\x02\x01\x02')
        return record[at:at + record[at - 1]]     # SHORT_BINBYTES

    def test_facility_encrypt_output_planted_as_a_state_is_refused(self):
        # An application encrypts data of its users with facility.encrypt
        # (the keas.kmi API): the attacker has one encrypted, a pickle of
        # their choice, and writes it into the storage as the state of an
        # object.  Loading the object must not unpickle it.
        oid = self._store(Crypt('alice', 'secret'))
        chosen = pickle.dumps({'name': 'mallory', 'value': 'planted'}, 3)
        ciphertext = self.facility.encrypt(self.kek, chosen)
        self.assertEqual(self.facility.decrypt(self.kek, ciphertext), chosen)
        with mock.patch.object(Crypt, '__getstate__',
                               lambda self: ciphertext):
            tm = transaction.TransactionManager()
            conn = self.db.open(tm)
            obj = conn.get(oid)
            obj._p_activate()
            obj._p_changed = True
            tm.commit()           # the storage now holds the planted state
            conn.close()
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._load(oid)
        self.assertIn('0x%s' % oid.hex(), str(cm.exception))
        self.assertIn('data envelope where an object state envelope',
                      str(cm.exception))
        # the direct way too
        obj = Crypt.__new__(Crypt)
        with self.assertRaises(exceptions.UnsupportedFormatError):
            obj.__setstate__(ciphertext)
        self.assertEqual(obj.__dict__, {})

    def test_storage_record_is_neither(self):
        record = self.facility.encrypt(self.kek, b'x', oid=bytes(8))
        for opener in (self.facility.decrypt, self.facility.decrypt_state):
            with self.assertRaises(exceptions.UnsupportedFormatError):
                opener(self.kek, record)

    def test_version_1_data_is_still_read_as_both(self):
        # the one cross-acceptance left (docs/format.rst): states written
        # before version 2 are version 1 data envelopes
        dek = os.urandom(32)
        dek_id = self.facility.create_key(self.kek, _dek=dek)
        sealer = envelope.Sealer(bytes.fromhex(dek_id), dek)
        state = pickle.dumps({'name': 'old', 'value': 'v1'}, 3)
        v1 = sealer.seal(state, _nonce=os.urandom(12))
        self.assertEqual(v1[3], 1)
        self.assertEqual(self.facility.decrypt(self.kek, v1), state)
        self.assertEqual(self.facility.decrypt_state(self.kek, v1), state)
        obj = Crypt.__new__(Crypt)
        obj.__setstate__(v1)
        self.assertEqual((obj.name, obj.value), ('old', 'v1'))


class SizeTests(unittest.TestCase):
    """At most 64 bytes per EncryptedPersistent object (issue 16)."""

    def test_at_most_64_bytes_per_object(self):
        tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, tmp, True)
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        facility = KeyManagementFacility(os.path.join(tmp, 'keys'))
        kek = os.urandom(32)
        facility.create_key(kek)
        zope.component.provideUtility(facility)
        zope.component.provideUtility(StaticKeyHolder(kek))
        sizes = {}
        n = 50
        for cls in (Plain, Crypt):
            path = os.path.join(tmp, cls.__name__ + '.fs')
            db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
            try:
                with db.transaction() as conn:
                    for i in range(n):
                        conn.root()[i] = cls('name %d' % i, 'x' * 200)
            finally:
                db.close()
            sizes[cls] = os.path.getsize(path)
        per_object = (sizes[Crypt] - sizes[Plain]) / n
        self.assertLessEqual(per_object, 64)
        self.assertEqual(per_object, 64)      # 54 envelope + 10 framing


class VersionOneTests(FacilityCase):
    """Version 1 envelopes keep opening, through every path that reads
    them: the facility (its tables and the storage's fast path) and
    EncryptingStorage, pack included (its oid index keys version 1
    records by their nonce: ``envelope.unique_part``)."""

    def setUp(self):
        super().setUp()
        self.dek = os.urandom(32)
        self.dek_id = self.facility.create_key(self.kek, _dek=self.dek)
        self.v1 = envelope.Sealer(bytes.fromhex(self.dek_id), self.dek)

    def _v1(self, plaintext, oid=None):
        return self.v1.seal(plaintext, 1 if oid else 0, oid,
                            _nonce=os.urandom(12))

    def test_facility_opens_version_1(self):
        data, record = self._v1(b'data'), self._v1(b'record', bytes(8))
        self.assertEqual((data[3], record[3]), (1, 1))
        fast = self.facility.record_fast_path(self.kek)
        for _ in range(2):      # the slow path, then the tables' hits
            self.assertEqual(self.facility.decrypt(self.kek, data), b'data')
            self.assertEqual(self.facility.decrypt_state(self.kek, data),
                             b'data')
            self.assertEqual(
                self.facility.decrypt(self.kek, record, bytes(8)), b'record')
        self.assertEqual(fast(record, bytes(8)), b'record')
        self.assertIsNone(fast(record, b'\0' * 7 + b'\1'))
        self.assertEqual(self.facility.key_id_of(data), self.dek_id)
        self.assertEqual(self.facility.key_id_of(record, bytes(8)),
                         self.dek_id)
        # the table holds the version 1 prefix next to version 2 ones
        self.facility.decrypt(self.kek, self.facility.encrypt(self.kek, b''))
        self.assertIn(data[:22], self.facility._opened[0][self.kek])
        # and still refuses what it must
        for bad, error in ((data[:49], exceptions.TruncatedDataError),
                           (data[:-1] + bytes([data[-1] ^ 1]),
                            exceptions.AuthenticationError),
                           (record, exceptions.UnsupportedFormatError)):
            with self.assertRaises(error):
                self.facility.decrypt(self.kek, bad)
        with self.assertRaises(exceptions.AuthenticationError):
            self.facility.decrypt(self.kek, record, b'\0' * 7 + b'\1')

    def test_storage_reads_and_packs_version_1_records(self):
        import time
        from persistent.mapping import PersistentMapping
        from zodbkmi.storage import EncryptingStorage
        path = os.path.join(self.tmp, 'Data.fs')

        def open_db():
            base = ZODB.FileStorage.FileStorage(path)
            return base, ZODB.DB(EncryptingStorage(base, self.facility,
                                                   self.kek))
        base, db = open_db()
        from ZODB.Connection import TransactionMetaData
        with db.transaction() as conn:
            conn.root()['kept'] = kept = PersistentMapping(value='v1 kept')
            conn.root()['dropped'] = dropped = PersistentMapping(
                value='garbage')
        with db.transaction() as conn:
            del conn.root()['dropped']
        # the current records rewritten as version 1, as an earlier
        # release wrote them
        wrapper = db.storage
        t = TransactionMetaData()
        base.tpc_begin(t)
        for oid in (b'\0' * 8, kept._p_oid):
            data, serial = base.load(oid)
            base.store(oid, serial, self._v1(wrapper.unseal(data, oid), oid),
                       '', t)
        base.tpc_vote(t)
        base.tpc_finish(t)
        db.close()
        base, db = open_db()
        try:
            self.assertEqual({base.load(oid)[0][3]
                              for oid in (b'\0' * 8, kept._p_oid)}, {1})
            with db.transaction() as conn:
                self.assertEqual(conn.root()['kept']['value'], 'v1 kept')
            base.load(dropped._p_oid)      # still there before the pack
            # the pack's garbage collection reads the references of the
            # version 1 records (opened with the oids of its index)
            db.pack(time.time() + 1)
            with self.assertRaises(ZODB.POSException.POSKeyError):
                base.load(dropped._p_oid)
            with db.transaction() as conn:
                self.assertEqual(conn.root()['kept']['value'], 'v1 kept')
        finally:
            db.close()
