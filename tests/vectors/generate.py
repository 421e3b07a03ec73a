"""Generate the JSON test vectors of zodbkmi's byte formats, once.

The vectors pin the formats specified in ``docs/format.rst``: once released
they never change, because data written by every earlier release must stay
readable.  This script is kept to show how each vector was made; it is run
once per new vector file and refuses to overwrite a file that exists::

    python tests/vectors/generate.py            # writes missing files only
    python tests/vectors/generate.py --out DIR  # to look at fresh output

These files hold wrapped-DEK format version 1 (what this script writes);
version 2 has its own files and generator (``generate_wrapped_v2.py``).
A new vector is added by adding a new file (or, before the format is
released, by deleting the file and running this again), never by editing a
released one.

Fixed nonces come from the private seams ``Sealer.seal(..., _nonce=...)``
and ``AESKeyEncryptingKey.wrap(..., _nonce=...)``, so those vectors are
reproduced byte for byte by ``tests/test_format_vectors.py``.  RSA-OAEP is
randomized: its vectors are decrypt-only, made with an RSA key generated
here once and stored in ``wrapped.json``.  That key is a PUBLIC TEST KEY:
its private half is published, it protects nothing.
"""
import argparse
import base64
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from zodbkmi.format import envelope
from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.kek import RSAKeyEncryptingKey
# the vectors (frozen) name the class by its old name
from zodbkmi.keystore import KeyStoreEntry as VaultEntry

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLIC_TEST_KEY = ('PUBLIC TEST KEY: published with the test vectors, it '
                   'protects nothing; never use it for data.')


def label(text, size=32):
    """Fixed, public bytes derived from ``text``."""
    return hashlib.sha256(b'zodbkmi test vector: ' + text.encode()).digest()[
        :size]


def flip(data, index, bit=0):
    data = bytearray(data)
    data[index] ^= 1 << bit
    return bytes(data)


def patch(data, index, value):
    data = bytearray(data)
    data[index] = value
    return bytes(data)


# -- record envelope ------------------------------------------------------

DEK_ID = label('DEK id', 16)
DEK = label('DEK')
OTHER_DEK_ID = label('other DEK id', 16)
OTHER_DEK = label('other DEK')
OID = bytes.fromhex('0000000000000001')
OTHER_OID = bytes.fromhex('0000000000000002')


