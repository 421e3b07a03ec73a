"""Scan files for secrets and plaintext canaries that must not be there.

Every secret is looked for in the forms it may take when it leaks: its raw
bytes, lowercase and uppercase hex, standard and URL-safe base64 (at each
of the three alignments a secret can have inside a longer base64 text, so
a key embedded in a base64 blob is found too), and, for a PEM private key,
its DER bytes and the lines of its PEM body.  Findings name the file, the
label of the secret, the form and the offset; never the secret itself.

As a library (``tests/test_leaks.py``)::

    secrets = [Secret('kek', kek), Secret('canary', b'...')]
    findings = scan_paths([directory], secrets)

From the command line::

    python scripts/leakscan.py --secret-file F [--testing] DIR_OR_FILE...

``F`` holds one secret per line: ``hex:<hex digits>``, ``base64:<base64>``
or ``text:<UTF-8 text>`` (a line may start with ``<label>=``; ``#`` starts a
comment line); a PEM private key file may be given whole with ``--pem-file``.
``--testing`` adds the public key material of :mod:`zodbkmi.testing` and
:data:`CANARY`.  The exit code is 0 when nothing was found, 1 when
something was, 2 for a usage error.
"""
import argparse
import base64
import os
import stat
import sys

#: A marker that tests put into plaintext: finding it in a file that
#: outlives the test suite means plaintext leaked to disk.
CANARY = b'ZODBKMI-LEAK-CANARY-7f3c'

#: Files larger than this are scanned in pieces of this size.
BLOCK = 1 << 22

#: Shortest pattern looked for: shorter ones match by chance.
MIN_PATTERN = 12


class Secret:
    """Bytes that must not appear on disk, with a label for the report."""

    def __init__(self, label, value):
        if isinstance(value, str):
            value = value.encode('utf-8')
        if not isinstance(value, bytes) or not value:
            raise ValueError('a secret is non-empty bytes')
        self.label = label
        self.value = value

    def __repr__(self):
        # never the value
        return '<Secret %s (%d bytes)>' % (self.label, len(self.value))


class Finding:
    """Where a secret was found: ``path``, ``label``, ``form``, ``offset``."""

    def __init__(self, path, label, form, offset):
        self.path = path
        self.label = label
        self.form = form
        self.offset = offset

    def __repr__(self):
        return '<Finding %s>' % self

    def __str__(self):
        return '%s: %s (%s) at byte %d' % (self.path, self.label,
                                           self.form, self.offset)


def _base64_forms(value, encode):
    """The characters of ``encode`` (a base64 flavour) that depend only on
    ``value``, for each of its three alignments in a longer text."""
    forms = []
    for shift in range(3):
        text = encode(b'\0' * shift + value)
        start = (4 * shift + 2) // 3
        end = ((shift + len(value)) * 8) // 6
        forms.append(text[start:end])
    return forms


def _pem_forms(value):
    """DER and PEM body lines of a PEM private key, else nothing."""
    if not value.lstrip().startswith(b'-----BEGIN'):
        return []
    lines = [line.strip() for line in value.splitlines()]
    body = [line for line in lines if line and not line.startswith(b'-----')]
    forms = [('pem line', line) for line in body if len(line) >= 32]
    try:
        der = base64.b64decode(b''.join(body), validate=True)
    except ValueError:
        return forms
    forms.append(('der', der))
    forms.extend(('der base64', f) for f in _base64_forms(
        der, base64.b64encode))
    return forms


def patterns(secret):
    """Return ``[(form, bytes)]``: every form of ``secret`` looked for."""
    v = secret.value
    found = [('raw', v), ('hex', v.hex().encode('ascii')),
             ('HEX', v.hex().upper().encode('ascii'))]
    for i, form in enumerate(_base64_forms(v, base64.b64encode)):
        found.append(('base64' if i == 0 else 'base64+%d' % i, form))
    for i, form in enumerate(_base64_forms(v, base64.urlsafe_b64encode)):
        found.append(('urlsafe base64' if i == 0
                      else 'urlsafe base64+%d' % i, form))
    found.extend(_pem_forms(v))
    unique, seen = [], set()
    for form, pattern in found:
        if len(pattern) >= MIN_PATTERN and pattern not in seen:
            seen.add(pattern)
            unique.append((form, pattern))
    if not unique:
        raise ValueError('secret %s is shorter than %d bytes: it would '
                         'match by chance' % (secret.label, MIN_PATTERN))
    return unique


