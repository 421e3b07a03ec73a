"""The key server process: settings, TLS material, tokens and granian.

One typed settings table (:data:`SETTINGS`) is shared by the command line
(``--key-dir``), the environment (``ZODBKMI_KEY_DIR``) and a config file
(TOML or JSON, ``key_dir = ...``); later sources win: defaults < file <
environment < command line.  Unknown keys are rejected.
"""
import datetime
import hashlib
import ipaddress
import json
import os
import re
import ssl
import sys

try:
    import tomllib
except ImportError:     # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from zodbkmi.exceptions import SettingsError
from zodbkmi.fileutil import write_atomic
from zodbkmi.tls import server_context


def _bool(value):
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ('1', 'true', 'yes', 'on'):
        return True
    if v in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError('not a boolean')


def _port(value):
    v = int(value)
    if not 0 < v <= 65535:
        raise ValueError('not a port number')
    return v


def _positive(value):
    v = int(value)
    if v < 1:
        raise ValueError('must be at least 1')
    return v


def _optional_str(value):
    return None if value in (None, '') else str(value)


def _key_store_url(value):
    if value in (None, ''):
        return None
    value = str(value)
    if not value.startswith(('postgresql://', 'postgres://')):
        # never echo the value: it may hold a password
        raise ValueError('a postgresql:// URL expected')
    return value


class Setting:
    __slots__ = ('name', 'type', 'default', 'help')

    def __init__(self, name, type, default, help):
        self.name, self.type, self.default, self.help = (
            name, type, default, help)

    @property
    def flag(self):
        return '--' + self.name.replace('_', '-')

    @property
    def env(self):
        return 'ZODBKMI_' + self.name.upper()


#: The settings of ``zodbkmi serve``.
SETTINGS = (
    Setting('host', str, '127.0.0.1', 'address to listen on'),
    Setting('port', _port, 8443, 'TCP port'),
    Setting('key_dir', str, 'var/keys', 'directory of wrapped data keys '
            '(may be shared by several server processes)'),
    Setting('key_store', _key_store_url, None, 'postgresql:// URL of a '
            'key store in PostgreSQL shared by server replicas (libpq '
            'options such as sslmode and sslrootcert in the query, plus '
            'pool_size and pool_timeout); unset: the key_dir directory'),
    Setting('tokens_in_key_store', _bool, False, 'keep the hashed tokens '
            'in the PostgreSQL key store instead of tokens_file (shared by '
            'the replicas)'),
    Setting('metrics', _bool, True, 'serve /v1/metrics (Prometheus text '
            'format) to tokens of the metrics or admin role'),
    Setting('tls_dir', str, 'var/tls', 'where a self-signed certificate is '
            'generated when no certificate is given'),
    Setting('tls_cert', _optional_str, None, 'PEM certificate (chain)'),
    Setting('tls_key', _optional_str, None, 'PEM private key of tls_cert'),
    Setting('client_ca', _optional_str, None, 'CA file: require TLS client '
            'certificates signed by it (mutual TLS, on top of tokens)'),
    Setting('insecure_http', _bool, False, 'serve plain HTTP (development '
            'only; never across a network)'),
    Setting('tokens_file', str, 'var/tokens.json', 'hashed bearer tokens; '
            'created with an admin and a client token if missing'),
    Setting('audit_log', str, 'var/audit.log', 'JSON lines audit log ("-": '
            'standard error)'),
    Setting('access_log', _bool, True, 'log one line per request'),
    Setting('threads', _positive, min(16, 2 * (os.cpu_count() or 1) + 1),
            'threads running the application, per worker process'),
    Setting('workers', _positive, 1, 'worker processes'),
    Setting('max_body', _positive, 65536, 'largest request body (bytes)'),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def _convert(setting, value, source):
    try:
        return setting.type(value)
    except (TypeError, ValueError) as e:
        raise SettingsError('invalid value for %s in %s: %s'
                            % (setting.name, source, e)) from None


def read_config_file(path):
    """Return the settings of a TOML (``.toml``) or JSON file."""
    with open(path, 'rb') as f:
        data = f.read()
    try:
        if path.endswith('.json'):
            doc = json.loads(data)
        else:
            doc = tomllib.loads(data.decode('utf-8'))
    except Exception as e:
        raise SettingsError('cannot parse %s: %s'
                            % (path, str(e).splitlines()[0][:100])) from None
    if not isinstance(doc, dict):
        raise SettingsError('%s: a table of settings expected' % path)
    return doc


def resolve_settings(config_file=None, environ=None, overrides=None):
    """Return the settings (a dict) from defaults, file, environment and
    ``overrides`` (command line: names to values, None meaning unset)."""
    environ = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    if config_file:
        for key, value in read_config_file(config_file).items():
            setting = _BY_NAME.get(key.replace('-', '_'))
            if setting is None:
                raise SettingsError('unknown setting %r in %s'
                                    % (key, config_file))
            values[setting.name] = _convert(setting, value, config_file)
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.name] = _convert(
                setting, environ[setting.env], setting.env)
    for key, value in (overrides or {}).items():
        setting = _BY_NAME.get(key)
        if setting is None:
            raise SettingsError('unknown setting %r' % (key,))
        if value is not None:
            values[key] = _convert(setting, value, setting.flag)
    return values


