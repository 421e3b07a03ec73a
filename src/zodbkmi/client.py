"""The key server's client: HTTP transport and the "local" facility.

:class:`LocalKeyManagementFacility` is the keas.kmi "local" facility: its
wrapped DEKs live on a key server (:mod:`zodbkmi.rest`, started by
``zodbkmi serve``), reached over HTTPS by an :class:`HTTPTransport` (or,
in tests, handed to a WSGI application in the same process by a
:class:`WSGITransport`).  The KEK never leaves this process: DEKs are
created, wrapped and unwrapped here, the server only stores wrapped ones.

Layers: this module builds on the encryption service of
:mod:`zodbkmi.facility` and on the formats and the key store's id rules;
it never imports the server (:mod:`zodbkmi.rest`), which knows nothing of
it either.  ``zodbkmi.facility.LocalKeyManagementFacility`` and
``zodbkmi.rest.HTTPTransport`` (``WSGITransport``, ``check_url``) stay
importable for code written before the client had a module of its own.

Several URLs name replicas of one key service (``zodbkmi serve`` processes
over one key store): :class:`Replica` holds the health of each, and the
facility fails over between them (``docs/server.rst``, "Several key
servers").  With ``prometheus_client`` installed (the ``metrics`` extra)
the client counts cache hits and misses, fetch latency, failovers and
replicas marked down (:data:`METRIC_NAMES`); without it, metrics are off.
"""
import base64
import http.client
import io
import itertools
import json
import os
import re
import ssl
import threading
import time
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import urlsplit

from zope.interface import implementer

from zodbkmi import keystore
from zodbkmi.cache import DEFAULT_MAXSIZE
from zodbkmi.cache import DEFAULT_TTL
from zodbkmi.cache import DEFAULT_USE_LIMIT
from zodbkmi.cache import evict_everywhere
from zodbkmi.cache import MAX_GRACE
from zodbkmi.exceptions import KeyServerError
from zodbkmi.exceptions import SettingsError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.facility import EncryptionService
from zodbkmi.fileutil import read_secret_text
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IExtendedKeyManagementFacility
from zodbkmi.kek import DEFAULT_KEK_KIND
from zodbkmi.kek import RSA_DEFAULT_BITS
from zodbkmi.kek import as_kek
from zodbkmi.kek import generate_kek
from zodbkmi.tls import client_context

try:
    import prometheus_client
except ImportError:     # the metrics extra is not installed: metrics off
    prometheus_client = None

#: The path prefix of the key server's API: ``zodbkmi.rest.API_PREFIX``
#: (not imported from there: the client does not import the server).
API_PREFIX = '/v1'

#: How a client with several URLs chooses a replica: ``prefer`` (the first
#: healthy one in the order given: the others are standbys) or ``spread``
#: (round-robin among the healthy ones).
POLICIES = ('prefer', 'spread')
DEFAULT_POLICY = 'prefer'
#: Seconds a replica that failed is left alone before it is tried again.
DEFAULT_DOWN_TIME = 30.0

#: The client's metrics (``prometheus_client``, default registry).
METRIC_NAMES = {
    'zodbkmi_client_dek_cache_hits_total':
        'DEK lookups answered by the DEK cache',
    'zodbkmi_client_dek_cache_misses_total':
        'DEK lookups that had to fetch the wrapped DEK',
    'zodbkmi_client_fetch_seconds':
        'seconds per request to the key server, failovers included '
        '(histogram)',
    'zodbkmi_client_failovers_total':
        'requests answered by another replica than the first one tried',
    'zodbkmi_client_replica_down_total':
        'times a replica was marked down (label replica: its URL)',
    'zodbkmi_client_grace_uses_total':
        'DEKs used past their time to live during an outage (grace period)',
}
_metrics = None
_metrics_lock = threading.Lock()


class _Metrics:
    """The client's metrics, made once per process."""

    def __init__(self):
        p = prometheus_client
        d = {name[len('zodbkmi_client_'):]: doc
             for name, doc in METRIC_NAMES.items()}
        self.hits = p.Counter('zodbkmi_client_dek_cache_hits',
                              d['dek_cache_hits_total'])
        self.misses = p.Counter('zodbkmi_client_dek_cache_misses',
                                d['dek_cache_misses_total'])
        self.fetch = p.Histogram('zodbkmi_client_fetch_seconds',
                                 d['fetch_seconds'])
        self.failovers = p.Counter('zodbkmi_client_failovers',
                                   d['failovers_total'])
        self.down = p.Counter('zodbkmi_client_replica_down',
                              d['replica_down_total'], ['replica'])
        self.grace = p.Counter('zodbkmi_client_grace_uses',
                               d['grace_uses_total'])


