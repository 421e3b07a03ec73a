"""Generate tests/vectors/txn-metadata-v1.json, the vectors of the
transaction metadata envelope (record envelope version 2, context 3) and
of its plaintext, transaction metadata version 1, once.

The vectors pin ``docs/format.rst`` ("Transaction metadata, version 1"):
once released they never change.  This script shows how each vector was
made; it refuses to overwrite a file that exists::

    python tests/vectors/generate_txn_metadata.py            # if missing
    python tests/vectors/generate_txn_metadata.py --out DIR  # fresh output

Fixed salts and nonces come from the private seam ``Sealer.seal(...,
_salt=..., _nonce=...)``, so every valid vector is reproduced byte for byte
by ``tests/test_format_vectors.py``.  The DEKs are those of
``envelope-v2.json`` (made from public labels): PUBLIC TEST KEYS, they
protect nothing.
"""
import argparse
import json
import os
import runpy
import sys
import types

from zodbkmi.format import envelope
from zodbkmi.format import txnmeta

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = 'txn-metadata-v1.json'


def _generate_v1():
    """The globals of generate.py, for its helpers (public labels, bit
    flips)."""
    return types.SimpleNamespace(**runpy.run_path(
        os.path.join(HERE, 'generate.py')))


_v1 = _generate_v1()
label, flip, patch = _v1.label, _v1.flip, _v1.patch

DEK_ID = label('DEK id', 16)
DEK = label('DEK')
OTHER_DEK_ID = label('other DEK id', 16)
OTHER_DEK = label('other DEK')
OID = bytes.fromhex('0000000000000001')
SALT = label('v2 salt', 4)
# ZODB's encoding (a protocol 3 pickle) of {'request': 'admin/patients/
# p123/manage_edit', 'user_name': 'admin'}, as Zope puts in an extension
ZOPE_EXTENSION = (
    b'\x80\x03}q\x00(X\x07\x00\x00\x00requestq\x01X\x1f\x00\x00\x00admin/'
    b'patients/p123/manage_editq\x02X\t\x00\x00\x00user_nameq\x03X\x05\x00'
    b'\x00\x00adminq\x04u.')


