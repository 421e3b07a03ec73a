"""Benchmark: EncryptingStorage around FileStorage, against plain and floors.

Usage:
python benchmarks/bench_storage.py [--rounds 9] [--objects 20000]
[--blobs 200] [--plaintext-dir DIR] [--only records|blobs] [--frames]
[--blob-cache-size BYTES] [--blob-cache-dir DIR]

Every round runs each variant on a fresh database (a new FileStorage in a
new directory), the variants alternating (their order reverses from one
round to the next), and each floor is measured in the same round as the
wrapper it bounds.  Wall time (``time.perf_counter``); the table gives
medians over the rounds, and the range of the per-round ratios.

Records: commit of ``--objects`` small objects (``PersistentMapping`` of
two items) in transactions of 1,000, then loading each of them in a new
``DB`` (cache of 10 objects).  Variants: plain FileStorage; the floor
storage (``AESGCMFloorStorage``: one bare AES-256-GCM call per record, a
12 byte nonce, the oid as associated data; no format, no key ids, no key
cache); the wrapper (``EncryptingStorage``).  ``--frames`` adds the floor
storage without its cipher (what the wrapping costs apart from AES-GCM).

Blobs: ``--blobs`` blobs of 1 MiB, one per transaction, then, in a new
``DB`` (nothing cached), each blob loaded in its own transaction of one
connection (``_p_activate``: ZODB's ``setstate`` asks ``loadBlob`` for a
file name) -- the first load --, then again in a later transaction of
the same connection, then in another connection (another transaction
manager) of the same process; blob objects are made ghosts between these
passes, so each pass loads them.  Then, in another new ``DB``, the same
three passes opening each blob and reading every byte (``open('r')``,
``read()``; blob objects are left as ZODB leaves them): the figure users
feel.  Variants: plain FileStorage and the wrapper.  The floors, measured
on the wrapper's files in the same round:

- blob commit: the plain commit plus encrypting each blob file into a new
  file with the facility (read the plaintext, encrypt, write, remove the
  plaintext): what any wrapper adds, since ZODB hands over a plaintext
  file and the base storage keeps a file;
- blob first load (and first read): the plain load (read) plus decrypting
  each blob file into a new file and removing it (read the ciphertext,
  authenticate, write a new file, as the wrapper's ``loadBlob`` does, into
  the directory where the wrapper put its copies): ZODB's ``setstate``
  asks for a plaintext file of every blob it loads.

Repeat loads have no floor: their target is against plain, met by the
wrapper's repeat-load cache of plaintext copies (``blob_cache_size``,
``blob_cache_dir``) where the wrapper has one; without it they print
'n/a (no cache)'.
"""
import argparse
import inspect
import itertools
import os
import platform
import shutil
import stat
import statistics
import sys
import tempfile
import time

import cryptography
import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
import zope.interface
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from persistent.mapping import PersistentMapping
from ZODB.utils import p64

from zodbkmi.storage import EncryptingStorage
from zodbkmi.testing import KeyEncryptingKey
from zodbkmi.testing import TestingKeyManagementFacility

FLOOR_KEY = AESGCM.generate_key(256)
BLOB_SIZE = 1 << 20
RECORDS_PER_TRANSACTION = 1000
# the 1 minute load average above which the figures are noise (2 cores;
# the script itself keeps one busy, hence the higher mark at the end)
QUIET_START = 0.7
QUIET_END = 1.7


# -- the floor storages ------------------------------------------------------

class AESGCMFloorStorage:
    """The least an AES-GCM record wrapper does: a record is a 12 byte
    nonce and AES-256-GCM(state) bound to the oid; one AEAD call per store
    and per load, nothing else (benchmark only: no format, no key ids)."""

    _counter = itertools.count(1)

    def __init__(self, base):
        self.base = base
        self._aead = AESGCM(FLOOR_KEY)
        zope.interface.directlyProvides(
            self, zope.interface.providedBy(base))

    def __getattr__(self, name):
        return getattr(self.base, name)

    def _open(self, data, oid):
        return self._aead.decrypt(data[:12], data[12:], oid)

    def load(self, oid, version=''):
        data, serial = self.base.load(oid)
        return self._open(data, oid), serial

    def loadBefore(self, oid, tid):
        r = self.base.loadBefore(oid, tid)
        if r is None:
            return r
        return self._open(r[0], oid), r[1], r[2]

    def loadSerial(self, oid, serial):
        return self._open(self.base.loadSerial(oid, serial), oid)

    def store(self, oid, serial, data, version, transaction):
        nonce = next(self._counter).to_bytes(12, 'big')
        return self.base.store(
            oid, serial, nonce + self._aead.encrypt(nonce, data, oid),
            version, transaction)


