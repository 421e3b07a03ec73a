"""A bounded load test of ``zodbkmi serve``: valid and malformed requests.

Usage: python benchmarks/load_server.py [--seconds 60] [--clients 16]
                                        [--mode threads|processes]
                                        [--workers 2] [--create-rate 5]

Starts the key server on 127.0.0.1 with TLS (its generated self-signed
certificate, its generated tokens), stops it by PID at the end, and runs
``--clients`` clients for ``--seconds``.  Each client holds one keep-alive
TLS connection (a fresh one for requests that may leave a connection in
doubt) and sends a weighted random mix of requests, each checked:

valid
    fetch a wrapped DEK (answer compared byte for byte with what was
    uploaded and with the vault file), the active DEK of a KEK, health,
    and key creation (at most ``--create-rate`` keys per second in all, so
    the vault stays small and memory measures leaks, not data).
malformed
    bad JSON, a wrong content type, a wrong body, unknown and invalid key
    ids, bad, missing and under-privileged tokens, oversized bodies (sent,
    and only announced), bad paths, bad methods, garbage instead of HTTP,
    and requests cut off by the client: each must get a 4xx with a short
    body and no traceback (or, for a cut-off request, no answer; an
    oversized body may lose its 413 when the server closes the connection
    while the client is still sending).

Figures printed: requests in total, per second and per class, latency
percentiles, 5xx answers seen by clients and in the server's access log,
wrong answers, and the resident memory (RSS) of the server's process tree
after warm-up and at the end.  :func:`run` returns them as a dict (the test
``tests/test_load.py`` calls it).
"""
import argparse
import base64
import json
import os
import random
import re
import socket
import ssl
import sys
import threading
import time

from zodbkmi.testing import ServerProcess

#: Largest body an error answer may have (bytes).
SHORT_BODY = 512

#: class name -> weight in the mix; 'create' is also rate limited.
MIX = {
    # valid
    'fetch': 30, 'active': 6, 'health': 6, 'create': 4,
    # malformed
    'bad_json': 3, 'wrong_content_type': 3, 'bad_wrapped': 3,
    'unknown_key': 3, 'invalid_key_id': 3, 'bad_token': 3,
    'no_token': 3, 'client_token_as_admin': 3, 'oversized_body': 2,
    'oversized_claim': 2, 'bad_path': 3, 'bad_method': 3,
    'garbage': 2, 'truncated': 2,
}
VALID = ('fetch', 'active', 'health', 'create')

#: The outcome of a request the server cut off while the client was still
#: sending it: the server answered and closed without reading the rest
#: (an oversized body), and the connection reset lost the answer.
RESET = 'reset'

#: malformed class -> the statuses it may get (None: no answer, for
#: requests the client cuts off itself; RESET: see above).
EXPECTED = {
    'bad_json': {400}, 'wrong_content_type': {415}, 'bad_wrapped': {400},
    'unknown_key': {404}, 'invalid_key_id': {404}, 'bad_token': {401},
    'no_token': {401}, 'client_token_as_admin': {403},
    'oversized_body': {413, 'reset'}, 'oversized_claim': {413},
    'bad_path': {404, 400}, 'bad_method': {405, 400, 501},
    'garbage': {400, None}, 'truncated': {400, None},
}


# -- the server --------------------------------------------------------------

# -- HTTP over TLS, by hand --------------------------------------------------

class Closed(Exception):
    """The server closed the connection before a whole answer."""


class BadAnswer(Exception):
    """The server's answer is not HTTP."""


class Connection:
    """One TLS connection; requests are bytes written as given, so that
    malformed ones reach the server as they are."""

    def __init__(self, port, context, timeout=15):
        sock = socket.create_connection(('127.0.0.1', port), timeout)
        self.sock = context.wrap_socket(sock, server_hostname='127.0.0.1')
        self.buf = b''
        self.used = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self):
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError,
                ssl.SSLZeroReturnError):
            chunk = b''
        if not chunk:
            raise Closed()
        self.buf += chunk

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self):
        while b'\r\n' not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b'\r\n', 1)
        return line

    def send(self, data):
        self.used = True
        self.sock.sendall(data)

    def response(self):
        """Return ``(status, headers, body)`` of the next answer."""
        while b'\r\n\r\n' not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b'\r\n\r\n', 1)
        lines = head.decode('latin-1').split('\r\n')
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise BadAnswer(lines[0][:60]) from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(':')
            headers[name.strip().lower()] = value.strip()
        if 'content-length' in headers:
            body = self._take(int(headers['content-length']))
        elif headers.get('transfer-encoding', '').lower() == 'chunked':
            body = b''
            while True:
                size = int(self._line().split(b';')[0], 16)
                if not size:
                    self._line()
                    break
                body += self._take(size)
                self._take(2)
        else:
            body = b''
            if headers.get('connection', '').lower() == 'close':
                try:
                    while True:
                        self._fill()
                except Closed:
                    body, self.buf = self.buf, b''
        return status, headers, body


