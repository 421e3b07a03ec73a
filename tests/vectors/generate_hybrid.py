"""Generate the vectors of the hybrid KEK (ML-KEM-768 + X25519 through HPKE),
once: ``hybrid.json``.

Run from the top of the checkout; it refuses to overwrite a file that
exists (released vectors never change)::

    python tests/vectors/generate_hybrid.py            # a missing file
    python tests/vectors/generate_hybrid.py --out DIR  # fresh output

The keys are derived from public labels (PUBLIC TEST KEYS).  HPKE is
randomized (a fresh KEM encapsulation each time): the wrapped DEKs and the
stream are decryption vectors, checked with the fixed private key; the key
files and the KEK ids are reproduced byte for byte.

Each vector has a ``type``:

- ``key-file``: ``content`` written to a file of mode 0600 and read by
  ``keyholder.read_key_file`` (private keys, valid: ``kek_id``) or
  ``kek.HybridPublicKeyEncryptingKey.from_pem`` (``"public": true``).
- ``wrapped``: ``wrapped.unwrap(kek, wrapped)`` gives ``(dek_id, dek)``,
  ``kek`` naming one of ``keys`` (``-public``: its public half).
- ``stream``: ``files.decrypt_with_private_key(kek, stream)`` gives
  ``plaintext``.
- ``entry``: ``KeyStoreEntry.from_json(json)`` holds ``wrapped``.
"""
import argparse
import io
import json
import os
import runpy
import sys
import types

from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric import x25519

from zodbkmi import files
from zodbkmi.format import wrapped
from zodbkmi.kek import HybridKeyEncryptingKey
from zodbkmi.kek import HYBRID_WRAPPED_SIZE
from zodbkmi.kek import RSAKeyEncryptingKey
from zodbkmi.keystore import KeyStoreEntry

HERE = os.path.dirname(os.path.abspath(__file__))
CREATED = 1796500000000000000       # 2026-12-05, nanoseconds


def _generate_v1():
    return types.SimpleNamespace(**runpy.run_path(
        os.path.join(HERE, 'generate.py')))


def test_key(g, name):
    """The hybrid PUBLIC TEST KEY ``name``: its ML-KEM-768 seed and X25519
    private key are public labels."""
    return HybridKeyEncryptingKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(
            g.label(name + ' ML-KEM-768 seed a')
            + g.label(name + ' ML-KEM-768 seed b')),
        x25519.X25519PrivateKey.from_private_bytes(
            g.label(name + ' X25519')))


