"""Benchmark: plain FileStorage vs EncryptingStorage around it.

Commit and load of N small objects and of B blobs of 1 MiB, variants
alternating within each round; prints medians and ratios, and the floor
of an encrypted blob load: the plain load plus decrypting every blob file
into a new file, which ZODB's loadBlob contract makes every wrapper do.
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

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

from zodbkmi.storage import EncryptingStorage
from zodbkmi.testing import KeyEncryptingKey
from zodbkmi.testing import TestingKeyManagementFacility


PLAINTEXT_DIR = None


def open_storage(path, encrypted, facility):
    base = ZODB.FileStorage.FileStorage(
        os.path.join(path, 'Data.fs'), blob_dir=os.path.join(path, 'blobs'))
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
            order = (False, True) if r % 2 == 0 else (True, False)
            for encrypted in order:
                for kind in ('records', 'blobs'):
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
    plain = statistics.median(results['blobs', 'load', False])
    enc = statistics.median(results['blobs', 'load', True])
    floor = plain + statistics.median(decrypts)
    print('blob load floor: plain load + decrypting each blob into a new '
          'file, %.3f s (%.2fx plain); the wrapper is at %.2fx that floor'
          % (floor, floor / plain, enc / floor))


if __name__ == '__main__':
    main()
