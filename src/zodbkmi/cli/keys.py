"""Key commands: ``kek-file`` and ``create-key`` work locally; ``new``,
``get``, ``status``, ``list``, ``rotate``, ``retire``, ``delete`` are the
key server's client (the successor of keas.kmi's testclient).

The server is named by ``--url`` (or ``ZODBKMI_URL``; several replicas of
one key service: ``--url`` again, or URLs separated by commas), its CA by
``--ca-file`` (``ZODBKMI_CA_FILE``), the bearer token by ``--token-file``
(``ZODBKMI_TOKEN_FILE``, mode 0600) or ``ZODBKMI_TOKEN``; an ``http://``
URL needs ``--allow-http``.  Defaults fit ``zodbkmi serve`` started in the
same directory.
"""
import json
import os
import sys

from zodbkmi.exceptions import UsageError

DEFAULT_URL = 'https://127.0.0.1:8443'


def _common(p, admin=False):
    g = p.add_argument_group('key server')
    g.add_argument('--url', default=None, action='append',
                   help='key server URL (ZODBKMI_URL; default %s); '
                        'replicas of one key service: give it again, or '
                        'several URLs separated by commas' % DEFAULT_URL)
    g.add_argument('--ca-file', default=None,
                   help='CA of the server certificate (ZODBKMI_CA_FILE; '
                        'default var/tls/cert.pem if it exists)')
    g.add_argument('--token-file', default=None,
                   help='file holding a bearer token, mode 0600 '
                        '(ZODBKMI_TOKEN_FILE; '
                        'default var/%s.token if it exists)'
                        % ('admin' if admin else 'client'))
    g.add_argument('--timeout', type=float, default=5.0,
                   help='seconds per request attempt (default 5)')
    g.add_argument('--allow-http', action='store_true',
                   help='accept an http:// URL (development only: the '
                        'bearer token and the wrapped keys then travel in '
                        'clear)')
    p.set_defaults(admin=admin)


