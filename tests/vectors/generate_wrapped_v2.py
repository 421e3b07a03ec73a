"""Generate the vectors of wrapped-DEK format version 2 and of the vault
entries that hold it, once: ``wrapped-v2.json`` and ``vault-entry-v2.json``.

Run from the top of the checkout; it refuses to overwrite a file that
exists (released vectors never change)::

    python tests/vectors/generate_wrapped_v2.py            # missing files
    python tests/vectors/generate_wrapped_v2.py --out DIR  # fresh output

The keys are those of ``wrapped.json`` (PUBLIC TEST KEYS).  AES-GCM and the
PKCS#11 suite (plain AES-GCM) are reproduced byte for byte from their
nonce; RSA-OAEP and RSA-PSS are randomized, so the RSA vectors are
decrypt-only.
"""
import argparse
import base64
import json
import os
import runpy
import sys
import types

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.kek import _PSS
from zodbkmi.kek import RSAKeyEncryptingKey
# the vectors (frozen) name the class by its old name
from zodbkmi.keystore import KeyStoreEntry as VaultEntry

HERE = os.path.dirname(os.path.abspath(__file__))
CREATED = 1796000000000000000       # 2026-11-30, nanoseconds


def _generate_v1():
    """The globals of generate.py, for its helpers (public labels, bit
    flips, the keys and DEKs of the version 1 vectors)."""
    return types.SimpleNamespace(**runpy.run_path(
        os.path.join(HERE, 'generate.py')))


