"""The key store: wrapped data keys in a directory, one file per key.

The local store of wrapped DEKs was called the "vault" until 2026-12;
the name now belongs to HashiCorp Vault/OpenBao alone
(:mod:`zodbkmi.sources.vault`).  ``zodbkmi.vault`` keeps the old
names (``DirectoryVault``, ``VaultEntry``) as deprecated aliases.  The
stored names do not change: an entry still says ``"format":
"zodbkmi-vault-entry"`` and the test vectors are still
``vault-entry*.json``, because formats are frozen.

Each entry is a small JSON document ``<dek id>.dek`` (specified in
``docs/format.rst``)::

    {"format": "zodbkmi-vault-entry", "version": 1,
     "dek_id": "<32 hex>", "kek_id": "<KEK id>", "state": "active",
     "created": <ns since the epoch>, "wrapped": "<base64 wrapped DEK>"}

Files are written atomically (temporary file, fsync, rename, fsync of the
directory) with mode 0600 in a directory of mode 0700, so a crash leaves an
entry complete or absent, and several processes can share the directory.
A process killed before its rename leaves its temporary file
(``.tmp-*.part``): never taken for an entry, and removed by
:meth:`DirectoryKeyStore.sweep` when its key is destroyed or rewrapped.
The key store holds no unwrapped key.  What proves an entry genuine is its
wrapped DEK: a version 2 wrapped DEK can only be made with the KEK's
secret, and it authenticates the DEK id, the KEK id and the creation time.
The lifecycle state is not authenticated, so it only ever restricts: the
active DEK of a KEK is its newest version 2 entry, and none when that one
is retired (:meth:`DirectoryKeyStore.active_for`); retiring an older
entry, or marking one active, changes nothing.
"""
import base64
import binascii
import json
import os
import stat
import threading
import time

from zope.interface import implementer

from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import KeyStateError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.exceptions import UnknownKeyError
# the temporary files of write_atomic are never taken for entries
from zodbkmi.fileutil import TEMP_PREFIX
from zodbkmi.fileutil import TEMP_SUFFIX
from zodbkmi.fileutil import write_atomic
from zodbkmi.format import wrapped as wrappedmod
from zodbkmi.interfaces import IKeyStore
from zodbkmi.interfaces import IKeyStoreEntry
from zodbkmi.interfaces import IKeyStoreSweep

ACTIVE = 'active'
RETIRED = 'retired'
STATES = (ACTIVE, RETIRED)
SUFFIX = '.dek'
# Frozen: stored in every entry; the rename of the vault to "key store"
# (2026-12) did not change it, and no later one may.
ENTRY_FORMAT = 'zodbkmi-vault-entry'
# an entry has the version of its wrapped DEK: 1 (legacy, read only) or 2
ENTRY_VERSIONS = wrappedmod.VERSIONS
#: ``DirectoryKeyStore(create=ON_FIRST_KEY)``: a missing directory reads
#: as an empty key store and is made when the first key is written, so
#: opening a key store at a mistyped path creates nothing.
ON_FIRST_KEY = 'on-first-key'


def check_dek_id(dek_id):
    """Return ``dek_id`` if it is 32 lowercase hex digits, else raise
    :class:`~zodbkmi.exceptions.UnknownKeyError` (an id that cannot exist)."""
    if (not isinstance(dek_id, str) or len(dek_id) != 32
            or dek_id.strip('0123456789abcdef')):
        raise UnknownKeyError('invalid key id %r: 32 lowercase hex digits '
                              'expected' % (str(dek_id)[:40],), dek_id)
    return dek_id


