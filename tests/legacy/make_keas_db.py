"""Create a keas.kmi 3.x database (run by tests/test_legacy.py in a virtual
environment where keas.kmi 3.3.0 is installed from PyPI).

Usage: python make_keas_db.py OUTDIR

Writes in OUTDIR: ``kek.pem`` (the key holder's file), ``keys/`` (the
facility's DEK directory), ``keas.fs`` (keas ``EncryptedPersistent``
objects, class ``keasdata.Secret``), ``plain.fs`` (plain objects) and
``ces.fs`` (the records of plain.fs as cipher.encryptingstorage 1.1 writes
them: ``b'.e'`` + keas encrypt of the record, zlib-compressed first when
that is shorter), and ``expected.json``.
"""
import json
import os
import sys
import zlib

import transaction
import ZODB
import ZODB.FileStorage
import zope.component
from keas.kmi.facility import KeyManagementFacility
from keas.kmi.interfaces import IEncryptionService
from keas.kmi.interfaces import IKeyHolder
from keas.kmi.keyholder import KeyHolder
from persistent.mapping import PersistentMapping

out = sys.argv[1]
sys.path.insert(0, out)
import keasdata  # noqa: E402  (written by the test, next to the data)

os.makedirs(os.path.join(out, 'keys'))
facility = KeyManagementFacility(os.path.join(out, 'keys'))
kek = facility.generate()
with open(os.path.join(out, 'kek.pem'), 'wb') as f:
    f.write(kek)
zope.component.provideUtility(facility, IEncryptionService)
zope.component.provideUtility(KeyHolder(os.path.join(out, 'kek.pem')),
                              IKeyHolder)

# -- keas.kmi EncryptedPersistent objects ---------------------------------
db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(out, 'keas.fs')))
conn = db.open()
root = conn.root()
root['secrets'] = secrets = PersistentMapping()
expected = {}
previous = None
for i in range(int(os.environ.get('KEAS_OBJECTS', '200'))):
    note = keasdata.Plain()
    note.text = 'plain %d' % i
    secret = keasdata.Secret()
    secret.name = 'secret %d' % i
    secret.number = i
    secret.data = os.urandom(8) + b'\0\xff' * i
    secret.note = note          # a reference to a plain persistent object
    secret.previous = previous  # a reference to another encrypted object
    secret.kind = keasdata.Plain  # a class, kept out of the ciphertext
    secrets[i] = secret
    previous = secret
transaction.commit()
for i, secret in secrets.items():
    expected[secret._p_oid.hex()] = {
        'name': secret.name, 'number': secret.number,
        'data': secret.data.hex(), 'note': secret.note.text,
        'previous': (secret.previous._p_oid.hex()
                     if secret.previous is not None else None)}
db.close()

# -- cipher.encryptingstorage records --------------------------------------
db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(out, 'plain.fs')))
with db.transaction() as c:
    for i in range(50):
        c.root()[i] = PersistentMapping(text='plain text %d ' % i * (i % 7))
db.close()


def ces_transform(data):
    # cipher.encryptingstorage 1.1: encrypt() = '.e' + encryptBytes(
    # compress(data)), compress() = '.z' + zlib when shorter.
    if data and len(data) > 20 and data[:2] != b'.z':
        compressed = b'.z' + zlib.compress(data)
        if len(compressed) < len(data):
            data = compressed
    return b'.e' + facility.encrypt(kek, data)


src = ZODB.FileStorage.FileStorage(os.path.join(out, 'plain.fs'),
                                   read_only=True)
dst = ZODB.FileStorage.FileStorage(os.path.join(out, 'ces.fs'))
for txn in src.iterator():
    dst.tpc_begin(txn, txn.tid, txn.status)
    for r in txn:
        dst.restore(r.oid, r.tid, ces_transform(r.data), '', r.data_txn,
                    txn)
    dst.tpc_vote(txn)
    dst.tpc_finish(txn)
src.close()
dst.close()

with open(os.path.join(out, 'expected.json'), 'w') as f:
    json.dump({'secrets': expected}, f)
print('ok')