def wrapped_v2_vectors(v1_doc):
    g = _generate_v1()
    label, flip, patch = g.label, g.flip, g.patch
    keys = v1_doc['keys']
    aes = AESKeyEncryptingKey(bytes.fromhex(keys['aes']['key']))
    rsa = RSAKeyEncryptingKey.from_pem(keys['rsa']['private_pem'].encode())
    dek_id, dek = g.WRAPPED_DEK_ID, g.WRAPPED_DEK
    valid = []

    def add(name, comment, kek_name, suite, kek_id, data, nonce=None,
            extra=None):
        valid.append(dict({
            'name': name, 'comment': comment, 'kek': kek_name,
            'suite': suite, 'dek_id': data[5:21].hex(), 'dek': None,
            'kek_id': kek_id, 'created': int.from_bytes(data[21:29], 'big'),
            'nonce': None if nonce is None else nonce.hex(),
            'wrapped': data.hex()}, **(extra or {})))

    def aes_gcm(name, comment, key, kek_name, suite, kek_id, d_id, d):
        nonce = label('wrap v2 nonce ' + name, 12)
        header = wrapped.build_header(suite, d_id, kek_id, created=CREATED)
        data = header + nonce + AESGCM(key).encrypt(nonce, d, header)
        add(name, comment, kek_name, suite, kek_id, data, nonce)
        valid[-1]['dek'] = d.hex()
        return data

    a = aes_gcm('aes', 'suite 2, AES-256-GCM', bytes.fromhex(
        keys['aes']['key']), 'aes', aes.suite, aes.key_id, dek_id, dek)
    aes_gcm('aes-zero-dek', 'suite 2, a DEK of zero bytes, created 0',
            bytes.fromhex(keys['aes']['key']), 'aes', aes.suite,
            aes.key_id, bytes(16), bytes(32))
    aes_gcm('pkcs11', 'suite 4, PKCS#11 AES-GCM: C_Encrypt with CKM_AES_GCM '
            'is this AES-256-GCM; the "aes" key imported into a token',
            bytes.fromhex(keys['aes']['key']), 'aes', 4,
            'pkcs11:zodbkmi-test:kek', dek_id, dek)
    r = wrapped.wrap(rsa, dek_id, dek, created=CREATED)
    add('rsa', 'suite 1: RSA-OAEP-SHA256 then RSA-PSS-SHA256 over header || '
        'OAEP ciphertext (randomized: decrypt only)', 'rsa', rsa.suite,
        rsa.key_id, r)
    valid[-1]['dek'] = dek.hex()
    transit = wrapped.build_header(3, dek_id, 'transit:transit:app',
                                   created=CREATED)
    headers = [{'name': 'transit', 'comment': 'suite 3: the header is the '
                'Transit context (base64), the wrapping is Transit\'s',
                'header': transit.hex()}]
    h = len(wrapped.parse(a).header)
    hr = len(wrapped.parse(r).header)
    k = 384
    invalid = []

    def bad(name, comment, data, error, kek='aes'):
        invalid.append({'name': name, 'comment': comment, 'kek': kek,
                        'wrapped': data.hex(), 'error': error})

    T, U, A, W, I = (  # noqa: E741 (I: InvalidKeyError)
        'TruncatedDataError', 'UnsupportedFormatError',
        'AuthenticationError', 'WrongKeyError', 'InvalidKeyError')
    bad('truncated-after-version', 'magic and version 2', a[:4], T)
    bad('truncated-in-created', 'ends inside the creation time', a[:25], T)
    bad('truncated-before-kek-id-length', 'ends after the creation time',
        a[:29], T)
    bad('truncated-header-only', 'the header, no wrapping', a[:h], T)
    bad('truncated-in-tag', 'ends inside the AES-GCM tag', a[:-1], T)
    bad('version-3', 'version 3', patch(a, 3, 3), U)
    bad('version-1-layout', 'a version 1 header read as version 2: the '
        'version byte changed', patch(bytes.fromhex(
            v1_doc['valid'][0]['wrapped']), 3, 2), T)
    bad('version-2-read-as-1', 'this vector\'s bytes with version byte 1',
        patch(a, 3, 1), U)
    bad('created-flipped-bit', 'one bit of the creation time',
        flip(a, 27), A)
    bad('created-later', 'the creation time moved to the far future',
        a[:21] + (2 ** 63).to_bytes(8, 'big') + a[29:], A)
    bad('dek-id-flipped-bit', 'one bit of the DEK id', flip(a, 10), A)
    bad('kek-id-changed', 'the header names another KEK',
        a[:29] + bytes([len(keys['other-aes']['kek_id'])])
        + keys['other-aes']['kek_id'].encode() + a[h:], W)
    bad('impostor-kek', 'right KEK id, another key', a, A, 'aes-impostor')
    bad('tag-flipped-bit', 'one bit of the tag', flip(a, -1, 6), A)
    bad('rsa-unsigned', 'an OAEP wrapping with no signature (what the '
        'public key alone can make)', r[:hr + k], T, 'rsa')
    bad('rsa-random-signature', 'a genuine OAEP wrapping and a signature '
        'made without the private key', r[:hr + k] + label(
            'not a signature', 32) * 12, A, 'rsa')
    bad('rsa-signature-flipped-bit', 'one bit of the signature',
        flip(r, -3), A, 'rsa')
    bad('rsa-ciphertext-flipped-bit', 'one bit of the OAEP ciphertext: '
        'the signature no longer verifies', flip(r, hr + 7), A, 'rsa')
    bad('rsa-created-changed', 'the creation time changed: the signature '
        'no longer verifies', flip(r, 22), A, 'rsa')
    bad('rsa-trailing-byte', 'one byte appended', r + b'\x00', A, 'rsa')
    # a genuine signature over another OAEP ciphertext of the same header
    other = rsa.wrap(label('other DEK'), r[:hr])
    bad('rsa-signature-of-another-ciphertext', 'the signature of this '
        'header over another ciphertext', r[:hr] + other + r[hr + k:], A,
        'rsa')
    # the holder of the private key may wrap any DEK and sign it: valid
    resigned = r[:hr] + other + rsa._private.sign(r[:hr] + other, _PSS,
                                                  hashes.SHA256())
    add('rsa-other-dek', 'another DEK under the same header, OAEP then '
        'signed by the private key', 'rsa', 1, rsa.key_id, resigned)
    valid[-1]['dek'] = label('other DEK').hex()
    bad('rsa-public-only', 'the public half of the KEK cannot unwrap', r, I,
        'rsa-public')
    return {
        'format': 'zodbkmi wrapped DEK, version 2',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate_wrapped_v2.py',
        'comment': ('The keys are those of wrapped.json (every one a PUBLIC '
                    'TEST KEY).  Each valid vector unwraps to (dek_id, dek) '
                    'with wrapped.unwrap(kek, wrapped); AES-GCM ones are '
                    'also reproduced from their nonce (suite 4 with the '
                    '"aes" key as the token key).  Each invalid vector '
                    'raises exactly the zodbkmi.exceptions class named in '
                    '"error".'),
        'valid': valid, 'headers': headers, 'invalid': invalid}