# -- TLS ---------------------------------------------------------------------

def generate_self_signed(tls_dir, host='127.0.0.1'):
    """Create ``cert.pem`` and ``key.pem`` (0600) in ``tls_dir`` if missing;
    return their paths.  An ECDSA P-256 key, valid for ten years, for
    localhost, 127.0.0.1 and ``host``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path = os.path.join(tls_dir, 'cert.pem')
    key_path = os.path.join(tls_dir, 'key.pem')
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    os.makedirs(tls_dir, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         'zodbkmi key server')])
    sans = [x509.DNSName('localhost'),
            x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]
    try:
        ip = ipaddress.ip_address(host)
        if str(ip) != '127.0.0.1':
            sans.append(x509.IPAddress(ip))
    except ValueError:
        if host != 'localhost':
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                           critical=True)
            .sign(key, hashes.SHA256()))
    write_atomic(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                 mode=0o600)
    return cert_path, key_path


def fingerprint(cert_path):
    """SHA-256 fingerprint of the first certificate in ``cert_path``
    (colon separated hex, as ``openssl x509 -fingerprint -sha256``)."""
    with open(cert_path, 'rb') as f:
        der = ssl.PEM_cert_to_DER_cert(f.read().decode('ascii'))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ':'.join(digest[i:i + 2] for i in range(0, len(digest), 2))


# -- tokens ------------------------------------------------------------------

def ensure_tokens(tokens_file):
    """Load the token table; create it with a new admin and client token
    when missing (the tokens go to ``admin.token`` and ``client.token``
    (0600) beside it, and only their hashes into ``tokens_file``).
    Return ``(table, created_paths)``."""
    from zodbkmi.rest import TokenTable, hash_token, new_token
    if os.path.exists(tokens_file):
        return TokenTable.load(tokens_file), []
    directory = os.path.dirname(os.path.abspath(tokens_file))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    table, created = TokenTable(), []
    for role in ('admin', 'client'):
        token = new_token()
        path = os.path.join(directory, role + '.token')
        write_atomic(path, token.encode('ascii') + b'\n')
        table.add(role, role, hash_token(token))
        created.append(path)
    write_atomic(tokens_file, table.to_json())
    return table, created


# -- running -----------------------------------------------------------------

#: Environment variable handing the resolved settings to worker processes.
WORKER_SETTINGS_ENV = 'ZODBKMI_SERVER_WORKER_SETTINGS'


def open_key_store(settings, init=False):
    """The PostgreSQL key store of ``settings`` (None: the directory);
    ``init`` creates or migrates its schema."""
    if not settings.get('key_store'):
        if settings.get('tokens_in_key_store'):
            raise SettingsError('tokens_in_key_store needs a postgresql:// '
                                'key_store')
        return None
    from zodbkmi.keystore_pg import PostgresKeyStore
    return PostgresKeyStore(settings['key_store'], init=init)


def make_app(settings, init=False):
    """Return the key server's WSGI application for ``settings``."""
    from zodbkmi.facility import KeyManagementFacility
    from zodbkmi.rest import AuditLog, KeyServerApp, TokenFile

    facility = KeyManagementFacility(settings['key_dir'])
    store = open_key_store(settings, init=init)
    if store is not None:
        facility.key_store = store
    if settings.get('tokens_in_key_store'):
        from zodbkmi.rest import StoredTokenTable
        tokens = StoredTokenTable(store)
    else:
        tokens = TokenFile(settings['tokens_file'])
    metrics = None
    if settings.get('metrics', True):
        from zodbkmi.servermetrics import ServerMetrics
        metrics = ServerMetrics()
        facility.key_store = metrics.instrument(facility.key_store)
    audit_path = settings['audit_log']
    if audit_path == '-':
        audit = AuditLog(stream=sys.stderr)
    else:
        audit = AuditLog(path=audit_path)
    return KeyServerApp(facility, tokens, audit=audit,
                        max_body=settings['max_body'], metrics=metrics)