def request(method, path, token=None, body=None, ctype='application/json',
            extra=b''):
    head = '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n' % (method, path)
    if token is not None:
        head += 'Authorization: Bearer %s\r\n' % token
    if body is not None:
        head += 'Content-Type: %s\r\nContent-Length: %d\r\n' % (
            ctype, len(body))
    return head.encode('latin-1') + extra + b'\r\n' + (body or b'')


def new_wrapped_key():
    """A wrapped DEK under a new AES KEK: ``(dek_id, kek_id, bytes)``."""
    from zodbkmi.format import wrapped
    from zodbkmi.kek import AESKeyEncryptingKey
    kek = AESKeyEncryptingKey(os.urandom(32))
    dek_id = os.urandom(16)
    return dek_id.hex(), kek.key_id, wrapped.wrap(kek, dek_id,
                                                  os.urandom(32))


def upload(conn, admin, key):
    dek_id, kek_id, data = key
    body = json.dumps({'wrapped': base64.b64encode(data).decode()}).encode()
    conn.send(request('POST', '/v1/keys', admin, body))
    return conn.response()


# -- one client --------------------------------------------------------------

class Client:
    """Sends the mix for a while; counts and checks every answer."""

    def __init__(self, target, keys, seconds, create_interval, seed):
        self.port, self.ca, self.admin, self.client = target
        self.keys = list(keys)   # (dek_id, kek_id, wrapped bytes)
        self.seconds = seconds
        self.create_interval = create_interval
        self.next_create = 0.0
        self.random = random.Random(seed)
        self.context = ssl.create_default_context(cafile=self.ca)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.conn = None
        self.names = list(MIX)
        self.weights = [MIX[n] for n in self.names]
        self.latency = {n: [] for n in MIX}
        self.statuses = {n: {} for n in MIX}
        self.wrong = []          # (class, reason), first few kept
        self.wrong_count = 0
        self.errors = 0          # connections that failed
        self.created = []

    # each handler returns (request bytes, check(status, headers, body)
    # -> None or a reason, fresh connection?)

    def _fetch(self):
        dek_id, kek_id, data = self.random.choice(self.keys)

        def check(status, headers, body):
            if status != 200:
                return 'status %d' % status
            doc = json.loads(body)
            if (doc.get('dek_id'), doc.get('kek_id'), doc.get('state')) != (
                    dek_id, kek_id, 'active'):
                return 'wrong metadata'
            if base64.b64decode(doc['wrapped']) != data:
                return 'wrong wrapped DEK'
        return request('GET', '/v1/keys/' + dek_id, self.client), check, False

    def _active(self):
        dek_id, kek_id, _ = self.random.choice(self.keys)

        def check(status, headers, body):
            if status != 200:
                return 'status %d' % status
            if json.loads(body).get('dek_id') != dek_id:
                return 'wrong active DEK'
        return (request('GET', '/v1/keks/%s/active' % kek_id, self.client),
                check, False)

    def _health(self):
        def check(status, headers, body):
            if (status, body) != (200, b'{"status": "ok"}'):
                return 'status %d' % status
        return request('GET', '/v1/health'), check, False

    def _create(self):
        key = new_wrapped_key()
        body = json.dumps({'wrapped': base64.b64encode(key[2]).decode()})

        def check(status, headers, body):
            if status != 201:
                return 'status %d' % status
            doc = json.loads(body)
            if (doc.get('dek_id'), doc.get('kek_id')) != key[:2]:
                return 'wrong created key'
            self.keys.append(key)
            self.created.append(key)
        return (request('POST', '/v1/keys', self.admin, body.encode()),
                check, False)

    def _malformed(self, name):
        r = self.random
        dek_id = r.choice(self.keys)[0]
        admin, client = self.admin, self.client
        fresh = False
        if name == 'bad_json':
            data = request('POST', '/v1/keys', admin, r.choice(
                [b'{"wrapped": ', b'{', b'\xff\xfe', b'[1, 2',
                 b'{"wrapped": "a"' + b' ' * 100, b'null']))
        elif name == 'wrong_content_type':
            data = request('POST', '/v1/keys', admin, b'{"wrapped": "x"}',
                           ctype=r.choice(['text/plain',
                                           'application/x-www-form-urlencoded',
                                           'multipart/form-data']))
        elif name == 'bad_wrapped':
            data = request('POST', '/v1/keys', admin, r.choice([
                b'{"wrapped": "not base64!"}',
                b'{"wrapped": "' + base64.b64encode(os.urandom(90)) + b'"}',
                b'{"wrapped": 12}', b'{"key": "x", "wrapped": "eA=="}',
                b'{"wrapped": "'
                + base64.b64encode(b'zkw\x01\x02' + b'x' * 16 + b'\x00xx')
                + b'"}',
                json.dumps({'wrapped': 'A' * 9000}).encode()]))
        elif name == 'unknown_key':
            data = request('GET', '/v1/keys/' + os.urandom(16).hex(), client)
        elif name == 'invalid_key_id':
            data = request('GET', '/v1/keys/' + r.choice(
                ['NOTHEX', dek_id.upper(), dek_id + '0', dek_id[:-1],
                 '%00' * 16, '..%2f..%2fetc%2fpasswd']), client)
        elif name == 'bad_token':
            data = request('GET', '/v1/keys/' + dek_id, r.choice(
                ['wrong', client[:-1], client + 'x', 'x' * 2000]))
        elif name == 'no_token':
            data = request('GET', '/v1/keys/' + dek_id, None)
            if r.random() < 0.5:
                data = data.replace(b'\r\n\r\n', b'\r\nAuthorization: Basic '
                                    b'YWRtaW46YWRtaW4=\r\n\r\n', 1)
        elif name == 'client_token_as_admin':
            key = new_wrapped_key()
            data = request('POST', '/v1/keys', client, json.dumps(
                {'wrapped': base64.b64encode(key[2]).decode()}).encode())
        elif name == 'oversized_body':
            data = request('POST', '/v1/keys', admin,
                           b'{"wrapped": "' + b'A' * 70000 + b'"}')
            fresh = True
        elif name == 'oversized_claim':
            data = request('POST', '/v1/keys', admin, b'{')
            data = data.replace(b'Content-Length: 1\r\n',
                                b'Content-Length: 99999999\r\n')
            fresh = True
        elif name == 'bad_path':
            data = request('GET', r.choice(
                ['/', '/v2/keys', '/v1', '/v1/', '/v1/keys/%s/x/y' % dek_id,
                 '/v1/keks//active', '/v1/keks/%s/active' % ('k' * 300),
                 '/v1/../../etc/passwd', '/v1/health%00',
                 '/' + 'a' * 4000]), client)
        elif name == 'bad_method':
            method, path = r.choice([
                ('DELETE', '/v1/health'), ('PUT', '/v1/keys'),
                ('PATCH', '/v1/keys/' + dek_id), ('POST', '/v1/status'),
                ('FOO', '/v1/keys'), ('TRACE', '/v1/health')])
            data = request(method, path, admin)
        elif name == 'garbage':
            data = r.choice([b'\x00\x01\x02 nonsense\r\n\r\n',
                             b'GET\r\n\r\n', b'GET / HTTP/9.9\r\n\r\n',
                             b'GET /v1/health HTTP/1.1\r\nHost: x\r\n'
                             b'Bad Header\r\n\r\n',
                             os.urandom(64) + b'\r\n\r\n'])
            fresh = True
        elif name == 'truncated':
            full = request('POST', '/v1/keys', admin,
                           b'{"wrapped": "' + b'A' * 200 + b'"}')
            data = full[:r.randrange(10, len(full) - 1)]
            fresh = True
        else:   # pragma: no cover
            raise ValueError(name)
        expected = EXPECTED[name]

        def check(status, headers, body):
            if status not in expected:
                return 'status %s' % status
            if isinstance(status, int):
                if len(body) > SHORT_BODY:
                    return 'long error body (%d bytes)' % len(body)
                if b'Traceback' in body or b'File "' in body:
                    return 'traceback in the answer'
        return data, check, fresh

    def _connection(self, fresh):
        if fresh or self.conn is None:
            if self.conn is not None:
                self.conn.close()
            self.conn = Connection(self.port, self.context)
        return self.conn

    def _exchange(self, name, data, fresh):
        """Send ``data``; return ``(status, headers, body)``, with status
        None when the server closed without answering."""
        for attempt in (0, 1):
            conn = self._connection(fresh or attempt > 0)
            reused = conn.used
            sent = False
            try:
                conn.send(data)
                sent = True
                if name == 'truncated':
                    # the client gives up: the server sees the connection
                    # end in the middle of the request
                    conn.sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass   # the answer may be there all the same
            try:
                answer = conn.response()
            except BadAnswer:
                conn.close()
                self.conn = None
                return 'not HTTP', {}, b''
            except (Closed, BrokenPipeError, ConnectionResetError,
                    ssl.SSLError):
                conn.close()
                self.conn = None
                if reused and not fresh and attempt == 0:
                    continue   # an idle keep-alive connection closed
                # RESET: the server closed while the client was still
                # sending (it refuses a body without reading it all)
                return (None if sent else RESET), {}, b''
            if fresh or answer[1].get('connection', '').lower() == 'close':
                conn.close()
                self.conn = None
            return answer

    def run(self, start_at):
        while time.time() < start_at:
            time.sleep(0.005)
        t_start = time.monotonic()
        end = t_start + self.seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            name = self.random.choices(self.names, self.weights)[0]
            if name == 'create':
                if now < self.next_create:
                    name = 'fetch'
                else:
                    self.next_create = now + self.create_interval
            if name == 'fetch':
                data, check, fresh = self._fetch()
            elif name == 'active':
                data, check, fresh = self._active()
            elif name == 'health':
                data, check, fresh = self._health()
            elif name == 'create':
                data, check, fresh = self._create()
            else:
                data, check, fresh = self._malformed(name)
            t0 = time.perf_counter()
            try:
                status, headers, body = self._exchange(name, data, fresh)
            except OSError:
                self.errors += 1
                self.conn = None
                continue
            self.latency[name].append(time.perf_counter() - t0)
            counts = self.statuses[name]
            counts[status] = counts.get(status, 0) + 1
            if name in VALID and not isinstance(status, int):
                reason = 'no answer'
            else:
                try:
                    reason = check(status, headers, body)
                except (ValueError, KeyError, TypeError) as e:
                    reason = 'unreadable answer: %s' % str(e)[:60]
            if reason:
                self.wrong_count += 1
                if len(self.wrong) < 10:
                    self.wrong.append((name, reason))
        if self.conn is not None:
            self.conn.close()
        return self.result()

    def result(self):
        return {'latency': self.latency, 'statuses': self.statuses,
                'wrong': self.wrong, 'wrong_count': self.wrong_count,
                'errors': self.errors, 'created': self.created}