def client_metrics():
    """The client's metrics (made on the first call), or None without
    ``prometheus_client``."""
    global _metrics
    if prometheus_client is None:
        return None
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def split_urls(urls):
    """The list of key server URLs that ``urls`` names: a list or tuple of
    URLs, or a string of URLs separated by white space or commas.  Raises
    :class:`~zodbkmi.exceptions.SettingsError` for none or a repeated
    one (they are not checked here: see :func:`check_url`)."""
    if isinstance(urls, str):
        found = [u for u in re.split(r'[\s,]+', urls) if u]
    elif isinstance(urls, (list, tuple)):
        found = []
        for u in urls:
            if not isinstance(u, str):
                raise SettingsError('a key server URL is a string, not %r'
                                    % (u,))
            found.extend(split_urls(u))
    else:
        raise SettingsError('key server URLs are a string or a list, not %r'
                            % (urls,))
    if not found:
        raise SettingsError('no key server URL given')
    seen = set()
    for u in found:
        if u in seen:
            raise SettingsError('key server URL %s is given twice' % u)
        seen.add(u)
    return found


def _outage(error):
    """Whether the KeyServerError ``error`` means no replica answered
    (no answer, or a 5xx one), rather than a refusal (401, 403, 404...)."""
    return error.status is None or error.status >= 500


# -- transports --------------------------------------------------------------

def check_url(url, allow_http=False):
    """Check the key server URL ``url``; return its ``urlsplit`` parts.

    It must be ``https://host[:port][/path]``; ``http://`` only with
    ``allow_http`` (development only: the bearer token and the wrapped
    keys would travel in clear, so loopback is no exception).  Raises
    :class:`zodbkmi.exceptions.SettingsError` (a ``ValueError``).
    """
    try:
        parts = urlsplit(url)
        parts.port
    except (ValueError, TypeError, AttributeError):
        raise SettingsError('key server URL %r is not a URL'
                            % (url,)) from None
    if parts.scheme not in ('https', 'http') or not parts.hostname:
        raise SettingsError('key server URL must be https://host:port, '
                            'not %r' % (url,))
    if parts.scheme == 'http' and not allow_http:
        raise SettingsError(
            'key server URL %s is plain HTTP: the bearer token and the '
            'wrapped keys would travel in clear; use https://, or pass '
            'allow_http=True (development only)' % url)
    return parts