def iter_files(paths):
    """Every regular file under ``paths`` (files or directories); symbolic
    links are not followed."""
    for path in paths:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            yield path
        elif stat.S_ISDIR(st.st_mode):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if stat.S_ISREG(os.lstat(full).st_mode):
                        yield full


def scan_file(path, secrets):
    """Return the findings of ``secrets`` in the file ``path``."""
    table = [(s.label, form, p) for s in secrets for form, p in patterns(s)]
    return _scan(path, table)


def _scan(path, table):
    overlap = max(len(p) for _, _, p in table) - 1
    findings = []
    seen = set()
    try:
        f = open(path, 'rb')
    except OSError:
        return findings   # removed while scanning, or a socket
    with f:
        base = 0
        tail = b''
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            data = tail + block
            start = base - len(tail)
            for label, form, pattern in table:
                at = data.find(pattern)
                if at >= 0 and (label, form) not in seen:
                    seen.add((label, form))
                    findings.append(Finding(path, label, form, start + at))
            base += len(block)
            tail = data[-overlap:] if overlap else b''
    return findings


def scan_paths(paths, secrets):
    """Return the findings of ``secrets`` in every file under ``paths``."""
    table = [(s.label, form, p) for s in secrets for form, p in patterns(s)]
    findings = []
    for path in iter_files(paths):
        findings.extend(_scan(path, table))
    return findings


def testing_secrets():
    """The public key material of :mod:`zodbkmi.testing`, and CANARY."""
    from zodbkmi import testing
    return [Secret('zodbkmi.testing KEK', testing.KeyEncryptingKey),
            Secret('zodbkmi.testing DEK', testing._TESTING_DEK),
            Secret('canary marker', CANARY)]


def read_secret_file(path):
    """Parse a secret file (see the module docstring)."""
    secrets = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            label = '%s line %d' % (os.path.basename(path), n)
            if '=' in line.split(':', 1)[0]:
                label, line = line.split('=', 1)
            kind, _, value = line.partition(':')
            if kind == 'hex':
                raw = bytes.fromhex(value)
            elif kind == 'base64':
                raw = base64.b64decode(value, validate=True)
            elif kind == 'text':
                raw = value.encode('utf-8')
            else:
                raise ValueError('%s line %d: expected hex:, base64: or '
                                 'text:' % (path, n))
            secrets.append(Secret(label, raw))
    return secrets


def main(argv=None, out=None):
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog='leakscan', description='Look for secrets and plaintext '
        'canaries in files (raw, hex, base64, PEM forms).')
    parser.add_argument('paths', nargs='+', metavar='DIR_OR_FILE')
    parser.add_argument('--secret-file', action='append', default=[],
                        help='one secret per line: hex:..., base64:... or '
                        'text:... (repeatable)')
    parser.add_argument('--pem-file', action='append', default=[],
                        help='a PEM private key to look for (repeatable)')
    parser.add_argument('--testing', action='store_true',
                        help='look for the public keys of zodbkmi.testing '
                        'and the canary marker')
    args = parser.parse_args(argv)
    try:
        secrets = []
        for path in args.secret_file:
            secrets.extend(read_secret_file(path))
        for path in args.pem_file:
            with open(path, 'rb') as f:
                secrets.append(Secret(os.path.basename(path), f.read()))
        if args.testing:
            secrets.extend(testing_secrets())
        if not secrets:
            raise ValueError('no secret given (--secret-file, --pem-file '
                             'or --testing)')
        for path in args.paths:
            os.lstat(path)
        findings = scan_paths(args.paths, secrets)
    except (OSError, ValueError) as e:
        print('leakscan: %s' % e, file=sys.stderr)
        return 2
    files = len(list(iter_files(args.paths)))
    for finding in findings:
        print('LEAK %s' % finding, file=out)
    if findings:
        print('leakscan: %d leak(s) of %d secret(s) in %d file(s) scanned'
              % (len(findings), len(secrets), files), file=out)
        return 1
    print('leakscan: no leak of %d secret(s) in %d file(s)'
          % (len(secrets), files), file=out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