@implementer(IKeyStoreEntry)
class KeyStoreEntry:
    """One wrapped DEK with its metadata; ``wrapped`` is the binary
    wrapped-DEK format, ``dek_id`` 32 hex digits.

    ``version`` is the version of the wrapped DEK; for version 2,
    ``created`` is the creation time its header authenticates (given or
    not, it must be that one)."""

    __slots__ = ('dek_id', 'kek_id', 'state', 'created', 'wrapped',
                 'version')

    def __init__(self, dek_id, kek_id, wrapped, state=ACTIVE, created=None):
        if state not in STATES:
            raise ValueError('unknown key state %r' % (state,))
        self.dek_id = dek_id
        self.kek_id = kek_id
        self.state = state
        self.wrapped = wrapped
        self.version = wrapped[3] if len(wrapped) > 3 else None
        if self.version == wrappedmod.VERSION_2:
            made = wrappedmod.parse(wrapped).created
            if created is not None and created != made:
                raise ValueError('created %r differs from the creation time '
                                 'of the wrapped DEK' % (created,))
            created = made
        self.created = time.time_ns() if created is None else created

    def __repr__(self):
        return '<KeyStoreEntry %s by KEK %s, %s>' % (
            self.dek_id, self.kek_id, self.state)

    def to_json(self):
        return json.dumps({
            'format': ENTRY_FORMAT, 'version': self.version,
            'dek_id': self.dek_id, 'kek_id': self.kek_id,
            'state': self.state, 'created': self.created,
            'wrapped': base64.b64encode(self.wrapped).decode('ascii'),
        }, sort_keys=True).encode('ascii')

    @classmethod
    def from_json(cls, data, name='entry'):
        try:
            doc = json.loads(data)
            if doc.get('format') != ENTRY_FORMAT:
                raise ValueError('not a key store entry')
            version = doc.get('version')
            if type(version) is not int or version not in ENTRY_VERSIONS:
                raise ValueError('unsupported version %r' % (version,))
            raw = base64.b64decode(doc['wrapped'], validate=True)
            parsed = wrappedmod.parse(raw)
            if parsed.version != version:
                raise ValueError('a version %d entry holds a version %d '
                                 'wrapped DEK' % (version, parsed.version))
            entry = cls(check_dek_id(doc['dek_id']), doc['kek_id'], raw,
                        doc['state'], int(doc['created']))
        except (ValueError, KeyError, TypeError, AttributeError,
                RecursionError, binascii.Error, UnknownKeyError,
                DecryptionError) as e:
            raise KeyStoreError('corrupt key store entry %s: %s'
                                % (name, str(e)[:100])) from None
        if parsed.dek_id.hex() != entry.dek_id or \
                parsed.kek_id != entry.kek_id:
            raise KeyStoreError('corrupt key store entry %s: ids do not match '
                                'its wrapped DEK' % name)
        return entry


def newest_entry(entries, kek_id):
    """The newest version 2 entry of ``kek_id`` among ``entries`` (by
    authenticated creation time, then id), or None."""
    best = None
    for entry in entries:
        if entry.kek_id == kek_id and entry.version == wrappedmod.VERSION_2:
            if best is None or (entry.created, entry.dek_id) > (
                    best.created, best.dek_id):
                best = entry
    return best


def next_created(entries, kek_id):
    """The creation time for a new DEK of ``kek_id``: now, or just after
    the newest entry of ``kek_id`` when a clock ahead of ours made it, so
    that the new DEK is the newest one whatever the clocks say."""
    newest = newest_entry(entries, kek_id)
    return created_after(None if newest is None else newest.created)


def created_after(newest):
    """Now in ns since the epoch, or ``newest + 1`` if that is later."""
    now = time.time_ns()
    return now if newest is None or newest < now else newest + 1


def stale_error(entry):
    """The error of a rotation to ``entry`` when the key store holds a
    newer (or as new) entry of its KEK: the active DEK of a KEK is always
    its newest one, so ``entry`` could never be used."""
    return KeyStateError(
        'KEK %s was rotated at the same moment by another request, or '
        'has a key newer than %s: it has another active key now (none of '
        'this request was stored)' % (entry.kek_id, entry.dek_id))


def active_entries(store=None, kek_id=None, *, vault=None):
    """Return every active entry of ``kek_id`` in the key store ``store``
    (an :class:`~zodbkmi.interfaces.IKeyStore`), oldest first.

    Normally at most one; more when a process was killed between adding
    a new key and retiring the previous one.  Key creation retires them
    all, so the next rotation heals such a key store.  ``vault`` is the
    old name of ``store`` (deprecated).
    """
    if vault is not None:
        if store is not None:
            raise TypeError('give store or vault (its old name), not both')
        store = vault
    if store is None or kek_id is None:
        raise TypeError('active_entries() needs store and kek_id')
    return sorted((e for e in store.entries()
                   if e.kek_id == kek_id and e.state == ACTIVE),
                  key=lambda e: (e.created, e.dek_id))