def init_key_store(settings, out=sys.stdout):
    """``zodbkmi serve --init-vault``: create or migrate the schema of the
    PostgreSQL key store (and its first tokens when they live there);
    return the exit code."""
    from zodbkmi.keystore_pg import SCHEMA_VERSION
    if not settings.get('key_store'):
        raise SettingsError('--init-vault needs a postgresql:// key_store')
    store = open_key_store(settings)
    try:
        found = store.init_schema()
        if found == SCHEMA_VERSION:
            print('key store %s: schema version %d, up to date'
                  % (store.path, found), file=out)
        else:
            print('key store %s: schema version %s -> %d'
                  % (store.path, found or 'none', SCHEMA_VERSION), file=out)
        if settings.get('tokens_in_key_store'):
            for path in ensure_stored_tokens(store, settings['tokens_file']):
                print('created token file %s' % path, file=out)
    finally:
        store.close()
    return 0


def ensure_stored_tokens(store, tokens_file):
    """Add an admin and a client token to the token table of ``store`` when
    it has none of that name; the new tokens are written to
    ``admin.token`` and ``client.token`` beside ``tokens_file``.  Return
    their paths."""
    from zodbkmi.rest import hash_token, new_token
    directory = os.path.dirname(os.path.abspath(tokens_file))
    created = []
    for role in ('admin', 'client'):
        token = new_token()
        if store.add_token(role, role, hash_token(token)):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            path = os.path.join(directory, role + '.token')
            write_atomic(path, token.encode('ascii') + b'\n')
            created.append(path)
    return created


#: What a token name may be (it is what the audit log records).
TOKEN_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z')


