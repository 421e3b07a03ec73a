"""Benchmark: plain FileStorage vs EncryptingStorage around it.

Commit and load of N small objects and of B blobs of 1 MiB, variants
alternating within each round; prints medians and ratios.  Usage:
python benchmarks/bench_storage.py [--rounds 9] [--objects 20000]
[--blobs 200]
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


def open_storage(path, encrypted, facility):
    base = ZODB.FileStorage.FileStorage(
        os.path.join(path, 'Data.fs'), blob_dir=os.path.join(path, 'blobs'))
    if encrypted:
        return EncryptingStorage(base, facility, KeyEncryptingKey)
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
    conn.close()
    db.close()
    return commit, load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--objects', type=int, default=20000)
    parser.add_argument('--blobs', type=int, default=200)
    args = parser.parse_args()
    payload = os.urandom(1 << 20)
    work = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    facility = TestingKeyManagementFacility(os.path.join(work, 'keys'))
    results = {}
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
                        c, l = run_blobs(path, encrypted, facility,
                                         args.blobs, payload)
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


if __name__ == '__main__':
    main()