def check_key_directory(path):
    """Refuse the key directory ``path`` when group or others can write
    it (``mode & 0o022``: they could plant, swap or delete entries) or
    when it belongs to another user; raise
    :class:`~zodbkmi.exceptions.KeyStoreError` naming the path and the
    command that fixes it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyStoreError('cannot read key directory %s: %s'
                            % (path, e.strerror)) from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise KeyStoreError(
            'key directory %s is writable by group or others (mode %04o); '
            'run: chmod 700 %s' % (path, mode, path))
    if hasattr(os, 'geteuid') and st.st_uid != os.geteuid():
        raise KeyStoreError(
            'key directory %s belongs to user id %d, not to this user (%d); '
            'run: chown %d %s && chmod 700 %s'
            % (path, st.st_uid, os.geteuid(), os.geteuid(), path, path))


def _check_can_make(path):
    """Refuse at once a directory that could never be made: its nearest
    existing ancestor is not a directory."""
    parent = path
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise KeyStoreError('cannot create key directory %s: %s is not a '
                            'directory' % (path, parent))


@implementer(IKeyStore, IKeyStoreSweep)
class DirectoryKeyStore:
    """Wrapped DEKs in a directory, created with mode 0700.

    ``create`` says when a missing directory is made: ``True`` (the
    default) when the key store is opened, :data:`ON_FIRST_KEY` when the
    first key is written (until then the key store is empty, and opening it
    with a mistyped path leaves nothing behind: the default of
    :class:`~zodbkmi.facility.KeyManagementFacility`), ``False`` never
    (:class:`~zodbkmi.exceptions.KeyStoreError` at once).  An existing
    directory is refused (:class:`~zodbkmi.exceptions.KeyStoreError`) when
    group or others can write it or when
    another user owns it (see :func:`check_key_directory`).

    Thread-safe.  Entries are cached in memory after the first read; the
    directory listing is read again when its modification time changes, so
    processes that share the directory see each other's new keys.
    """

    def __init__(self, path, create=True):
        self.path = os.path.abspath(path)
        self._lock = threading.RLock()
        self._entries = {}
        self._inodes = {}
        self._mtime = None
        # whether the directory exists and was checked
        self._made = os.path.isdir(self.path)
        if not self._made:
            if not create:
                raise KeyStoreError('key directory %s does not exist'
                                    % self.path)
            if create != ON_FIRST_KEY:
                self._make()
            else:
                _check_can_make(self.path)
        if self._made:
            check_key_directory(self.path)

    def _make(self):
        """Make the directory (mode 0700) if it is missing."""
        if self._made:
            return
        with self._lock:
            if not os.path.isdir(self.path):
                try:
                    os.makedirs(self.path, mode=0o700, exist_ok=True)
                    os.chmod(self.path, 0o700)
                except OSError as e:
                    raise KeyStoreError('cannot create key directory %s: %s'
                                        % (self.path, e.strerror)) from None
            check_key_directory(self.path)
            self._made = True

    def __repr__(self):
        return '<DirectoryKeyStore %s>' % self.path

    def _file(self, dek_id):
        return os.path.join(self.path, check_dek_id(dek_id) + SUFFIX)

    def _refresh(self):
        if not self._made:
            if not os.path.isdir(self.path):
                return      # ON_FIRST_KEY: empty until the first key
            check_key_directory(self.path)   # made by another process
            self._made = True
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as e:
            raise KeyStoreError('cannot read key directory %s: %s'
                                % (self.path, e.strerror)) from None
        if mtime == self._mtime:
            return
        with self._lock:
            try:
                found = {e.name[:-len(SUFFIX)]: e.inode()
                         for e in os.scandir(self.path)
                         if e.name.endswith(SUFFIX)
                         and len(e.name) == 32 + len(SUFFIX)}
            except OSError as e:
                raise KeyStoreError('cannot read key directory %s: %s'
                                    % (self.path, e.strerror)) from None
            entries, inodes = {}, {}
            for dek_id, inode in found.items():
                entry = self._entries.get(dek_id)
                if entry is None or self._inodes.get(dek_id) != inode:
                    entry = self._read(dek_id)
                if entry is not None:
                    entries[dek_id] = entry
                    inodes[dek_id] = inode
            self._entries, self._inodes = entries, inodes
            self._mtime = mtime

    def _read(self, dek_id):
        if not self._made:
            return None
        try:
            with open(self._file(dek_id), 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KeyStoreError('cannot read key %s: %s'
                                % (dek_id, e.strerror)) from None
        except UnknownKeyError:
            return None
        entry = KeyStoreEntry.from_json(data, dek_id)
        if entry.dek_id != dek_id:
            raise KeyStoreError('corrupt key store entry %s: it holds DEK %s'
                                % (dek_id, entry.dek_id))
        return entry

    def _write(self, entry):
        self._make()
        try:
            write_atomic(self._file(entry.dek_id), entry.to_json())
        except OSError as e:
            error = KeyStoreError('cannot write key %s to %s: %s'
                                  % (entry.dek_id, self.path,
                                     e.strerror or e))
            error.errno = e.errno   # ENOSPC, EDQUOT, EACCES, ...
            raise error from None

    def add(self, entry):
        with self._lock:
            if self.get(entry.dek_id) is not None:
                raise ValueError('key %s exists already' % entry.dek_id)
            self._write(entry)
            self._entries[entry.dek_id] = entry

    def update(self, entry):
        with self._lock:
            if self.get(entry.dek_id) is None:
                raise UnknownKeyError('no key %s' % entry.dek_id,
                                      entry.dek_id)
            self._write(entry)
            self._entries[entry.dek_id] = entry
            self._mtime = None

    def rotate(self, entry):
        """Add the active ``entry`` and retire the other active entries of
        its KEK, under the lock of this key store; return the retired
        entries.  Refused (:class:`~zodbkmi.exceptions.KeyStateError`)
        when an entry of the KEK is as new as ``entry``.  Processes
        sharing the directory are not serialized: two of them rotating at
        once may leave two active entries, of which :meth:`active_for`
        takes the newest (and the next rotation retires both)."""
        with self._lock:
            newest = newest_entry(self.entries(), entry.kek_id)
            if newest is not None and newest.created >= entry.created:
                raise stale_error(entry)
            # all of them: a process killed between add and retire may
            # have left two active keys of one KEK
            previous = active_entries(self, entry.kek_id)
            self.add(entry)
            retired = []
            for old in previous:
                old = KeyStoreEntry(old.dek_id, old.kek_id, old.wrapped,
                                    RETIRED, old.created)
                self.update(old)
                retired.append(old)
            return retired

    def get(self, dek_id):
        try:
            check_dek_id(dek_id)
        except UnknownKeyError:
            return None
        self._refresh()
        entry = self._entries.get(dek_id)
        if entry is None:
            # another process may have written it within the same mtime tick
            entry = self._read(dek_id)
            if entry is not None:
                with self._lock:
                    self._entries[dek_id] = entry
        return entry

    def remove(self, dek_id):
        """Delete the entry of ``dek_id`` and sweep its temporary files."""
        with self._lock:
            try:
                os.unlink(self._file(dek_id))
            except FileNotFoundError:
                raise UnknownKeyError('no key %s' % dek_id, dek_id) from None
            except OSError as e:
                raise KeyStoreError('cannot delete key %s: %s'
                                    % (dek_id, e.strerror)) from None
            self._entries.pop(dek_id, None)
            self._mtime = None
            self.sweep([dek_id])

    def sweep(self, dek_ids):
        """Remove the temporary files of writers killed before their
        rename that hold an entry of one of ``dek_ids``; return how many.

        Such a file is ignored by the key store, but it keeps a wrapped copy of
        the DEK: it must not outlive the destruction of the key
        (:meth:`remove` sweeps) nor a KEK rotation (``rewrap`` sweeps).
        """
        wanted = [b'"dek_id": "%s"' % check_dek_id(i).encode('ascii')
                  for i in dek_ids]
        if not wanted or not os.path.isdir(self.path):
            return 0
        try:
            names = [e.name for e in os.scandir(self.path)
                     if e.name.startswith(TEMP_PREFIX)
                     and e.name.endswith(TEMP_SUFFIX)]
        except OSError as e:
            raise KeyStoreError('cannot read key directory %s: %s'
                                % (self.path, e.strerror)) from None
        removed = 0
        for name in names:
            path = os.path.join(self.path, name)
            try:
                with open(path, 'rb') as f:
                    data = f.read(1 << 16)
                if any(w in data for w in wanted):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:   # renamed by a live writer
                continue
            except OSError as e:
                raise KeyStoreError('cannot remove %s: %s'
                                    % (path, e.strerror)) from None
        return removed

    def ids(self):
        self._refresh()
        return sorted(self._entries)

    def entries(self):
        self._refresh()
        return [self._entries[i] for i in sorted(self._entries)]

    def active_for(self, kek_id):
        """The active entry of ``kek_id``: its newest version 2 entry, or
        None when there is none or that one is retired.

        The state is not authenticated, so it can only take the active
        role away: an entry marked active that is not the newest one of
        its KEK is never chosen, and version 1 entries (whose creation time
        is not authenticated) never are."""
        self._refresh()
        best = newest_entry(self._entries.values(), kek_id)
        return best if best is not None and best.state == ACTIVE else None
