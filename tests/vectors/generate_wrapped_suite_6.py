"""Generate the vectors of wrapping suite 6 (KMIP AES-GCM), once:
``wrapped-suite-6.json``.

Run from the top of the checkout; it refuses to overwrite a file that
exists (released vectors never change)::

    python tests/vectors/generate_wrapped_suite_6.py            # missing
    python tests/vectors/generate_wrapped_suite_6.py --out DIR  # fresh

Suite 6 is plain AES-256-GCM with the IV stored in front, so every vector
is reproduced byte for byte from its IV: a 12 byte one (what the
``fetchKey`` mode and most servers draw) and a 16 byte one (PyKMIP's).
The key is a PUBLIC TEST KEY.
"""
import argparse
import hashlib
import json
import os

from zodbkmi.format import wrapped
from zodbkmi.sources.kmip import KmipFetchedKeyEncryptingKey

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = 'wrapped-suite-6.json'
CREATED = 1796000000000000000       # 2026-11-30, nanoseconds


def _public(label, size):
    return hashlib.sha256(b'zodbkmi public test vector: ' + label).digest(
        )[:size]


def vectors():
    key = _public(b'suite 6 key', 32)
    dek_id, dek = _public(b'suite 6 dek id', 16), _public(b'suite 6 dek', 32)
    kek = KmipFetchedKeyEncryptingKey._from_key(key, '1')
    valid, invalid = [], []
    for name, iv in (('iv-12', _public(b'suite 6 iv 12', 12)),
                     ('iv-16', _public(b'suite 6 iv 16', 16))):
        header = wrapped.build_header(wrapped.SUITE_KMIP_AES_GCM, dek_id,
                                      kek.key_id, created=CREATED)
        data = header + kek.wrap(dek, header, _iv=iv)
        valid.append({'name': name, 'kek_id': kek.key_id,
                      'dek_id': dek_id.hex(), 'dek': dek.hex(),
                      'iv': iv.hex(), 'wrapped': data.hex()})
    good = bytes.fromhex(valid[0]['wrapped'])
    head = len(good) - 61

    def bad(name, comment, data, error):
        invalid.append({'name': name, 'comment': comment,
                        'wrapped': data.hex(), 'error': error})
    bad('truncated', 'the wrapping is 60 bytes, one short of the minimum',
        good[:-1], 'TruncatedDataError')
    bad('iv-length-17', 'n = 17 is outside 12 to 16',
        good[:head] + bytes([17]) + good[head + 1:] + b'\0' * 5,
        'AuthenticationError')
    bad('iv-length-11', 'n = 11 is outside 12 to 16',
        good[:head] + bytes([11]) + good[head + 1:], 'AuthenticationError')
    bad('extra-byte', 'one byte after the tag', good + b'\0',
        'AuthenticationError')
    flipped = bytearray(good)
    flipped[-1] ^= 1
    bad('tag-flipped', 'the last bit of the tag flipped', bytes(flipped),
        'AuthenticationError')
    moved = bytearray(good)
    moved[5] ^= 1
    bad('dek-id-changed', 'the wrapping moved under another DEK id',
        bytes(moved), 'AuthenticationError')
    return {'comment': 'Wrapping suite 6 (KMIP AES-GCM), docs/format.rst. '
                       'The key is a PUBLIC TEST KEY.  Each valid vector '
                       'unwraps to (dek_id, dek) and is reproduced from its '
                       'IV; each invalid one raises the zodbkmi.exceptions '
                       'class named in "error".',
            'key': key.hex(), 'valid': valid, 'invalid': invalid}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=HERE)
    args = parser.parse_args(argv)
    path = os.path.join(args.out, NAME)
    if os.path.exists(path):
        print('%s exists: released vectors never change' % path)
        return 1
    with open(path, 'w') as f:
        json.dump(vectors(), f, indent=1)
        f.write('\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