class _ClosingHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that closes its socket when it is collected: a
    kept-alive connection goes with its thread (``threading.local``) or
    with a client that was never closed, and without this the socket's
    own finalizer would report it as a ResourceWarning."""

    def __del__(self):
        try:
            self.close()
        except Exception:   # pragma: no cover - interpreter shutdown
            pass


class _ClosingHTTPSConnection(http.client.HTTPSConnection):
    __del__ = _ClosingHTTPConnection.__del__


class HTTPTransport:
    """HTTPS (or, with ``allow_http``, HTTP) requests to a key server.

    One keep-alive connection per thread.  The server certificate is
    verified against ``ca_file`` (or the system store); TLS 1.2 minimum.
    ``request`` returns ``(status, body)`` or raises ``OSError`` for a
    connection that failed (the caller retries).  The URL is checked by
    :func:`check_url`.
    """

    def __init__(self, url, ca_file=None, timeout=5.0, client_cert=None,
                 client_key=None, allow_http=False):
        parts = check_url(url, allow_http)
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == 'https' else 80)
        self.prefix = parts.path.rstrip('/')
        if self.prefix.endswith(API_PREFIX):
            self.prefix = self.prefix[:-len(API_PREFIX)]
        self.timeout = timeout
        self.context = None
        if self.scheme == 'https':
            self.context = client_context(ca_file, client_cert, client_key)
        self._local = threading.local()

    def _connection(self):
        conn = getattr(self._local, 'conn', None)
        if conn is None:
            if self.context is not None:
                conn = _ClosingHTTPSConnection(
                    self.host, self.port, timeout=self.timeout,
                    context=self.context)
            else:
                conn = _ClosingHTTPConnection(
                    self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def close(self):
        conn = getattr(self._local, 'conn', None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method, path, body=None, headers=None):
        """Return ``(status, body)``.  An ``OSError`` raised before any
        byte of the request was sent (connection refused, TLS handshake
        failed) has ``request_sent = False``; one raised after, True
        (the server may have carried the request out), and ``reused``
        says whether a kept-alive connection was used."""
        conn = self._connection()
        reused = conn.sock is not None
        if not reused:
            try:
                conn.connect()
            except OSError as e:
                self.close()
                e.request_sent, e.reused = False, False
                raise
        try:
            conn.request(method, self.prefix + path, body=body,
                         headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            if not isinstance(e, OSError):
                e = ConnectionError(str(e)[:100])
            e.request_sent, e.reused = True, reused
            raise e from None
        if response.will_close:
            self.close()
        return response.status, data


class WSGITransport:
    """Requests handed to a WSGI application in this process (no socket):
    what :func:`zodbkmi.testing.setupRestApi` uses."""

    def __init__(self, app):
        self.app = app

    def close(self):
        pass

    def request(self, method, path, body=None, headers=None):
        body = body or b''
        environ = {
            # PEP 3333: PATH_INFO is %-decoded, as a real server does.
            'REQUEST_METHOD': method,
            'PATH_INFO': unquote(path.split('?')[0], 'latin-1'),
            'QUERY_STRING': '', 'SERVER_NAME': 'localhost',
            'SERVER_PORT': '443', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'REMOTE_ADDR': '127.0.0.1', 'wsgi.url_scheme': 'https',
            'wsgi.input': io.BytesIO(body), 'wsgi.errors': io.StringIO(),
            'wsgi.version': (1, 0), 'wsgi.multithread': True,
            'wsgi.multiprocess': False, 'wsgi.run_once': False,
            'CONTENT_LENGTH': str(len(body)),
        }
        for name, value in (headers or {}).items():
            key = name.upper().replace('-', '_')
            if key == 'CONTENT_TYPE':
                environ[key] = value
            elif key != 'CONTENT_LENGTH':
                environ['HTTP_' + key] = value
        result = {}

        def start_response(status, response_headers, exc_info=None):
            result['status'] = int(status.split(' ', 1)[0])
        chunks = self.app(environ, start_response)
        try:
            data = b''.join(chunks)
        finally:
            close = getattr(chunks, 'close', None)
            if close is not None:
                close()
        return result['status'], data


# -- replicas ----------------------------------------------------------------

class Replica:
    """One URL of a key service: its transport and its health.

    ``down_until`` (monotonic seconds) is when a replica that failed may be
    tried again; ``error`` why it failed last (one line, no secret)."""

    __slots__ = ('url', 'transport', 'down_until', 'error')

    def __init__(self, url, transport):
        self.url = url
        self.transport = transport
        self.down_until = 0.0
        self.error = None

    def __repr__(self):
        return '<Replica %s %s>' % (self.url, 'down' if self.error else 'up')

    def up(self, now=None):
        return (time.monotonic() if now is None else now) >= self.down_until


def _reason(e):
    """One line saying why the request to a replica failed."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return 'certificate verification failed (%s)' % e.verify_message
    if isinstance(e, ssl.SSLError) and not isinstance(
            e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return 'TLS refused (%s)' % (e.reason or e.strerror)
    if isinstance(e, TimeoutError):
        return 'timed out'
    return e.strerror or type(e).__name__


# -- the facility ------------------------------------------------------------

@implementer(IExtendedKeyManagementFacility)
class LocalKeyManagementFacility(EncryptionService):
    """A facility whose wrapped DEKs live on a key server (the REST API of
    :mod:`zodbkmi.rest`); the keas.kmi "local" facility.

    The KEK never leaves this process: new DEKs are created and wrapped
    here and uploaded in wrapped form; fetched wrapped DEKs are unwrapped
    here and kept in the DEK cache (``timeout`` seconds, ``cache_size``
    entries).  Error answers are never cached.  ``token`` is a bearer token
    (``token_file`` names a file holding one); ``ca_file`` the CA that
    signed the server's certificate; ``request_timeout`` bounds every
    attempt, ``retries`` more attempts follow a connection error, after
    ``backoff``, ``2 * backoff``, ... seconds.  When the server cannot be
    reached or refuses, :class:`zodbkmi.exceptions.KeyServerError` is
    raised.

    ``url`` may name several replicas of one key service: a list of URLs,
    or a string of URLs separated by white space or commas (see
    :func:`split_urls`).  ``policy`` says which one a request goes to:
    ``"prefer"`` (the default: the first healthy one, in the order given)
    or ``"spread"`` (round-robin among the healthy ones).  A replica that
    fails (no connection, timeout, TLS failure, a 5xx answer) is marked
    down for ``down_time`` seconds and the request goes on to the next
    one if it is idempotent (a GET, the rewrap PUT, and key creation,
    whose DEK id is its idempotency key); retiring and deleting a key are
    tried on another replica only when the failure proves the request
    was not sent.  While every replica is down, a request fails at once.
    With several URLs, ``retries`` and ``backoff`` are not used: each
    healthy replica is tried once per request.

    ``grace`` (seconds, 0 by default, at most
    ``zodbkmi.cache.MAX_GRACE``, one day) lets cached DEKs serve up to that
    long past their time to live while no replica answers, never when
    one refuses (``docs/server.rst``, "Outage policy").

    The token file is read by :func:`zodbkmi.fileutil.read_secret_file`
    (refused when group or others can access it).  An ``http://`` URL is
    refused with :class:`zodbkmi.exceptions.SettingsError` unless
    ``allow_http=True`` is given (development only: the bearer token and
    the wrapped keys would travel in clear; loopback is no exception).
    ``transport`` (for tests) replaces the HTTP transport: one, or a list
    with one per URL.
    """

    rsa_bits = RSA_DEFAULT_BITS
    kek_kind = DEFAULT_KEK_KIND

    def __init__(self, url, token=None, ca_file=None, token_file=None,
                 timeout=DEFAULT_TTL, cache_size=DEFAULT_MAXSIZE,
                 use_limit=DEFAULT_USE_LIMIT, request_timeout=5.0,
                 retries=3, backoff=0.05, client_cert=None,
                 client_key=None, transport=None, allow_http=False,
                 policy=DEFAULT_POLICY, down_time=DEFAULT_DOWN_TIME,
                 grace=0):
        urls = split_urls(url)
        for u in urls:
            check_url(u, allow_http)
        if policy not in POLICIES:
            raise SettingsError('key server policy must be %s, not %r'
                                % (' or '.join(POLICIES), policy))
        if not (isinstance(down_time, (int, float)) and down_time >= 0):
            raise SettingsError('key server down time must be a number of '
                                'seconds >= 0, not %r' % (down_time,))
        if not (isinstance(grace, (int, float))
                and 0 <= grace <= MAX_GRACE):
            raise SettingsError('grace period must be 0 to %d seconds, not '
                                '%r' % (MAX_GRACE, grace))
        if token is None and token_file is not None:
            token = read_secret_text(token_file, 'token')
        super().__init__(timeout, cache_size, use_limit)
        self._cache.grace = grace
        self.url = urls[0]
        self.urls = urls
        self.policy = policy
        self.down_time = down_time
        self._token = token
        self.retries = retries
        self.backoff = backoff
        if transport is None:
            transports = [HTTPTransport(
                u, ca_file=ca_file, timeout=request_timeout,
                client_cert=client_cert, client_key=client_key,
                allow_http=allow_http) for u in urls]
        elif isinstance(transport, (list, tuple)):
            if len(transport) != len(urls):
                raise SettingsError('%d transports for %d URLs'
                                    % (len(transport), len(urls)))
            transports = list(transport)
        else:
            transports = [transport] * len(urls)
        self.replicas = [Replica(u, t) for u, t in zip(urls, transports)]
        self._turn = itertools.count()
        # KEK id -> the id of its active DEK as a replica last said it
        self._known_active = {}

    @property
    def _transport(self):
        """The transport of the first replica; set, the transport of every
        replica (what :func:`zodbkmi.testing.setupRestApi` does)."""
        return self.replicas[0].transport

    @_transport.setter
    def _transport(self, transport):
        for replica in self.replicas:
            replica.transport = transport

    @property
    def grace(self):
        """Seconds a cached DEK may serve past its time to live while no
        key server answers (0: never)."""
        return self._cache.grace

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, ' '.join(self.urls))

    def close(self):
        """Close this thread's connections to the servers (they are opened
        again when needed)."""
        for replica in self.replicas:
            replica.transport.close()

    # -- HTTP ------------------------------------------------------------

    def _request(self, method, path, doc=None, missing_ok=False,
                 idempotent=None):
        """Return the JSON answer, None for a 404 when ``missing_ok``.

        ``idempotent`` (by default: for GET and PUT) allows the request to
        go to another replica after one failed once it was sent."""
        if idempotent is None:
            idempotent = method in ('GET', 'PUT', 'HEAD')
        headers = {'Accept': 'application/json'}
        if self._token:
            headers['Authorization'] = 'Bearer ' + self._token
        body = None
        if doc is not None:
            body = json.dumps(doc).encode('ascii')
            headers['Content-Type'] = 'application/json'
        metrics = client_metrics()
        started = time.perf_counter()
        try:
            if len(self.replicas) == 1:
                status, data = self._send_single(method, path, body, headers,
                                                 idempotent)
                url = self.url
            else:
                status, data, url = self._send(method, path, body, headers,
                                               idempotent)
        finally:
            if metrics is not None:
                metrics.fetch.observe(time.perf_counter() - started)
        if status == 404 and missing_ok:
            return None
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):   # not JSON, or nested too deep
            answer = None
        if not 200 <= status < 300 or not isinstance(answer, dict):
            reason = None
            if isinstance(answer, dict) and isinstance(
                    answer.get('error'), str):
                reason = answer['error'][:200]
            if status == 404 and path.startswith('/v1/keys/'):
                dek_id = path.split('/')[3]
                raise UnknownKeyError('no key %s on the key server'
                                      % dek_id, dek_id)
            raise KeyServerError(
                'key server %s refused %s %s: %d %s'
                % (url, method, path, status, reason or ''),
                status, reason)
        return answer

    def _send_single(self, method, path, body, headers, idempotent):
        """One URL: ``retries`` more attempts after a connection error,
        with a growing backoff (a request that is not idempotent only when
        it was not sent)."""
        replica = self.replicas[0]
        if not idempotent:
            replica.transport.close()   # a failure then says if it was sent
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                status, data = replica.transport.request(
                    method, path, body, headers)
                replica.error = None
                return status, data
            except OSError as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise KeyServerError(
                        'key server %s: certificate verification failed '
                        '(%s)' % (self.url, e.verify_message)) from None
                if isinstance(e, ssl.SSLError) and not isinstance(
                        e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                    raise KeyServerError(
                        'key server %s: TLS refused (%s)'
                        % (self.url, e.reason or e.strerror)) from None
                reason = e.strerror or type(e).__name__
                if not e.strerror and isinstance(e, ConnectionError):
                    # the server closed the connection without an
                    # HTTP answer: a TLS server asked in plain HTTP
                    reason = 'closed without an answer'
                    if self.url.lower().startswith('http://'):
                        reason += ' (is it an https:// server?)'
                if not idempotent and getattr(e, 'request_sent', True):
                    self._mark_down(replica, reason)
                    raise KeyServerError(
                        'key server %s failed after %s %s was sent (%s); '
                        'not repeated, it is not idempotent: check the '
                        "key's state" % (self.url, method, path,
                                         reason)) from None
                if attempt == self.retries:
                    self._mark_down(replica, reason)
                    raise KeyServerError(
                        'key server %s cannot be reached (%d attempts): %s'
                        % (self.url, attempt + 1, reason)) from None
                time.sleep(delay)
                delay *= 2

    def _order(self):
        """The replicas that are up, in the order to try them."""
        now = time.monotonic()
        healthy = [r for r in self.replicas if r.up(now)]
        if self.policy == 'spread' and len(healthy) > 1:
            k = next(self._turn) % len(healthy)
            healthy = healthy[k:] + healthy[:k]
        return healthy

    def _mark_down(self, replica, reason):
        replica.down_until = time.monotonic() + self.down_time
        replica.error = reason
        metrics = client_metrics()
        if metrics is not None:
            metrics.down.labels(replica.url).inc()

    def _down_message(self):
        now = time.monotonic()
        return '; '.join(
            '%s down for %.0f s more (%s)'
            % (r.url, max(0.0, r.down_until - now), r.error or 'failed')
            for r in self.replicas)

    def _send(self, method, path, body, headers, idempotent):
        """Several URLs: try the healthy replicas in turn; return
        ``(status, body, url)``.  Raises KeyServerError naming every
        replica that failed and why, in one line."""
        order = self._order()
        if not order:
            raise KeyServerError('no key server replica is up for %s %s: %s'
                                 % (method, path, self._down_message()))
        failures = []
        status = None
        for replica in order:
            transport = replica.transport
            if not idempotent:
                transport.close()   # a failure then says if it was sent
            try:
                try:
                    status, data = transport.request(method, path, body,
                                                     headers)
                except OSError as e:
                    if not (idempotent and getattr(e, 'reused', False)):
                        raise
                    # a kept-alive connection the server had closed: once
                    # more on a new one before calling the replica down
                    status, data = transport.request(method, path, body,
                                                     headers)
            except OSError as e:
                reason = _reason(e)
                self._mark_down(replica, reason)
                failures.append('%s: %s' % (replica.url, reason))
                if not idempotent and getattr(e, 'request_sent', True):
                    raise KeyServerError(
                        'key server %s failed after %s %s was sent (%s); '
                        'not repeated on another replica, it is not '
                        "idempotent: check the key's state"
                        % (replica.url, method, path, reason)) from None
                continue
            if status >= 500:
                self._mark_down(replica, 'answered %d' % status)
                failures.append('%s: answered %d' % (replica.url, status))
                if not idempotent:   # not repeated: its answer stands
                    return status, data, replica.url
                continue
            replica.error = None
            if failures:
                metrics = client_metrics()
                if metrics is not None:
                    metrics.failovers.inc()
            return status, data, replica.url
        raise KeyServerError(
            'no key server replica answered %s %s: %s'
            % (method, path, '; '.join(failures)), status)

    # -- EncryptionService -----------------------------------------------

    def _wrapped_key(self, dek_id):
        keystore.check_dek_id(dek_id)
        answer = self._request('GET', '/v1/keys/' + dek_id)
        try:
            return base64.b64decode(answer['wrapped'], validate=True)
        except (KeyError, TypeError, ValueError):
            raise KeyServerError('key server %s sent a malformed answer for '
                                 'key %s' % (self.url, dek_id)) from None

    def _active_key_id(self, kek_id):
        """The active DEK of ``kek_id`` as the key server says.  When no
        replica answers, the one a replica named last, if that DEK is
        still in the cache (within its time to live or grace period);
        else the KeyServerError: nothing is ever created locally."""
        try:
            answer = self._request('GET', '/v1/keks/%s/active'
                                   % quote(kek_id, safe=''), missing_ok=True)
        except KeyServerError as e:
            known = self._known_active.get(kek_id)
            if _outage(e) and known is not None and self._cache.stale(
                    bytes.fromhex(known)) is not None:
                return known
            raise
        dek_id = None if answer is None else answer.get('dek_id')
        if dek_id is None:
            self._known_active.pop(kek_id, None)
        else:
            keystore.check_dek_id(dek_id)
            self._known_active[kek_id] = dek_id
        return dek_id

    def _authorized_entry(self, raw_id, keks):
        """As :meth:`EncryptionService._authorized_entry`, counting cache
        hits and misses, and, when no replica answers, handing out an
        entry that expired less than ``grace`` seconds ago (to a KEK that
        unwrapped it itself)."""
        metrics = client_metrics()
        if metrics is not None:
            entry = self._cache.get(raw_id)
            if entry is not None and any(
                    entry.authorizes(k) for k in keks.values()):
                metrics.hits.inc()
            else:
                metrics.misses.inc()
        try:
            return super()._authorized_entry(raw_id, keks)
        except KeyServerError as e:
            if not (_outage(e) and self._cache.grace):
                raise
            entry = self._cache.stale(raw_id)
            kek = None if entry is None else keks.get(entry.kek_id)
            if kek is None or not entry.authorizes(kek):
                raise
            if metrics is not None:
                metrics.grace.inc()
            return entry

    # -- read-only mapping -----------------------------------------------

    def keys(self):
        return [k['dek_id'] for k in self.metadata()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return self._request('GET', '/v1/status')['keys']

    def __contains__(self, dek_id):
        try:
            self._wrapped_key(dek_id)
        except UnknownKeyError:
            return False
        return True

    def __getitem__(self, dek_id):
        try:
            return self._wrapped_key(dek_id)
        except UnknownKeyError:
            raise KeyError(dek_id) from None

    def get(self, dek_id, default=None):
        try:
            return self._wrapped_key(dek_id)
        except UnknownKeyError:
            return default

    def values(self):
        return [self[dek_id] for dek_id in self.keys()]

    def items(self):
        return [(dek_id, self[dek_id]) for dek_id in self.keys()]

    def status(self):
        """The server's status: ``{"keys": N, "message": ...}``."""
        return self._request('GET', '/v1/status')

    def metadata(self):
        """Metadata of every key on the server: a list of dicts with
        ``dek_id``, ``kek_id``, ``state`` and ``created``."""
        return self._request('GET', '/v1/keys')['keys']

    def entry(self, dek_id):
        """Return the :class:`zodbkmi.keystore.KeyStoreEntry` of
        ``dek_id`` as the server has it; raise UnknownKeyError."""
        keystore.check_dek_id(dek_id)
        a = self._request('GET', '/v1/keys/' + dek_id)
        return keystore.KeyStoreEntry(a['dek_id'], a['kek_id'],
                                      base64.b64decode(a['wrapped']),
                                      a['state'], a['created'])

    # -- key lifecycle ---------------------------------------------------

    def generate(self, kind=None):
        """Create a KEK here and an active DEK wrapped by it on the
        server; return the KEK as PEM.  Keep it: it is stored nowhere.

        ``kind`` (default ``self.kek_kind``, ``'hybrid'``) is ``'hybrid'``
        (ML-KEM-768 + X25519 through HPKE, a ``ZODBKMI HYBRID PRIVATE
        KEY``) or ``'rsa'`` (RSA of ``self.rsa_bits`` bits, PKCS#8)."""
        kek = generate_kek(kind or self.kek_kind, self.rsa_bits)
        self.create_key(kek)
        return kek.private_pem()

    def create_key(self, key):
        """Create a DEK here, wrap it with ``key`` here and upload the
        wrapped DEK; it becomes the active DEK of ``key`` (the previous one
        is retired).  Return the new DEK id."""
        kek = as_kek(key)
        raw_id = os.urandom(16)
        created = keystore.created_after(max(
            (m['created'] for m in self.metadata()
             if m['kek_id'] == kek.key_id and m.get('version') == 2),
            default=None))
        data = wrapped.wrap(kek, raw_id, os.urandom(32), created=created)
        # idempotent: the DEK id inside ``data`` is the idempotency key (a
        # replica that has these bytes already answers with the entry)
        answer = self._request('POST', '/v1/keys', {
            'wrapped': base64.b64encode(data).decode('ascii')},
            idempotent=True)
        self._forget_active()
        self._known_active[kek.key_id] = answer['dek_id']
        return answer['dek_id']

    def upgrade(self, key):
        """Rewrite every version 1 entry of the KEK ``key`` on the server
        in version 2 (see
        :meth:`zodbkmi.facility.KeyManagementFacility.upgrade`); return
        how many.  The DEKs are unwrapped and wrapped again here; the
        server only stores the result."""
        kek = as_kek(key)
        done = 0
        for m in self.metadata():
            if m['kek_id'] != kek.key_id or m.get('version') != 1:
                continue
            raw_id, dek = wrapped.unwrap(kek, self._wrapped_key(m['dek_id']))
            data = wrapped.wrap(kek, raw_id, dek, created=m['created'])
            self._request('PUT', '/v1/keys/' + m['dek_id'], {
                'wrapped': base64.b64encode(data).decode('ascii')})
            evict_everywhere(m['dek_id'])
            done += 1
        self._forget_active()
        return done

    def rotate(self, key):
        """DEK rotation: new writes go to a new DEK; return its id."""
        return self.create_key(key)

    def ensure_key(self, key):
        """Return the active DEK id of ``key``, creating one if needed."""
        kek = as_kek(key)
        current = self._active_key_id(kek.key_id)
        return current if current is not None else self.create_key(kek)

    def retire(self, dek_id):
        """Make ``dek_id`` decrypt-only on the server."""
        keystore.check_dek_id(dek_id)
        self._request('POST', '/v1/keys/%s/retire' % dek_id)
        self._forget_known(dek_id)
        evict_everywhere(dek_id)

    def delete(self, dek_id):
        """Destroy ``dek_id`` on the server; it cannot be undone."""
        keystore.check_dek_id(dek_id)
        self._request('DELETE', '/v1/keys/' + dek_id)
        self._forget_known(dek_id)
        evict_everywhere(dek_id)

    def _forget_known(self, dek_id):
        self._forget_active()
        for kek_id, known in list(self._known_active.items()):
            if known == dek_id:
                self._known_active.pop(kek_id, None)