class FramesOnlyStorage(AESGCMFloorStorage):
    """The floor storage without its cipher: the same Python frames and
    slices, the record stored as a zero nonce and the plaintext (what the
    wrapping costs apart from AES-GCM)."""

    def _open(self, data, oid):
        return data[12:]

    def store(self, oid, serial, data, version, transaction):
        return self.base.store(oid, serial, bytes(12) + data, version,
                               transaction)


# -- storages ----------------------------------------------------------------

WRAPPER_PARAMETERS = inspect.signature(EncryptingStorage).parameters
HAS_CACHE = 'blob_cache_size' in WRAPPER_PARAMETERS


class Context:
    """What every variant needs: the facility and the wrapper's options."""

    def __init__(self, facility, args):
        self.facility = facility
        self.options = {'plaintext_dir': args.plaintext_dir}
        if HAS_CACHE:
            if args.blob_cache_size is not None:
                self.options['blob_cache_size'] = args.blob_cache_size
            if args.blob_cache_dir is not None:
                self.options['blob_cache_dir'] = args.blob_cache_dir
        elif (args.blob_cache_size, args.blob_cache_dir) != (None, None):
            sys.exit('this EncryptingStorage has no blob_cache_size or '
                     'blob_cache_dir argument')
        self.cache = None       # what the wrapper said about its cache
        self.cache_object = None
        self.copies = None      # where the wrapper put a blob copy


def open_storage(path, variant, ctx):
    base = ZODB.FileStorage.FileStorage(
        os.path.join(path, 'Data.fs'), blob_dir=os.path.join(path, 'blobs'))
    if variant == 'floor':
        return AESGCMFloorStorage(base)
    if variant == 'frames':
        return FramesOnlyStorage(base)
    if variant == 'wrapper':
        storage = EncryptingStorage(base, ctx.facility, KeyEncryptingKey,
                                    **ctx.options)
        if ctx.cache is None:
            ctx.cache = describe_cache(storage)
            ctx.cache_object = getattr(storage, 'blob_cache', None)
        return storage
    return base


def describe_cache(storage):
    """A line on the wrapper's repeat-load cache, and whether it is on."""
    if not HAS_CACHE:
        return 'n/a (no cache)', False
    cache = getattr(storage, 'blob_cache', 'unknown')
    if cache is None:
        return 'off', False
    if cache == 'unknown':
        return 'on (size and directory not visible)', True
    limit = getattr(cache, 'limit', None)
    parent = getattr(cache, 'parent', '?')
    if limit is None:
        return 'on, in %s' % parent, True
    return 'on, %d MiB in %s' % (limit >> 20, parent), True


# -- records -----------------------------------------------------------------

def run_records(path, variant, ctx, n):
    db = ZODB.DB(open_storage(path, variant, ctx), cache_size=10)
    conn = db.open()
    root = conn.root()
    t0 = time.perf_counter()
    for i in range(0, n, RECORDS_PER_TRANSACTION):
        for j in range(i, min(n, i + RECORDS_PER_TRANSACTION)):
            root[j] = PersistentMapping(name='object %d' % j, value=j)
        transaction.commit()
    commit = time.perf_counter() - t0
    conn.close()
    db.close()
    db = ZODB.DB(open_storage(path, variant, ctx), cache_size=10)
    conn = db.open()
    root = conn.root()
    t0 = time.perf_counter()
    for j in range(n):
        root[j]['value']
        root[j]._p_deactivate()
    load = time.perf_counter() - t0
    conn.close()
    db.close()
    return {'records commit': commit, 'records load': load}


# -- blobs -------------------------------------------------------------------

def open_connection(db):
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root._p_activate()
    return tm, conn, root


def blob_pass(root, tm, n, read, ctx=None):
    """Load (or open and read) each blob in a transaction of its own;
    return the seconds taken.  Loads make the blobs ghosts afterwards
    (untimed), so that the next pass loads them again."""
    t0 = time.perf_counter()
    for i in range(n):
        blob = root[i]
        if read:
            with blob.open('r') as f:
                f.read()
        else:
            blob._p_activate()
            if ctx is not None and i == 0:
                ctx.copies = blob._p_blob_committed
        tm.abort()
    elapsed = time.perf_counter() - t0
    if not read:
        for i in range(n):
            root[i]._p_deactivate()
    return elapsed