def vault_v2_vectors(doc):
    v = doc['valid'][0]
    raw = bytes.fromhex(v['wrapped'])
    entry = VaultEntry(v['dek_id'], v['kek_id'], raw, 'active')
    retired = VaultEntry(v['dek_id'], v['kek_id'], raw, 'retired')
    base = json.loads(entry.to_json())
    valid = [dict(name=e.state, comment='a version 2 entry, ' + e.state,
                  dek_id=e.dek_id, kek_id=e.kek_id, state=e.state,
                  created=e.created, wrapped=raw.hex(),
                  json=e.to_json().decode('ascii'))
             for e in (entry, retired)]
    invalid = []

    def bad(name, comment, **kw):
        d = dict(base)
        d.update(kw)
        invalid.append({'name': name, 'comment': comment,
                        'json': json.dumps(d, sort_keys=True),
                        'error': 'KeyStoreError'})

    bad('created-differs', '"created" is not the time the wrapped DEK '
        'authenticates', created=entry.created + 1)
    bad('version-1-with-v2-wrapped', 'version 1 names a version 2 wrapped '
        'DEK', version=1)
    bad('version-2-with-v1-wrapped', 'version 2 names a version 1 wrapped '
        'DEK', wrapped=base64.b64encode(_v1_wrapped()).decode())
    bad('version-3', 'version 3', version=3)
    bad('kek-id-differs', 'the KEK id differs from the wrapped DEK',
        kek_id='aes-' + '0' * 32)
    bad('state-unknown', 'state "destroyed"', state='destroyed')
    bad('version-true', 'version true (JSON), not the integer 2',
        version=True)
    return {
        'format': 'zodbkmi vault entry, version 2',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate_wrapped_v2.py',
        'comment': ('Each valid vector is the exact text VaultEntry(dek_id, '
                    'kek_id, wrapped, state).to_json() writes; each invalid '
                    'one raises KeyStoreError from VaultEntry.from_json.'),
        'valid': valid, 'invalid': invalid}


def _v1_wrapped():
    with open(os.path.join(HERE, 'wrapped.json')) as f:
        return bytes.fromhex(json.load(f)['valid'][0]['wrapped'])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=HERE)
    args = parser.parse_args(argv)
    with open(os.path.join(HERE, 'wrapped.json')) as f:
        v1_doc = json.load(f)
    paths = {n: os.path.join(args.out, n)
             for n in ('wrapped-v2.json', 'vault-entry-v2.json')}
    if all(os.path.exists(p) for p in paths.values()):
        print('all vector files exist; released vectors are never '
              'regenerated')
        return 0
    if os.path.exists(paths['wrapped-v2.json']):
        with open(paths['wrapped-v2.json']) as f:
            doc = json.load(f)
    else:
        doc = wrapped_v2_vectors(v1_doc)
    docs = {'wrapped-v2.json': doc,
            'vault-entry-v2.json': vault_v2_vectors(doc)}
    os.makedirs(args.out, exist_ok=True)
    for name, path in paths.items():
        if os.path.exists(path):
            print('kept', path)
            continue
        with open(path, 'x') as f:
            f.write(json.dumps(docs[name], indent=1) + '\n')
        print('wrote', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
