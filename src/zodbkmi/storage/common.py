"""Names shared by the modules of :mod:`zodbkmi.storage`."""
import os

from ZODB.utils import oid_repr

from zodbkmi.exceptions import NotEncryptedError
from zodbkmi.format import envelope

STRICT = 'strict'
MIGRATE = 'migrate'
DECRYPT_ONLY = 'decrypt-only'
MODES = (STRICT, MIGRATE, DECRYPT_ONLY)

MAGIC = envelope.MAGIC
MAGIC_SIZE = len(MAGIC)
# the part of a record envelope unique per sealed record (salt and nonce,
# or the nonce of version 1): the key of the oid hints
unique_part = envelope.unique_part


def is_sealed(data):
    """Whether the stored record ``data`` is a record envelope."""
    return bool(data) and data[:MAGIC_SIZE] == MAGIC


def oid_text(oid):
    return oid_repr(oid) if isinstance(oid, bytes) else repr(oid)


def tid_text(tid):
    return tid.hex() if isinstance(tid, bytes) else repr(tid)


def remove(name):
    try:
        os.remove(name)
    except OSError:
        pass


def annotate(error, oid):
    """Name ``oid`` in ``error`` (a zodbkmi error) and keep its type."""
    error.oid = oid
    if error.args:
        error.args = ('oid %s: %s' % (oid_text(oid), error.args[0]),
                      ) + error.args[1:]
    return error


def refused(oid, message):
    """The NotEncryptedError of a plaintext record refused in migrate
    mode."""
    if oid is not None:
        message = 'oid %s: %s' % (oid_text(oid), message)
    error = NotEncryptedError(message)
    error.oid = oid
    return error
