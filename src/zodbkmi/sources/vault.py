"""HashiCorp Vault and OpenBao: master keys from KV v2, KEKs in Transit.

Needs the ``vault`` extra (urllib3).  Every request has a bounded timeout
(``timeout`` seconds to connect and as much to read, two connection
retries with a short backoff), verifies TLS (against ``caFile`` when
given), and any failure raises :class:`~zodbkmi.exceptions.KeySourceError`
naming the URL and path, never the token.

KV v2: the secret holds ``{"key": "<base64>", "algorithm": "aes256-gcm"}``;
its KV version becomes the key version, in the key id
(``vaultkv:<mount>:<path>:v<version>``; key ids travel in URL paths, so
every "/" is written ":").

Transit (wrapping suite 3): the DEK is sent to Transit's ``encrypt``
endpoint with the wrapped-DEK header as the key derivation *context*; the
blob is the returned ``vault:v<N>:...`` ciphertext, which names the Transit
key version.  The Transit key must be created with ``derived=true``.
"""
import base64
import json
import os
import re

from zope.interface import implementer

from zodbkmi import keystore
from zodbkmi.cache import evict_everywhere
from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import SettingsError
from zodbkmi.fileutil import read_secret_text
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IKeyEncryptingKey
from zodbkmi.kek import as_kek
from zodbkmi.sources.local import MasterKey
from zodbkmi.sources.local import decode_key
from zodbkmi.sources.settings import DEFAULT_TIMEOUT

try:
    import urllib3
except ImportError:   # pragma: no cover
    urllib3 = None

_CIPHERTEXT = re.compile(r'vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/=]+\Z')
_NAME = re.compile(r'[A-Za-z0-9_.\-/]+\Z')
_LEAF = re.compile(r'[A-Za-z0-9_.\-]+\Z')


def _b64(data):
    return base64.b64encode(data).decode('ascii')


def _check_name(value, what, slash=True):
    if (not (_NAME if slash else _LEAF).match(value)
            or '..' in value.split('/') or '' in value.split('/')):
        raise KeySourceError('invalid %s %r (letters, digits, "_.-"%s)'
                             % (what, value[:60],
                                ' and "/" between them' if slash else ''))
    return value


def _id_part(value):
    # Key ids travel in URL paths of the key server: no "/" in them.
    return value.replace('/', ':')


def read_token(params, environ=None):
    """The Vault token from ``token``, ``tokenFile`` or ``tokenEnv``."""
    environ = os.environ if environ is None else environ
    if params.get('token'):
        return params['token']
    if params.get('tokenFile'):
        return read_secret_text(params['tokenFile'], 'token')
    name = params.get('tokenEnv')
    if name:
        token = environ.get(name)
        if not token:
            raise KeySourceError('Vault token variable %s is not set' % name,
                                 name)
        return token.strip()
    raise KeySourceError('no Vault token given (token, tokenFile or '
                         'tokenEnv)')


