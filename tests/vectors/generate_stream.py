"""Generate tests/vectors/stream.json, the vectors of the stream format, once.

The vectors pin the stream format of ``docs/format.rst``: once released
they never change.  This script shows how each vector was made; it refuses
to overwrite a file that exists::

    python tests/vectors/generate_stream.py            # if missing
    python tests/vectors/generate_stream.py --out DIR  # fresh output

Fixed salts come from the private seam ``build_header(..., _salt=...)``
(and ``AESKeyEncryptingKey.wrap(..., _nonce=...)`` for the embedded wrapped
DEK), so every valid vector is reproduced byte for byte by
``tests/test_stream.py``.  The keys are PUBLIC TEST KEYS: they protect
nothing.
"""
import argparse
import io
import json
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zodbkmi.format import stream
from zodbkmi.format import wrapped
from zodbkmi.kek import AESKeyEncryptingKey

HERE = os.path.dirname(os.path.abspath(__file__))
DEK = bytes(range(32, 64))
DEK_ID = bytes(range(16))
SALT = bytes(range(100, 116))
KEK = bytes(range(200, 232))
WRAP_NONCE = bytes(range(12))


def plaintext(n):
    return bytes((i * 7 + 3) % 256 for i in range(n))


def seal(data, cs=64):
    return stream.encrypt_bytes(DEK_ID, DEK, data, cs, _salt=SALT)


def vectors():
    out = []

    def valid(name, n, cs=64, comment=''):
        out.append(dict(name=name, comment=comment, dek=DEK.hex(),
                        dek_id=DEK_ID.hex(), salt=SALT.hex(), chunk_size=cs,
                        plaintext=plaintext(n).hex(),
                        stream=seal(plaintext(n), cs).hex()))

    def invalid(name, data, error, comment='', dek=DEK):
        out.append(dict(name=name, comment=comment, dek=dek.hex(),
                        dek_id=DEK_ID.hex(), stream=data.hex(), error=error))

    valid('empty', 0, comment='one empty final chunk')
    valid('one byte', 1)
    valid('exactly one chunk', 64, comment='a single full final chunk')
    valid('one chunk and one byte', 65)
    valid('three full chunks', 192)
    valid('four chunks, last short', 200)
    valid('default chunk size', 100, 65536)

    # self-contained: the DEK wrapped by an AES test KEK, embedded
    kek = AESKeyEncryptingKey(KEK)
    wheader = wrapped.build_header(kek.suite, DEK_ID, kek.key_id)
    blob = wheader + kek.wrap(DEK, wheader, _nonce=WRAP_NONCE)
    header = stream.build_header(wrapped=blob, chunk_size=64, _salt=SALT)
    sink = io.BytesIO()
    stream.encrypt(io.BytesIO(plaintext(100)), sink, DEK, header)
    out.append(dict(name='embedded wrapped DEK', comment='kind 0x02; '
                    'the wrapped DEK is in the wrapped-DEK format, under '
                    'the AES-256 KEK "kek"', dek=DEK.hex(),
                    dek_id=DEK_ID.hex(), salt=SALT.hex(), chunk_size=64,
                    kek=KEK.hex(), wrapped=blob.hex(),
                    plaintext=plaintext(100).hex(),
                    stream=sink.getvalue().hex()))

    s = seal(plaintext(200))
    h, c = 39, 64 + 16
    parts = [s[h + i:h + i + c] for i in range(0, len(s) - h, c)]
    head = s[:h]
    invalid('header only', head, 'TruncatedDataError')
    invalid('truncated inside the header', s[:30], 'TruncatedDataError')
    invalid('truncated at a chunk boundary', head + b''.join(parts[:3]),
            'TruncatedDataError', 'chunk 2 is not final')
    invalid('truncated inside a tag',
            head + b''.join(parts[:3]) + parts[3][:10], 'TruncatedDataError')
    invalid('truncated inside a chunk', s[:-5], 'AuthenticationError',
            'cannot be told from an altered last chunk')
    invalid('dropped chunk', head + parts[0] + parts[2] + parts[3],
            'AuthenticationError')
    invalid('duplicated chunk',
            head + parts[0] + parts[1] + parts[1] + parts[2] + parts[3],
            'AuthenticationError')
    invalid('reordered chunks', head + parts[1] + parts[0] + parts[2]
            + parts[3], 'AuthenticationError')
    invalid('data after the final chunk', seal(plaintext(192)) + b'\x00',
            'AuthenticationError')
    invalid('data after a short final chunk', s + b'\x00',
            'AuthenticationError')
    b = bytearray(s)
    b[h + 100] ^= 0x01
    invalid('flipped bit in a chunk', bytes(b), 'AuthenticationError')
    b = bytearray(s)
    b[10] ^= 0x80
    invalid('flipped bit in the salt', bytes(b), 'AuthenticationError')
    b = bytearray(s)
    b[3] = 2
    invalid('newer version', bytes(b), 'UnsupportedFormatError')
    b = bytearray(s)
    b[4] = 2
    invalid('unknown suite', bytes(b), 'UnsupportedFormatError')
    invalid('bad magic', b'zkx' + s[3:], 'UnsupportedFormatError')
    invalid('wrong DEK', s, 'AuthenticationError', dek=bytes(32))
    hd = stream.build_header(DEK_ID, chunk_size=64, _salt=SALT)
    aead = AESGCM(stream.payload_key(hd, DEK))
    invalid('empty final chunk after a full one',
            hd.raw + aead.encrypt(stream._nonce(0, False), plaintext(64),
                                  None)
            + aead.encrypt(stream._nonce(1, True), b'', None),
            'AuthenticationError')
    invalid('last chunk not flagged final',
            hd.raw + aead.encrypt(stream._nonce(0, False), plaintext(10),
                                  None),
            'TruncatedDataError', 'a short chunk sealed as non-final')
    return {'format': 'zodbkmi stream, version 1 (docs/format.rst, '
                      'Stream format)',
            'note': 'hex strings; valid vectors give the plaintext and the '
                    'salt the writer used, invalid ones the exception '
                    'decrypt_bytes raises.  PUBLIC TEST KEYS: they protect '
                    'nothing.',
            'vectors': out}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=HERE)
    args = parser.parse_args(argv)
    path = os.path.join(args.out, 'stream.json')
    if os.path.exists(path):
        print('%s exists: released vectors never change' % path,
              file=sys.stderr)
        return 1
    with open(path, 'w') as f:
        f.write(json.dumps(vectors(), indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