def run_blobs(path, variant, ctx, n, payload):
    result = {}
    wrapper = variant == 'wrapper'
    db = ZODB.DB(open_storage(path, variant, ctx))
    tm, conn, root = open_connection(db)
    t0 = time.perf_counter()
    for i in range(n):
        root[i] = ZODB.blob.Blob(payload)
        tm.commit()
    result['blob commit'] = time.perf_counter() - t0
    oids = [root[i]._p_oid for i in range(n)]
    conn.close()
    db.close()
    if wrapper:
        result['encrypt'] = encrypt_only(ctx.facility, path, payload, n)

    # loads: nothing cached, then a later transaction, another connection
    storage = open_storage(path, variant, ctx)
    db = ZODB.DB(storage)
    tm, conn, root = open_connection(db)
    result['blob load, first'] = blob_pass(root, tm, n, False,
                                           ctx if wrapper else None)
    result['blob load, later transaction'] = blob_pass(root, tm, n, False)
    tm2, conn2, root2 = open_connection(db)
    result['blob load, other connection'] = blob_pass(root2, tm2, n, False)
    if wrapper:
        oids = [(oid, storage.base.load(oid)[1]) for oid in oids]
        copies = os.path.dirname(ctx.copies)
        result['decrypt'] = decrypt_only(
            storage.base, ctx.facility, oids, copies)
        result['read copies'] = read_files(copies, payload, n)
        result['read blob dir'] = read_files(path, payload, n)
    conn2.close()
    conn.close()
    db.close()

    # open and read every byte, the same three passes, in a new DB
    db = ZODB.DB(open_storage(path, variant, ctx))
    tm, conn, root = open_connection(db)
    result['blob read, first'] = blob_pass(root, tm, n, True)
    result['blob read, later transaction'] = blob_pass(root, tm, n, True)
    tm2, conn2, root2 = open_connection(db)
    result['blob read, other connection'] = blob_pass(root2, tm2, n, True)
    conn2.close()
    conn.close()
    db.close()
    return result


def encrypt_only(facility, path, payload, n):
    """The work any wrapper adds to a blob commit: encrypt the plaintext
    file ZODB hands over into a new file and remove the plaintext (the
    plaintext files are written untimed, as ZODB writes them for plain
    FileStorage too); no ZODB."""
    work = tempfile.mkdtemp(dir=path)
    elapsed = 0.0
    try:
        for i in range(n):
            plain = os.path.join(work, 'plain')
            with open(plain, 'wb') as f:
                f.write(payload)
            t0 = time.perf_counter()
            fd, sealed = tempfile.mkstemp(suffix='.zks', dir=work)
            with open(plain, 'rb', buffering=0) as src, \
                    open(fd, 'wb', buffering=0) as dst:
                facility.encrypt_file(KeyEncryptingKey, src, dst,
                                      oid=p64(i + 1))
            os.remove(plain)
            elapsed += time.perf_counter() - t0
            os.remove(sealed)
    finally:
        shutil.rmtree(work)
    return elapsed


def decrypt_only(base, facility, oids, directory):
    """The work any wrapper adds to the first load of a blob, since ZODB
    asks for a plaintext file of every blob it loads: read the ciphertext,
    authenticate and decrypt it into a new file (read-only, created
    exclusively, as the wrapper's copies), then remove that file; in a new
    directory of ``directory`` (where the wrapper put its copies); no
    ZODB."""
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    out = tempfile.mkdtemp(dir=directory)
    try:
        t0 = time.perf_counter()
        for oid, serial in oids:
            name = os.path.join(out, oid.hex())
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         stat.S_IRUSR)
            with open(base.loadBlob(oid, serial), 'rb',
                      buffering=0) as src, \
                    open(fd, 'wb', buffering=0) as dst:
                facility.decrypt_file(KeyEncryptingKey, src, dst, oid=oid)
            os.remove(name)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out)


def read_files(directory, payload, n):
    """Seconds to read ``n`` files like ``payload`` (written untimed just
    before, so in memory) in a new directory of ``directory``: what
    reading a blob costs on that file system."""
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    out = tempfile.mkdtemp(dir=directory)
    try:
        names = []
        for i in range(n):
            names.append(os.path.join(out, str(i)))
            with open(names[-1], 'wb') as f:
                f.write(payload)
        t0 = time.perf_counter()
        for name in names:
            with open(name, 'rb', buffering=0) as f:
                f.read()
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out)


def cipher_only(payload, n, chunk=256 << 10):
    """Seconds to AES-256-GCM-encrypt and to decrypt ``n`` blobs like
    ``payload`` in memory, 256 KiB at a time (medians of 5)."""
    aead = AESGCM(FLOOR_KEY)
    nonce = bytes(12)
    pieces = [payload[i:i + chunk] for i in range(0, len(payload), chunk)]
    sealed = [aead.encrypt(nonce, p, None) for p in pieces]
    enc, dec = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            for p in pieces:
                aead.encrypt(nonce, p, None)
        t1 = time.perf_counter()
        for _ in range(n):
            for c in sealed:
                aead.decrypt(nonce, c, None)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return statistics.median(enc), statistics.median(dec)