def register(subparsers):
    p = subparsers.add_parser(
        'kek-file', help='write a new key encrypting key file',
        description='Generate a key encrypting key and write it to '
                    'KEK_FILE (atomically, mode 0600; an existing file is '
                    'never overwritten): one base64 line of an AES-256 '
                    'key, or with --kind hybrid (or --rsa, the same as '
                    '--kind rsa) the PEM of a private key.  '
                    'Print the KEK id.  Keep the file: it is stored '
                    'nowhere else, and what its data keys encrypt cannot '
                    'be read without it.')
    p.add_argument('kek_file', help='where to write the KEK (must not '
                                    'exist)')
    p.add_argument('--kind', choices=('aes', 'hybrid', 'rsa'), default=None,
                   help='aes (the default here: AES-256), hybrid '
                        '(ML-KEM-768 + X25519) or rsa (3072 bits)')
    p.add_argument('--rsa', action='store_true',
                   help='an RSA key (3072 bits) instead of AES-256 '
                        '(--kind rsa)')
    p.set_defaults(func=cmd_kek_file)

    p = subparsers.add_parser(
        'create-key', help='create a data key for a KEK',
        description='Create a data key wrapped by the KEK in KEK_FILE and '
                    'make it the active data key of that KEK (the previous '
                    'one becomes decrypt-only); print its id.  In a local '
                    'key directory with --key-dir (made if missing), else '
                    'on the key server.  KEK_FILE is read as the key '
                    'holder reads it (mode 0600).')
    p.add_argument('kek_file')
    p.add_argument('--key-dir', default=None,
                   help='a local key directory instead of the key server')
    _common(p, admin=True)
    p.set_defaults(func=cmd_create_key)

    p = subparsers.add_parser(
        'new', help='create a KEK here and a data key on the server',
        description='Create a key encrypting key locally (a hybrid '
                    'ML-KEM-768 + X25519 key, or with --kind rsa an RSA '
                    'key) and an active data key wrapped by it on the '
                    'server; write the KEK (PEM, 0600) to KEK_FILE and '
                    'print the data key id.')
    p.add_argument('kek_file', help='where to write the new KEK (must not '
                                    'exist)')
    p.add_argument('--kind', choices=('hybrid', 'rsa'), default='hybrid',
                   help='hybrid (post-quantum ML-KEM-768 + X25519, the '
                        'default) or rsa (RSA-3072)')
    _common(p, admin=True)
    p.set_defaults(func=cmd_new)

    p = subparsers.add_parser(
        'get', help='show a wrapped data key',
        description='Print the metadata and the wrapped form of a data key '
                    'as JSON (the wrapped form is not secret).')
    p.add_argument('dek_id')
    _common(p)
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser('status', help='show the server status',
                              description='Print "KMS server holding N '
                                          'keys".')
    _common(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser('list', help='list the keys',
                              description='Print one line per data key: '
                                          'id, state, KEK id.')
    _common(p)
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser(
        'rotate', help='give a KEK a new active data key',
        description='Create a new data key wrapped by the KEK in KEK_FILE '
                    '(locally) and upload it; the previous one becomes '
                    'decrypt-only.  Print the new id.  KEK_FILE is read '
                    'as the key holder reads it: the PEM of a hybrid or RSA '
                    'private key or one base64 line of an AES-256 key, mode '
                    '0600.')
    p.add_argument('kek_file')
    _common(p, admin=True)
    p.set_defaults(func=cmd_rotate)

    p = subparsers.add_parser('retire', help='make a data key decrypt-only',
                              description='Retire a data key.')
    p.add_argument('dek_id')
    _common(p, admin=True)
    p.set_defaults(func=cmd_retire)

    p = subparsers.add_parser(
        'delete', help='destroy a data key (cannot be undone)',
        description='Destroy a data key: everything encrypted with it '
                    'becomes unreadable.  Needs --yes.')
    p.add_argument('dek_id')
    p.add_argument('--yes', action='store_true',
                   help='confirm the destruction')
    _common(p, admin=True)
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser(
        'upgrade-keys',
        help='rewrite the data keys of a KEK in wrapped-DEK format 2',
        description='Rewrite every data key of the KEK in KEK_FILE that is '
                    'still in wrapped-DEK format version 1 in version 2, '
                    'which only the holder of the KEK can make; same keys, '
                    'ids, states and creation times.  Run it once, as the '
                    'holder of the KEK, on a key store you trust: it vouches '
                    'for the version 1 keys it finds (docs/keys.rst).  '
                    'Works on a key directory (--key-dir) or the key '
                    'server.')
    p.add_argument('kek_file')
    p.add_argument('--key-dir', default=None,
                   help='a local key directory instead of the key server')
    _common(p, admin=True)
    p.set_defaults(func=cmd_upgrade_keys)


def facility(args, environ=None):
    """The LocalKeyManagementFacility the arguments describe."""
    from zodbkmi.client import LocalKeyManagementFacility
    from zodbkmi.client import split_urls
    env = os.environ if environ is None else environ
    try:
        urls = split_urls(args.url or env.get('ZODBKMI_URL') or DEFAULT_URL)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ca = args.ca_file or env.get('ZODBKMI_CA_FILE')
    if ca is None and os.path.exists(os.path.join('var', 'tls', 'cert.pem')):
        ca = os.path.join('var', 'tls', 'cert.pem')
    token = None
    token_file = args.token_file or env.get('ZODBKMI_TOKEN_FILE')
    if token_file is None:
        token = env.get('ZODBKMI_TOKEN')
        default = os.path.join('var', ('admin' if args.admin else 'client')
                               + '.token')
        if token is None and os.path.exists(default):
            token_file = default
    if token is None and token_file is None:
        raise UsageError('no credentials: give --token-file or set '
                         'ZODBKMI_TOKEN')
    allow_http = getattr(args, 'allow_http', False)
    for url in urls:
        if url.lower().startswith('http://') and not allow_http:
            raise UsageError('key server URL %s is plain HTTP: the bearer '
                             'token and the wrapped keys would travel in '
                             'clear; use https://, or add --allow-http '
                             '(development only)' % url)
    try:
        return LocalKeyManagementFacility(
            urls, token=token, token_file=token_file, ca_file=ca,
            request_timeout=args.timeout, retries=1, allow_http=allow_http)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_kek_file(args):
    from zodbkmi.kek import AES_KEY_SIZE
    from zodbkmi.kek import as_kek
    from zodbkmi.kek import generate_kek
    from zodbkmi.keyholder import write_key_file
    if os.path.lexists(args.kek_file):
        raise UsageError('%s exists: refusing to overwrite a key'
                         % args.kek_file)
    if args.rsa and args.kind not in (None, 'rsa'):
        raise UsageError('--rsa contradicts --kind %s' % args.kind)
    kind = 'rsa' if args.rsa else (args.kind or 'aes')
    if kind == 'aes':
        key = os.urandom(AES_KEY_SIZE)
    else:
        key = generate_kek(kind).private_pem()
    write_key_file(args.kek_file, key)
    print(as_kek(key).key_id)
    return 0


def cmd_create_key(args):
    from zodbkmi.keyholder import read_key_file
    kek = read_key_file(args.kek_file)
    if args.key_dir is not None:
        from zodbkmi.facility import KeyManagementFacility
        target = KeyManagementFacility(args.key_dir)
    else:
        target = facility(args)
    print(target.create_key(kek))
    return 0


def cmd_new(args):
    from zodbkmi.kek import generate_kek
    from zodbkmi.fileutil import write_atomic
    if os.path.exists(args.kek_file):
        raise UsageError('%s exists: refusing to overwrite a key'
                         % args.kek_file)
    local = facility(args)
    kek = generate_kek(args.kind, local.rsa_bits)
    dek_id = local.create_key(kek)
    write_atomic(args.kek_file, kek.private_pem(), overwrite=False)
    print(dek_id)
    return 0


def cmd_get(args):
    entry = facility(args).entry(args.dek_id)
    import base64
    json.dump({'dek_id': entry.dek_id, 'kek_id': entry.kek_id,
               'state': entry.state, 'created': entry.created,
               'wrapped': base64.b64encode(entry.wrapped).decode('ascii')},
              sys.stdout, indent=1)
    print()
    return 0


def cmd_status(args):
    print(facility(args).status()['message'])
    return 0


def cmd_list(args):
    local = facility(args)
    for k in local.metadata():
        print('%s %-7s %s' % (k['dek_id'], k['state'], k['kek_id']))
    return 0


def cmd_rotate(args):
    from zodbkmi.keyholder import read_key_file
    # the key holder's reader: mode checked, PEM or base64 AES
    kek = read_key_file(args.kek_file)
    print(facility(args).rotate(kek))
    return 0


def cmd_retire(args):
    facility(args).retire(args.dek_id)
    print('retired %s' % args.dek_id)
    return 0


def cmd_delete(args):
    if not args.yes:
        raise UsageError('deleting %s cannot be undone: add --yes'
                         % args.dek_id)
    facility(args).delete(args.dek_id)
    print('deleted %s' % args.dek_id)
    return 0


def cmd_upgrade_keys(args):
    from zodbkmi.keyholder import read_key_file
    kek = read_key_file(args.kek_file)
    if args.key_dir is not None:
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.keystore import DirectoryKeyStore
        DirectoryKeyStore(args.key_dir, create=False)   # must exist
        target = KeyManagementFacility(args.key_dir)
    else:
        target = facility(args)
    n = target.upgrade(kek)
    print('upgraded %d data key%s to wrapped-DEK format 2'
          % (n, '' if n == 1 else 's'))
    return 0
