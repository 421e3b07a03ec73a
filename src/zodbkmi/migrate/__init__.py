"""Migrations of whole databases: encrypt, rekey, decrypt, scan, rotate-kek.

One engine, two record transformers, each concern a module:

- :mod:`~zodbkmi.migrate.engine`: :class:`Migration` walks the current
  record of every object in oid order, in chunks, one transaction per
  chunk that needs work; a process killed at any moment loses at most the
  chunk it was writing, and running again is resuming.
- :mod:`~zodbkmi.migrate.interfaces`: what the engine expects of a
  transformer (:class:`~zodbkmi.migrate.interfaces.ITransformer`) and of
  a progress observer.
- :mod:`~zodbkmi.migrate.records`: :class:`RecordTransformer` (storage
  level, the records an ``EncryptingStorage`` writes): works on the raw
  records of the storage under the wrapper and writes them back with the
  serial it read, so a concurrent write by the application makes the
  chunk conflict; the chunk is then read again and retried.
- :mod:`~zodbkmi.migrate.objects`: :class:`ObjectTransformer` (object
  level, the states of ``EncryptedPersistent`` objects, written through
  ZODB).
- :mod:`~zodbkmi.migrate.scan`: the records of a storage in oid order;
  :mod:`~zodbkmi.migrate.fsinternals`: the private parts of FileStorage it
  reads, named once.
- :mod:`~zodbkmi.migrate.keys`: :class:`MigrationKeys`, an encryption
  service (usually a :class:`zodbkmi.facility.KeyManagementFacility`), the
  KEK that encrypts (``new``) and the KEKs that may decrypt (``old``);
  :func:`keys_from_environ` builds them from ``OLD_ENCRYPTION_KEY`` /
  ``NEW_ENCRYPTION_KEY`` / ``ENCRYPTION_ALGORITHM``.
- :mod:`~zodbkmi.migrate.report`: what a migration found and did.
- :mod:`~zodbkmi.migrate.legacy`: readers of keas.kmi and
  cipher.encryptingstorage, to import their databases.
- :mod:`~zodbkmi.migrate.kinds`: modes, record kinds and
  :class:`MigrationError`.

The names below are the public API; import them from here.
"""
from zodbkmi.migrate.engine import Migration
from zodbkmi.migrate.engine import pack
from zodbkmi.migrate.keys import ENV_RULES
from zodbkmi.migrate.keys import MigrationKeys
from zodbkmi.migrate.keys import keys_from_environ
from zodbkmi.migrate.keys import rotate_kek
from zodbkmi.migrate.kinds import ALGORITHMS
from zodbkmi.migrate.kinds import BACKUP_WARNING
from zodbkmi.migrate.kinds import DECRYPT
from zodbkmi.migrate.kinds import DEFAULT_CHUNK_SIZE
from zodbkmi.migrate.kinds import ENCRYPT
from zodbkmi.migrate.kinds import ENCRYPTED
from zodbkmi.migrate.kinds import INVALID
from zodbkmi.migrate.kinds import LEGACY
from zodbkmi.migrate.kinds import LEGACY_PREFIX
from zodbkmi.migrate.kinds import MAX_FAILED_LISTED
from zodbkmi.migrate.kinds import MAX_RETRIES
from zodbkmi.migrate.kinds import MODES
from zodbkmi.migrate.kinds import MigrationError
from zodbkmi.migrate.kinds import PLAINTEXT
from zodbkmi.migrate.kinds import REKEY
from zodbkmi.migrate.kinds import SCAN
from zodbkmi.migrate.objects import ObjectTransformer
from zodbkmi.migrate.objects import PersistentStateCodec
from zodbkmi.migrate.objects import peek_state
from zodbkmi.migrate.records import RecordTransformer
from zodbkmi.migrate.records import storage_migration
from zodbkmi.migrate.records import unwrap
from zodbkmi.migrate.report import Report
from zodbkmi.migrate.scan import iter_records

__all__ = (
    'ALGORITHMS', 'BACKUP_WARNING', 'DECRYPT', 'DEFAULT_CHUNK_SIZE',
    'ENCRYPT', 'ENCRYPTED', 'ENV_RULES', 'INVALID', 'LEGACY',
    'LEGACY_PREFIX', 'MAX_FAILED_LISTED', 'MAX_RETRIES', 'MODES',
    'Migration', 'MigrationError', 'MigrationKeys', 'ObjectTransformer',
    'PLAINTEXT', 'PersistentStateCodec', 'REKEY', 'RecordTransformer',
    'Report', 'SCAN', 'iter_records', 'keys_from_environ', 'pack',
    'peek_state', 'rotate_kek', 'storage_migration', 'unwrap',
)
