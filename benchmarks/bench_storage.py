"""Benchmark: plain FileStorage vs EncryptingStorage around it.

Commit and load of N small objects and of B blobs of 1 MiB, variants
alternating within each round; prints medians and ratios, and two floors:
for records, a wrapper that is nothing but one AES-256-GCM call per record
(no format, no key management; what any AES-GCM wrapper pays), also run
without its cipher; for blobs, the plain load plus decrypting every blob
file into a new file, which ZODB's loadBlob contract makes every wrapper
do.
Usage:
python benchmarks/bench_storage.py [--rounds 9] [--objects 20000]
[--blobs 200] [--plaintext-dir DIR]
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import itertools

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
import zope.interface
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from persistent.mapping import PersistentMapping

from zodbkmi.storage import EncryptingStorage
from zodbkmi.testing import KeyEncryptingKey
from zodbkmi.testing import TestingKeyManagementFacility


PLAINTEXT_DIR = None
FLOOR_KEY = AESGCM.generate_key(256)


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


def open_storage(path, encrypted, facility):
    base = ZODB.FileStorage.FileStorage(
        os.path.join(path, 'Data.fs'), blob_dir=os.path.join(path, 'blobs'))
    if encrypted == 'floor':
        return AESGCMFloorStorage(base)
    if encrypted == 'frames':
        return FramesOnlyStorage(base)
    if encrypted:
        return EncryptingStorage(base, facility, KeyEncryptingKey,
                                 plaintext_dir=PLAINTEXT_DIR)
    return base


def run_records(path, encrypted, facility, n):
    db = ZODB.DB(open_storage(path, encrypted, facility), cache_size=10)
    conn = db.open()
    root = conn.root()
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        for j in range(i, min(n, i + 1000)):
            root[j] = PersistentMapping(name='object %d' % j, value=j)
        transaction.commit()
    commit = time.perf_counter() - t0
    conn.close()
    db.close()
    db = ZODB.DB(open_storage(path, encrypted, facility), cache_size=10)
    conn = db.open()
    root = conn.root()
    t0 = time.perf_counter()
    for j in range(n):
        root[j]['value']
        root[j]._p_deactivate()
    load = time.perf_counter() - t0
    conn.close()
    db.close()
    return commit, load


def run_blobs(path, encrypted, facility, n, payload):
    db = ZODB.DB(open_storage(path, encrypted, facility))
    conn = db.open()
    root = conn.root()
    t0 = time.perf_counter()
    for i in range(n):
        root[i] = ZODB.blob.Blob(payload)
        transaction.commit()
    commit = time.perf_counter() - t0
    conn.close()
    db.close()
    db = ZODB.DB(open_storage(path, encrypted, facility))
    conn = db.open()
    root = conn.root()
    t0 = time.perf_counter()
    for i in range(n):
        with root[i].open() as f:
            f.read()
        transaction.abort()
    load = time.perf_counter() - t0
    oids = [(root[i]._p_oid, root[i]._p_serial) for i in range(n)]
    conn.close()
    db.close()
    return commit, load, decrypt_only(path, facility, oids) if encrypted else 0


def decrypt_only(path, facility, oids):
    """The work any wrapper must add to a blob load, since ZODB asks for a
    plaintext file of every blob it loads: decrypt each blob file into a
    new file, then remove it (no ZODB)."""
    storage = open_storage(path, False, facility)
    out = tempfile.mkdtemp(dir=PLAINTEXT_DIR or path)
    try:
        t0 = time.perf_counter()
        for oid, serial in oids:
            name = os.path.join(out, oid.hex())
            with open(storage.loadBlob(oid, serial), 'rb',
                      buffering=0) as src, \
                    open(name, 'wb', buffering=0) as dst:
                facility.decrypt_file(KeyEncryptingKey, src, dst, oid=oid)
            os.remove(name)
        return time.perf_counter() - t0
    finally:
        storage.close()
        os.rmdir(out)


def cipher_only(payload, n, chunk=256 << 10):
    """Seconds to AES-256-GCM-decrypt ``n`` blobs like ``payload`` in
    memory, in 256 KiB chunks as the stream format does (median of 5)."""
    aead = AESGCM(FLOOR_KEY)
    nonce = bytes(12)
    sealed = [aead.encrypt(nonce, payload[i:i + chunk], None)
              for i in range(0, len(payload), chunk)]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            for c in sealed:
                aead.decrypt(nonce, c, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--objects', type=int, default=20000)
    parser.add_argument('--blobs', type=int, default=200)
    parser.add_argument('--plaintext-dir', default=None,
                        help="the wrapper's plaintext_dir (default: the "
                             "system's temporary directory)")
    args = parser.parse_args()
    global PLAINTEXT_DIR
    PLAINTEXT_DIR = args.plaintext_dir
    payload = os.urandom(1 << 20)
    work = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    facility = TestingKeyManagementFacility(os.path.join(work, 'keys'))
    results = {}
    decrypts = []
    try:
        for r in range(args.rounds):
            order = ((False, 'frames', 'floor', True) if r % 2 == 0
                     else (True, 'floor', 'frames', False))
            for encrypted in order:
                for kind in ('records', 'blobs'):
                    if encrypted in ('floor', 'frames') and kind == 'blobs':
                        continue
                    path = tempfile.mkdtemp(dir=work)
                    if kind == 'records':
                        c, l = run_records(path, encrypted, facility,
                                           args.objects)
                    else:
                        c, l, d = run_blobs(path, encrypted, facility,
                                            args.blobs, payload)
                        if encrypted:
                            decrypts.append(d)
                    shutil.rmtree(path)
                    results.setdefault((kind, 'commit', encrypted), []).append(c)
                    results.setdefault((kind, 'load', encrypted), []).append(l)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print('%d rounds; %d small objects, %d blobs of 1 MiB; medians in s'
          % (args.rounds, args.objects, args.blobs))
    print('%-16s %10s %10s %7s' % ('operation', 'plain', 'encrypted',
                                   'ratio'))
    for kind in ('records', 'blobs'):
        for op in ('commit', 'load'):
            plain = statistics.median(results[kind, op, False])
            enc = statistics.median(results[kind, op, True])
            print('%-16s %10.3f %10.3f %6.2fx' % ('%s %s' % (kind, op),
                                                   plain, enc, enc / plain))
    for op in ('commit', 'load'):
        plain = statistics.median(results['records', op, False])
        frames = statistics.median(results['records', op, 'frames'])
        floor = statistics.median(results['records', op, 'floor'])
        enc = statistics.median(results['records', op, True])
        print('records %s, the floor storage without its cipher: %.3f s '
              '(%.2fx plain)' % (op, frames, frames / plain))
        print('records %s floor: one AES-GCM call per record, %.3f s '
              '(%.2fx plain); the wrapper is at %.2fx that floor'
              % (op, floor, floor / plain, enc / floor))
    plain = statistics.median(results['blobs', 'load', False])
    enc = statistics.median(results['blobs', 'load', True])
    cipher = plain + cipher_only(payload, args.blobs)
    print('blob load cipher floor: plain load + AES-GCM of every blob in '
          'memory, %.3f s (%.2fx plain)' % (cipher, cipher / plain))
    floor = plain + statistics.median(decrypts)
    print('blob load floor: plain load + decrypting each blob into a new '
          'file, %.3f s (%.2fx plain); the wrapper is at %.2fx that floor'
          % (floor, floor / plain, enc / floor))


if __name__ == '__main__':
    main()