def envelope_vectors():
    sealer = envelope.Sealer(DEK_ID, DEK)
    other = envelope.Sealer(OTHER_DEK_ID, OTHER_DEK)
    valid = []

    def add(name, comment, plaintext, context, oid, sealer=sealer):
        nonce = label('nonce ' + name, 12)
        data = sealer.seal(plaintext, context, oid, _nonce=nonce)
        valid.append({
            'name': name, 'comment': comment,
            'dek_id': sealer.dek_id.hex(),
            'dek': (DEK if sealer is not other else OTHER_DEK).hex(),
            'context': context, 'oid': oid.hex() if oid else None,
            'nonce': nonce.hex(), 'plaintext': plaintext.hex(),
            'envelope': data.hex()})
        return data

    empty = add('data-empty', 'data context, empty plaintext: the '
                'smallest envelope, 50 bytes', b'', 0, None)
    hello = add('data-short', 'data context, 12 bytes', b'hello, world', 0,
                None)
    add('data-64', 'data context, 64 bytes', bytes(range(64)), 0, None)
    record = add('record-oid-1', 'storage record bound to oid 1: a pickle',
                 b'\x80\x03}q\x00X\x05\x00\x00\x00titleq\x01X\x03\x00\x00'
                 b'\x00zodq\x02s.', 1, OID)
    add('record-oid-0', 'storage record bound to the root oid, empty',
        b'', 1, bytes(8))
    add('data-other-dek', 'data context under the other DEK',
        b'other', 0, None, sealer=other)
    other_hello = other.seal(b'hello, world', 0, None,
                             _nonce=label('nonce other-hello', 12))

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
    bad('truncated-after-version', 'magic and version', empty[:4], T)
    bad('truncated-after-suite', 'magic, version, suite', empty[:5], T)
    bad('truncated-after-context', 'the first 6 bytes', empty[:6], T)
    bad('truncated-in-dek-id', 'ends inside the DEK id', empty[:14], T)
    bad('truncated-in-nonce', 'ends inside the nonce', empty[:28], T)
    bad('truncated-header-only', 'the 34 byte header, no tag',
        empty[:34], T)
    bad('truncated-in-tag', 'ends inside the tag', empty[:49], T)
    bad('truncated-record-in-tag', 'a record envelope ending inside the '
        'tag', record[:45], T, 1, OID)
    bad('truncated-one-byte-of-body', 'a truncation leaving at least 50 '
        'bytes is caught by the tag', hello[:-1], A)
    bad('truncated-whole-plaintext', 'the 12 bytes of plaintext removed: '
        '50 bytes remain', hello[:34] + hello[-16:], A)
    # magic, version, suite, context
    bad('bad-magic', 'another magic', b'.zx' + hello[3:], U)
    bad('bad-magic-flipped-bit', 'one bit of the magic flipped',
        flip(hello, 1), U)
    bad('pickle-protocol-3', 'plaintext: a pickle is not an envelope',
        b'\x80\x03}q\x00.', U)
    bad('pickle-protocol-1', 'plaintext: an old pickle', b'(dp0\n.', U)
    bad('zlib-record', 'a zc.zlibstorage record', b'.z' + bytes(60), U)
    bad('version-0', 'version 0', patch(hello, 3, 0), U)
    bad('version-2', 'version 2, from a newer zodbkmi', patch(hello, 3, 2),
        U)
    bad('version-2-short', 'version 2, 4 bytes: the version is checked '
        'before the length', patch(hello, 3, 2)[:4], U)
    bad('suite-0', 'cipher suite 0', patch(hello, 4, 0), U)
    bad('suite-2', 'cipher suite 2', patch(hello, 4, 2), U)
    bad('context-2', 'unknown context 2', patch(hello, 5, 2), U)
    bad('context-255', 'unknown context 255', patch(hello, 5, 255), U)
    bad('record-read-as-data', 'a storage record where data is required',
        record, U, 0, None)
    bad('data-read-as-record', 'a data envelope where a storage record is '
        'required', hello, U, 1, OID)
    bad('context-flipped-to-record', 'the context byte changed from data '
        'to record', patch(hello, 5, 1), A, 1, OID)
    # the DEK id names the key
    bad('other-dek-id', 'sealed under another DEK', other_hello, K)
    bad('dek-id-flipped-bit', 'one bit of the DEK id flipped',
        flip(hello, 6), K)
    bad('wrong-dek', 'right DEK id, wrong key bytes', hello, A,
        dek=OTHER_DEK)
    # authentication of the nonce, ciphertext and tag
    bad('nonce-flipped-bit', 'one bit of the nonce flipped',
        flip(hello, 22, 7), A)
    bad('ciphertext-flipped-bit', 'one bit of the ciphertext flipped',
        flip(hello, 34), A)
    bad('ciphertext-last-flipped-bit', 'last ciphertext byte',
        flip(hello, 45, 3), A)
    bad('tag-flipped-bit', 'one bit of the tag flipped', flip(hello, -1, 7),
        A)
    bad('empty-tag-flipped-bit', 'the tag of an empty plaintext',
        flip(empty, 40), A)
    bad('trailing-byte', 'one byte appended', hello + b'\x00', A)
    bad('spliced-header', 'the header of one envelope, the body of '
        'another under the same DEK', hello[:34] + sealer.seal(
            b'hello, world', 0, None, _nonce=label('splice', 12))[34:], A)
    # the oid of a storage record
    bad('record-wrong-oid', 'a storage record opened as another oid',
        record, A, 1, OTHER_OID)
    bad('record-oid-flipped-bit', 'the oid differs in one bit', record, A,
        1, flip(OID, 7))
    bad('record-header-flipped-bit', 'a storage record with a flipped '
        'nonce bit', flip(record, 30), A, 1, OID)
    return {
        'format': 'zodbkmi record envelope, version 1',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate.py',
        'comment': ('Each valid vector decrypts to its plaintext with '
                    'open_envelope(dek_id, dek, envelope, context, oid) and '
                    'Sealer(dek_id, dek).seal(plaintext, context, oid, '
                    '_nonce=nonce) gives its envelope.  Each invalid '
                    'vector raises exactly the zodbkmi.exceptions class '
                    'named in "error".  All values are hex.'),
        'valid': valid, 'invalid': invalid}


