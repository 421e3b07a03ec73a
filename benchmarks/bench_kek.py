"""Cost of wrapping and unwrapping one DEK: RSA-3072 and the hybrid KEK.

Usage: python benchmarks/bench_kek.py [--rounds 7] [--number 200]

Measures, per DEK, ``wrapped.wrap`` and ``wrapped.unwrap`` of a key store
wrapping (format version 2: RSA-OAEP + RSA-PSS, HPKE ML-KEM-768+X25519 +
HMAC) and of a ``--recipient`` wrapping made with the public key alone
(version 1), with an AES-256 KEK for scale; and the generation of a KEK.
Variants alternate within each round; figures are medians over the
rounds, ratios are medians of per-round ratios to RSA-3072.
"""
import argparse
import os
import statistics
import sys
import timeit

from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.kek import HybridKeyEncryptingKey
from zodbkmi.kek import RSAKeyEncryptingKey


def _pairs(kek, version):
    """(wrap, unwrap) callables for ``kek`` in wrapped-DEK ``version``."""
    dek_id, dek = os.urandom(16), os.urandom(32)
    writer = kek.public() if version == 1 else kek
    data = wrapped.wrap(writer, dek_id, dek, version=version)
    return (lambda: wrapped.wrap(writer, dek_id, dek, version=version),
            lambda: wrapped.unwrap(kek, data))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--number', type=int, default=200)
    args = parser.parse_args(argv)
    rsa = RSAKeyEncryptingKey.generate()
    hybrid = HybridKeyEncryptingKey.generate()
    aes = AESKeyEncryptingKey.generate()
    rows = [  # (name, group, callable); group: what the ratio compares to
        ('RSA-3072 key store (v2)', 'store', _pairs(rsa, 2)),
        ('hybrid key store (v2)', 'store', _pairs(hybrid, 2)),
        ('AES-256 key store (v2)', 'store', _pairs(aes, 2)),
        ('RSA-3072 --recipient (v1)', 'recipient', _pairs(rsa, 1)),
        ('hybrid --recipient (v1)', 'recipient', _pairs(hybrid, 1)),
    ]
    times = {(name, op): [] for name, _, _ in rows for op in (0, 1)}
    for _ in range(args.rounds):
        for name, _, pair in rows:
            for op in (0, 1):
                pair[op]()
                t = timeit.timeit(pair[op], number=args.number)
                times[name, op].append(t / args.number * 1e6)
    gen = {}
    for name, make, n in (('RSA-3072', RSAKeyEncryptingKey.generate, 5),
                          ('hybrid', HybridKeyEncryptingKey.generate, 200)):
        gen[name] = statistics.median(
            timeit.repeat(make, number=n, repeat=3)) / n * 1e6

    def ratio(name, op, base):
        return statistics.median(
            t / b for t, b in zip(times[name, op], times[base, op]))

    print('one DEK wrapped and unwrapped, %d rounds x %d calls (Python %s)'
          % (args.rounds, args.number, sys.version.split()[0]))
    print('%-28s %10s %10s %12s %12s' % (
        'variant', 'us/wrap', 'us/unwrap', 'wrap x RSA', 'unwrap x RSA'))
    base = {'store': rows[0][0], 'recipient': rows[3][0]}
    for name, group, _ in rows:
        print('%-28s %10.1f %10.1f %11.3fx %11.3fx' % (
            name, statistics.median(times[name, 0]),
            statistics.median(times[name, 1]),
            ratio(name, 0, base[group]), ratio(name, 1, base[group])))
    print('KEK generation: RSA-3072 %.0f us, hybrid %.0f us (%.0fx faster)'
          % (gen['RSA-3072'], gen['hybrid'], gen['RSA-3072'] / gen['hybrid']))
    for name, group, _ in rows[1:2]:
        print('hybrid unwrap is %.1fx cheaper than RSA-3072'
              % (1 / ratio(name, 1, base[group])))


if __name__ == '__main__':
    main()
