"""The key server's REST API: a plain WSGI application over a master facility.

Routes (all JSON, versioned under ``/v1``; see ``openapi.json``)::

    GET    /v1/health                   anyone     {"status": "ok"}
    GET    /v1/status                   client     {"keys": N, "message": ...}
    GET    /v1/openapi.json             client     the OpenAPI document
    GET    /v1/keys                     client     metadata of every key
    POST   /v1/keys                     admin      upload a wrapped DEK
    GET    /v1/keys/{dek_id}            client     metadata + wrapped DEK
    PUT    /v1/keys/{dek_id}            admin      store a new wrapping of it
    DELETE /v1/keys/{dek_id}            admin      destroy a key
    POST   /v1/keys/{dek_id}/retire     admin      make a key decrypt-only
    GET    /v1/keks/{kek_id}/active     client     the active DEK of a KEK
    GET    /v1/metrics                  metrics    Prometheus text format

The server never sees a key encrypting key nor a plaintext data key: clients
wrap new DEKs themselves and upload the wrapped form; the server checks its
format and ids and stores it.  Uploading a new DEK for a KEK retires the
previous active DEK of that KEK (DEK rotation).  Only version 2 wrapped
DEKs are accepted: the server cannot check them (it holds no KEK), its
clients do, and refuse a key whose wrapping does not prove that the KEK's
holder made it.

Every error is an answer ``{"error": "<short message>"}`` (4xx; 503 or 507
when the key store fails or cannot be reached); messages name
key ids, never tokens or key bytes.  Every key operation is written to the
audit log as one JSON line.
"""
import base64
import binascii
import errno
import hashlib
import hmac
import json
from json.encoder import encode_basestring_ascii as _encode_str
import logging
import os
import re
import threading
import time

from zodbkmi import keystore
from zodbkmi.cache import evict_everywhere
from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import KeyStateError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.format import wrapped as wrappedmod
from zodbkmi.interfaces import IKeyStoreCheck

API_PREFIX = '/v1'
#: Default limit of a request body, in bytes.
DEFAULT_MAX_BODY = 64 * 1024
#: ``metrics`` reads ``/v1/metrics`` only; ``client`` the keys; ``admin``
#: everything.
ROLES = ('client', 'admin', 'metrics')
# the roles each needed role admits
_ADMITS = {'client': ('client', 'admin'), 'admin': ('admin',),
           'metrics': ('metrics', 'admin')}
OPENAPI_PATH = os.path.join(os.path.dirname(__file__), 'openapi.json')

_DEK_ID = re.compile(r'[0-9a-f]{32}\Z')
_KEK_ID = re.compile(r'[A-Za-z0-9._:+=-]{1,255}\Z')

logger = logging.getLogger('zodbkmi.server')


class HTTPError(Exception):
    """An answer other than 2xx; ``message`` is safe to show."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


_REASONS = {
    200: 'OK', 201: 'Created', 204: 'No Content', 400: 'Bad Request',
    401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found',
    405: 'Method Not Allowed', 409: 'Conflict', 411: 'Length Required',
    413: 'Content Too Large', 415: 'Unsupported Media Type',
    500: 'Internal Server Error', 503: 'Service Unavailable',
    507: 'Insufficient Storage',
}
# errno values of a key store that is full (answered with 507)
_STORAGE_FULL = frozenset((errno.ENOSPC, errno.EDQUOT))


def hash_token(token):
    """Return the stored form of a bearer token: hex SHA-256.

    Tokens are random (see :func:`new_token`), so a plain hash is enough;
    the server keeps only hashes.
    """
    if isinstance(token, str):
        token = token.encode('utf-8')
    return hashlib.sha256(token).hexdigest()


def new_token():
    """Return a new random bearer token (43 URL-safe characters)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b'=').decode()


