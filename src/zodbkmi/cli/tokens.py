"""``zodbkmi token add|list|remove``: the key server's bearer tokens, in
its token file (``tokens_file``) or, with ``tokens_in_key_store``, in its
PostgreSQL key store.  A running server sees the change within a second
(a token file) or within 30 seconds (the key store)."""
import sys

#: The server settings these commands read (flags, ZODBKMI_<NAME>, --config).
SETTINGS = ('tokens_file', 'key_store', 'tokens_in_key_store')


def register(subparsers):
    from zodbkmi.rest import ROLES
    from zodbkmi.server import SETTINGS as ALL
    p = subparsers.add_parser(
        'token', help="manage the key server's bearer tokens",
        description="Add, list or remove the key server's bearer tokens. "
                    'A new token is written to a file of mode 0600, never '
                    'printed; the server keeps its SHA-256 only.')
    actions = p.add_subparsers(dest='action', metavar='ACTION')
    actions.required = True
    add = actions.add_parser('add', help='make a new token')
    add.add_argument('name', help='the name the audit log records')
    add.add_argument('--role', choices=ROLES, required=True,
                     help='client: read keys; admin: manage keys; metrics: '
                          '/v1/metrics only')
    add.add_argument('--out', metavar='FILE',
                     help='where to write the token (default: NAME.token '
                          'beside the token file)')
    remove = actions.add_parser('remove', help='delete a token')
    remove.add_argument('name')
    listing = actions.add_parser('list', help='names and roles')
    for q in (add, remove, listing):
        q.add_argument('--config', metavar='FILE',
                       help='the server settings file (TOML, or JSON)')
        for s in ALL:
            if s.name in SETTINGS:
                q.add_argument(s.flag, dest=s.name, default=None,
                               metavar='BOOL' if s.type.__name__ == '_bool'
                               else s.name.upper(),
                               help='%s (default: %s)' % (s.help, s.default))
    p.set_defaults(func=run)


def run(args):
    from zodbkmi import server
    overrides = {name: getattr(args, name) for name in SETTINGS}
    settings = server.resolve_settings(args.config, overrides=overrides)
    if args.action == 'add':
        server.add_token(settings, args.name, args.role, args.out,
                         out=sys.stdout)
    elif args.action == 'remove':
        server.remove_token(settings, args.name, out=sys.stdout)
    else:
        server.list_tokens(settings, out=sys.stdout)
    return 0