class VaultClient:
    """A small HTTPS client for the Vault/OpenBao HTTP API.

    ``url`` is the server (``https://host:8200``), ``token`` the client
    token (kept private), ``ca_file`` the CA to verify the server with
    (default: the system's), ``timeout`` seconds per connect and per read.
    """

    def __init__(self, url, token, ca_file=None, timeout=DEFAULT_TIMEOUT,
                 allow_http=False, namespace=None):
        if urllib3 is None:   # pragma: no cover
            raise KeySourceError('Vault sources need urllib3: install '
                                 'zodbkmi[vault]', url)
        url = url.rstrip('/')
        if url.startswith('http://') and not allow_http:
            raise KeySourceError('plain http refused for %s' % url, url)
        self.url = url
        self.timeout = timeout
        self._token = token
        self._headers = {'X-Vault-Token': token,
                         'Content-Type': 'application/json'}
        if namespace:
            self._headers['X-Vault-Namespace'] = namespace
        kw = {}
        if url.startswith('https://'):
            from zodbkmi.tls import client_context
            try:
                ctx = client_context(ca_file)
            except SettingsError as e:
                raise KeySourceError('%s (for %s)' % (e, url), url) from None
            kw['ssl_context'] = ctx
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=8, block=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=urllib3.Retry(total=2, connect=2, read=0, status=0,
                                  redirect=0, other=0, backoff_factor=0.1,
                                  raise_on_status=False),
            **kw)

    def __repr__(self):
        return '<VaultClient %s>' % self.url

    def close(self):
        self._pool.clear()

    def request(self, method, path, body=None, what=None):
        """Send ``method /v1/<path>``; return the decoded JSON body (or {}).

        Raises KeySourceError for every failure (with ``status`` and
        ``detail``, the server's message, for an HTTP error status);
        ``what`` describes the object for the message (default: the
        path).
        """
        where = '%s/v1/%s' % (self.url, path)
        what = what or where
        data = None if body is None else json.dumps(body).encode('utf-8')
        try:
            resp = self._pool.request(method, where, body=data,
                                      headers=self._headers)
        except urllib3.exceptions.MaxRetryError as e:
            raise KeySourceError('%s: %s' % (what, self._reason(e.reason)),
                                 where) from None
        except urllib3.exceptions.HTTPError as e:
            raise KeySourceError('%s: %s' % (what, self._reason(e)),
                                 where) from None
        status = resp.status
        try:
            payload = json.loads(resp.data) if resp.data else {}
        except (ValueError, RecursionError):   # not JSON, or nested deeply
            payload = None
        if not isinstance(payload, dict):
            payload = None
        if 200 <= status < 300:
            if payload is None:
                raise KeySourceError('%s: answer is not a JSON object'
                                     % what, where)
            return payload
        errors = (payload or {}).get('errors') or []
        message = '; '.join(str(m) for m in errors)[:200]
        message = ' '.join(message.split())
        raise _http_error(status, message, what, where)

    def _reason(self, reason):
        E = urllib3.exceptions
        # NewConnectionError subclasses ConnectTimeoutError: test it first.
        if isinstance(reason, (E.NewConnectionError, ConnectionError)):
            return 'cannot connect (server down or unreachable)'
        if isinstance(reason, E.ConnectTimeoutError):
            return 'connection timed out after %gs' % self.timeout
        if isinstance(reason, (E.ReadTimeoutError, TimeoutError)):
            return 'no answer within %gs (timed out)' % self.timeout
        if isinstance(reason, E.SSLError):
            if 'CERTIFICATE_VERIFY_FAILED' in str(reason):
                return ('TLS certificate not verified (is caFile the CA of '
                        'this server?)')
            return 'TLS handshake failed'
        if isinstance(reason, E.ProtocolError):
            return 'connection broken (server down or not Vault)'
        return 'request failed (%s)' % type(reason).__name__


def _http_error(status, detail, what, where):
    if status == 403:
        text = 'permission denied (token invalid, expired or not allowed)'
    elif status == 404:
        text = 'not found'
    elif status == 503 and 'sealed' in detail.lower():
        text = 'Vault is sealed'
    elif status in (429, 472, 473, 501, 503):
        text = 'Vault is unavailable (sealed, standby or not initialized)'
    elif status >= 500:
        text = 'server error'
    else:
        text = 'request refused'
    if detail and detail.lower() not in text.lower():
        text += ': ' + detail
    error = KeySourceError('%s: HTTP %d, %s' % (what, status, text), where)
    error.status, error.detail = status, detail
    return error


def client_from_params(params, environ=None):
    """A :class:`VaultClient` from ``vaultKV``/``vaultTransit`` settings."""
    return VaultClient(params['url'], read_token(params, environ),
                       params.get('caFile'),
                       params.get('timeout', DEFAULT_TIMEOUT),
                       params.get('allowHttp', False))


# -- KV v2 ---------------------------------------------------------------

def kv_key_id(mount, path, version):
    """``vaultkv:<mount>:<path>:v<version>``, every "/" written ":"."""
    return 'vaultkv:%s:%s:v%d' % (_id_part(mount), _id_part(path), version)


