"""Tenant commands: ``tenant create``, ``tenant list``, ``tenant
verify-receipt`` and ``shred`` (``docs/tenants.rst``)."""
import json
import os
import sys

from zodbkmi.exceptions import TenantError
from zodbkmi.exceptions import UsageError


def _registry_args(p, key_dir=True):
    p.add_argument('--registry', required=True, metavar='DIR',
                   help='the tenant registry (a directory, made 0700)')
    if key_dir:
        p.add_argument('--key-dir', metavar='DIR',
                       help='the directory of wrapped data keys (or the key '
                            'server of --url)')
        from zodbkmi.cli.keys import _common
        _common(p, admin=True)


def register(subparsers):
    p = subparsers.add_parser(
        'tenant', help='create and list tenants with keys of their own',
        description='Tenants: each gets a key encrypting key of its own '
                    '(or data keys of its own under a shared KEK), so that '
                    '"zodbkmi shred" can destroy one tenant\'s data '
                    'everywhere (docs/tenants.rst).')
    sub = p.add_subparsers(dest='tenant_command', metavar='ACTION')
    c = sub.add_parser(
        'create', help='create a tenant and its keys',
        description='Create TENANT in the registry with a key of KIND and '
                    'an active data key; print the tenant, its KEK id and '
                    'its data key id.  file: a new AES-256 KEK in the '
                    'registry (keys/TENANT.key, 0600); shared: a data key '
                    'of its own under the KEK of --shared-key-file; '
                    'source: a new key in the key source of '
                    '--source-settings (a JSON object: vaultTransit, '
                    'pkcs11, vaultKV, file, env).')
    c.add_argument('tenant')
    _registry_args(c)
    c.add_argument('--kind', choices=('file', 'shared', 'source'),
                   default='file', help='where the tenant key lives '
                                        '(default file)')
    c.add_argument('--shared-key-file', metavar='FILE',
                   help='kind shared: the shared KEK (a key file)')
    c.add_argument('--source-settings', metavar='FILE',
                   help='kind source: the key source settings (JSON)')
    c.set_defaults(func=cmd_create)
    c = sub.add_parser('list', help='list the tenants',
                       description='One line per tenant: id, kind, state, '
                                   'KEK id, data key ids.')
    _registry_args(c, key_dir=False)
    c.set_defaults(func=cmd_list)
    c = sub.add_parser(
        'verify-receipt', help='verify a destruction receipt',
        description='Verify the signature of the destruction receipt in '
                    'RECEIPT (a JSON file, or one line of the audit log) '
                    'with the public key PEM; print what it says.  Exit 2 '
                    'when it does not verify.')
    c.add_argument('receipt')
    c.add_argument('--public-key', required=True, metavar='PEM',
                   help='the registry\'s receipt-signing.pub')
    c.set_defaults(func=cmd_verify)
    p.set_defaults(func=lambda args: _no_action(p))

    p = subparsers.add_parser(
        'shred', help='crypto-shred a tenant (cannot be undone)',
        description='Destroy the data keys of TENANT in the key directory '
                    'and in this process, and its own KEK where its source '
                    'allows (key file, Transit key, PKCS#11 object); write '
                    'a signed destruction receipt to the registry\'s '
                    'audit.log, to --receipt and to standard output.  Asks '
                    'to type the tenant id unless --yes.  Refuses, '
                    'destroying nothing: an unknown tenant, a key shared '
                    'with another tenant or with the default key, an '
                    'unreachable key service.  Run it again after a crash: '
                    'it finishes.')
    p.add_argument('tenant')
    _registry_args(p)
    p.add_argument('--default-key-file', metavar='FILE',
                   help='the default KEK: refuse a tenant that uses it')
    p.add_argument('--operator', help='who shreds (default: the user)')
    p.add_argument('--receipt', metavar='FILE',
                   help='write the receipt there too (must not exist)')
    p.add_argument('--audit-log', metavar='FILE',
                   help='append the receipt to this audit log too')
    p.add_argument('--yes', action='store_true',
                   help='confirm without asking')
    p.set_defaults(func=cmd_shred)


def _no_action(parser):
    parser.print_help(sys.stderr)
    return 2


def _registry(args, create=True):
    from zodbkmi.tenants import TenantRegistry
    return TenantRegistry(args.registry, create=create)


