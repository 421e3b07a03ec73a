"""Throughput of the stream format on a 1 GiB file, next to plain copies.

Usage: python benchmarks/bench_stream.py [--rounds 5] [--size-mib 1024]
                                         [--dir DIR]

Variants, alternating within each round (the file-to-file ones in an
order rotated from round to round), all on the same source file (random
bytes, in the page cache after the first round):

- ``AES-GCM alone``: ``encrypt_into`` of 64 KiB chunks from memory, the
  ceiling;
- ``read + AES-GCM loop``: ``readinto`` of the file and ``encrypt_into``,
  no format, output dropped;
- ``encrypt_file -> /dev/null`` and ``decrypt_file -> /dev/null``:
  ``facility.encrypt_file`` / ``decrypt_file`` (64 KiB chunks, and 1 MiB
  chunks for comparison);
- file to file: ``encrypt_file`` and ``decrypt_file`` writing a file
  (both files unbuffered, as ``zodbkmi encrypt-file`` opens them),
  next to a plain copy of the same file made in Python (``readinto`` and
  ``write`` of 64 KiB, a preallocated buffer) and by the kernel
  (``copy_file_range``, no copy through user space).  Each of the four
  runs twice: into a new file (removed afterwards), and over the pages of
  an existing file as large, without truncating it ("overwrite"): that
  one measures the copies and the cryptography without the allocation of
  1 GiB of fresh page cache, whose cost varies from pass to pass on a
  virtual machine that hands freed memory back to its host (see
  docs/performance.rst).  Before each variant ``os.sync()`` writes the
  dirty pages of the previous one back (not timed).

Throughput is plaintext bytes per second (GB = 10**9 bytes); the table
gives medians over the rounds, the ratios are medians of per-round ratios.
Then the peak resident memory of ``zodbkmi encrypt-file`` and
``decrypt-file`` on a small and on the large file, each measured in its own
process.
"""
import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zodbkmi.facility import KeyManagementFacility
from zodbkmi.keyholder import write_key_file

MiB = 1 << 20
CHUNK = 1 << 16
COPY_PYTHON = 'plain copy, Python, %s'
COPY_KERNEL = 'plain copy, kernel, %s'
ENCRYPT_FILE = 'encrypt_file file -> %s'
DECRYPT_FILE = 'decrypt_file file -> %s'

