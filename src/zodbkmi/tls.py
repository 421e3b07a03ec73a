"""TLS contexts of the key server, its clients and the Vault/OpenBao
client, with errors that name the file at fault.

OpenSSL says what is wrong (``NO_CERTIFICATE_OR_CRL_FOUND``) but not in
which file, and ``ssl.SSLContext.load_cert_chain`` does not say whether
the certificate or the key is at fault.  These functions load one file at a
time and raise :class:`~zodbkmi.exceptions.SettingsError` naming the
setting and the file.
"""
import os
import re
import ssl

from zodbkmi.exceptions import SettingsError

#: OpenSSL's reasons, as a user would say them.
_REASONS = {
    'NO_CERTIFICATE_OR_CRL_FOUND': 'no PEM certificate in it',
    'NO_START_LINE': 'not PEM',
    'PEM_LIB': 'not a PEM certificate or key',
    'KEY_VALUES_MISMATCH': 'the key does not belong to the certificate',
    'BAD_BASE64_DECODE': 'damaged PEM (bad base64)',
    'CA_MD_TOO_WEAK': 'signed with a digest too weak to trust',
    'EE_KEY_TOO_SMALL': 'the key is too small',
}


def describe(error):
    """A short text for an ``ssl.SSLError`` or ``OSError`` of loading a
    file."""
    if isinstance(error, ssl.SSLError):
        reason = getattr(error, 'reason', None)
        if not reason:
            # "[SSL] PEM lib (_ssl.c:3905)": the words, as a reason
            text = str(error.args[1] if len(error.args) > 1 else error)
            text = re.sub(r'^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$', '', text)
            reason = text.upper().replace(' ', '_')
        return _REASONS.get(reason, reason.replace('_', ' ').lower())
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _refused(role, path, error):
    return SettingsError('%s %s: %s' % (role, path, describe(error)))


def _readable(role, path):
    try:
        with open(path, 'rb'):
            pass
    except OSError as e:
        raise _refused(role, path, e) from None


def client_context(ca_file=None, client_cert=None, client_key=None,
                   ca_role='CA file'):
    """A client context verifying servers against ``ca_file`` (default:
    the system's CAs), TLS 1.2 minimum, with the client certificate when
    given."""
    if ca_file is not None:
        _readable(ca_role, ca_file)
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as e:
        raise _refused(ca_role, ca_file, e) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert:
        _load_chain(ctx, client_cert, client_key, 'client certificate',
                    'client key')
    return ctx


def server_context(cert, key, client_ca=None):
    """The key server's context: TLS 1.2 minimum; client certificates
    verified against ``client_ca`` when given (optional, so token clients
    still connect)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, 'TLS certificate', 'TLS key')
    if client_ca:
        _readable('client CA file', client_ca)
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as e:
            raise _refused('client CA file', client_ca, e) from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _load_chain(ctx, cert, key, cert_role, key_role):
    _readable(cert_role, cert)
    if key is not None:
        _readable(key_role, key)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        if key is None or os.path.samefile(cert, key):
            raise _refused(cert_role, cert, e) from None
        raise SettingsError('%s %s with %s %s: %s' % (
            cert_role, cert, key_role, key, describe(e))) from None