class TokenTable:
    """Bearer tokens stored as SHA-256 hashes, each with a name and a role.

    The file form is JSON: ``{"tokens": [{"name": ..., "role": "admin" |
    "client", "sha256": "<hex>"}]}``.  Lookups compare every stored hash in
    constant time.
    """

    def __init__(self, entries=()):
        self.entries = []
        for name, role, digest in entries:
            self.add(name, role, digest)

    def add(self, name, role, digest):
        if role not in ROLES:
            raise ValueError('unknown role %r (admin, client or metrics)'
                             % (role,))
        if not re.match(r'[0-9a-f]{64}\Z', digest or ''):
            raise ValueError('token %r: sha256 must be 64 hex digits'
                             % (name,))
        self.entries.append((name, role, bytes.fromhex(digest)))

    @classmethod
    def load(cls, path):
        """Read the table in ``path``, through
        :func:`zodbkmi.fileutil.read_secret_file`: a table that others can
        write would let them add an admin token."""
        from zodbkmi.fileutil import read_secret_file
        data = read_secret_file(path, 'token table')
        try:
            doc = json.loads(data)
            return cls((t['name'], t['role'], t['sha256'])
                       for t in doc['tokens'])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise KeyStoreError('invalid token file %s: %s'
                                % (path, str(e)[:100])) from None

    def to_json(self):
        return json.dumps({'tokens': [
            {'name': n, 'role': r, 'sha256': d.hex()}
            for n, r, d in self.entries]}, indent=1).encode('ascii')

    def lookup(self, token):
        """Return ``(name, role)`` of ``token`` or None."""
        digest = hashlib.sha256(token.encode('utf-8', 'replace')).digest()
        found = None
        for name, role, stored in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = (name, role)
        return found


class TokenFile:
    """The token table of the file ``path``, read again when the file
    changes (its identity, size and modification time, looked at once per
    ``check`` seconds at most), so that a token added or removed with
    ``zodbkmi token`` counts on a running server within that time.  A file
    that cannot be read again (invalid, or open to group or others)
    leaves the table read last in use, with a warning in the log."""

    def __init__(self, path, check=1.0):
        self.path = path
        self.check = check
        self._signature = self._stat()
        self._table = TokenTable.load(path)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stat(self):
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def lookup(self, token):
        now = time.monotonic()
        if now - self._checked >= self.check and self._lock.acquire(False):
            try:
                self._checked = now
                signature = self._stat()
                if signature != self._signature:
                    self._table = TokenTable.load(self.path)
                    self._signature = signature
            except (OSError, ValueError) as e:   # KeyStoreError is OSError
                logger.warning('cannot read the token file again, the '
                               'tokens read before stay: %s', e)
            finally:
                self._lock.release()
        return self._table.lookup(token)


class StoredTokenTable:
    """The token table kept in a PostgreSQL key store (setting
    ``tokens_in_key_store``), shared by every replica.

    Read again at most every ``refresh`` seconds, so a token added or
    removed in the database takes effect on every replica within that
    time; while the database cannot be read the last table read stays in
    use (and key requests fail with 503 anyway)."""

    def __init__(self, store, refresh=30.0):
        self.store = store
        self.refresh = refresh
        self._table = store.load_tokens()
        self._read = time.monotonic()
        self._lock = threading.Lock()

    def lookup(self, token):
        now = time.monotonic()
        if now - self._read > self.refresh and self._lock.acquire(False):
            try:
                self._table = self.store.load_tokens()
            except KeyStoreError as e:
                logger.warning('cannot read the token table: %s', e)
            finally:
                self._read = now
                self._lock.release()
        return self._table.lookup(token)


def _json_str(value):
    return 'null' if value is None else _encode_str(value)


class AuditLog:
    """Key operations as JSON lines: time, client, operation, key id,
    outcome.  Never a token nor key bytes.

    Each line is one ``write`` on a file opened with ``O_APPEND``, so
    several processes can share the file without interleaving lines.
    """

    #: called with no argument when a line cannot be written (metrics)
    on_failure = None

    def __init__(self, stream=None, path=None):
        self._stream = stream
        self.path = path
        self._fd = None
        self._second = None
        self._stamp = None
        if path is not None and stream is None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                               0o600)

    def write(self, client, operation, key_id, outcome):
        now = int(time.time())
        if now != self._second:
            self._stamp = time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                        time.gmtime(now))
            self._second = now
        line = ('{"time": "%s", "client": %s, "operation": "%s", '
                '"key_id": %s, "outcome": "%s"}\n' % (
                    self._stamp, _json_str(client), operation,
                    _json_str(key_id), outcome))
        try:
            if self._fd is not None:
                os.write(self._fd, line.encode('utf-8'))
            elif self._stream is not None:
                self._stream.write(line)
                self._stream.flush()
        except (OSError, ValueError):
            # the request fails (500): no key operation goes unaudited
            if self.on_failure is not None:
                self.on_failure()
            raise

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _metadata(entry):
    return {'dek_id': entry.dek_id, 'kek_id': entry.kek_id,
            'state': entry.state, 'created': entry.created,
            'version': entry.version}


