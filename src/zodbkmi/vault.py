"""Deprecated: the old name of :mod:`zodbkmi.keystore`.

The local store of wrapped data keys was called the "vault"; it is the
*key store* now, so that "Vault" names HashiCorp Vault/OpenBao only
(:mod:`zodbkmi.sources.vault`).  This module keeps every old name
importable: ``DirectoryVault`` is :class:`~zodbkmi.keystore.DirectoryKeyStore`,
``VaultEntry`` is :class:`~zodbkmi.keystore.KeyStoreEntry`, the rest is
re-exported unchanged.  Importing it warns (``DeprecationWarning``); it
will be removed in a later release.
"""
import warnings

from zodbkmi.keystore import ACTIVE  # noqa: F401
from zodbkmi.keystore import ENTRY_FORMAT  # noqa: F401
from zodbkmi.keystore import ENTRY_VERSIONS  # noqa: F401
from zodbkmi.keystore import ON_FIRST_KEY  # noqa: F401
from zodbkmi.keystore import RETIRED  # noqa: F401
from zodbkmi.keystore import STATES  # noqa: F401
from zodbkmi.keystore import SUFFIX  # noqa: F401
from zodbkmi.keystore import TEMP_PREFIX  # noqa: F401
from zodbkmi.keystore import TEMP_SUFFIX  # noqa: F401
from zodbkmi.keystore import DirectoryKeyStore
from zodbkmi.keystore import KeyStoreEntry
from zodbkmi.keystore import active_entries  # noqa: F401
from zodbkmi.keystore import check_dek_id  # noqa: F401
from zodbkmi.keystore import check_key_directory  # noqa: F401
from zodbkmi.keystore import created_after  # noqa: F401
from zodbkmi.keystore import newest_entry  # noqa: F401
from zodbkmi.keystore import next_created  # noqa: F401
from zodbkmi.keystore import write_atomic  # noqa: F401

DirectoryVault = DirectoryKeyStore
VaultEntry = KeyStoreEntry

warnings.warn('zodbkmi.vault is deprecated: use zodbkmi.keystore '
              '(DirectoryVault is DirectoryKeyStore, VaultEntry is '
              'KeyStoreEntry)', DeprecationWarning, stacklevel=2)