def hybrid_vectors():
    g = _generate_v1()
    label, flip, patch = g.label, g.flip, g.patch
    kek = test_key(g, 'hybrid')
    other = test_key(g, 'other hybrid')
    keys = {}
    for name, k in (('hybrid', kek), ('other-hybrid', other)):
        keys[name] = {'kek_id': k.key_id,
                      'private_pem': k.private_pem().decode('ascii'),
                      'public_pem': k.public_pem().decode('ascii'),
                      'comment': 'PUBLIC TEST KEY: its seeds are public '
                                 'labels; never use it for data'}
    valid, invalid = [], []
    T, U, A, W, I = (  # noqa: E741 (I: InvalidKeyError)
        'TruncatedDataError', 'UnsupportedFormatError',
        'AuthenticationError', 'WrongKeyError', 'InvalidKeyError')

    def ok(type_, name, comment, **kw):
        valid.append(dict(type=type_, name=name, comment=comment, **kw))

    def bad(type_, name, comment, error, **kw):
        invalid.append(dict(type=type_, name=name, comment=comment,
                            error=error, **kw))

    # -- key files --------------------------------------------------------
    priv, pub = kek.private_pem(), kek.public_pem()
    ok('key-file', 'private', 'the private key file as write_key_file '
       'writes it', content=priv.decode(), kek_id=kek.key_id)
    ok('key-file', 'private-crlf', 'CRLF line ends and surrounding white '
       'space are accepted', content='\n' + priv.decode().replace(
           '\n', '\r\n') + '\n', kek_id=kek.key_id)
    ok('key-file', 'public', 'the public key file (zodbkmi public-key)',
       content=pub.decode(), kek_id=kek.key_id, public=True)
    lines = priv.split(b'\n')
    bad('key-file', 'private-truncated-line', 'the last base64 line cut',
        I, content=b'\n'.join(lines[:-3] + [lines[-3][:-4]] + lines[-2:])
        .decode())
    bad('key-file', 'private-no-end', 'no END line', I,
        content=b'\n'.join(lines[:-2]).decode())
    bad('key-file', 'private-flipped-seed-bit', 'one bit of a base64 letter '
        'of the ML-KEM seed: the check value differs',
        I, content=priv.replace(lines[1], lines[1][:20] + bytes(
            [lines[1][20] ^ 1]) + lines[1][21:]).decode())
    bad('key-file', 'private-rewrapped-lines', 'the same body in lines of '
        '76 characters', I, content=_relines(priv, 76).decode())
    bad('key-file', 'public-as-private', 'the public key file where the '
        'private key is needed (the error names its KEK id)', I,
        content=pub.decode())
    bad('key-file', 'private-as-public', 'the private key file where a '
        'public key is expected', I, content=priv.decode(), public=True)
    with open(os.path.join(HERE, 'wrapped.json')) as f:
        rsa_pem = json.load(f)['keys']['rsa']['private_pem']
    rsa = RSAKeyEncryptingKey.from_pem(rsa_pem.encode())
    bad('key-file', 'rsa-as-public', 'an RSA public key (the "rsa" key of '
        'wrapped.json) read as a hybrid one', I,
        content=rsa.public_pem().decode(), public=True)
    for name, body, comment in _bad_bodies(kek, label):
        bad('key-file', name, comment, I, content=body)

    # -- wrapped DEKs -------------------------------------------------------
    dek_id, dek = g.WRAPPED_DEK_ID, g.WRAPPED_DEK
    w2 = wrapped.wrap(kek, dek_id, dek, created=CREATED)
    w1 = wrapped.wrap(kek.public(), dek_id, dek, version=wrapped.VERSION_1)
    h2, h1 = len(wrapped.parse(w2).header), len(wrapped.parse(w1).header)
    n = HYBRID_WRAPPED_SIZE
    ok('wrapped', 'v2', 'version 2, suite 5: HPKE (info = header) then '
       'HMAC-SHA256 of header || HPKE ciphertext', kek='hybrid',
       wrapped=w2.hex(), dek_id=dek_id.hex(), dek=dek.hex(),
       kek_id=kek.key_id, created=CREATED)
    ok('wrapped', 'v1', 'version 1, suite 5: HPKE only, what the public key '
       'alone makes (self-contained streams)', kek='hybrid',
       wrapped=w1.hex(), dek_id=dek_id.hex(), dek=dek.hex(),
       kek_id=kek.key_id, created=None)
    zero = wrapped.wrap(kek, bytes(16), bytes(32), created=0)
    ok('wrapped', 'v2-zero-dek', 'a DEK of zero bytes, created 0',
       kek='hybrid', wrapped=zero.hex(), dek_id=bytes(16).hex(),
       dek=bytes(32).hex(), kek_id=kek.key_id, created=0)

    def badw(name, comment, data, error, kek_name='hybrid'):
        bad('wrapped', name, comment, error, kek=kek_name,
            wrapped=data.hex())

    badw('v2-header-only', 'the header, no wrapping', w2[:h2], T)
    badw('v2-no-mac', 'the HPKE ciphertext without its MAC (what the '
         'public key alone can make, presented as version 2)',
         w2[:h2 + n], T)
    badw('v2-mac-cut', 'ends inside the MAC', w2[:-1], T)
    badw('v2-in-enc', 'ends inside the KEM encapsulation', w2[:h2 + 600], T)
    badw('v2-trailing-byte', 'one byte appended', w2 + b'\x00', A)
    badw('v2-mac-flipped-bit', 'one bit of the MAC', flip(w2, -1), A)
    badw('v2-enc-flipped-bit', 'one bit of the ML-KEM ciphertext: the MAC '
         'no longer verifies', flip(w2, h2 + 5), A)
    badw('v2-created-changed', 'one bit of the creation time', flip(w2, 22),
         A)
    badw('v2-dek-id-changed', 'one bit of the DEK id', flip(w2, 9), A)
    badw('v2-read-as-v1', 'the version byte set to 1', patch(w2, 3, 1), U)
    badw('v1-flipped-tag', 'one bit of the AES-GCM tag', flip(w1, -1), A)
    badw('v1-flipped-x25519', 'one bit of the X25519 share (the last 32 '
         'bytes of the encapsulation)', flip(w1, h1 + 1100), A)
    badw('v1-dek-id-changed', 'one bit of the DEK id: info differs', flip(
        w1, 9), A)
    badw('v1-cut', 'ends inside the ciphertext', w1[:-1], T)
    badw('v1-trailing-byte', 'one byte appended', w1 + b'\x00', A)
    o1 = wrapped.wrap(other.public(), dek_id, dek, version=1)
    badw('other-recipient', 'made for another hybrid key: the header names '
         'it', o1, W)
    ho = len(wrapped.parse(o1).header)
    badw('other-recipient-relabelled', 'made for another hybrid key, its '
         'header rewritten to name this one', w1[:h1] + o1[ho:], A)
    badw('suite-1-claimed', 'the suite byte says RSA', patch(w1, 4, 1), W)
    badw('public-only', 'the public half cannot unwrap', w1, I,
         'hybrid-public')
    badw('rsa-kek', 'an RSA KEK (the "rsa" key of wrapped.json) given for '
         'a hybrid wrapping', w2, W, 'rsa')

    # -- streams and key store entries ------------------------------------
    plaintext = label('stream plaintext') * 3
    out = io.BytesIO()
    files.encrypt_to_recipient(kek.public_pem(), io.BytesIO(plaintext), out,
                               64)
    s = out.getvalue()
    ok('stream', 'stream', 'a self-contained stream (kind 2) for the hybrid '
       'key: 64 byte chunks, its DEK wrapped in version 1 suite 5',
       kek='hybrid', stream=s.hex(), plaintext=plaintext.hex())
    bad('stream', 'stream-other-recipient', 'the stream opened with another '
        'hybrid key', W, kek='other-hybrid', stream=s.hex())
    bad('stream', 'stream-wrapped-flipped', 'one bit of the embedded HPKE '
        'tag', A, kek='hybrid', stream=flip(s, 25 + len(w1) - 1).hex())
    entry = KeyStoreEntry(dek_id.hex(), kek.key_id, w2, 'active')
    ok('entry', 'entry', 'a key store entry holding the v2 vector',
       json=entry.to_json().decode('ascii'), wrapped=w2.hex(), kek='hybrid')
    bad('entry', 'entry-kek-id-differs', 'the entry names another KEK',
        'KeyStoreError', json=json.dumps(dict(json.loads(entry.to_json()),
                                              kek_id=other.key_id),
                                         sort_keys=True))
    return {
        'format': 'zodbkmi hybrid KEK: key files, wrapped DEK suite 5, '
                  'streams, key store entries',
        'specification': 'docs/format.rst',
        'generated_by': 'tests/vectors/generate_hybrid.py',
        'comment': __doc__.split('\n\n', 1)[1],
        'keys': keys, 'valid': valid, 'invalid': invalid}