class _TokenTableFile:
    """Read, change and write the token file of ``settings`` under an
    exclusive lock (``<tokens_file>.lock``), as ``zodbkmi token`` does;
    or the token table of the PostgreSQL key store with
    ``tokens_in_key_store``."""

    def __init__(self, settings, out, create=False):
        self.settings = settings
        self.out = out
        self.create = create
        self.store = None
        if settings.get('tokens_in_key_store'):
            self.store = open_key_store(settings)

    def __enter__(self):
        if self.store is not None:
            return self
        import fcntl
        path = self.settings['tokens_file']
        if not self.create and not os.path.exists(path):
            raise SettingsError('token file %s does not exist (the first '
                                'start of the server, or zodbkmi token add, '
                                'makes it)' % path)
        for created in ensure_tokens(path)[1]:
            print('created token file %s' % created, file=self.out)
        self._lock = os.fdopen(os.open(path + '.lock', os.O_WRONLY
                                       | os.O_CREAT, 0o600), 'w')
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        from zodbkmi.rest import TokenTable
        self.table = TokenTable.load(path)
        return self

    def __exit__(self, *exc):
        if self.store is not None:
            self.store.close()
        else:
            self._lock.close()

    def entries(self):
        if self.store is not None:
            return self.store.load_tokens().entries
        return self.table.entries

    def add(self, name, role, digest):
        if self.store is not None:
            return self.store.add_token(name, role, digest)
        if any(n == name for n, _, _ in self.table.entries):
            return False
        self.table.add(name, role, digest)
        write_atomic(self.settings['tokens_file'], self.table.to_json())
        return True

    def remove(self, name):
        if self.store is not None:
            return self.store.remove_token(name)
        before = len(self.table.entries)
        self.table.entries = [e for e in self.table.entries if e[0] != name]
        if len(self.table.entries) == before:
            return False
        write_atomic(self.settings['tokens_file'], self.table.to_json())
        return True

    @property
    def where(self):
        if self.store is not None:
            return 'key store %s' % self.store.path
        return self.settings['tokens_file']


def add_token(settings, name, role, path=None, out=sys.stdout):
    """``zodbkmi token add``: make a bearer token of ``role`` named
    ``name``, write it to ``path`` (0600; default ``<name>.token`` beside
    ``tokens_file``; never over an existing file) and its hash to the
    token table of ``settings``.  Return the path."""
    from zodbkmi.rest import ROLES, hash_token, new_token
    if not TOKEN_NAME.match(name or ''):
        raise SettingsError('invalid token name %r: letters, digits and '
                            '"_.@-", at most 64' % (name,))
    if role not in ROLES:
        raise SettingsError('unknown role %r (%s)' % (role, ', '.join(ROLES)))
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(
            settings['tokens_file'])), name + '.token')
    token = new_token()
    with _TokenTableFile(settings, out, create=True) as table:
        exists = SettingsError('a token named %s exists in %s: remove it '
                               'first' % (name, table.where))
        if any(n == name for n, _, _ in table.entries()):
            raise exists
        if os.path.lexists(path):
            raise SettingsError('%s exists: give another --out' % path)
        if not table.add(name, role, hash_token(token)):
            raise exists
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700,
                        exist_ok=True)
            write_atomic(path, token.encode('ascii') + b'\n',
                         overwrite=False)
        except OSError:
            table.remove(name)   # a token nobody has is no token
            raise
        print('created token %s (%s) in %s' % (name, role, path), file=out)
    return path


def remove_token(settings, name, out=sys.stdout):
    """``zodbkmi token remove``: delete the token ``name`` from the token
    table of ``settings`` (refused for the last admin token)."""
    with _TokenTableFile(settings, out) as table:
        entries = table.entries()
        roles = {n: r for n, r, _ in entries}
        if name not in roles:
            raise SettingsError('no token named %s in %s'
                                % (name, table.where))
        if roles[name] == 'admin' and \
                sum(1 for r in roles.values() if r == 'admin') == 1:
            raise SettingsError('%s is the last admin token: add another '
                                'admin token first' % name)
        table.remove(name)
        print('removed token %s from %s' % (name, table.where), file=out)


def list_tokens(settings, out=sys.stdout):
    """``zodbkmi token list``: the names and roles of the tokens (never a
    hash)."""
    with _TokenTableFile(settings, out) as table:
        for name, role, _ in sorted(table.entries()):
            print('%s %s' % (name, role), file=out)


def worker_app():
    """The application of one worker process (granian calls this factory
    in each worker; the settings come from the parent's environment)."""
    return make_app(json.loads(os.environ[WORKER_SETTINGS_ENV]))