# -- wrapped DEK ----------------------------------------------------------

AES_KEK = label('AES KEK')
OTHER_AES_KEK = label('other AES KEK')
WRAPPED_DEK_ID = label('wrapped DEK id', 16)
WRAPPED_DEK = label('wrapped DEK')


def pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode('ascii')


def wrapped_vectors(rsa_key):
    aes = AESKeyEncryptingKey(AES_KEK)
    other_aes = AESKeyEncryptingKey(OTHER_AES_KEK)
    rsa_kek = RSAKeyEncryptingKey(rsa_key)
    keys = {
        'aes': {'kind': 'aes', 'key': AES_KEK.hex(), 'kek_id': aes.key_id,
                'comment': PUBLIC_TEST_KEY},
        'other-aes': {'kind': 'aes', 'key': OTHER_AES_KEK.hex(),
                      'kek_id': other_aes.key_id,
                      'comment': PUBLIC_TEST_KEY},
        'aes-impostor': {
            'kind': 'aes', 'key': OTHER_AES_KEK.hex(), 'kek_id': aes.key_id,
            'comment': 'the other AES key presenting the id of "aes": not '
                       'a derived id; used to show that the wrapping itself '
                       'authenticates'},
        'rsa': {'kind': 'rsa', 'private_pem': pem(rsa_key),
                'kek_id': rsa_kek.key_id, 'comment': PUBLIC_TEST_KEY +
                ' RSA-3072, generated once for these vectors.'},
        'rsa-public': {'kind': 'rsa-public',
                       'public_pem': rsa_kek.public_pem().decode('ascii'),
                       'kek_id': rsa_kek.key_id,
                       'comment': 'the public half of "rsa": it wraps, it '
                                  'cannot unwrap'},
    }
    valid = []

    def add_aes(name, comment, kek, kek_name, dek_id, dek):
        nonce = label('wrap nonce ' + name, 12)
        header = wrapped.build_header(kek.suite, dek_id, kek.key_id,
                                      wrapped.VERSION_1)
        data = header + kek.wrap(dek, header, _nonce=nonce)
        valid.append({'name': name, 'comment': comment, 'kek': kek_name,
                      'suite': kek.suite, 'dek_id': dek_id.hex(),
                      'dek': dek.hex(), 'kek_id': kek.key_id,
                      'nonce': nonce.hex(), 'wrapped': data.hex()})
        return data

    def add_rsa(name, comment, dek_id, dek):
        data = wrapped.wrap(rsa_kek, dek_id, dek, version=wrapped.VERSION_1)
        valid.append({'name': name, 'comment': comment, 'kek': 'rsa',
                      'suite': rsa_kek.suite, 'dek_id': dek_id.hex(),
                      'dek': dek.hex(), 'kek_id': rsa_kek.key_id,
                      'nonce': None, 'wrapped': data.hex()})
        return data

    a = add_aes('aes', 'suite 2, AES-256-GCM', aes, 'aes', WRAPPED_DEK_ID,
                WRAPPED_DEK)
    add_aes('aes-zero-dek', 'suite 2, a DEK of zero bytes', aes, 'aes',
            bytes(16), bytes(32))
    add_aes('aes-other-kek', 'suite 2 under the other AES key', other_aes,
            'other-aes', WRAPPED_DEK_ID, WRAPPED_DEK)
    r = add_rsa('rsa', 'suite 1, RSA-OAEP-SHA256 (randomized: decrypt '
                'only)', WRAPPED_DEK_ID, WRAPPED_DEK)
    add_rsa('rsa-zero-dek', 'suite 1, a DEK of zero bytes', bytes(16),
            bytes(32))
    n = len(aes.key_id)
    h = 22 + n     # header size of the AES vectors
    invalid = []

    def bad(name, comment, data, error, kek='aes'):
        invalid.append({'name': name, 'comment': comment, 'kek': kek,
                        'wrapped': data.hex(), 'error': error})

    T, U, A, W, I = (  # noqa: E741 (I: InvalidKeyError)
        'TruncatedDataError', 'UnsupportedFormatError',
        'AuthenticationError', 'WrongKeyError', 'InvalidKeyError')
    bad('empty', 'no bytes', b'', T)
    bad('truncated-in-magic', 'two bytes of the magic', b'zk', T)
    bad('truncated-after-magic', 'the magic only', a[:3], T)
    bad('truncated-after-suite', 'magic, version, suite', a[:5], T)
    bad('truncated-in-dek-id', 'ends inside the DEK id', a[:12], T)
    bad('truncated-before-kek-id-length', 'ends before the length byte',
        a[:21], T)
    bad('truncated-in-kek-id', 'ends inside the KEK id', a[:h - 1], T)
    bad('truncated-header-only', 'the header, no wrapping', a[:h], T)
    bad('truncated-in-nonce', 'ends inside the AES-GCM nonce',
        a[:h + 11], T)
    bad('truncated-in-tag', 'ends inside the AES-GCM tag', a[:-1], T)
    bad('rsa-truncated', 'an RSA-OAEP wrapping one byte short', r[:-1], T,
        'rsa')
    bad('bad-magic', 'another magic', b'zkx' + a[3:], U)
    bad('envelope-as-wrapped', 'a record envelope is not a wrapped DEK',
        bytes.fromhex(envelope_vectors()['valid'][1]['envelope']), U)
    bad('version-0', 'version 0', patch(a, 3, 0), U)
    bad('version-2', 'version 2', patch(a, 3, 2), U)
    bad('version-2-short', 'version 2, 10 bytes: the version is checked '
        'before the length', patch(a, 3, 2)[:10], U)
    bad('suite-0', 'suite 0', patch(a, 4, 0), U)
    bad('suite-5', 'suite 5', patch(a, 4, 5), U)
    bad('suite-255-short', 'suite 255, 5 bytes', patch(a, 4, 255)[:5], U)
    bad('empty-kek-id', 'a KEK id of length 0',
        a[:21] + b'\x00' + a[h:], U)
    bad('non-ascii-kek-id', 'a KEK id byte >= 0x80',
        patch(a, 22, 0xe9), U)
    bad('suite-3-for-aes-kek', 'the suite of another kind of KEK',
        patch(a, 4, 3), W)
    bad('suite-1-for-aes-kek', 'the RSA suite, the AES KEK id',
        patch(a, 4, 1), W)
    bad('other-kek-id', 'wrapped under the other AES key',
        bytes.fromhex(valid[2]['wrapped']), W)
    bad('kek-id-changed', 'the header names another KEK', a[:22] +
        other_aes.key_id.encode() + a[h:], W)
    bad('rsa-for-aes-kek', 'an RSA-wrapped DEK given the AES KEK', r, W)
    bad('impostor-kek', 'right KEK id, another key', a, A, 'aes-impostor')
    bad('moved-to-other-dek-id', 'the DEK id in the header changed',
        a[:5] + label('other DEK id', 16) + a[21:], A)
    bad('dek-id-flipped-bit', 'one bit of the DEK id', flip(a, 10), A)
    bad('nonce-flipped-bit', 'one bit of the AES-GCM nonce',
        flip(a, h + 3), A)
    bad('ciphertext-flipped-bit', 'one bit of the wrapped key',
        flip(a, h + 12 + 5), A)
    bad('tag-flipped-bit', 'one bit of the tag', flip(a, -1, 6), A)
    bad('trailing-byte', 'one byte appended', a + b'\x00', A)
    bad('rsa-flipped-bit', 'one bit of the RSA-OAEP wrapping',
        flip(r, -10), A, 'rsa')
    bad('rsa-moved-to-other-dek-id', 'the label no longer matches',
        r[:5] + label('other DEK id', 16) + r[21:], A, 'rsa')
    bad('rsa-trailing-byte', 'one byte appended', r + b'\x00', A, 'rsa')
    bad('rsa-public-only', 'the public half of the KEK cannot unwrap', r,
        I, 'rsa-public')
    return {
        'format': 'zodbkmi wrapped DEK, version 1',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate.py',
        'comment': ('Each valid vector unwraps to (dek_id, dek) with '
                    'wrapped.unwrap(kek, wrapped), "kek" naming an entry '
                    'of "keys"; AES vectors are also reproduced from their '
                    'nonce.  Each invalid vector raises exactly the '
                    'zodbkmi.exceptions class named in "error".  Every '
                    'key here is a ' + PUBLIC_TEST_KEY),
        'keys': keys, 'valid': valid, 'invalid': invalid}


