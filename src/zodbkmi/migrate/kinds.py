"""Modes, record kinds, limits and the error of migrations."""
from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.migrate.legacy import CES_PREFIX

ENCRYPT = 'encrypt'
REKEY = 'rekey'
DECRYPT = 'decrypt'
SCAN = 'scan'
MODES = (ENCRYPT, REKEY, DECRYPT, SCAN)

#: Record kinds found by classification.
PLAINTEXT = 'plaintext'
ENCRYPTED = 'encrypted'
LEGACY = 'legacy'
INVALID = 'invalid'

#: Records of cipher.encryptingstorage start with this prefix.
LEGACY_PREFIX = CES_PREFIX

ALGORITHMS = ('aes256-gcm',)
DEFAULT_CHUNK_SIZE = 1000
MAX_RETRIES = 10
#: At most this many failed oids are kept in a report (the count is exact).
MAX_FAILED_LISTED = 100
#: A report's summary names at most this many oids per reason of failure.
MAX_OIDS_PER_REASON = 3

BACKUP_WARNING = """\
WARNING: make sure a backup of this database exists before you go on.
FileStorage appends: the old (plaintext or old-key) revisions of every
record stay in the file until it is packed (use --pack, or pack later), and
packing leaves them in the '.old' file next to it. Destroy that file, and
every copy or backup made before the migration, once you have checked the
result (e.g. shred -u Data.fs.old)."""


class MigrationError(ZodbKmiError):
    """A migration cannot start or could not finish (bad keys, refused
    environment, records that failed to authenticate)."""