def _relines(pem, width):
    lines = pem.strip().split(b'\n')
    body = b''.join(lines[1:-1])
    return b'\n'.join([lines[0]] + [body[i:i + width]
                                    for i in range(0, len(body), width)]
                      + [lines[-1]]) + b'\n'


def _bad_bodies(kek, label):
    """Key files with well-formed armour around a bad body."""
    from zodbkmi import kek as kekmod
    body = kekmod.HYBRID_MAGIC + bytes([1, 1]) + kek._secret()

    def armour(b, check=True):
        return kekmod._armour(kekmod.HYBRID_PRIVATE_LABEL, b + (
            kekmod._check_value(b) if check else b'')).decode()

    yield ('private-version-2', 'a body of version 2 (correct check value)',
           armour(body[:3] + b'\x02' + body[4:]))
    yield ('private-type-public', 'a body of type 2 in a private key file',
           armour(body[:4] + b'\x02' + body[5:]))
    yield ('private-bad-magic', 'magic "zkx"', armour(b'zkx' + body[3:]))
    yield ('private-short-body', 'the seed one byte short (correct check '
           'value)', armour(body[:-1]))
    yield ('private-no-check', 'no check value', armour(body, False))
    yield ('private-wrong-check', 'a check value of another body',
           armour(body + label('not a check value', 16), False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=HERE)
    args = parser.parse_args(argv)
    path = os.path.join(args.out, 'hybrid.json')
    if os.path.exists(path):
        print('hybrid.json exists; released vectors are never regenerated')
        return 0
    doc = hybrid_vectors()
    os.makedirs(args.out, exist_ok=True)
    with open(path, 'x') as f:
        f.write(json.dumps(doc, indent=1) + '\n')
    print('wrote', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