# -- vault entries --------------------------------------------------------

def vault_vectors(wrapped_doc):
    v = wrapped_doc['valid'][0]
    raw = bytes.fromhex(v['wrapped'])
    entry = VaultEntry(v['dek_id'], v['kek_id'], raw, 'active',
                       1795000000000000000)
    retired = VaultEntry(v['dek_id'], v['kek_id'], raw, 'retired',
                         1795000000000000000)
    doc = json.loads(entry.to_json())
    valid = [
        {'name': 'active', 'comment': 'an active entry', 'dek_id':
         entry.dek_id, 'kek_id': entry.kek_id, 'state': 'active',
         'created': entry.created, 'wrapped': raw.hex(),
         'json': entry.to_json().decode('ascii')},
        {'name': 'retired', 'comment': 'a retired entry', 'dek_id':
         retired.dek_id, 'kek_id': retired.kek_id, 'state': 'retired',
         'created': retired.created, 'wrapped': raw.hex(),
         'json': retired.to_json().decode('ascii')},
    ]
    invalid = []

    def bad(name, comment, text):
        invalid.append({'name': name, 'comment': comment, 'json': text,
                        'error': 'KeyStoreError'})

    def changed(**kw):
        d = dict(doc)
        for k, val in kw.items():
            if val is None:
                del d[k]
            else:
                d[k] = val
        return json.dumps(d, sort_keys=True)

    bad('empty', 'an empty file', '')
    bad('not-json', 'not JSON', 'dek_id=1')
    bad('truncated-json', 'cut in the middle', entry.to_json().decode()[:60])
    bad('json-list', 'a JSON array', '[]')
    bad('other-format', 'another "format"', changed(format='other'))
    bad('no-format', 'no "format"', changed(format=None))
    bad('version-2', 'version 2', changed(version=2))
    bad('version-string', 'version "1"', changed(version='1'))
    bad('no-wrapped', 'no "wrapped"', changed(wrapped=None))
    bad('wrapped-not-base64', '"wrapped" is not base64',
        changed(wrapped='not base64!'))
    bad('wrapped-bad-magic', '"wrapped" is not a wrapped DEK',
        changed(wrapped=base64.b64encode(b'xyz' + raw[3:]).decode()))
    bad('wrapped-truncated', '"wrapped" ends inside its header',
        changed(wrapped=base64.b64encode(raw[:15]).decode()))
    bad('dek-id-uppercase', 'a DEK id in upper case',
        changed(dek_id=entry.dek_id.upper()))
    bad('dek-id-short', 'a DEK id of 31 digits',
        changed(dek_id=entry.dek_id[:31]))
    bad('dek-id-mismatch', 'the DEK id differs from the wrapped DEK',
        changed(dek_id='0' * 32))
    bad('kek-id-mismatch', 'the KEK id differs from the wrapped DEK',
        changed(kek_id='aes-' + '0' * 32))
    bad('unknown-state', 'state "destroyed" (destroyed entries are gone)',
        changed(state='destroyed'))
    bad('no-state', 'no "state"', changed(state=None))
    bad('created-not-a-number', '"created" is not a number',
        changed(created='yesterday'))
    return {
        'format': 'zodbkmi vault entry, version 1',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate.py',
        'comment': ('Each valid vector is the exact text VaultEntry(dek_id, '
                    'kek_id, wrapped, state, created).to_json() writes; '
                    'each invalid one raises KeyStoreError from '
                    'VaultEntry.from_json.'),
        'valid': valid, 'invalid': invalid}