def _facility(args, environ=None):
    """The key directory of ``--key-dir``, else the key server of
    ``--url`` (or ``ZODBKMI_URL``)."""
    env = os.environ if environ is None else environ
    if args.key_dir is not None:
        if args.url:
            raise UsageError('give --key-dir or --url, not both')
        from zodbkmi.facility import KeyManagementFacility
        return KeyManagementFacility(args.key_dir)
    if not (args.url or env.get('ZODBKMI_URL')):
        raise UsageError('give --key-dir (a directory of wrapped data keys) '
                         'or --url (a key server)')
    from zodbkmi.cli.keys import facility
    return facility(args, env)


def _read_kek(path):
    from zodbkmi.kek import as_kek
    from zodbkmi.keyholder import read_key_file
    return as_kek(read_key_file(path))


def cmd_create(args):
    params = shared = None
    if args.kind == 'shared':
        if not args.shared_key_file:
            raise UsageError('--kind shared needs --shared-key-file')
        shared = _read_kek(args.shared_key_file)
    if args.kind == 'source':
        if not args.source_settings:
            raise UsageError('--kind source needs --source-settings')
        with open(args.source_settings, 'rb') as f:
            try:
                params = json.load(f)
            except ValueError:
                raise UsageError('%s is not JSON' % args.source_settings) \
                    from None
    registry = _registry(args)
    holder = registry.create(args.tenant, _facility(args), args.kind,
                             shared=shared, params=params)
    record = registry.record(args.tenant)
    print('tenant %s: KEK %s, data key %s' % (
        args.tenant, holder.key.key_id, record['deks'][-1]))
    return 0


def cmd_list(args):
    registry = _registry(args, create=False)
    for tid, record in sorted(registry.tenants().items()):
        print('%s %s %s %s %s' % (tid, record['kind'], record['state'],
                                  record['kek_id'],
                                  ','.join(record['deks'])))
    return 0


def cmd_verify(args):
    from zodbkmi.tenants import verify_receipt
    with open(args.receipt, 'rb') as f:
        text = f.read()
    with open(args.public_key, 'rb') as f:
        pem = f.read()
    try:
        receipt = verify_receipt(text, pem)
    except ValueError:
        raise UsageError('%s is not a receipt (JSON)' % args.receipt) \
            from None
    print('valid receipt: tenant %s, data keys %s, KEK %s %s (%s), at %s '
          'by %s' % (receipt['tenant'], ', '.join(receipt['deks']),
                     receipt['kek']['kind'], receipt['kek']['id'],
                     'destroyed' if receipt['kek']['destroyed']
                     else 'kept', receipt['time'], receipt['operator']))
    return 0


def cmd_shred(args, stdin=None):
    from zodbkmi.tenants import _canonical
    from zodbkmi.tenants import shred
    stdin = sys.stdin if stdin is None else stdin
    registry = _registry(args, create=False)
    record = registry.record(args.tenant)     # unknown: refused here
    facility = _facility(args)
    if args.key_dir is not None and not os.path.isdir(args.key_dir):
        raise TenantError('key directory %s is unreachable: nothing was '
                          'destroyed' % args.key_dir, args.tenant)
    if args.receipt and os.path.exists(args.receipt):
        raise UsageError('receipt file %s exists' % args.receipt)
    default = _read_kek(args.default_key_file) if \
        args.default_key_file else None
    if not args.yes:
        if not stdin.isatty():
            raise TenantError('shred of tenant %s not confirmed: give --yes '
                              '(nothing was destroyed)' % args.tenant,
                              args.tenant)
        print('This destroys the keys of tenant %s (%d data keys, KEK %s): '
              'its data becomes unreadable everywhere, for good.'
              % (args.tenant, len(record['deks']), record['kek_id']),
              file=sys.stderr)
        sys.stderr.write('Type the tenant id to confirm: ')
        sys.stderr.flush()
        if stdin.readline().strip() != args.tenant:
            raise TenantError('shred of tenant %s not confirmed: nothing '
                              'was destroyed' % args.tenant, args.tenant)
    receipt = shred(registry, facility, args.tenant,
                    operator=args.operator, confirm=True,
                    default_key=default, audit_log=args.audit_log)
    line = _canonical(receipt) + b'\n'
    if args.receipt:
        from zodbkmi.fileutil import write_atomic
        write_atomic(args.receipt, line, 0o600, overwrite=False)
    sys.stdout.write(line.decode('ascii'))
    return 0