def vectors():
    sealer = envelope.Sealer(DEK_ID, DEK)
    other = envelope.Sealer(OTHER_DEK_ID, OTHER_DEK)
    M = envelope.CONTEXT_METADATA
    valid = []

    def add(name, comment, user, description, extension, sealer=sealer):
        dek = DEK if sealer is not other else OTHER_DEK
        nonce = label('metadata nonce ' + name, 12)
        plaintext = txnmeta.encode(user, description, extension)
        data = sealer.seal(plaintext, M, None, _salt=SALT, _nonce=nonce)
        valid.append({
            'name': name, 'comment': comment,
            'dek_id': sealer.dek_id.hex(), 'dek': dek.hex(),
            'context': M, 'oid': None, 'salt': SALT.hex(),
            'nonce': nonce.hex(), 'user': user.hex(),
            'description': description.hex(), 'extension': extension.hex(),
            'plaintext': plaintext.hex(), 'envelope': data.hex()})
        return data

    add('empty', 'no user, description nor extension (the wrapper '
        'does not seal these; a reader opens them)', b'', b'', b'')
    zope = add('zope-edit', 'what Zope writes: the user (path of its user '
               'folder and name), the request path as description, an '
               'extension', b'/ admin', b'admin/patients/p123/manage_edit',
               ZOPE_EXTENSION)
    add('utf8-user', 'a UTF-8 user name and a note', 'Zoë'.encode(),
        b'edited the dose', b'')
    add('binary', 'every byte value in each field', bytes(range(256)),
        bytes(range(255, -1, -1)), bytes(range(0, 256, 3)))
    add('other-dek', 'under the other DEK', b'bob', b'', b'', sealer=other)

    invalid = []

    def bad(name, comment, data, error, context=M, oid=None):
        invalid.append({
            'name': name, 'comment': comment, 'dek_id': DEK_ID.hex(),
            'dek': DEK.hex(), 'context': context,
            'oid': oid.hex() if oid else None, 'envelope': data.hex(),
            'error': error})

    def sealed(plaintext, name):
        return sealer.seal(plaintext, M, None, _salt=SALT,
                           _nonce=label('metadata nonce ' + name, 12))

    T, U, A, K = ('TruncatedDataError', 'UnsupportedFormatError',
                  'AuthenticationError', 'UnknownKeyError')
    record = sealer.seal(b'\x80\x03}q\x00.', 1, OID, _salt=SALT,
                         _nonce=label('metadata nonce record', 12))
    data = sealer.seal(zope[38:-16], 0, None, _salt=SALT,
                       _nonce=label('metadata nonce data', 12))
    state = sealer.seal(b'\x80\x03}q\x00.', 2, None, _salt=SALT,
                        _nonce=label('metadata nonce state', 12))
    # the context keeps metadata and the other envelopes apart
    bad('record-read-as-metadata', 'a storage record pasted into the '
        'metadata slot', record, U)
    bad('data-read-as-metadata', 'a data envelope (facility.encrypt) where '
        'metadata is required', data, U)
    bad('state-read-as-metadata', 'an object state where metadata is '
        'required', state, U)
    bad('metadata-read-as-record', 'a metadata envelope pasted into a '
        'record', zope, U, 1, OID)
    bad('metadata-read-as-data', 'a metadata envelope where data is '
        'required', zope, U, 0)
    bad('metadata-read-as-state', 'a metadata envelope where an object '
        'state is required', zope, U, 2)
    bad('context-flipped-to-metadata', 'a data envelope whose context byte '
        'was changed to 3', patch(data, 5, 3), A)
    bad('context-flipped-to-data', 'a metadata envelope whose context byte '
        'was changed to 0', patch(zope, 5, 0), A, 0)
    bad('version-1-context-3', 'version 1 has no context 3',
        patch(zope, 3, 1), U)
    # the envelope's own rules
    bad('truncated-header', 'the header only', zope[:38], T)
    bad('truncated-in-tag', '53 bytes: less than the overhead',
        zope[:53], T)
    bad('truncated-body', 'one byte of the body cut', zope[:-1], A)
    bad('tag-flipped-bit', 'one bit of the tag flipped', flip(zope, -1), A)
    bad('ciphertext-flipped-bit', 'one bit of the ciphertext flipped',
        flip(zope, 40), A)
    bad('salt-flipped-bit', 'one bit of the salt flipped', flip(zope, 23),
        A)
    bad('other-dek-id', 'the DEK id of another key', flip(zope, 6), K)
    bad('plaintext', 'clear metadata is not an envelope', b'/ admin', U)
    # the plaintext encoding, sealed (authentic, but not version 1)
    bad('not-json', 'a pickle sealed as metadata',
        sealed(ZOPE_EXTENSION, 'not-json'), U)
    bad('json-list', 'a JSON array', sealed(b'[]', 'json-list'), U)
    bad('version-2', 'metadata version 2', sealed(
        b'{"description":"","extension":"","user":"","version":2}',
        'version-2'), U)
    bad('version-text', 'the version as text', sealed(
        b'{"description":"","extension":"","user":"","version":"1"}',
        'version-text'), U)
    bad('version-true', 'the version as a boolean', sealed(
        b'{"description":"","extension":"","user":"","version":true}',
        'version-true'), U)
    bad('missing-key', 'no extension', sealed(
        b'{"description":"","user":"","version":1}', 'missing-key'), U)
    bad('extra-key', 'a key not in version 1', sealed(
        b'{"description":"","extension":"","tid":"","user":"",'
        b'"version":1}', 'extra-key'), U)
    bad('not-base64', 'a user that is not base64', sealed(
        b'{"description":"","extension":"","user":"admin!","version":1}',
        'not-base64'), U)
    bad('base64-unpadded', 'base64 without its padding', sealed(
        b'{"description":"","extension":"","user":"YQ","version":1}',
        'base64-unpadded'), U)
    bad('value-not-text', 'a user given as a number', sealed(
        b'{"description":"","extension":"","user":1,"version":1}',
        'value-not-text'), U)
    bad('not-utf8', 'bytes that are not UTF-8', sealed(
        b'{"description":"","extension":"","user":"\xff","version":1}',
        'not-utf8'), U)
    return {
        'format': 'zodbkmi transaction metadata, version 1, in a record '
                  'envelope of version 2, context 3',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate_txn_metadata.py',
        'extension_key': txnmeta.EXTENSION_KEY,
        'comment': ('Each valid vector opens with open_envelope(dek_id, '
                    'dek, envelope, 3) to its plaintext, which '
                    'zodbkmi.format.txnmeta.decode turns into (user, '
                    'description, extension); txnmeta.encode(user, '
                    'description, extension) gives the plaintext and '
                    'Sealer(dek_id, dek).seal(plaintext, 3, None, '
                    '_salt=salt, _nonce=nonce) the envelope.  Each invalid '
                    'vector raises exactly the zodbkmi.exceptions class '
                    'named in "error" from txnmeta.decode(open_envelope('
                    'dek_id, dek, envelope, context, oid)) (the envelope '
                    'rules first).  The storage stores the envelope as the '
                    'only item of the transaction\'s extension, under '
                    '"extension_key".  All values are hex.  The DEKs are '
                    'PUBLIC TEST KEYS: they protect nothing.'),
        'valid': valid, 'invalid': invalid}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=HERE,
                        help='directory to write to (default: %(default)s)')
    args = parser.parse_args(argv)
    path = os.path.join(args.out, NAME)
    if os.path.exists(path):
        print('%s exists: released vectors never change' % path,
              file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    with open(path, 'x') as f:
        f.write(json.dumps(vectors(), indent=1) + '\n')
    print('wrote', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