def read_kv_key(client, mount, path, version=None, algorithm='aes256-gcm',
                expected_check_value=None):
    """Read the master key at ``mount``/``path`` (KV v2) and return a
    :class:`~zodbkmi.sources.local.MasterKey` whose key id names the KV
    version read (the latest one when ``version`` is None)."""
    mount = _check_name(mount, 'KV mount')
    path = _check_name(path, 'KV path')
    api = '%s/data/%s' % (mount, path)
    if version is not None:
        api += '?version=%d' % version
    what = 'vaultKV %s/v1/%s' % (client.url, api)
    try:
        payload = client.request('GET', api, what=what)
    except KeySourceError as e:
        if getattr(e, 'status', None) == 404 and version is not None:
            raise KeySourceError('%s: HTTP 404, version %d not found '
                                 '(missing, deleted or destroyed)'
                                 % (what, version), e.source) from None
        if getattr(e, 'status', None) == 404:
            raise KeySourceError('%s: HTTP 404, not found (no such secret, '
                                 'or its latest version is deleted or '
                                 'destroyed)' % what, e.source) from None
        raise
    data = payload.get('data') or {}
    secret = data.get('data')
    meta = data.get('metadata') or {}
    got_version = meta.get('version')
    if not isinstance(secret, dict):
        raise KeySourceError('%s: the secret version is deleted or destroyed'
                             % what, what)
    if not isinstance(got_version, int):
        raise KeySourceError('%s: no KV version in the answer (is %s a KV '
                             'version 2 mount?)' % (what, mount), what)
    if 'key' not in secret:
        raise InvalidKeyError('%s: the secret has no "key" field' % what)
    if secret.get('algorithm', algorithm) != algorithm:
        raise InvalidKeyError('%s: the secret is for algorithm %r, the '
                              'settings ask for %r'
                              % (what, str(secret.get('algorithm'))[:40],
                                 algorithm))
    if not isinstance(secret['key'], str):
        raise InvalidKeyError('%s: the key is not base64' % what)
    key = decode_key(secret['key'], what)
    return MasterKey(key, kv_key_id(mount, path, got_version),
                     'vaultKV %s/v1/%s/data/%s' % (client.url, mount, path),
                     algorithm, got_version, expected_check_value)


def write_kv_key(client, mount, path, key, algorithm='aes256-gcm', cas=None):
    """Store ``key`` (32 bytes) as a new version at ``mount``/``path``;
    return the new KV version.  ``cas`` is KV's check-and-set version."""
    mount = _check_name(mount, 'KV mount')
    path = _check_name(path, 'KV path')
    body = {'data': {'key': _b64(key), 'algorithm': algorithm}}
    if cas is not None:
        body['options'] = {'cas': cas}
    api = '%s/data/%s' % (mount, path)
    payload = client.request('POST', api, body,
                             what='vaultKV %s/v1/%s' % (client.url, api))
    return payload['data']['version']


def kv_key(params, algorithm='aes256-gcm', environ=None):
    """The master key of ``vaultKV`` settings."""
    client = client_from_params(params, environ)
    try:
        return read_kv_key(client, params.get('mount', 'secret'),
                           params['path'], params.get('version'), algorithm,
                           params.get('checkValue'))
    finally:
        client.close()


# -- Transit ---------------------------------------------------------------

def transit_key_id(mount, name):
    """``transit:<mount>:<key name>``, every "/" of the mount written
    ":"."""
    return 'transit:%s:%s' % (_id_part(mount), name)


def ciphertext_version(blob):
    """The Transit key version named by a suite 3 blob (``vault:vN:...``)."""
    m = _CIPHERTEXT.match(blob.decode('ascii', 'replace'))
    if m is None:
        raise AuthenticationError('not a Transit ciphertext')
    return int(m.group(1))


