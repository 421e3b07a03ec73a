"""The ``zodbkmi`` command line: one entry point, one module a concern.

Each subcommand module in :mod:`zodbkmi.cli` exposes ``register(subparsers)``
which adds its parsers and sets ``func(args) -> exit code`` as default.
User errors (:class:`zodbkmi.exceptions.ZodbKmiError`, ``OSError``) print a
one-line message on stderr and exit 2; no traceback.
"""
import argparse
import importlib
import sys

from zodbkmi.exceptions import UsageError  # noqa: F401 (its old home)
from zodbkmi.exceptions import ZodbKmiError

#: The modules that add subcommands, in the order of ``--help``.
COMMAND_MODULES = ('server', 'tokens', 'keys', 'files', 'migrate',
                   'tenants')


def make_parser():
    parser = argparse.ArgumentParser(
        prog='zodbkmi',
        description='Encryption at rest for ZODB: key server, keys, files, '
                    'migrations.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMAND_MODULES:
        importlib.import_module('zodbkmi.cli.' + name).register(sub)
    return parser


def error_text(error):
    """One line for a user error: an ``OSError`` as ``FILE: what`` (its
    file name says the file's role where zodbkmi set it, such as ``input
    file report.txt``), without Python's ``[Errno N]``."""
    if isinstance(error, OSError) and not isinstance(error, ZodbKmiError) \
            and error.strerror:
        if error.filename is not None:
            return '%s: %s' % (error.filename, error.strerror)
        return error.strerror
    return str(error)


def main(argv=None):
    """Run the command line; return the exit code."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # a subcommand may understand what argparse left over (see
        # zodbkmi.cli.migrate: a positional after options)
        understood = getattr(args, 'extra_arguments', None)
        if understood is None or not understood(args, extra):
            parser.error('unrecognized arguments: %s' % ' '.join(extra))
    if not getattr(args, 'func', None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (ZodbKmiError, OSError) as e:
        print('zodbkmi %s: error: %s' % (args.command, error_text(e)),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('zodbkmi %s: interrupted' % args.command, file=sys.stderr)
        return 130


if __name__ == '__main__':   # pragma: no cover
    sys.exit(main())
