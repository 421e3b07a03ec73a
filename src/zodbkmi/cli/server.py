"""``zodbkmi serve``: run the key server (settings from flags, environment
and a config file; see :data:`zodbkmi.server.SETTINGS`)."""
import sys


def register(subparsers):
    from zodbkmi.server import SETTINGS
    p = subparsers.add_parser(
        'serve', help='run the key server',
        description='Run the key server over TLS.  With no settings: keys '
                    'in ./var/keys, a self-signed certificate in ./var/tls, '
                    'tokens in ./var, listening on 127.0.0.1:8443.  Every '
                    'setting also reads ZODBKMI_<NAME> from the environment '
                    'and <name> from the --config file.')
    p.add_argument('--config', metavar='FILE',
                   help='settings file (TOML, or JSON if it ends in .json)')
    p.add_argument('--init-vault', action='store_true',
                   help='create or migrate the schema of the PostgreSQL '
                        'key store (key_store), then exit')
    for s in SETTINGS:
        if s.type.__name__ == '_bool':
            p.add_argument(s.flag, dest=s.name, metavar='BOOL', default=None,
                           help='%s (default: %s)' % (s.help, s.default))
        else:
            p.add_argument(s.flag, dest=s.name, default=None,
                           metavar=s.name.upper(),
                           help='%s (default: %s)' % (s.help, s.default))
    p.set_defaults(func=run)


def run(args):
    from zodbkmi import server
    overrides = {s.name: getattr(args, s.name) for s in server.SETTINGS}
    settings = server.resolve_settings(args.config, overrides=overrides)
    if args.init_vault:
        return server.init_key_store(settings, out=sys.stdout)
    return server.serve(settings, out=sys.stdout)