def _client_process(args, queue):
    queue.put(Client(*args[:-1]).run(args[-1]))


# -- the whole run -----------------------------------------------------------

def percentile(values, p):
    if not values:
        return float('nan')
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def run(seconds=60.0, clients=16, mode='threads', workers=2,
        initial_keys=50, create_rate=5.0, warmup=None, server_args=(),
        out=sys.stdout):
    """Start a server, load it, stop it; return the figures (a dict).

    ``warmup``: seconds after which the reference RSS is taken (default:
    a sixth of the run, at most 10 s)."""
    warmup = min(10.0, seconds / 6) if warmup is None else warmup
    server = ServerProcess(
        *(['--workers', str(workers)] if workers else []) + list(server_args))
    try:
        target = (server.port, server.ca, server.admin, server.client)
        ctx = ssl.create_default_context(cafile=server.ca)
        conn = Connection(server.port, ctx)
        keys = []
        for _ in range(initial_keys):
            key = new_wrapped_key()
            status, _, _ = upload(conn, server.admin, key)
            if status != 201:
                raise RuntimeError('setup upload: status %d' % status)
            keys.append(key)
        conn.close()
        interval = clients / create_rate if create_rate > 0 else 1e9
        start_at = time.time() + 1.0
        args = [(target, keys, seconds, interval, seed, start_at)
                for seed in range(clients)]
        samples = []   # (seconds since start, rss)
        done = threading.Event()

        def sample():
            while time.time() < start_at:
                time.sleep(0.01)
            t0 = time.monotonic()
            while not done.is_set():
                samples.append((time.monotonic() - t0, server.rss()))
                done.wait(0.5)
            samples.append((time.monotonic() - t0, server.rss()))
        sampler = threading.Thread(target=sample)
        sampler.start()
        rss_before = server.rss()
        try:
            if mode == 'threads':
                results = [None] * clients

                def one(i):
                    try:
                        results[i] = Client(*args[i][:-1]).run(args[i][-1])
                    except BaseException as e:   # re-raised below
                        results[i] = e
                threads = [threading.Thread(target=one, args=(i,))
                           for i in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
            else:
                import multiprocessing
                mp = multiprocessing.get_context('fork')
                queue = mp.Queue()
                procs = [mp.Process(target=_client_process, args=(a, queue))
                         for a in args]
                for p in procs:
                    p.start()
                results = [queue.get(timeout=seconds + 120) for _ in procs]
                for p in procs:
                    p.join()
        finally:
            done.set()
            sampler.join()
        # the server still serves, and the vault holds what was uploaded
        ctx = ssl.create_default_context(cafile=server.ca)
        conn = Connection(server.port, ctx)
        conn.send(request('GET', '/v1/health'))
        healthy = conn.response()[0] == 200
        conn.close()
        vault_mismatches = 0
        created = [k for r in results for k in r['created']]
        for dek_id, kek_id, data in keys + created:
            with open(os.path.join(server.key_dir, dek_id + '.dek'),
                      'rb') as f:
                entry = json.loads(f.read())
            if (base64.b64decode(entry['wrapped']), entry['kek_id']) != (
                    data, kek_id):
                vault_mismatches += 1
        log = server.stdout() + '\n' + server.stderr()
    finally:
        rc = server.stop()
        server.cleanup()
    return figures(results, seconds, clients, mode, samples, warmup,
                   rss_before, healthy, vault_mismatches, log, rc,
                   len(keys) + len(created), out)


def figures(results, seconds, clients, mode, samples, warmup, rss_before,
            healthy, vault_mismatches, log, rc, vault_keys, out):
    latency = {n: [] for n in MIX}
    statuses = {n: {} for n in MIX}
    wrong, wrong_count, errors = [], 0, 0
    for r in results:
        for n in MIX:
            latency[n].extend(r['latency'][n])
            for status, count in r['statuses'][n].items():
                statuses[n][status] = statuses[n].get(status, 0) + count
        wrong.extend(r['wrong'])
        wrong_count += r['wrong_count']
        errors += r['errors']
    every = [x for n in MIX for x in latency[n]]
    total = len(every)
    client_5xx = sum(c for n in MIX for s, c in statuses[n].items()
                     if isinstance(s, int) and s >= 500)
    valid = [x for n in VALID for x in latency[n]]
    logged = [int(s) for s in re.findall(r'" (\d{3}) [\d.]+ms', log)]
    access = re.compile(r'" \d{3} [\d.]+ms$')
    log_errors = [line for line in log.splitlines()
                  if not access.search(line)
                  and re.search(r'error|warn|critical|exception', line, re.I)]
    rss_warm = next((rss for t, rss in samples if t >= warmup),
                    samples[-1][1])
    rss_end = samples[-1][1]
    result = {
        'seconds': seconds, 'clients': clients, 'mode': mode,
        'requests': total, 'per_second': total / seconds,
        'valid': sum(len(latency[n]) for n in VALID),
        'malformed': sum(len(latency[n]) for n in MIX if n not in VALID),
        'by_class': {n: dict(statuses[n]) for n in MIX},
        'p50_ms': percentile(every, 0.50) * 1000,
        'p95_ms': percentile(every, 0.95) * 1000,
        'p99_ms': percentile(every, 0.99) * 1000,
        'valid_p50_ms': percentile(valid, 0.50) * 1000,
        'valid_p95_ms': percentile(valid, 0.95) * 1000,
        'valid_p99_ms': percentile(valid, 0.99) * 1000,
        'client_5xx': client_5xx,
        'logged_requests': len(logged),
        'logged_5xx': sum(1 for s in logged if s >= 500),
        'tracebacks': log.count('Traceback'),
        'log_errors': len(log_errors), 'log_error_examples': log_errors[:3],
        'wrong': wrong_count, 'wrong_examples': wrong,
        'connection_errors': errors,
        'vault_keys': vault_keys, 'vault_mismatches': vault_mismatches,
        'healthy_after': healthy, 'exit_code': rc,
        'rss_before': rss_before, 'rss_warm': rss_warm,
        'rss_end': rss_end, 'rss_max': max(s for _, s in samples),
        'warmup': warmup,
    }
    report(result, latency, out)
    return result


def report(r, latency, out):
    mib = 1024 * 1024
    p = lambda *a: print(*a, file=out)   # noqa: E731
    p('zodbkmi serve under load: %d clients (%s) for %.0f s on 127.0.0.1 '
      '(TLS)' % (r['clients'], r['mode'], r['seconds']))
    p('requests: %d (%.0f/s); valid %d, malformed %d'
      % (r['requests'], r['per_second'], r['valid'], r['malformed']))
    p('latency (all requests): p50 %.2f ms, p95 %.2f ms, p99 %.2f ms'
      % (r['p50_ms'], r['p95_ms'], r['p99_ms']))
    p('latency (valid requests): p50 %.2f ms, p95 %.2f ms, p99 %.2f ms'
      % (r['valid_p50_ms'], r['valid_p95_ms'], r['valid_p99_ms']))
    p('%-22s %8s %8s %8s  %s' % ('class', 'count', 'p50 ms', 'p99 ms',
                                 'statuses'))
    for n in MIX:
        lat = latency[n]
        shown = ', '.join('%s: %d' % ('no answer' if s is None else s, c)
                          for s, c in sorted(r['by_class'][n].items(),
                                             key=lambda x: str(x[0])))
        p('%-22s %8d %8.2f %8.2f  %s' % (
            n, len(lat), percentile(lat, 0.5) * 1000,
            percentile(lat, 0.99) * 1000, shown))
    p('5xx answers: %d seen by clients, %d in the access log (%d lines); '
      'tracebacks in the server log: %d, error or warning lines: %d'
      % (r['client_5xx'], r['logged_5xx'], r['logged_requests'],
         r['tracebacks'], r['log_errors']))
    p('wrong answers: %d%s; connection errors: %d'
      % (r['wrong'], (' e.g. %s' % r['wrong_examples'][:3])
         if r['wrong'] else '', r['connection_errors']))
    p('vault: %d keys checked against the files, %d mismatches; healthy '
      'after the run: %s; exit code %s'
      % (r['vault_keys'], r['vault_mismatches'], r['healthy_after'],
         r['exit_code']))
    p('server RSS (process tree): %.1f MiB before, %.1f MiB after %.0f s '
      'warm-up, %.1f MiB at the end (max %.1f MiB); growth %+.1f MiB'
      % (r['rss_before'] / mib, r['rss_warm'] / mib, r['warmup'],
         r['rss_end'] / mib, r['rss_max'] / mib,
         (r['rss_end'] - r['rss_warm']) / mib))
    out.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--mode', choices=('threads', 'processes'),
                        default='threads')
    parser.add_argument('--workers', type=int, default=2,
                        help='zodbkmi serve --workers (default: 2, so that '
                             'keys created in one worker are fetched from '
                             'the other)')
    parser.add_argument('--create-rate', type=float, default=5.0,
                        help='new keys per second, all clients together')
    parser.add_argument('--warmup', type=float, default=None)
    parser.add_argument('--server-arg', action='append', default=[],
                        help='more zodbkmi serve arguments, e.g. '
                             '--server-arg=--threads=8')
    args = parser.parse_args(argv)
    r = run(args.seconds, args.clients, args.mode, args.workers,
            create_rate=args.create_rate, warmup=args.warmup,
            server_args=args.server_arg)
    ok = not (r['client_5xx'] or r['logged_5xx'] or r['wrong']
              or r['tracebacks'] or r['log_errors'] or r['vault_mismatches']
              or not r['healthy_after'])
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