# -- the table ---------------------------------------------------------------

# operation, floor (None, a variant, or (plain operation, floor work)),
# target ('plain' or 'floor', ratio), needs the repeat-load cache
LINES = (
    ('records commit', 'floor', ('plain', 1.10), False),
    ('records load', 'floor', ('floor', 1.10), False),
    ('blob commit', ('blob commit', 'encrypt'), ('plain', 1.3), False),
    ('blob load, first', ('blob load, first', 'decrypt'), ('floor', 1.25),
     False),
    ('blob load, later transaction', None, ('plain', 1.5), True),
    ('blob load, other connection', None, ('plain', 1.5), True),
    ('blob read, first', ('blob read, first', 'decrypt'), ('floor', 1.25),
     False),
    ('blob read, later transaction', None, ('plain', 1.5), True),
    ('blob read, other connection', None, ('plain', 1.5), True),
)


def ms(seconds):
    v = seconds * 1000
    if v >= 100:
        return '%.0f' % v
    if v >= 10:
        return '%.1f' % v
    return '%.2f' % v


def ratio(wrapper, other):
    """'r (min-max)': the ratio of the medians, and the range of the
    per-round ratios."""
    per_round = [w / o for w, o in zip(wrapper, other)]
    return '%.2fx (%.2f-%.2f)' % (
        statistics.median(wrapper) / statistics.median(other),
        min(per_round), max(per_round))


def table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = '  '.join('=' * w for w in widths)
    lines = [rule]
    for k, row in enumerate(rows):
        lines.append('  '.join(c.ljust(w) for c, w in zip(row, widths))
                     .rstrip())
        if k == 0:
            lines.append(rule)
    lines.append(rule)
    return '\n'.join(lines)