MEASURE = """
import os, sys
pid = os.posix_spawn(sys.executable,
                     [sys.executable, '-m', 'zodbkmi.cli'] + sys.argv[1:],
                     os.environ)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def make_source(path, size):
    with open(path, 'wb') as f:
        for i in range(size // MiB):
            f.write(os.urandom(MiB))


def peak_rss(args, stdin, cwd):
    """Peak RSS (MiB) of ``zodbkmi ARGS`` in a process of its own."""
    with open(stdin, 'rb') as f:
        out = subprocess.run(
            [sys.executable, '-c', MEASURE] + args, stdin=f, cwd=cwd,
            stdout=subprocess.PIPE, check=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    return int(out.stdout.split()[-1]) / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--size-mib', type=int, default=1024)
    parser.add_argument('--dir', default=None,
                        help='where to write the files (default: a '
                             'temporary directory)')
    args = parser.parse_args(argv)
    size = args.size_mib * MiB

    tmp = tempfile.mkdtemp(prefix='zodbkmi-bench-stream-', dir=args.dir)
    try:
        src = os.path.join(tmp, 'source')
        enc64 = os.path.join(tmp, 'source.zks')
        enc1m = os.path.join(tmp, 'source-1m.zks')
        out = os.path.join(tmp, 'out')
        make_source(src, size)
        facility = KeyManagementFacility(os.path.join(tmp, 'keys'))
        kek = os.urandom(32)
        facility.create_key(kek)
        write_key_file(os.path.join(tmp, 'kek.key'), kek)
        with open(src, 'rb') as f, open(enc64, 'wb') as g:
            facility.encrypt_file(kek, f, g)
        with open(src, 'rb') as f, open(enc1m, 'wb') as g:
            facility.encrypt_file(kek, f, g, chunk_size=MiB)

        aead = AESGCM(os.urandom(32))

        def aes_alone():
            buf, dst = bytearray(CHUNK), bytearray(CHUNK + 16)
            nonce = bytes(12)
            for _ in range(size // CHUNK):
                aead.encrypt_into(nonce, buf, None, dst)

        def read_loop():
            buf, dst = bytearray(CHUNK), bytearray(CHUNK + 16)
            nonce = bytes(12)
            with open(src, 'rb', buffering=0) as f:
                while f.readinto(buf):
                    aead.encrypt_into(nonce, buf, None, dst)

        def enc_null(chunk_size=None):
            with open(src, 'rb') as f, open(os.devnull, 'wb') as g:
                facility.encrypt_file(kek, f, g, chunk_size)

        def dec_null(path=enc64):
            with open(path, 'rb') as f, open(os.devnull, 'wb') as g:
                facility.decrypt_file(kek, f, g)

        over = os.path.join(tmp, 'overwritten')
        shutil.copyfile(enc64, over)      # as large as the largest output

        def target(overwrite):
            if overwrite:
                return open(over, 'r+b', buffering=0)
            return open(out, 'wb', buffering=0)

        def copy_python(overwrite):
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            with open(src, 'rb', buffering=0) as f, target(overwrite) as g:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    g.write(view[:n])

        def copy_kernel(overwrite):
            with open(src, 'rb', buffering=0) as f, target(overwrite) as g:
                while os.copy_file_range(f.fileno(), g.fileno(), 1 << 30):
                    pass

        def enc_file(overwrite):
            with open(src, 'rb', buffering=0) as f, target(overwrite) as g:
                facility.encrypt_file(kek, f, g)

        def dec_file(overwrite):
            with open(enc64, 'rb', buffering=0) as f, \
                    target(overwrite) as g:
                facility.decrypt_file(kek, f, g)

        variants = [
            ('AES-GCM alone (64 KiB, memory)', aes_alone),
            ('read + AES-GCM loop', read_loop),
            ('encrypt_file -> /dev/null', enc_null),
            ('decrypt_file -> /dev/null', dec_null),
            ('encrypt_file -> /dev/null, 1 MiB chunks',
             lambda: enc_null(MiB)),
            ('decrypt_file -> /dev/null, 1 MiB chunks',
             lambda: dec_null(enc1m)),
        ]
        for mode, overwrite in (('new file', False), ('overwrite', True)):
            variants += [
                (name % mode, functools.partial(fn, overwrite))
                for name, fn in ((COPY_PYTHON, copy_python),
                                 (COPY_KERNEL, copy_kernel),
                                 (ENCRYPT_FILE, enc_file),
                                 (DECRYPT_FILE, dec_file))]
        rates = {name: [] for name, _ in variants}
        fixed = len(variants) - 8
        for r in range(args.rounds):
            # the eight file-to-file variants start at another one each
            # round, so that no variant always runs first or after the
            # same other one
            files = variants[fixed:]
            k = (3 * r) % len(files)
            for name, fn in variants[:fixed] + files[k:] + files[:k]:
                os.sync()     # start each variant without dirty pages
                t = time.perf_counter()
                fn()
                t = time.perf_counter() - t
                rates[name].append(size / t / 1e9)
                if os.path.exists(out):
                    os.unlink(out)

        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(rates[a],
                                                           rates[b]))

        print('stream format, %d MiB file, %d rounds (Python %s, %d CPUs)'
              % (args.size_mib, args.rounds, sys.version.split()[0],
                 os.cpu_count()))
        print('%-42s %8s' % ('variant', 'GB/s'))
        for name, _ in variants:
            print('%-42s %8.2f' % (name, statistics.median(rates[name])))
        print()
        for name in ('encrypt_file -> /dev/null',
                     'decrypt_file -> /dev/null'):
            print('%-42s %7.0f%% of the read + AES-GCM loop'
                  % (name, 100 * ratio(name, 'read + AES-GCM loop')))
        for mode in ('new file', 'overwrite'):
            for name in (ENCRYPT_FILE, DECRYPT_FILE):
                for copy in (COPY_PYTHON, COPY_KERNEL):
                    print('%-42s %7.0f%% of %s'
                          % (name % mode,
                             100 * ratio(name % mode, copy % mode),
                             copy % mode))

        print()
        small = os.path.join(tmp, 'small')
        make_source(small, 16 * MiB)
        key = ['-k', 'kek.key', '-d', 'keys']
        sizes = (('16 MiB', small), ('%d MiB' % args.size_mib, src))
        for label, path in sizes:
            e = peak_rss(['encrypt-file'] + key + ['-o', 'rss.zks', '-f'],
                         path, tmp)
            d = peak_rss(['decrypt-file'] + key + ['-o', os.devnull],
                         os.path.join(tmp, 'rss.zks'), tmp)
            print('peak RSS, %-8s encrypt-file %.1f MiB, decrypt-file '
                  '%.1f MiB' % (label, e, d))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
