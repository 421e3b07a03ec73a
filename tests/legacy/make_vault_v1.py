"""Make tests/legacy/vault-v1: key stores and data written by zodbkmi
before wrapped-DEK format 2 (main at commit ca920cc, 2026-12-01).

Run once with that code on the path (a checkout of ca920cc):

    PYTHONPATH=<checkout>/src python tests/legacy/make_vault_v1.py OUTDIR

It writes, for an RSA KEK and an AES KEK (PUBLIC TEST KEYS, generated for
this fixture: they protect nothing), a key directory holding a retired and
an active data key, and data.json: envelopes sealed under each key, with
their plaintexts.  tests/test_review_keys.py opens them with today's code.
Files are never regenerated: data written then must open forever.
"""
import base64
import json
import os
import sys

from zodbkmi.facility import KeyManagementFacility
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.kek import RSAKeyEncryptingKey


def main(out):
    if os.path.exists(os.path.join(out, 'data.json')):
        sys.exit('%s exists: the fixture is never regenerated' % out)
    os.makedirs(out, exist_ok=True)
    rsa = RSAKeyEncryptingKey.generate()
    aes = os.urandom(32)
    with open(os.path.join(out, 'kek-rsa.pem'), 'wb') as f:
        f.write(rsa.private_pem())
    with open(os.path.join(out, 'kek-aes.b64'), 'wb') as f:
        f.write(base64.b64encode(aes) + b'\n')
    doc = {'comment': 'PUBLIC TEST KEYS and data written by zodbkmi at '
                      'commit ca920cc (wrapped-DEK format 1, record '
                      'envelope version 1)',
           'generated_by': 'tests/legacy/make_vault_v1.py',
           'stores': {}}
    for name, kek in (('rsa', rsa.private_pem()), ('aes', aes)):
        facility = KeyManagementFacility(os.path.join(out, 'keys-' + name))
        records = []
        for n in range(2):
            dek_id = facility.create_key(kek)   # the first one is retired
            plaintext = ('%s data under key %d' % (name, n)).encode()
            oid = bytes(7) + bytes([n + 1])
            records.append({
                'dek_id': dek_id, 'plaintext': plaintext.hex(),
                'data': facility.encrypt(kek, plaintext).hex(),
                'oid': oid.hex(),
                'record': facility.encrypt(kek, plaintext, oid).hex()})
        doc['stores'][name] = {
            'kek_id': AESKeyEncryptingKey(aes).key_id if name == 'aes'
            else rsa.key_id,
            'active': records[-1]['dek_id'], 'records': records}
    with open(os.path.join(out, 'data.json'), 'w') as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write('\n')


if __name__ == '__main__':
    main(sys.argv[1])
