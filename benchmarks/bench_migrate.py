"""Benchmark migrations: encrypt and rekey next to a plain copy.

Usage: python benchmarks/bench_migrate.py [--objects 100000] [--rounds 3]
                                          [--chunk-size 1000]

Builds a FileStorage of ``--objects`` small objects, then in each round runs,
each in a fresh process (so that its peak memory is its own):

- ``copy``: ``FileStorage.copyTransactionsFrom`` of the database into a new
  file (the plain copy a migration is compared with);
- ``encrypt``: ``zodbkmi migrate encrypt`` (storage level) of a copy of the
  plaintext database;
- ``rekey``: ``zodbkmi migrate rekey`` of a copy of the encrypted database
  to a new KEK.

The variants alternate within each round; medians are printed, with the
ratio to the plain copy and the peak RSS.  ``--objects`` at a quarter of the
size shows how peak memory depends on the size of the database.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def build(path, count):
    import transaction
    import ZODB
    import ZODB.FileStorage
    from BTrees.IOBTree import IOBTree
    from persistent.mapping import PersistentMapping
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tree = conn.root()['tree'] = IOBTree()
    for i in range(count):
        tree[i] = PersistentMapping(n=i, text='secret %d' % i,
                                    pad='x' * 100)
        if i % 10000 == 9999:
            tm.commit()
            conn.cacheMinimize()
    tm.commit()
    conn.close()
    db.close()


def child(variant, src, work, chunk_size):
    """Run one variant; print seconds and peak RSS as JSON."""
    import base64
    import ZODB.FileStorage
    from zodbkmi import migrate
    from zodbkmi.facility import KeyManagementFacility
    from zodbkmi.kek import AESKeyEncryptingKey
    keys = json.loads(os.environ['BENCH_KEYS'])
    kek1 = AESKeyEncryptingKey(base64.b64decode(keys['old']))
    kek2 = AESKeyEncryptingKey(base64.b64decode(keys['new']))
    start = time.perf_counter()
    if variant == 'copy':
        source = ZODB.FileStorage.FileStorage(src, read_only=True)
        dest = ZODB.FileStorage.FileStorage(work)
        dest.copyTransactionsFrom(source)
        source.close()
        dest.close()
    else:
        facility = KeyManagementFacility(keys['dir'])
        if variant == 'encrypt':
            mkeys = migrate.MigrationKeys(facility, kek1)
        else:
            mkeys = migrate.MigrationKeys(facility, kek2, [kek1])
        storage = ZODB.FileStorage.FileStorage(work)
        report = migrate.Migration(
            storage, migrate.RecordTransformer(mkeys), variant,
            chunk_size=chunk_size).run()
        storage.close()
        assert report.failed == 0 and report.rewritten, report.format()
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'seconds': seconds, 'rss_kb': rss}))


def copy_fs(src, dst):
    """Copy a FileStorage with its index (as a backup copy would)."""
    shutil.copy(src, dst)
    if os.path.exists(src + '.index'):
        shutil.copy(src + '.index', dst + '.index')


def run_child(variant, src, work, chunk_size, env):
    proc = subprocess.run(
        [sys.executable, __file__, '--child', variant, src, work,
         str(chunk_size)], env=env, capture_output=True, text=True,
        check=True)
    return json.loads(proc.stdout)


def measure(objects, rounds, chunk_size):
    import base64
    tmp = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    try:
        plain = os.path.join(tmp, 'plain.fs')
        build(plain, objects)
        env = dict(os.environ, BENCH_KEYS=json.dumps({
            'dir': os.path.join(tmp, 'keys'),
            'old': base64.b64encode(os.urandom(32)).decode(),
            'new': base64.b64encode(os.urandom(32)).decode()}))
        results = {'copy': [], 'encrypt': [], 'rekey': []}
        encrypted = os.path.join(tmp, 'encrypted.fs')
        for _ in range(rounds):
            for variant in ('copy', 'encrypt', 'rekey'):
                work = os.path.join(tmp, 'work.fs')
                for suffix in ('', '.index', '.tmp', '.lock'):
                    if os.path.exists(work + suffix):
                        os.remove(work + suffix)
                if variant == 'encrypt':
                    copy_fs(plain, work)
                elif variant == 'rekey':
                    if not os.path.exists(encrypted):
                        copy_fs(plain, encrypted)
                        run_child('encrypt', plain, encrypted, chunk_size,
                                  env)
                    copy_fs(encrypted, work)
                results[variant].append(
                    run_child(variant, plain, work, chunk_size, env))
        return results
    finally:
        shutil.rmtree(tmp, True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '--child':
        return child(argv[1], argv[2], argv[3], int(argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--objects', type=int, default=100000)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--chunk-size', type=int, default=1000)
    args = parser.parse_args(argv)
    results = measure(args.objects, args.rounds, args.chunk_size)
    copy = statistics.median(r['seconds'] for r in results['copy'])
    print('%d objects, %d rounds, chunk size %d (medians)'
          % (args.objects, args.rounds, args.chunk_size))
    print('%-8s %9s %12s %9s %12s'
          % ('variant', 'seconds', 'objects/s', 'x copy', 'peak RSS MB'))
    for variant in ('copy', 'encrypt', 'rekey'):
        seconds = statistics.median(r['seconds'] for r in results[variant])
        rss = statistics.median(r['rss_kb'] for r in results[variant])
        print('%-8s %9.2f %12.0f %9.2f %12.1f'
              % (variant, seconds, args.objects / seconds, seconds / copy,
                 rss / 1024))


if __name__ == '__main__':
    main()
