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
"""
import base64
import http.client
import io
import json
import os
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

#: The path prefix of the key server's API: ``zodbkmi.rest.API_PREFIX``
#: (not imported from there: the client does not import the server).
API_PREFIX = '/v1'


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
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout,
                    context=self.context)
            else:
                conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def close(self):
        conn = getattr(self._local, 'conn', None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method, path, body=None, headers=None):
        conn = self._connection()
        try:
            conn.request(method, self.prefix + path, body=body,
                         headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            if isinstance(e, OSError):
                raise
            raise ConnectionError(str(e)[:100]) from None
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

    The token file is read by :func:`zodbkmi.fileutil.read_secret_file`
    (refused when group or others can access it).  An ``http://`` URL is
    refused with :class:`zodbkmi.exceptions.SettingsError` unless
    ``allow_http=True`` is given (development only: the bearer token and
    the wrapped keys would travel in clear; loopback is no exception).
    """

    rsa_bits = RSA_DEFAULT_BITS
    kek_kind = DEFAULT_KEK_KIND

    def __init__(self, url, token=None, ca_file=None, token_file=None,
                 timeout=DEFAULT_TTL, cache_size=DEFAULT_MAXSIZE,
                 use_limit=DEFAULT_USE_LIMIT, request_timeout=5.0,
                 retries=3, backoff=0.05, client_cert=None,
                 client_key=None, transport=None, allow_http=False):
        check_url(url, allow_http)
        if token is None and token_file is not None:
            token = read_secret_text(token_file, 'token')
        super().__init__(timeout, cache_size, use_limit)
        self.url = url
        self._token = token
        self.retries = retries
        self.backoff = backoff
        self._transport = transport or HTTPTransport(
            url, ca_file=ca_file, timeout=request_timeout,
            client_cert=client_cert, client_key=client_key,
            allow_http=allow_http)

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.url)

    def close(self):
        """Close this thread's connection to the server (it is opened
        again when needed)."""
        self._transport.close()

    # -- HTTP ------------------------------------------------------------

    def _request(self, method, path, doc=None, missing_ok=False):
        """Return the JSON answer, None for a 404 when ``missing_ok``."""
        headers = {'Accept': 'application/json'}
        if self._token:
            headers['Authorization'] = 'Bearer ' + self._token
        body = None
        if doc is not None:
            body = json.dumps(doc).encode('ascii')
            headers['Content-Type'] = 'application/json'
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                status, data = self._transport.request(
                    method, path, body, headers)
                break
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
                if attempt == self.retries:
                    reason = e.strerror or type(e).__name__
                    if not e.strerror and isinstance(e, ConnectionError):
                        # the server closed the connection without an
                        # HTTP answer: a TLS server asked in plain HTTP
                        reason = 'closed without an answer'
                        if self.url.lower().startswith('http://'):
                            reason += ' (is it an https:// server?)'
                    raise KeyServerError(
                        'key server %s cannot be reached (%d attempts): %s'
                        % (self.url, attempt + 1, reason)) from None
                time.sleep(delay)
                delay *= 2
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
                % (self.url, method, path, status, reason or ''),
                status, reason)
        return answer

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
        answer = self._request('GET', '/v1/keks/%s/active'
                               % quote(kek_id, safe=''), missing_ok=True)
        return None if answer is None else answer.get('dek_id')

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
        answer = self._request('POST', '/v1/keys', {
            'wrapped': base64.b64encode(data).decode('ascii')})
        self._forget_active()
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
        self._forget_active()
        evict_everywhere(dek_id)

    def delete(self, dek_id):
        """Destroy ``dek_id`` on the server; it cannot be undone."""
        keystore.check_dek_id(dek_id)
        self._request('DELETE', '/v1/keys/' + dek_id)
        self._forget_active()
        evict_everywhere(dek_id)