def report(results, cache_on):
    """The rows of the table: per line, medians over the rounds of plain,
    floor and wrapper, the ratio of the medians and the per-round range."""
    rows = [('operation', 'plain ms', 'floor ms', 'wrapper ms', 'x plain',
             'x floor', 'target', 'result')]
    ranges = [('operation', 'plain ms', 'floor ms', 'wrapper ms')]
    for op, floor, (against, target), needs_cache in LINES:
        plain = results.get(('plain', op))
        wrapper = results.get(('wrapper', op))
        if not plain or not wrapper:
            continue
        if floor is None:
            floors = None
        elif isinstance(floor, str):
            floors = results[(floor, op)]
        else:
            base, work = floor
            floors = [p + w for p, w in zip(results[('plain', base)],
                                            results[('wrapper', work)])]
        med = statistics.median
        got = med(wrapper) / (med(plain) if against == 'plain'
                              else med(floors))
        if needs_cache and not cache_on:
            result = 'n/a (%s)' % ('no cache' if not HAS_CACHE
                                   else 'cache off')
        else:
            result = 'met' if got <= target else 'missed'
        rows.append((
            op, ms(med(plain)), '-' if floors is None else ms(med(floors)),
            ms(med(wrapper)), ratio(wrapper, plain),
            '-' if floors is None else ratio(wrapper, floors),
            '<= %.2fx %s' % (target, against), result))
        ranges.append((
            op, '%s-%s' % (ms(min(plain)), ms(max(plain))),
            '-' if floors is None else '%s-%s' % (ms(min(floors)),
                                                  ms(max(floors))),
            '%s-%s' % (ms(min(wrapper)), ms(max(wrapper)))))
    return rows, ranges


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--objects', type=int, default=20000)
    parser.add_argument('--blobs', type=int, default=200)
    parser.add_argument('--only', choices=('records', 'blobs'))
    parser.add_argument('--frames', action='store_true',
                        help='also run the records floor storage without '
                             'its cipher')
    parser.add_argument('--plaintext-dir', default=None,
                        help="the wrapper's plaintext_dir (default: the "
                             "system's temporary directory)")
    parser.add_argument('--blob-cache-size', type=int, default=None,
                        help="the wrapper's blob_cache_size in bytes (0: "
                             "no cache; default: the wrapper's)")
    parser.add_argument('--blob-cache-dir', default=None,
                        help="the wrapper's blob_cache_dir (default: the "
                             "wrapper's)")
    args = parser.parse_args()
    kinds = (args.only,) if args.only else ('records', 'blobs')
    start = time.perf_counter()
    load_start = load_average()
    print('bench_storage: Python %s, ZODB %s, cryptography %s, %s cores'
          % (platform.python_version(), _version('ZODB'),
             cryptography.__version__, os.cpu_count()))
    print('load average at start: %s' % _load(load_start))

    payload = os.urandom(BLOB_SIZE)
    work = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    ctx = Context(TestingKeyManagementFacility(os.path.join(work, 'keys')),
                  args)
    variants = {'records': ('plain', 'floor', 'wrapper'),
                'blobs': ('plain', 'wrapper')}
    if args.frames:
        variants['records'] = ('plain', 'frames', 'floor', 'wrapper')
    results = {}
    try:
        for r in range(args.rounds):
            for kind in kinds:
                order = variants[kind]
                if r % 2:
                    order = order[::-1]
                for variant in order:
                    path = tempfile.mkdtemp(dir=work)
                    if kind == 'records':
                        got = run_records(path, variant, ctx, args.objects)
                    else:
                        got = run_blobs(path, variant, ctx, args.blobs,
                                        payload)
                    shutil.rmtree(path)
                    for op, seconds in got.items():
                        results.setdefault((variant, op), []).append(seconds)
            print('round %d of %d done (%.0f s)'
                  % (r + 1, args.rounds, time.perf_counter() - start),
                  file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()

    cache_line, cache_on = ctx.cache or describe_cache(None)
    print()
    print('%d rounds; %d small objects in transactions of %d; %d blobs of '
          '1 MiB, one per transaction; totals in ms, medians over the '
          'rounds; ratios: of the medians, and (min-max) of the per-round '
          'ratios' % (args.rounds, args.objects, RECORDS_PER_TRANSACTION,
                      args.blobs))
    if 'blobs' in kinds:
        print('repeat-load cache: %s; a blob copy went to %s'
              % (cache_line, os.path.dirname(ctx.copies or '?')))
        limit = getattr(ctx.cache_object, 'limit', None)
        if limit is not None and limit < args.blobs * BLOB_SIZE:
            print('the cache holds fewer bytes than the blobs: repeat '
                  'loads miss')
    rows, ranges = report(results, cache_on)
    print(table(rows))
    print()
    print('ranges over the rounds (ms):')
    print(table(ranges))
    print()
    print('floors: records, the floor storage (one bare AES-256-GCM call '
          'per record); blob commit, plain + encrypting each blob file '
          'into a new file; blob first load/read, plain + decrypting each '
          'blob file into a new file (then removing it)')
    if 'records' in kinds and args.frames:
        for op in ('records commit', 'records load'):
            frames = statistics.median(results[('frames', op)])
            plain = statistics.median(results[('plain', op)])
            print('%s, the floor storage without its cipher: %s ms (%.2fx '
                  'plain)' % (op, ms(frames), frames / plain))
    if 'blobs' in kinds:
        enc, dec = cipher_only(payload, args.blobs)
        print('AES-256-GCM alone, in memory, 256 KiB at a time, for the '
              '%d blobs: encrypt %s ms, decrypt %s ms; the work added per '
              'blob (medians): encrypt to a new file %s ms, decrypt to a '
              'new file %s ms'
              % (args.blobs, ms(enc), ms(dec),
                 ms(statistics.median(results[('wrapper', 'encrypt')])
                    / args.blobs),
                 ms(statistics.median(results[('wrapper', 'decrypt')])
                    / args.blobs)))
        print('reading the %d blob files once (written just before): in '
              'the blob directory %s ms, in the directory of the copies %s '
              'ms (medians)'
              % (args.blobs,
                 ms(statistics.median(results[('wrapper', 'read blob dir')])),
                 ms(statistics.median(results[('wrapper', 'read copies')]))))
    print()
    print('load average at start: %s; at end: %s; run took %.0f s'
          % (_load(load_start), _load(load_end),
             time.perf_counter() - start))
    if load_start is None or load_end is None:
        print('(no load average on this system: make sure the machine is '
              'quiet)')
    elif load_start[0] > QUIET_START or load_end[0] > QUIET_END:
        print('WARNING: the machine was loaded (1 minute load average '
              'above %.1f at the start or %.1f at the end; this script '
              'keeps one core busy): these figures are noise, run again '
              'on a quiet machine' % (QUIET_START, QUIET_END))
    else:
        print('the machine was quiet (1 minute load average at most %.1f '
              'at the start and %.1f at the end)' % (QUIET_START, QUIET_END))


def _load(avg):
    if avg is None:
        return 'unknown'
    return '%.2f %.2f %.2f (1, 5, 15 min)' % avg


def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return '?'


if __name__ == '__main__':
    main()
