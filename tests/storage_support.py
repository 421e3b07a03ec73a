"""Helpers shared by the storage tests: a facility and the wrapper."""
import os

from zodbkmi.storage import EncryptingStorage
from zodbkmi.testing import KeyEncryptingKey
from zodbkmi.testing import TestingKeyManagementFacility


def facility(directory=None):
    """A testing facility keeping its vault in ``directory`` (default: a
    ``keys`` directory in the current (test) directory)."""
    return TestingKeyManagementFacility(directory or os.path.abspath('keys'))


def wrap(base, **kw):
    """``base`` wrapped by an EncryptingStorage with the testing KEK."""
    kw.setdefault('key', KeyEncryptingKey)
    return EncryptingStorage(base, kw.pop('facility', None) or facility(),
                             **kw)


def read_blob(blob):
    """The data of ``blob``, read through a file that is closed."""
    with blob.open() as f:
        return f.read()
