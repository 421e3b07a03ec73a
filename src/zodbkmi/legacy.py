"""The old name of :mod:`zodbkmi.migrate.legacy` (kept for imports)."""
from zodbkmi.migrate.legacy import CES_PREFIX               # noqa: F401
from zodbkmi.migrate.legacy import CES_ZLIB_PREFIX          # noqa: F401
from zodbkmi.migrate.legacy import EncryptingStorageReader  # noqa: F401
from zodbkmi.migrate.legacy import KEAS_DEK_SIZE            # noqa: F401
from zodbkmi.migrate.legacy import KEAS_IV                  # noqa: F401
from zodbkmi.migrate.legacy import KEAS_PASSPHRASE          # noqa: F401
from zodbkmi.migrate.legacy import KEAS_SALT                # noqa: F401
from zodbkmi.migrate.legacy import KeasKMIKeys              # noqa: F401
from zodbkmi.migrate.legacy import decrypt_keas_state       # noqa: F401
from zodbkmi.migrate.legacy import is_keas_state            # noqa: F401
from zodbkmi.migrate.legacy import keas_key_id              # noqa: F401
