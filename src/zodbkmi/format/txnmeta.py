"""Transaction metadata, version 1: the plaintext of a metadata envelope.

The storage wrapper seals the metadata of each transaction (user,
description and ZODB's encoded extension) into one record envelope of the
transaction metadata context (``envelope.CONTEXT_METADATA``), stored as
the only item of the transaction's extension under :data:`EXTENSION_KEY`.
The plaintext of that envelope is this encoding (specified in
``docs/format.rst``, "Transaction metadata, version 1")::

    {"description":"<base64>","extension":"<base64>",
     "user":"<base64>","version":1}                   (on one line)

JSON (RFC 8259) in UTF-8, written with the keys sorted and no
whitespace; each value but ``version`` is the standard ``base64`` (with
padding) of the bytes of that field: ``extension`` holds ZODB's own
encoding of the extension (a pickle) as the storage would have stored it,
never unpickled here.  Reading parses JSON only.

This module is pure: bytes in, bytes out.
"""
import base64
import binascii
import json

from zodbkmi.exceptions import UnsupportedFormatError

#: The version of the encoding written (and the only one read).
VERSION = 1
#: The name of the metadata envelope in the stored extension.
EXTENSION_KEY = 'zodbkmi-metadata'
#: The name of the short message listings show for metadata that does not
#: open (the key id, never key material).
ERROR_KEY = 'zodbkmi-metadata-error'
_FIELDS = ('description', 'extension', 'user')
_KEYS = frozenset(_FIELDS + ('version',))


def encode(user, description, extension):
    """The encoded metadata of one transaction: ``user``, ``description``
    and ``extension`` (ZODB's encoded extension, ``extension_bytes``) are
    bytes."""
    values = {'user': user, 'description': description,
              'extension': extension}
    doc = {'version': VERSION}
    for name in _FIELDS:
        value = values[name]
        if not isinstance(value, bytes):
            raise TypeError('transaction metadata %s must be bytes, not %s'
                            % (name, type(value).__name__))
        doc[name] = base64.b64encode(value).decode('ascii')
    return json.dumps(doc, sort_keys=True, separators=(',', ':')).encode(
        'ascii')


def decode(data):
    """``(user, description, extension)`` (bytes) of the encoded metadata
    ``data``; raises :class:`~zodbkmi.exceptions.UnsupportedFormatError`
    for anything :func:`encode` does not write (checked in this order:
    JSON object, version, keys, values)."""
    try:
        doc = json.loads(bytes(data).decode('utf-8'))
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise UnsupportedFormatError(
            'transaction metadata is not a JSON object')
    version = doc.get('version')
    if type(version) is not int or version != VERSION:
        raise UnsupportedFormatError(
            'unsupported transaction metadata version %r (this zodbkmi '
            'reads version %d)' % (version, VERSION))
    if set(doc) != _KEYS:
        raise UnsupportedFormatError(
            'transaction metadata has the keys %s, not %s'
            % (', '.join(sorted(doc)), ', '.join(sorted(_KEYS))))
    fields = []
    for name in ('user', 'description', 'extension'):
        value = doc[name]
        try:
            if not isinstance(value, str):
                raise TypeError
            fields.append(base64.b64decode(value.encode('ascii'),
                                           validate=True))
        except (TypeError, ValueError, UnicodeError, binascii.Error):
            raise UnsupportedFormatError(
                'transaction metadata %s is not base64' % name) from None
    return tuple(fields)