# -- key files ------------------------------------------------------------

def key_file_vectors(wrapped_doc, weak_key):
    keys = wrapped_doc['keys']
    rsa_pem = keys['rsa']['private_pem']
    aes_line = base64.b64encode(bytes.fromhex(keys['aes']['key'])).decode()
    valid = [
        {'name': 'aes-base64', 'comment': 'one line of base64, as '
         'write_key_file writes it', 'content': aes_line + '\n',
         'kek_id': keys['aes']['kek_id']},
        {'name': 'aes-base64-no-newline', 'comment': 'without the newline',
         'content': aes_line, 'kek_id': keys['aes']['kek_id']},
        {'name': 'aes-base64-spaces', 'comment': 'surrounding white space '
         'is ignored', 'content': '  ' + aes_line + '\r\n\n',
         'kek_id': keys['aes']['kek_id']},
        {'name': 'rsa-pem', 'comment': 'an RSA-3072 private key, PKCS#8 '
         'PEM', 'content': rsa_pem, 'kek_id': keys['rsa']['kek_id']},
    ]
    short = base64.b64encode(bytes(16)).decode()
    invalid = [
        {'name': 'empty', 'comment': 'an empty file', 'content': ''},
        {'name': 'garbage', 'comment': 'neither PEM nor base64',
         'content': 'not a key!\n'},
        {'name': 'aes-16-bytes', 'comment': 'base64 of 16 bytes',
         'content': short + '\n'},
        {'name': 'aes-two-lines', 'comment': 'a key split over two lines '
         'is not one base64 line', 'content': aes_line[:20] + '\n' +
         aes_line[20:] + '\n'},
        {'name': 'pem-garbage', 'comment': 'a PEM frame around garbage',
         'content': '-----BEGIN PRIVATE KEY-----\nAAAA\n'
                    '-----END PRIVATE KEY-----\n'},
        {'name': 'pem-public-key', 'comment': 'a public key',
         'content': keys['rsa-public']['public_pem']},
        {'name': 'rsa-2048', 'comment': 'an RSA key of 2048 bits: too '
         'small (a ' + PUBLIC_TEST_KEY + ')', 'content': pem(weak_key)},
    ]
    for v in invalid:
        v['error'] = 'InvalidKeyError'
    return {
        'format': 'zodbkmi key file',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate.py',
        'comment': ('Each valid vector, written to a file of mode 0600, is '
                    'read by keyholder.read_key_file into a KEK of id '
                    '"kek_id"; each invalid one raises InvalidKeyError.  '
                    'Every key here is a ' + PUBLIC_TEST_KEY),
        'valid': valid, 'invalid': invalid}