@implementer(IKeyEncryptingKey)
class TransitKeyEncryptingKey:
    """A key encrypting key that lives in Vault/OpenBao Transit.

    DEKs are wrapped and unwrapped by the server; the Transit key never
    enters the process.  ``client`` is a :class:`VaultClient`, ``name`` the
    Transit key (created with ``derived=true``), ``mount`` its mount.  The
    key is looked up once, so a wrong name fails here, not later.
    """

    suite = wrapped.SUITE_VAULT_TRANSIT

    def __init__(self, client, name, mount='transit', check=True):
        self.client = client
        self.mount = _check_name(mount, 'Transit mount')
        self.name = _check_name(name, 'Transit key name', slash=False)
        self.key_id = transit_key_id(self.mount, self.name)
        self.source = 'vaultTransit %s/v1/%s/keys/%s' % (
            client.url, self.mount, self.name)
        if len(self.key_id) > 255:
            raise KeySourceError('Transit key id longer than 255 characters',
                                 self.source)
        if check:
            self.info()

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)

    def _what(self, op):
        return 'vaultTransit %s/v1/%s/%s/%s' % (
            self.client.url, self.mount, op, self.name)

    def info(self):
        """The Transit key's description (type, versions); checks that it
        exists and is derived."""
        try:
            info = self.client.request(
                'GET', '%s/keys/%s' % (self.mount, self.name),
                what=self.source)['data']
        except KeySourceError as e:
            if getattr(e, 'status', None) in (400, 404):
                raise KeySourceError('%s: no such Transit key' % self.source,
                                     self.source) from None
            raise
        if not info.get('derived'):
            raise KeySourceError(
                '%s: the Transit key must be created with derived=true (the '
                'wrapped-DEK header is its derivation context)'
                % self.source, self.source)
        return info

    @property
    def latest_version(self):
        return self.info()['latest_version']

    def _post(self, op, body):
        return self.client.request(
            'POST', '%s/%s/%s' % (self.mount, op, self.name), body,
            what=self._what(op))['data']

    def wrap(self, dek, aad):
        data = self._post('encrypt', {'plaintext': _b64(dek),
                                      'context': _b64(aad)})
        blob = data.get('ciphertext', '').encode('ascii')
        ciphertext_version(blob)
        return blob

    def _transit_error(self, e):
        if getattr(e, 'status', None) is None:
            return e
        detail = e.detail.lower()
        if e.status == 400 and ('not found' in detail
                                or 'no existing key' in detail):
            return KeySourceError('%s: no such Transit key' % self.source,
                                  self.source)
        if e.status == 400 and 'disallowed by policy' in detail:
            return KeySourceError(
                '%s: the key version is below the min_decryption_version'
                % self.source, self.source)
        if e.status == 400:
            return AuthenticationError(
                'wrapped DEK did not authenticate under KEK %s (%s)'
                % (self.key_id, e.detail[:100]))
        return e

    def unwrap(self, blob, aad):
        try:
            ciphertext = blob.decode('ascii')
        except UnicodeDecodeError:
            raise AuthenticationError('wrapped DEK for KEK %s is not a '
                                      'Transit ciphertext'
                                      % self.key_id) from None
        if not _CIPHERTEXT.match(ciphertext):
            raise AuthenticationError('wrapped DEK for KEK %s is not a '
                                      'Transit ciphertext' % self.key_id)
        try:
            data = self._post('decrypt', {'ciphertext': ciphertext,
                                          'context': _b64(aad)})
        except KeySourceError as e:
            raise self._transit_error(e) from None
        try:
            return base64.b64decode(data['plaintext'], validate=True)
        except (KeyError, TypeError, ValueError):
            raise KeySourceError('%s: malformed decrypt answer'
                                 % self.source, self.source) from None

    def rewrap(self, blob, aad):
        """Return ``blob`` rewrapped by the server under the latest Transit
        key version; the DEK never leaves the server."""
        try:
            data = self._post('rewrap', {'ciphertext': blob.decode('ascii'),
                                         'context': _b64(aad)})
        except KeySourceError as e:
            raise self._transit_error(e) from None
        new = data['ciphertext'].encode('ascii')
        ciphertext_version(new)
        return new

    def rotate(self):
        """Create a new version of the Transit key (needs the ``rotate``
        capability); return the new latest version."""
        self.client.request(
            'POST', '%s/keys/%s/rotate' % (self.mount, self.name), {},
            what=self.source)
        return self.latest_version


def transit_kek(params, environ=None):
    """The :class:`TransitKeyEncryptingKey` of ``vaultTransit`` settings."""
    return TransitKeyEncryptingKey(client_from_params(params, environ),
                                   params['keyName'],
                                   params.get('mount', 'transit'))


def key_version(data):
    """The key version recorded in the wrapped DEK ``data``: the Transit
    key version for suite 3, the KV version in the KEK id for ``vaultkv:``
    ids, else None."""
    wk = wrapped.parse(data)
    if wk.suite == wrapped.SUITE_VAULT_TRANSIT:
        return ciphertext_version(wk.blob)
    m = re.match(r'vaultkv:.*:v([0-9]+)\Z', wk.kek_id)
    return int(m.group(1)) if m else None


def transit_rewrap(facility, kek):
    """Server-side rewrap of every DEK of the Transit KEK ``kek`` in the
    vault of ``facility`` to the latest Transit key version (entries
    already there are left alone).

    The DEKs never enter the process.  Each entry is replaced atomically;
    running it again is harmless.  Return the number of entries changed.
    """
    kek = as_kek(kek)
    if not isinstance(kek, TransitKeyEncryptingKey):
        raise InvalidKeyError('transit_rewrap needs a Transit KEK, not %s'
                              % kek.key_id)
    count = 0
    latest = kek.latest_version
    with facility._write_lock:
        for entry in facility.key_store.entries():
            if entry.kek_id != kek.key_id:
                continue
            wk = wrapped.parse(entry.wrapped)
            if ciphertext_version(wk.blob) >= latest:
                continue
            blob = kek.rewrap(wk.blob, wk.header)
            facility.key_store.update(keystore.KeyStoreEntry(
                entry.dek_id, entry.kek_id, wk.header + blob, entry.state,
                entry.created))
            evict_everywhere(entry.dek_id)
            count += 1
    return count
