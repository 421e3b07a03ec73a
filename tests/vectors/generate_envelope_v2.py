"""Generate tests/vectors/envelope-v2.json, the vectors of record envelope
version 2, once.

The vectors pin the format of ``docs/format.rst`` ("Record envelope,
version 2"): once released they never change.  This script shows how each
vector was made; it refuses to overwrite a file that exists::

    python tests/vectors/generate_envelope_v2.py            # if missing
    python tests/vectors/generate_envelope_v2.py --out DIR  # fresh output

Fixed salts and nonces come from the private seam ``Sealer.seal(...,
_salt=..., _nonce=...)``, so every valid vector is reproduced byte for byte
by ``tests/test_format_vectors.py``.  Each valid vector also gives the
subkey HKDF derives from its DEK and salt, for other implementations to
check their derivation.  The DEKs are those of ``envelope.json`` (made the
same way from public labels): PUBLIC TEST KEYS, they protect nothing.
"""
import argparse
import json
import os
import runpy
import sys
import types

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from zodbkmi.format import envelope

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = 'envelope-v2.json'


def _generate_v1():
    """The globals of generate.py, for its helpers (public labels, bit
    flips, the keys and DEKs of the version 1 vectors)."""
    return types.SimpleNamespace(**runpy.run_path(
        os.path.join(HERE, 'generate.py')))


_v1 = _generate_v1()
label, flip, patch = _v1.label, _v1.flip, _v1.patch


DEK_ID = label('DEK id', 16)
DEK = label('DEK')
OTHER_DEK_ID = label('other DEK id', 16)
OTHER_DEK = label('other DEK')
OID = bytes.fromhex('0000000000000001')
OTHER_OID = bytes.fromhex('0000000000000002')
SALT = label('v2 salt', 4)
OTHER_SALT = label('v2 other salt', 4)
PICKLE = (b'\x80\x03}q\x00X\x05\x00\x00\x00titleq\x01X\x03\x00\x00'
          b'\x00zodq\x02s.')


def subkey(dek, salt):
    return HKDF(hashes.SHA256(), 32, salt, envelope.SUBKEY_INFO).derive(dek)


