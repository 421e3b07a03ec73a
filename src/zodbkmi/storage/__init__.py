"""Encrypting storages: every record and blob of a ZODB storage encrypted.

:class:`EncryptingStorage` wraps any ZODB storage (see
``zodbkmi.storage.wrapper``); :class:`ServerEncryptingStorage` is the
server side of a ZEO deployment whose clients encrypt.  The modules:

``wrapper``
    the wrapper and its record methods;
``oids``
    the oid of a record handed over without one (conflict resolution,
    undo, pack);
``checks``
    the downgrade checks of migrate mode;
``metadata``
    the transaction metadata (user, description, extension), sealed and
    opened;
``blobs``
    blob files and their plaintext copies;
``connections``
    the storages of connections;
``server``
    the storage of a ZEO server.
"""
from zodbkmi.storage import connections
from zodbkmi.storage.blobs import PRIVATE_PREFIX
from zodbkmi.storage.blobs import sweep_plaintext_dirs
from zodbkmi.storage.checks import MAX_CHECKED
from zodbkmi.storage.checks import MAX_SEARCHED_REVISIONS
from zodbkmi.storage.checks import UNCHECKED
from zodbkmi.storage.checks import parse_migrate_since
from zodbkmi.storage.common import DECRYPT_ONLY
from zodbkmi.storage.common import MIGRATE
from zodbkmi.storage.common import MODES
from zodbkmi.storage.common import STRICT
from zodbkmi.storage.wrapper import CONDITIONAL_INTERFACES
from zodbkmi.storage.wrapper import PASS_THROUGH
from zodbkmi.storage.wrapper import EncryptingStorage
from zodbkmi.storage.server import ServerEncryptingStorage

__all__ = (
    'connections',
    'CONDITIONAL_INTERFACES', 'DECRYPT_ONLY', 'EncryptingStorage',
    'MAX_CHECKED', 'MAX_SEARCHED_REVISIONS', 'MIGRATE', 'MODES',
    'PASS_THROUGH', 'PRIVATE_PREFIX', 'STRICT', 'ServerEncryptingStorage',
    'UNCHECKED', 'parse_migrate_since', 'sweep_plaintext_dirs',
)
