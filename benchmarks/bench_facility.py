"""Cost of encrypt+decrypt of a 300-byte payload: facility vs raw AES-GCM.

Usage: python benchmarks/bench_facility.py [--rounds 9] [--number 50000]

The raw baselines are what any correct use of AES-GCM from ``cryptography``
must do per message: draw a fresh random 96-bit nonce (``os.urandom``),
encrypt, decrypt; the second baseline also authenticates a 38 byte header,
as the envelope (version 2) does.  Variants alternate within each round;
the ratios are medians of the per-round ratios.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import timeit

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zodbkmi.facility import KeyManagementFacility


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--number', type=int, default=50000)
    parser.add_argument('--size', type=int, default=300)
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    try:
        facility = KeyManagementFacility(os.path.join(tmp, 'keys'))
        kek = facility.generate()
        data = os.urandom(args.size)
        aead = AESGCM(os.urandom(32))
        header = os.urandom(38)

        def raw():
            nonce = os.urandom(12)
            aead.decrypt(nonce, aead.encrypt(nonce, data, None), None)

        def raw_aad():
            nonce = os.urandom(12)
            aead.decrypt(nonce, aead.encrypt(nonce, data, header), header)

        def ours():
            facility.decrypt(kek, facility.encrypt(kek, data))

        ours()
        variants = [('raw AES-GCM', raw),
                    ('raw AES-GCM + header AAD', raw_aad),
                    ('KeyManagementFacility', ours)]
        times = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, fn in variants:
                t = timeit.timeit(fn, number=args.number)
                times[name].append(t / args.number * 1e6)
        r1 = statistics.median(o / r for o, r in zip(
            times['KeyManagementFacility'], times['raw AES-GCM']))
        r2 = statistics.median(o / r for o, r in zip(
            times['KeyManagementFacility'],
            times['raw AES-GCM + header AAD']))
        print('encrypt+decrypt of %d bytes, %d rounds x %d calls (Python %s)'
              % (args.size, args.rounds, args.number, sys.version.split()[0]))
        print('%-28s %10s' % ('variant', 'us/op'))
        for name, _ in variants:
            print('%-28s %10.2f' % (name, statistics.median(times[name])))
        print('ratio facility / raw AES-GCM:              %.2fx' % r1)
        print('ratio facility / raw AES-GCM + header AAD: %.2fx' % r2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
