"""The key server process: settings, TLS material, tokens and cheroot.

One typed settings table (:data:`SETTINGS`) is shared by the command line
(``--key-dir``), the environment (``ZODBKMI_KEY_DIR``) and a config file
(TOML or JSON, ``key_dir = ...``); later sources win: defaults < file <
environment < command line.  Unknown keys are rejected.
"""
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
import threading

from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.vault import write_atomic

logger = logging.getLogger('zodbkmi.server')


class SettingsError(ZodbKmiError, ValueError):
    """A setting is unknown or has a value of the wrong type."""


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
    if not 0 <= v <= 65535:
        raise ValueError('not a port number')
    return v


def _positive(value):
    v = int(value)
    if v < 1:
        raise ValueError('must be at least 1')
    return v


def _optional_str(value):
    return None if value in (None, '') else str(value)


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
    Setting('port', _port, 8443, 'TCP port (0: any free port)'),
    Setting('key_dir', str, 'var/keys', 'directory of wrapped data keys '
            '(may be shared by several server processes)'),
    Setting('tls_dir', str, 'var/tls', 'where a self-signed certificate is '
            'generated when no certificate is given'),
    Setting('tls_cert', _optional_str, None, 'PEM certificate (chain)'),
    Setting('tls_key', _optional_str, None, 'PEM private key of tls_cert'),
    Setting('client_ca', _optional_str, None, 'CA file: ask for TLS client '
            'certificates and verify them against it'),
    Setting('cert_roles', _optional_str, None, 'client certificate common '
            'names and roles, "cn=role,cn=role"'),
    Setting('insecure_http', _bool, False, 'serve plain HTTP (development '
            'only; never across a network)'),
    Setting('tokens_file', str, 'var/tokens.json', 'hashed bearer tokens; '
            'created with an admin and a client token if missing'),
    Setting('audit_log', str, 'var/audit.log', 'JSON lines audit log ("-": '
            'standard error)'),
    Setting('access_log', _bool, True, 'log one line per request'),
    Setting('threads', _positive, 16, 'worker threads per process'),
    Setting('workers', _positive, 1, 'processes sharing the port '
            '(SO_REUSEPORT)'),
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
            import tomllib
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


def parse_cert_roles(text):
    roles = {}
    for item in (text or '').split(','):
        if item.strip():
            cn, _, role = item.partition('=')
            if role.strip() not in ('admin', 'client'):
                raise SettingsError('cert_roles: %r needs "=admin" or '
                                    '"=client"' % item.strip())
            roles[cn.strip()] = role.strip()
    return roles


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


def server_context(cert, key, client_ca=None):
    """The server's TLS context: TLS 1.2 minimum; client certificates
    verified against ``client_ca`` when given (optional, so token clients
    still connect)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


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

class _AccessLog:
    """WSGI middleware: one log line per request (method, path, status,
    client address); never headers or bodies."""

    def __init__(self, app, log):
        self.app, self.log = app, log

    def __call__(self, environ, start_response):
        def start(status, headers, exc_info=None):
            self.log.info('%s %s %s %s', environ.get('REMOTE_ADDR', '-'),
                          environ.get('REQUEST_METHOD'),
                          environ.get('PATH_INFO', '')[:200],
                          status.split(' ', 1)[0])
            return start_response(status, headers, exc_info)
        return self.app(environ, start)


def build(settings, out=sys.stdout):
    """Prepare everything :func:`serve` needs; return ``(server, url,
    app)`` with a cheroot server not yet started."""
    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    from zodbkmi.facility import KeyManagementFacility
    from zodbkmi.rest import AuditLog, KeyServerApp

    facility = KeyManagementFacility(settings['key_dir'])
    tokens, created = ensure_tokens(settings['tokens_file'])
    audit_path = settings['audit_log']
    if audit_path == '-':
        audit = AuditLog(stream=sys.stderr)
    else:
        d = os.path.dirname(os.path.abspath(audit_path))
        os.makedirs(d, mode=0o700, exist_ok=True)
        audit = AuditLog(path=audit_path)
    app = KeyServerApp(facility, tokens, audit=audit,
                       max_body=settings['max_body'],
                       cert_roles=parse_cert_roles(settings['cert_roles']))
    wsgi_app = app
    if settings['access_log']:
        wsgi_app = _AccessLog(app, logging.getLogger('zodbkmi.access'))
    server = wsgi.Server((settings['host'], settings['port']), wsgi_app,
                         numthreads=settings['threads'],
                         server_name='zodbkmi', timeout=30,
                         request_queue_size=128,
                         reuse_port=settings['workers'] > 1)
    scheme = 'http'
    fp = None
    if not settings['insecure_http']:
        cert, key = settings['tls_cert'], settings['tls_key']
        if not cert:
            cert, key = generate_self_signed(settings['tls_dir'],
                                             settings['host'])
        elif not key:
            raise SettingsError('tls_cert needs tls_key')
        adapter = BuiltinSSLAdapter(cert, key)
        adapter.context = server_context(cert, key, settings['client_ca'])
        server.ssl_adapter = adapter
        scheme = 'https'
        fp = fingerprint(cert)
    for path in created:
        print('created token file %s' % path, file=out)
    return server, scheme, fp, app


def serve(settings, out=sys.stdout, ready=None):
    """Run the key server until SIGTERM or SIGINT; return the exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(name)s %(message)s')
    server, scheme, fp, app = build(settings, out)
    server.prepare()   # binds: the port is known now
    host, port = server.bind_addr[:2]
    shown = '[%s]' % host if ':' in host else host
    print('zodbkmi key server listening on %s://%s:%d/v1/'
          % (scheme, shown, port), file=out)
    if fp:
        print('certificate SHA-256 fingerprint: %s' % fp, file=out)
    else:
        print('WARNING: plain HTTP, for development only', file=out)
    out.flush()
    children = []
    if settings['workers'] > 1:
        children = _fork_workers(settings, server)
    try:
        _run_until_signal(server)
    finally:
        app.audit.close()
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except OSError:
                pass
    return 0


def _run_until_signal(server):
    """Serve in a thread until SIGTERM or SIGINT, then stop gracefully
    (requests in progress finish; cheroot waits for its workers)."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve, name='zodbkmi-serve',
                              daemon=True)
    thread.start()
    while not stop.wait(0.5):
        if not thread.is_alive():   # pragma: no cover (server died)
            break
    server.stop()
    thread.join(10)


def _fork_workers(settings, server):
    """Start ``workers - 1`` more processes, each with its own listening
    socket on the same port (SO_REUSEPORT); the kernel spreads
    connections."""
    children = []
    for _ in range(settings['workers'] - 1):
        pid = os.fork()
        if pid == 0:   # pragma: no cover (child)
            try:
                child_settings = dict(settings, port=server.bind_addr[1],
                                      workers=1)
                child, _, _, app = build(child_settings, open(os.devnull, 'w'))
                child.prepare()
                _run_until_signal(child)
            finally:
                os._exit(0)
        children.append(pid)
    return children