def prepare(settings, out=sys.stdout):
    """Create what a first start needs (key directory, tokens, TLS
    material, audit log directory); return ``(scheme, cert, key)``."""
    if settings.get('key_store'):
        # the schema is created (or migrated) by the first start
        store = open_key_store(settings, init=True)
        try:
            if settings.get('tokens_in_key_store'):
                created = ensure_stored_tokens(store,
                                               settings['tokens_file'])
            else:
                _, created = ensure_tokens(settings['tokens_file'])
        finally:
            store.close()
    else:
        os.makedirs(settings['key_dir'], mode=0o700, exist_ok=True)
        _, created = ensure_tokens(settings['tokens_file'])
    for path in created:
        print('created token file %s' % path, file=out)
    if settings['audit_log'] != '-':
        os.makedirs(os.path.dirname(os.path.abspath(settings['audit_log'])),
                    mode=0o700, exist_ok=True)
    if settings['insecure_http']:
        return 'http', None, None
    cert, key = settings['tls_cert'], settings['tls_key']
    if not cert:
        cert, key = generate_self_signed(settings['tls_dir'],
                                         settings['host'])
    elif not key:
        raise SettingsError('tls_cert needs tls_key')
    # fail early, with a short message naming the file, on unusable TLS
    # material
    server_context(cert, key, settings['client_ca'])
    return 'https', cert, key


def check_address(host, port):
    """Raise SettingsError, in one line, if ``host:port`` cannot be
    listened on (granian would fail with a Rust backtrace)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as e:
        raise SettingsError('cannot listen on %s port %d: %s'
                            % (host, port, e.strerror or e)) from None


def serve(settings, out=sys.stdout):
    """Run the key server until SIGTERM or SIGINT; return the exit code.

    The HTTP and TLS work is done by granian (Rust: hyper and rustls) in
    ``workers`` processes with ``threads`` threads each running the WSGI
    application.
    """
    from granian import Granian
    from granian.constants import Interfaces
    from granian.constants import SSLProtocols
    from granian.errors import ConfigurationError

    if settings['workers'] > 1 and settings.get('metrics', True) and \
            not os.environ.get('PROMETHEUS_MULTIPROC_DIR'):
        # before prometheus_client is imported: each worker writes its
        # numbers to files there, and a scrape adds them up
        import tempfile
        made = tempfile.mkdtemp(prefix='zodbkmi-metrics-')
        os.environ['PROMETHEUS_MULTIPROC_DIR'] = made
    else:
        made = None
    scheme, cert, key = prepare(settings, out)
    app = make_app(settings)   # check that the worker will start
    app.audit.close()
    close = getattr(app.facility.key_store, 'close', None)
    if close is not None:
        close()
    host, port = settings['host'], settings['port']
    check_address(host, port)
    shown = '[%s]' % host if ':' in host else host
    print('zodbkmi key server listening on %s://%s:%d/v1/'
          % (scheme, shown, port), file=out)
    if cert:
        print('certificate SHA-256 fingerprint: %s' % fingerprint(cert),
              file=out)
    else:
        print('WARNING: plain HTTP, for development only', file=out)
    out.flush()
    os.environ[WORKER_SETTINGS_ENV] = json.dumps(settings)
    kw = {}
    if cert:
        from pathlib import Path
        kw.update(ssl_cert=Path(cert), ssl_key=Path(key),
                  ssl_protocol_min=SSLProtocols.tls12)
        if settings['client_ca']:
            kw.update(ssl_ca=Path(settings['client_ca']),
                      ssl_client_verify=True)
    server = Granian(
        'zodbkmi.server:worker_app', factory=True, address=host, port=port,
        interface=Interfaces.WSGI, workers=settings['workers'],
        blocking_threads=settings['threads'], log_enabled=True,
        log_access=settings['access_log'],
        log_access_format='%(addr)s "%(method)s %(path)s" %(status)d '
                          '%(dt_ms).3fms',
        websockets=False, **kw)
    try:
        server.serve()
    except ConfigurationError as e:
        raise SettingsError('server configuration refused: %s'
                            % str(e)[:200]) from None
    finally:
        if made is not None:
            import shutil
            shutil.rmtree(made, ignore_errors=True)
    return 0
