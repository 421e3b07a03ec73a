"""Commit and load of small objects: Persistent, EncryptedPersistent, keas.kmi.

Usage: python benchmarks/bench_persistent.py [--rounds 9] [--objects 20000]
       [--keas-python PATH | --no-keas]

Each measurement runs in a fresh interpreter: it creates ``--objects``
objects (a name and a 200 character string), puts them in an ``OOBTree``
in the root of a new FileStorage and times ``transaction.commit()``; then it
opens the storage again (a fresh connection with an empty cache) and times
loading every object's state (each one is read: its string is checked).
Every variant runs ``--repeat`` times per round (3), in a new storage each
time, and the best time counts for the round.  Variants:

plain
    ``persistent.Persistent``.
zodbkmi
    ``zodbkmi.persistent.EncryptedPersistent`` with a
    ``KeyManagementFacility`` and an AES-256 key encrypting key.
parents
    zodbkmi, each object with a ``__parent__``: one of 100 plain
    ``EncryptedPersistent`` folders (the base line of ``tenants``).
tenants
    zodbkmi, each object with a ``__parent__``: one of 100 tenants
    (``ITenant`` folders), each with a KEK of its own in a tenant
    registry (``docs/tenants.rst``): commits choose the key per object,
    loads open with a ring of 101 KEKs.  The cost of choosing the key is
    ``tenants - parents``, printed relative to plain.
keas.kmi
    keas.kmi 3.3.0's ``EncryptedPersistent`` with its
    ``KeyManagementFacility``; installed from PyPI into a virtual
    environment in a temporary directory (``python3 -m venv``, ``pip
    install keas.kmi==3.3.0 ZODB zope.component``) unless ``--keas-python``
    names an interpreter that has it.

The variants alternate in every round (the order rotates); the ratios
printed are medians of the per-round ratios to plain, of CPU time (user +
system time of the process, which other processes on a shared machine
disturb much less) and of wall time.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
KEAS_REQUIREMENTS = ['keas.kmi==3.3.0', 'ZODB', 'zope.component']
VARIANTS = ('plain', 'zodbkmi', 'parents', 'tenants', 'keas.kmi')
TENANTS = 100


# -- one measurement, in a fresh interpreter ----------------------------------

def _classes(variant, workdir):
    """Return the class to store, after registering what it needs."""
    if variant == 'plain':
        from persistent import Persistent as base
    elif variant in ('zodbkmi', 'parents', 'tenants'):
        from zope.component import provideUtility
        from zope.interface import implementer

        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.interfaces import IKeyHolder
        from zodbkmi.persistent import EncryptedPersistent as base

        @implementer(IKeyHolder)
        class Holder:
            key = os.urandom(32)     # an AES-256 key encrypting key
        facility = KeyManagementFacility(os.path.join(workdir, 'keys'))
        facility.create_key(Holder.key)
        provideUtility(facility)
        provideUtility(Holder())
        if variant != 'zodbkmi':
            _folders(variant, facility, workdir)
    else:
        from keas.kmi.facility import KeyManagementFacility
        from keas.kmi.interfaces import IEncryptionService
        from keas.kmi.interfaces import IKeyHolder
        from keas.kmi.persistent import EncryptedPersistent as base
        from zope.component import provideUtility
        from zope.interface import implementer

        facility = KeyManagementFacility(os.path.join(workdir, 'keys'))
        os.mkdir(facility.storage_dir)

        @implementer(IKeyHolder)
        class Holder:
            key = facility.generate()
        provideUtility(facility, IEncryptionService)
        provideUtility(Holder())

    class Item(base):
        def __init__(self, name, data):
            self.name = name
            self.data = data
            if FOLDERS:
                self.__parent__ = FOLDERS[len(name) and int(name[4:])
                                          % len(FOLDERS)]
    Item.__module__ = '__main__'
    sys.modules['__main__'].Item = Item
    return Item


FOLDERS = []


def _folders(variant, facility, workdir):
    """The 100 parents of the items: tenants with keys of their own, or
    plain folders."""
    from zope.interface import implementer

    from zodbkmi.interfaces import ITenant
    from zodbkmi.persistent import EncryptedPersistent
    from zodbkmi import tenants

    class Folder(EncryptedPersistent):
        pass
    Folder.__module__ = '__main__'
    sys.modules['__main__'].Folder = Folder
    if variant == 'tenants':
        implementer(ITenant)(Folder)
        registry = tenants.TenantRegistry(os.path.join(workdir, 'tenants'))
        for i in range(TENANTS):
            registry.create('t%03d' % i, facility)
        tenants.register_tenants(registry)
    FOLDER_CLASS.append(Folder)


FOLDER_CLASS = []


def _new_folders():
    """New parents (a new storage each time)."""
    del FOLDERS[:]
    for cls in FOLDER_CLASS:
        for i in range(TENANTS):
            folder = cls()
            folder.tenant_id = 't%03d' % i
            FOLDERS.append(folder)


def worker(variant, workdir, count, repeat):
    """Best of ``repeat`` commits and loads, each in a new storage."""
    item = _classes(variant, workdir)
    best = {}
    for i in range(repeat):
        path = os.path.join(workdir, 'Data%d.fs' % i)
        result = _commit_and_load(item, path, count)
        for k, v in result.items():
            best[k] = min(best.get(k, v), v)
    return best


def _commit_and_load(item, path, count):
    import gc

    import transaction
    import ZODB
    import ZODB.FileStorage
    from BTrees.OOBTree import OOBTree

    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    conn = db.open()
    _new_folders()
    tree = OOBTree()
    for i in range(count):
        name = 'item%06d' % i
        tree[name] = item(name, os.urandom(100).hex())
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    conn.root()['items'] = tree
    conn.root()['folders'] = list(FOLDERS)
    transaction.commit()
    commit = time.perf_counter() - start
    commit_cpu = time.process_time() - cpu
    conn.close()
    db.close()
    size = os.path.getsize(path)

    db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
    conn = db.open()
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    total = 0
    for obj in conn.root()['items'].values():
        total += len(obj.data)
    load = time.perf_counter() - start
    load_cpu = time.process_time() - cpu
    assert total == 200 * count, total
    assert conn._load_count >= count, conn._load_count
    db.close()
    return {'commit': commit, 'load': load, 'commit_cpu': commit_cpu,
            'load_cpu': load_cpu, 'size': size}


# -- the driver ---------------------------------------------------------------

def keas_environment(tmp):
    """Create a virtual environment with keas.kmi 3.3.0; return its python
    or None (with the reason printed) if it cannot be installed."""
    env = os.path.join(tmp, 'keas-venv')
    try:
        subprocess.run([sys.executable, '-m', 'venv', env], check=True,
                       capture_output=True, timeout=300)
        python = os.path.join(env, 'bin', 'python')
        subprocess.run([python, '-m', 'pip', 'install', '-q']
                       + KEAS_REQUIREMENTS,
                       check=True, capture_output=True, timeout=900)
        subprocess.run([python, '-c', 'import keas.kmi.persistent'],
                       check=True, capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as e:
        detail = getattr(e, 'stderr', b'') or b''
        print('keas.kmi 3.3.0 cannot be installed: %s %s'
              % (e, detail.decode(errors='replace')[-500:]))
        return None
    return python


def measure(python, variant, tmp, count, repeat):
    workdir = tempfile.mkdtemp(dir=tmp)
    try:
        proc = subprocess.run(
            [python, HERE, '--worker', variant, '--workdir', workdir,
             '--objects', str(count), '--repeat', str(repeat)],
            capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise RuntimeError('%s failed:\n%s' % (variant, proc.stderr))
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def versions(python, modules):
    code = ('import importlib.metadata as m, sys; '
            'print(sys.version.split()[0],'
            ' *[n + " " + m.version(n) for n in sys.argv[1:]], sep=", ")')
    return subprocess.run([python, '-c', code] + modules, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--objects', type=int, default=20000)
    parser.add_argument('--repeat', type=int, default=3,
                        help='measurements per variant and round (the best '
                        'counts)')
    parser.add_argument('--keas-python', help='a Python with keas.kmi 3.3.0')
    parser.add_argument('--no-keas', action='store_true')
    parser.add_argument('--worker', choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument('--workdir', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.objects,
                                args.repeat)))
        return 0

    tmp = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    try:
        pythons = {'plain': sys.executable, 'zodbkmi': sys.executable,
                   'parents': sys.executable, 'tenants': sys.executable}
        if not args.no_keas:
            keas = args.keas_python or keas_environment(tmp)
            if keas:
                pythons['keas.kmi'] = keas
        variants = [v for v in VARIANTS if v in pythons]
        print('%d objects (name + 200 characters) in an OOBTree, FileStorage;'
              ' %d rounds, best of %d' % (args.objects, args.rounds,
                                          args.repeat))
        print('zodbkmi environment: %s' % versions(
            sys.executable, ['ZODB', 'persistent', 'cryptography']))
        if 'keas.kmi' in pythons:
            print('keas.kmi environment: %s' % versions(
                pythons['keas.kmi'], ['keas.kmi', 'ZODB', 'pycryptodome']))
        results = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for variant in order:
                results[variant].append(
                    measure(pythons[variant], variant, tmp, args.objects,
                            args.repeat))
            print('round %d (commit/load, us CPU per object): %s' % (
                r + 1, ', '.join('%s %.2f/%.2f' % (
                    v, results[v][-1]['commit_cpu'] / args.objects * 1e6,
                    results[v][-1]['load_cpu'] / args.objects * 1e6)
                    for v in variants)), flush=True)
        print()
        print('%-9s %9s %9s %8s %8s %9s %9s %6s' % (
            'variant', 'commit', 'load', 'commit', 'load', 'commit',
            'load', 'bytes'))
        print('%-9s %9s %9s %8s %8s %9s %9s %6s' % (
            '', 'us CPU', 'us CPU', 'CPU', 'CPU', 'wall', 'wall',
            '/obj'))
        plain = results['plain']

        def ratio(res, key):
            return statistics.median(x[key] / p[key]
                                     for x, p in zip(res, plain))
        for v in variants:
            res = results[v]
            extra = statistics.median((x['size'] - p['size']) / args.objects
                                      for x, p in zip(res, plain))
            print('%-9s %9.2f %9.2f %7.2fx %7.2fx %8.2fx %8.2fx %+6.1f' % (
                v,
                statistics.median(x['commit_cpu'] for x in res)
                / args.objects * 1e6,
                statistics.median(x['load_cpu'] for x in res)
                / args.objects * 1e6,
                ratio(res, 'commit_cpu'), ratio(res, 'load_cpu'),
                ratio(res, 'commit'), ratio(res, 'load'), extra))
        if 'keas.kmi' not in pythons:
            print('keas.kmi: not measured (not installed)')
        res = results['zodbkmi']
        r_commit, r_load = ratio(res, 'commit_cpu'), ratio(res, 'load_cpu')
        extra = statistics.median((x['size'] - p['size']) / args.objects
                                  for x, p in zip(res, plain))
        print('targets (zodbkmi): commit %.3fx and load %.3fx CPU <= 1.15x: '
              '%s; %+.1f bytes per object <= 64: %s' % (
                  r_commit, r_load,
                  'met' if max(r_commit, r_load) <= 1.15 else 'NOT MET',
                  extra, 'met' if extra <= 64 else 'NOT MET'))
        t_commit = statistics.median(
            (t['commit_cpu'] - b['commit_cpu']) / p['commit_cpu']
            for t, b, p in zip(results['tenants'], results['parents'], plain))
        t_load = statistics.median(
            (t['load_cpu'] - b['load_cpu']) / p['load_cpu']
            for t, b, p in zip(results['tenants'], results['parents'], plain))
        print('targets (tenants - parents, %d tenants): commit %+.3fx and '
              'load %+.3fx of plain CPU <= 0.05x: %s' % (
                  TENANTS, t_commit, t_load,
                  'met' if max(t_commit, t_load) <= 0.05 else 'NOT MET'))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
