"""Generate shred-receipt.json: destruction receipts, version 1.

Ed25519 is deterministic: the same seed and body give the same signature.
Run once; the vectors never change once released."""
import base64
import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey)
from cryptography.hazmat.primitives import serialization

from zodbkmi.tenants import _canonical
from zodbkmi.tenants import signer_id

SEED = bytes(range(32))


def main():
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    public = key.public_key()
    body = {'format': 'zodbkmi-shred-receipt', 'version': 1,
            'tenant': 'acme', 'deks': ['00112233445566778899aabbccddeeff'],
            'kek': {'kind': 'file',
                    'id': 'aes-0123456789abcdef0123456789abcdef',
                    'destroyed': True},
            'operator': 'dpo@example.org', 'started': '2026-12-05T15:00:00Z',
            'time': '2026-12-05T15:00:01Z', 'host': 'db1',
            'registry': '/srv/zodb/tenants'}
    receipt = dict(body, signature={
        'alg': 'Ed25519', 'signer': signer_id(public),
        'value': base64.b64encode(key.sign(_canonical(body))).decode()})
    altered = json.loads(json.dumps(receipt))
    altered['tenant'] = 'globex'
    vectors = {
        'description': 'zodbkmi destruction receipts, version 1 '
                       '(docs/format.rst)',
        'seed': SEED.hex(),
        'public_key_pem': public.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        'canonical_body': _canonical(body).decode(),
        'valid': [receipt],
        'invalid': [altered]}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'shred-receipt.json')
    with open(path, 'w') as f:
        json.dump(vectors, f, indent=1, sort_keys=True)
        f.write('\n')


if __name__ == '__main__':
    main()
