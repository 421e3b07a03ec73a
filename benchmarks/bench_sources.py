"""Cost of one DEK unwrap per key source: raw master key, Transit, PKCS#11.

Usage: python benchmarks/bench_sources.py [--rounds 7] [--number 300]

Starts a real OpenBao dev server (TLS, 127.0.0.1) and a SoftHSM2 token,
as the tests do, and measures ``wrapped.unwrap`` of one wrapped DEK, plus a
cached ``facility.decrypt`` of a 300 byte record for comparison (what an
application pays per read once the DEK is in the cache).  Variants
alternate within each round; figures are medians over the rounds, ratios
are medians of per-round ratios to the raw master key.
"""
import argparse
import base64
import os
import shutil
import statistics
import sys
import tempfile
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # for tests.bao, tests.softhsm

from tests.bao import ROOT_TOKEN  # noqa: E402
from tests.bao import BaoServer  # noqa: E402
from tests.softhsm import KEY_LABEL  # noqa: E402
from tests.softhsm import PIN  # noqa: E402
from tests.softhsm import SoftHSM  # noqa: E402
from zodbkmi.facility import KeyManagementFacility  # noqa: E402
from zodbkmi.format import wrapped  # noqa: E402
from zodbkmi.sources import kek_from_params  # noqa: E402
from zodbkmi.sources.pkcs11 import create_key  # noqa: E402


def kmip_keks():
    """The KMIP rows: a KEK in a PyKMIP server (TLS with client
    certificates, 127.0.0.1, started as the tests do), used through its
    Encrypt and Decrypt (the default) and fetched once with Get
    (``fetchKey``).  The server is stopped when the script exits."""
    import atexit
    from tests.kmipserver import KmipServer
    from zodbkmi.sources.kmip import create_kek
    server = KmipServer().start()
    atexit.register(server.stop)
    client = server.client()
    uid = create_kek(client, 'bench').uid
    client.close()
    return [('KMIP (PyKMIP, TLS)',
             kek_from_params(server.params(uid=uid))),
            ('KMIP fetchKey (Get once)',
             kek_from_params(server.params(uid=uid, fetchKey=True)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--number', type=int, default=300)
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    bao = BaoServer().start()
    hsm = SoftHSM().start()
    try:
        bao.api('POST', 'sys/mounts/transit', {'type': 'transit'})
        bao.api('POST', 'transit/keys/bench', {'derived': True})
        create_key(hsm.library, hsm.token_label, KEY_LABEL, PIN)
        keks = [
            ('raw master key', kek_from_params({
                'source': 'raw',
                'key': base64.b64encode(os.urandom(32)).decode()})),
            ('Transit (OpenBao, TLS)', kek_from_params({
                'source': 'vaultTransit', 'url': bao.url, 'token': ROOT_TOKEN,
                'caFile': bao.ca_file, 'keyName': 'bench'})),
            ('PKCS#11 (SoftHSM2)', kek_from_params({
                'source': 'pkcs11', 'library': hsm.library,
                'tokenLabel': hsm.token_label, 'keyLabel': KEY_LABEL,
                'pinEnv': 'BENCH_PIN'}, environ={'BENCH_PIN': PIN})),
        ] + kmip_keks()
        variants = []
        for name, kek in keks:
            data = wrapped.wrap(kek, os.urandom(16), os.urandom(32))
            variants.append((name, lambda k=kek, d=data: wrapped.unwrap(k, d)))
        facility = KeyManagementFacility(os.path.join(tmp, 'keys'))
        kek = keks[1][1]
        facility.create_key(kek)
        record = facility.encrypt(kek, os.urandom(300))
        variants.append(('cached decrypt (any source)',
                         lambda: facility.decrypt(kek, record)))
        times = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, fn in variants:
                fn()
                t = timeit.timeit(fn, number=args.number)
                times[name].append(t / args.number * 1e6)
        base = times['raw master key']
        print('one DEK unwrap per source, %d rounds x %d calls (Python %s)'
              % (args.rounds, args.number, sys.version.split()[0]))
        print('%-30s %12s %14s' % ('variant', 'us/unwrap', 'x raw unwrap'))
        for name, _ in variants:
            ratio = statistics.median(t / b for t, b in zip(times[name], base))
            print('%-30s %12.1f %13.1fx' % (name, statistics.median(
                times[name]), ratio))
        for _, k in keks:
            close = getattr(k, 'close', None)
            if close is not None:
                close()
    finally:
        bao.stop()
        hsm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