def vectors():
    sealer = envelope.Sealer(DEK_ID, DEK)
    other = envelope.Sealer(OTHER_DEK_ID, OTHER_DEK)
    valid = []

    def add(name, comment, plaintext, context, oid, sealer=sealer,
            salt=SALT):
        dek = DEK if sealer is not other else OTHER_DEK
        nonce = label('v2 nonce ' + name, 12)
        data = sealer.seal(plaintext, context, oid, _salt=salt, _nonce=nonce)
        valid.append({
            'name': name, 'comment': comment,
            'dek_id': sealer.dek_id.hex(), 'dek': dek.hex(),
            'context': context, 'oid': oid.hex() if oid else None,
            'salt': salt.hex(), 'subkey': subkey(dek, salt).hex(),
            'nonce': nonce.hex(), 'plaintext': plaintext.hex(),
            'envelope': data.hex()})
        return data

    empty = add('data-empty', 'data context, empty plaintext: the smallest '
                'envelope, 54 bytes', b'', 0, None)
    hello = add('data-short', 'data context, 12 bytes', b'hello, world', 0,
                None)
    add('data-64', 'data context, 64 bytes', bytes(range(64)), 0, None)
    add('data-other-salt', 'data context, the same DEK, another salt: '
        'another subkey', b'hello, world', 0, None, salt=OTHER_SALT)
    add('data-other-dek', 'data context under the other DEK', b'other', 0,
        None, sealer=other)
    record = add('record-oid-1', 'storage record bound to oid 1: a pickle',
                 PICKLE, 1, OID)
    add('record-oid-0', 'storage record bound to the root oid, empty', b'',
        1, bytes(8))
    state = add('state-short', 'object state context (EncryptedPersistent):'
                ' a protocol 3 pickle', PICKLE, 2, None)
    add('state-empty', 'object state context, empty plaintext', b'', 2,
        None)
    add('state-64', 'object state context, 64 bytes', bytes(range(64)), 2,
        None)
    other_hello = other.seal(b'hello, world', 0, None, _salt=SALT,
                             _nonce=label('v2 nonce other-hello', 12))
    v1_hello = sealer.seal(b'hello, world', 0, None,
                           _nonce=label('nonce data-short', 12))
    v1_record = sealer.seal(PICKLE, 1, OID, _nonce=label('v1 record', 12))

    invalid = []

    def bad(name, comment, data, error, context=0, oid=None, dek=DEK):
        invalid.append({
            'name': name, 'comment': comment, 'dek_id': DEK_ID.hex(),
            'dek': dek.hex(), 'context': context,
            'oid': oid.hex() if oid else None, 'envelope': data.hex(),
            'error': error})

    T, U, A, K = ('TruncatedDataError', 'UnsupportedFormatError',
                  'AuthenticationError', 'UnknownKeyError')
    # truncation, at every part of the header and inside the tag
    bad('empty', 'no bytes at all', b'', T)
    bad('truncated-in-magic', 'one byte of the magic', b'.', T)
    bad('truncated-after-magic', 'the magic only', empty[:3], T)
    bad('truncated-after-version', 'magic and version 2', empty[:4], T)
    bad('truncated-after-suite', 'magic, version, suite', empty[:5], T)
    bad('truncated-after-context', 'the first 6 bytes', empty[:6], T)
    bad('truncated-in-dek-id', 'ends inside the DEK id', empty[:14], T)
    bad('truncated-in-salt', 'ends inside the salt', empty[:24], T)
    bad('truncated-in-nonce', 'ends inside the nonce', empty[:30], T)
    bad('truncated-header-only', 'the 38 byte header, no tag', empty[:38],
        T)
    bad('truncated-in-tag', 'ends inside the tag', empty[:53], T)
    bad('truncated-v1-size', '50 bytes: enough for version 1, not 2',
        hello[:50], T)
    bad('truncated-record-in-tag', 'a storage record ending inside the tag',
        record[:45], T, 1, OID)
    bad('truncated-state-in-tag', 'an object state ending inside the tag',
        state[:53], T, 2)
    bad('truncated-one-byte-of-body', 'a truncation leaving at least 54 '
        'bytes is caught by the tag', hello[:-1], A)
    bad('truncated-whole-plaintext', 'the 12 bytes of plaintext removed: '
        '54 bytes remain', hello[:38] + hello[-16:], A)
    # magic, version, suite, context
    bad('bad-magic', 'another magic', b'.zx' + hello[3:], U)
    bad('pickle-protocol-3', 'plaintext: a pickle is not an envelope',
        b'\x80\x03}q\x00.', U)
    bad('version-0', 'version 0', patch(hello, 3, 0), U)
    bad('version-3', 'version 3, from a newer zodbkmi', patch(hello, 3, 3),
        U)
    bad('version-3-short', 'version 3, 4 bytes: the version is checked '
        'before the length', patch(hello, 3, 3)[:4], U)
    bad('suite-0', 'cipher suite 0', patch(hello, 4, 0), U)
    bad('suite-2', 'cipher suite 2', patch(hello, 4, 2), U)
    bad('context-3', 'unknown context 3', patch(hello, 5, 3), U)
    bad('context-255', 'unknown context 255', patch(hello, 5, 255), U)
    # each context is refused where another one is required
    bad('record-read-as-data', 'a storage record where data is required',
        record, U, 0, None)
    bad('data-read-as-record', 'data where a storage record is required',
        hello, U, 1, OID)
    bad('state-read-as-data', 'an object state where data is required',
        state, U, 0, None)
    bad('data-read-as-state', 'data (facility.encrypt) where an object '
        'state is required', hello, U, 2, None)
    bad('record-read-as-state', 'a storage record where an object state '
        'is required', record, U, 2, None)
    bad('state-read-as-record', 'an object state where a storage record is '
        'required', state, U, 1, OID)
    bad('context-flipped-to-state', 'the context byte changed from data to '
        'object state', patch(hello, 5, 2), A, 2, None)
    bad('context-flipped-to-data', 'the context byte changed from object '
        'state to data', patch(state, 5, 0), A, 0, None)
    bad('context-flipped-to-record', 'the context byte changed from data '
        'to record', patch(hello, 5, 1), A, 1, OID)
    # version 1 and version 2 are not interchangeable
    bad('v2-labelled-v1', 'a version 2 envelope whose version byte says 1: '
        'opened as version 1, under the DEK itself', patch(hello, 3, 1), A)
    bad('v1-labelled-v2', 'the version 1 vector data-short of '
        'envelope.json whose version byte says 2: opened as version 2, its '
        'nonce read as salt and nonce', patch(v1_hello, 3, 2), A)
    bad('v1-record-read-as-state', 'a version 1 storage record where an '
        'object state is required', v1_record, U, 2, None)
    bad('v1-context-2', 'version 1 has no context 2',
        patch(v1_hello, 5, 2), U, 2, None)
    # the DEK id names the key
    bad('other-dek-id', 'sealed under another DEK', other_hello, K)
    bad('dek-id-flipped-bit', 'one bit of the DEK id flipped',
        flip(hello, 6), K)
    bad('wrong-dek', 'right DEK id, wrong key bytes', hello, A,
        dek=OTHER_DEK)
    # the salt selects the subkey
    bad('salt-flipped-bit', 'one bit of the salt flipped', flip(hello, 23),
        A)
    bad('salt-of-another-envelope', 'the salt of data-other-salt: another '
        'subkey of the same DEK', hello[:22] + OTHER_SALT + hello[26:], A)
    # authentication of the nonce, ciphertext and tag
    bad('nonce-flipped-bit', 'one bit of the nonce flipped',
        flip(hello, 26, 7), A)
    bad('ciphertext-flipped-bit', 'one bit of the ciphertext flipped',
        flip(hello, 38), A)
    bad('tag-flipped-bit', 'one bit of the tag flipped', flip(hello, -1, 7),
        A)
    bad('empty-tag-flipped-bit', 'the tag of an empty plaintext',
        flip(empty, 44), A)
    bad('trailing-byte', 'one byte appended', hello + b'\x00', A)
    bad('spliced-header', 'the header of one envelope, the body of another '
        'under the same subkey', hello[:38] + sealer.seal(
            b'hello, world', 0, None, _salt=SALT,
            _nonce=label('v2 splice', 12))[38:], A)
    # the oid of a storage record
    bad('record-wrong-oid', 'a storage record opened as another oid',
        record, A, 1, OTHER_OID)
    bad('record-oid-flipped-bit', 'the oid differs in one bit', record, A,
        1, flip(OID, 7))
    bad('record-salt-flipped-bit', 'a storage record with a flipped salt '
        'bit', flip(record, 24), A, 1, OID)
    return {
        'format': 'zodbkmi record envelope, version 2',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate_envelope_v2.py',
        'comment': ('Each valid vector decrypts to its plaintext with '
                    'open_envelope(dek_id, dek, envelope, context, oid); '
                    'Sealer(dek_id, dek).seal(plaintext, context, oid, '
                    '_salt=salt, _nonce=nonce) gives its envelope, and '
                    'subkey = HKDF-SHA256(IKM=dek, salt=salt, '
                    'info="zodbkmi/envelope/v2/subkey", L=32).  Each invalid '
                    'vector raises exactly the zodbkmi.exceptions class '
                    'named in "error" from open_envelope(dek_id, dek, '
                    'envelope, context, oid).  Contexts: 0 data, 1 storage '
                    'record, 2 object state.  All values are hex.  The DEKs '
                    'are PUBLIC TEST KEYS: they protect nothing.'),
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