def dump(doc):
    return json.dumps(doc, indent=1) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=HERE,
                        help='directory to write to (default: %(default)s)')
    args = parser.parse_args(argv)
    names = ['envelope.json', 'wrapped.json', 'vault-entry.json',
             'key-file.json']
    paths = {n: os.path.join(args.out, n) for n in names}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if len(existing) == len(names):
        print('all vector files exist; released vectors are never '
              'regenerated')
        return 0
    wrapped_path = paths['wrapped.json']
    if os.path.exists(wrapped_path):
        # later files must use the RSA test key released in wrapped.json
        with open(wrapped_path) as f:
            wrapped_doc = json.load(f)
    else:
        rsa_key = rsa.generate_private_key(public_exponent=65537,
                                           key_size=3072)
        wrapped_doc = wrapped_vectors(rsa_key)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    docs = {'envelope.json': envelope_vectors,
            'wrapped.json': lambda: wrapped_doc,
            'vault-entry.json': lambda: vault_vectors(wrapped_doc),
            'key-file.json': lambda: key_file_vectors(wrapped_doc, weak)}
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        if os.path.exists(paths[name]):
            print('kept', paths[name])
            continue
        with open(paths[name], 'x') as f:
            f.write(dump(docs[name]()))
        print('wrote', paths[name])
    return 0


if __name__ == '__main__':
    sys.exit(main())