class KeyServerApp:
    """The WSGI application of the key server.

    ``facility`` is a :class:`zodbkmi.facility.KeyManagementFacility` (the
    master); ``tokens`` a :class:`TokenTable`; ``audit`` an
    :class:`AuditLog`.
    """

    def __init__(self, facility, tokens, audit=None,
                 max_body=DEFAULT_MAX_BODY, metrics=None):
        self.facility = facility
        self.tokens = tokens
        self.audit = audit or AuditLog()
        self.max_body = max_body
        #: a :class:`zodbkmi.servermetrics.ServerMetrics` or None
        self.metrics = metrics
        if metrics is not None:
            self.audit.on_failure = metrics.audit_failed
        self._lock = threading.Lock()
        with open(OPENAPI_PATH, 'rb') as f:
            self._openapi = f.read()

    # -- WSGI ------------------------------------------------------------

    def __call__(self, environ, start_response):
        if self.metrics is None:
            return self._call(environ, start_response)
        return self.metrics.observe(self._call, environ, start_response)

    def _call(self, environ, start_response):
        try:
            status, body, headers = self.handle(environ)
        except HTTPError as e:
            status, headers = e.status, e.headers
            body = json.dumps({'error': e.message}).encode('utf-8')
        except KeyStoreError as e:   # the key store, not the request
            # the message names the store without its password
            logger.error('key store error on %s %s: %s',
                         environ.get('REQUEST_METHOD'),
                         environ.get('PATH_INFO'), e)
            headers = [('Retry-After', '5')]
            if e.errno in _STORAGE_FULL:
                status, body = 507, b'{"error": "key store full"}'
            else:
                status, body = 503, b'{"error": "key store unavailable"}'
        except Exception:   # never a traceback to the client
            logger.exception('internal error on %s %s',
                             environ.get('REQUEST_METHOD'),
                             environ.get('PATH_INFO'))
            status, headers = 500, []
            body = b'{"error": "internal error"}'
        if not isinstance(body, bytes):
            body = json.dumps(body).encode('utf-8')
        if not any(h[0] == 'Content-Type' for h in headers):
            headers = [('Content-Type', 'application/json')] + headers
        headers = [('Content-Length', str(len(body))),
                   ('Cache-Control', 'no-store')] + headers
        start_response('%d %s' % (status, _REASONS.get(status, 'Error')),
                       headers)
        return [body]

    def handle(self, environ):
        method = environ.get('REQUEST_METHOD', 'GET')
        path = environ.get('PATH_INFO', '') or '/'
        if not path.startswith(API_PREFIX + '/'):
            raise HTTPError(404, 'no such resource')
        parts = path[len(API_PREFIX) + 1:].split('/')
        route, args = self._route(parts)
        environ['zodbkmi.route'] = route
        allowed = self.ROUTES[route]
        if method not in allowed:
            raise HTTPError(405, 'method %s not allowed here'
                            % method[:16],
                            [('Allow', ', '.join(sorted(allowed)))])
        handler, role = allowed[method]
        client = None
        if role is not None:
            client = self._authenticate(environ, role)
        return handler(self, environ, client, *args)

    def _route(self, parts):
        n = len(parts)
        if n == 1 and parts[0] in ('health', 'status', 'openapi.json',
                                   'keys', 'metrics'):
            return parts[0], ()
        if parts[0] == 'keys' and n in (2, 3):
            dek_id = parts[1]
            if not _DEK_ID.match(dek_id):
                raise HTTPError(404, 'invalid key id: 32 lowercase hex '
                                     'digits expected')
            if n == 2:
                return 'key', (dek_id,)
            if parts[2] == 'retire':
                return 'retire', (dek_id,)
        if n == 3 and parts[0] == 'keks' and parts[2] == 'active':
            if not _KEK_ID.match(parts[1]):
                raise HTTPError(404, 'invalid KEK id')
            return 'active', (parts[1],)
        raise HTTPError(404, 'no such resource')

    # -- authentication ----------------------------------------------------

    def _authenticate(self, environ, needed):
        found = None
        auth = environ.get('HTTP_AUTHORIZATION')
        if auth:
            scheme, _, token = auth.partition(' ')
            if scheme.lower() != 'bearer' or not token.strip():
                raise HTTPError(401, 'bearer token expected',
                                [('WWW-Authenticate', 'Bearer')])
            found = self.tokens.lookup(token.strip())
            if found is None:
                raise HTTPError(401, 'invalid credentials',
                                [('WWW-Authenticate', 'Bearer')])
        if found is None:
            raise HTTPError(401, 'authentication required',
                            [('WWW-Authenticate', 'Bearer')])
        name, role = found
        if role not in _ADMITS[needed]:
            self.audit.write(name, 'authorize', None, 'forbidden')
            raise HTTPError(403, 'the %s role is required' % needed)
        return name

    # -- bodies ------------------------------------------------------------

    def _read_json(self, environ):
        ctype = environ.get('CONTENT_TYPE', '').split(';')[0].strip()
        if ctype.lower() != 'application/json':
            raise HTTPError(415, 'Content-Type application/json expected')
        try:
            length = int(environ.get('CONTENT_LENGTH') or 0)
        except ValueError:
            raise HTTPError(400, 'invalid Content-Length') from None
        if length > self.max_body:
            raise HTTPError(413, 'body larger than %d bytes' % self.max_body)
        if length <= 0:
            raise HTTPError(400, 'empty body')
        data = environ['wsgi.input'].read(length)
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: arrays or objects nested thousands deep (a
            # few KB of '[') exhaust the parser's recursion limit
            raise HTTPError(400, 'malformed JSON') from None
        if not isinstance(doc, dict):
            raise HTTPError(400, 'a JSON object expected')
        return doc

    # -- handlers ----------------------------------------------------------

    def health(self, environ, client):
        store = self.facility.key_store
        if IKeyStoreCheck.providedBy(store):
            try:
                store.check()
            except KeyStoreError as e:
                logger.warning('health: %s', e)
                return 503, {'status': 'unavailable',
                             'reason': 'key store unreachable'}, [
                                 ('Retry-After', '5')]
        return 200, {'status': 'ok'}, []

    def metrics_text(self, environ, client):
        if self.metrics is None:
            raise HTTPError(404, 'metrics are not enabled on this server')
        body, ctype = self.metrics.exposition(self.facility.key_store)
        return 200, body, [('Content-Type', ctype)]

    def status(self, environ, client):
        n = len(self.facility)
        return 200, {'keys': n,
                     'message': 'KMS server holding %d key%s'
                                % (n, '' if n == 1 else 's')}, []

    def openapi(self, environ, client):
        return 200, self._openapi, []

    def list_keys(self, environ, client):
        keys = [_metadata(e) for e in self.facility.key_store.entries()]
        self.audit.write(client, 'list', None, 'ok')
        return 200, {'keys': keys}, []

    def get_key(self, environ, client, dek_id):
        entry = self.facility.key_store.get(dek_id)
        if entry is None:
            self.audit.write(client, 'fetch', dek_id, 'not found')
            raise HTTPError(404, 'no key %s' % dek_id)
        self.audit.write(client, 'fetch', dek_id, 'ok')
        doc = _metadata(entry)
        doc['wrapped'] = base64.b64encode(entry.wrapped).decode('ascii')
        return 200, doc, []

    def active(self, environ, client, kek_id):
        entry = self.facility.key_store.active_for(kek_id)
        if entry is None:
            self.audit.write(client, 'active', None, 'not found')
            raise HTTPError(404, 'KEK %s has no active key' % kek_id)
        self.audit.write(client, 'active', entry.dek_id, 'ok')
        return 200, _metadata(entry), []

    def _wrapped_from_body(self, environ, client, operation):
        """The version 2 wrapped DEK of a request body ``{"wrapped":
        base64}`` and its parsed header; 400 for anything else."""
        doc = self._read_json(environ)
        if set(doc) - {'wrapped'}:
            raise HTTPError(400, 'unknown field in body (only "wrapped")')
        raw = doc.get('wrapped')
        if not isinstance(raw, str) or len(raw) > 8192:
            raise HTTPError(400, '"wrapped" must be a base64 string')
        try:
            data = base64.b64decode(raw, validate=True)
            parsed = wrappedmod.parse(data)
        except (binascii.Error, ValueError, DecryptionError) as e:
            self.audit.write(client, operation, None, 'invalid')
            raise HTTPError(400, 'invalid wrapped DEK: %s'
                            % str(e)[:80]) from None
        if parsed.version != wrappedmod.VERSION_2:
            # a version 1 RSA wrapping proves nothing about its maker
            self.audit.write(client, operation, parsed.dek_id.hex(),
                             'invalid')
            raise HTTPError(400, 'wrapped DEK version %d is no longer '
                                 'accepted: upgrade the client (version 2 '
                                 'proves who made the key)' % parsed.version)
        if not _KEK_ID.match(parsed.kek_id):
            raise HTTPError(400, 'invalid KEK id in wrapped DEK')
        return data, parsed

    def create_key(self, environ, client):
        data, parsed = self._wrapped_from_body(environ, client, 'create')
        dek_id = parsed.dek_id.hex()
        entry = keystore.KeyStoreEntry(dek_id, parsed.kek_id, data)
        store = self.facility.key_store
        with self._lock:
            # one step: the key store retires the previous active key(s)
            # (a database store in the same transaction)
            try:
                retired = store.rotate(entry)
                status = 201
            except (ValueError, KeyStateError) as e:
                # The DEK id, chosen by the client inside the wrapped DEK,
                # is the idempotency key: the same bytes again are a
                # client retrying (on this or another replica) a creation
                # whose answer it lost; it gets the entry, and what the
                # first request may not have finished (retiring the older
                # active keys, in a store where that is not one step) is
                # done.  Other bytes under that id, or a newer key of the
                # KEK made meanwhile (another replica won the race): 409.
                existing = store.get(dek_id)
                if existing is None or existing.wrapped != data:
                    if isinstance(e, KeyStateError):
                        self.audit.write(client, 'create', dek_id,
                                         'conflict')
                        raise HTTPError(409, str(e)) from None
                    self.audit.write(client, 'create', dek_id, 'exists')
                    raise HTTPError(409, 'key %s exists already'
                                    % dek_id) from None
                entry, status = existing, 200
                retired = []
                for old in keystore.active_entries(store, entry.kek_id):
                    if (old.created, old.dek_id) < (entry.created,
                                                    entry.dek_id):
                        self.facility.retire(old.dek_id)
                        retired.append(old)
        for old in retired:
            evict_everywhere(old.dek_id)
            self.audit.write(client, 'retire', old.dek_id, 'ok')
        self.audit.write(client, 'create', dek_id,
                         'ok' if status == 201 else 'repeated')
        return status, _metadata(entry), [
            ('Location', '%s/keys/%s' % (API_PREFIX, dek_id))]

    def replace_key(self, environ, client, dek_id):
        """Store a new wrapping of an existing DEK (KEK rotation, upgrade
        to format version 2, done by a client that holds the KEK); the
        state and the id stay."""
        data, parsed = self._wrapped_from_body(environ, client, 'rewrap')
        if parsed.dek_id.hex() != dek_id:
            self.audit.write(client, 'rewrap', dek_id, 'invalid')
            raise HTTPError(400, 'the wrapped DEK names another key')
        store = self.facility.key_store
        with self._lock:
            old = store.get(dek_id)
            if old is None:
                self.audit.write(client, 'rewrap', dek_id, 'not found')
                raise HTTPError(404, 'no key %s' % dek_id)
            entry = keystore.KeyStoreEntry(dek_id, parsed.kek_id, data,
                                           old.state)
            store.update(entry)
        evict_everywhere(dek_id)
        self.audit.write(client, 'rewrap', dek_id, 'ok')
        return 200, _metadata(entry), []

    def retire_key(self, environ, client, dek_id):
        try:
            self.facility.retire(dek_id)
        except UnknownKeyError:
            self.audit.write(client, 'retire', dek_id, 'not found')
            raise HTTPError(404, 'no key %s' % dek_id) from None
        self.audit.write(client, 'retire', dek_id, 'ok')
        return 200, _metadata(self.facility.key_store.get(dek_id)), []

    def delete_key(self, environ, client, dek_id):
        try:
            self.facility.delete(dek_id)
        except UnknownKeyError:
            self.audit.write(client, 'delete', dek_id, 'not found')
            raise HTTPError(404, 'no key %s' % dek_id) from None
        self.audit.write(client, 'delete', dek_id, 'ok')
        return 200, {'dek_id': dek_id, 'state': 'destroyed'}, []

    ROUTES = {
        'health': {'GET': (health, None)},
        'status': {'GET': (status, 'client')},
        'openapi.json': {'GET': (openapi, 'client')},
        'keys': {'GET': (list_keys, 'client'),
                 'POST': (create_key, 'admin')},
        'key': {'GET': (get_key, 'client'),
                'PUT': (replace_key, 'admin'),
                'DELETE': (delete_key, 'admin')},
        'retire': {'POST': (retire_key, 'admin')},
        'active': {'GET': (active, 'client')},
        'metrics': {'GET': (metrics_text, 'metrics')},
    }


def make_app(facility, tokens, **kw):
    """Return the WSGI application serving ``facility``."""
    return KeyServerApp(facility, tokens, **kw)


def __getattr__(name):
    # The client side (transports, URL check) moved to zodbkmi.client;
    # the old names are kept importable from here.
    if name in ('HTTPTransport', 'WSGITransport', 'check_url'):
        from zodbkmi import client
        return getattr(client, name)
    raise AttributeError('module %r has no attribute %r' % (__name__, name))
