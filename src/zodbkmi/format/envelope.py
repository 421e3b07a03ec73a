"""The record envelope: AES-256-GCM ciphertext of one object state or record.

Layout, version 2 (written; all of it specified in ``docs/format.rst``)::

    offset  size  field
    0       3     magic   b".km"  (starts with the pickle STOP opcode)
    3       1     version 0x02
    4       1     suite   0x01 = AES-256-GCM under an HKDF-SHA256 subkey,
                          96-bit nonce, 128-bit tag
    5       1     context 0x00 = data (facility.encrypt), not bound
                          0x01 = storage record, bound to its 8 byte oid
                          0x02 = object state (EncryptedPersistent)
                          0x03 = transaction metadata (EncryptingStorage),
                                 not bound
    6       16    DEK id
    22      4     salt    selects the subkey
    26      12    nonce   unique under the subkey: the writer's random
                          96-bit IV XOR its count of seals (as TLS 1.3)
    38      n+16  AES-256-GCM(subkey, nonce, plaintext, aad)

    aad    = bytes 0..37 (the whole header) || oid (context 0x01 only)
    subkey = HKDF-SHA256(IKM=DEK, salt=salt,
                         info=b"zodbkmi/envelope/v2/subkey", L=32)

Overhead: 54 bytes.  Version 1 (read forever, no longer written) has no
salt, seals under the DEK itself, knows contexts 0x00 and 0x01 only and has
a 34 byte header (50 bytes of overhead); a version 1 data envelope is
accepted where data or an object state is asked for.

A writer (:class:`Sealer`) keeps, per DEK and per thread, a *current
subkey*: a random salt, its AES-GCM context, a random 96-bit IV and a count
of seals; the nonce of a seal is the IV XOR the count.  It draws a new
subkey on first use, after :data:`SUBKEY_LIMIT` seals, and in a forked
child however the fork was made (a memory page the kernel zeroes in every
child, or the process id where that is not available); never at-fork
hooks.  Nothing is shared that two threads, two processes or a parent and
its child could hand out twice.

This module is pure: bytes in, bytes out.
"""
import itertools
import mmap
import os
import sys
import threading
import weakref

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.exceptions import UnsupportedFormatError

MAGIC = b'.km'
VERSION_1 = 1
VERSION_2 = 2
#: The version this zodbkmi writes.
VERSION = VERSION_2
#: The versions this zodbkmi reads.
VERSIONS = (VERSION_1, VERSION_2)
SUITE_AES256_GCM = 1            # version 1: AES-256-GCM under the DEK
SUITE_HKDF_AES256_GCM = 1       # version 2: under an HKDF-SHA256 subkey
CONTEXT_DATA = 0
CONTEXT_RECORD = 1
CONTEXT_STATE = 2
#: Transaction metadata sealed by the storage wrapper (version 2 only).
CONTEXT_METADATA = 3
DEK_ID_SIZE = 16
SALT_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
OID_SIZE = 8
_ID_END = 6 + DEK_ID_SIZE                                  # 22
#: Sizes of the version written (2).
HEADER_SIZE = _ID_END + SALT_SIZE + NONCE_SIZE             # 38
OVERHEAD = HEADER_SIZE + TAG_SIZE                          # 54
#: The part of a version 2 header before the nonce: format, context, DEK
#: id and salt; it selects the AES-GCM context that opens the envelope, so
#: callers may use it as a dictionary key (see :meth:`Sealer.opener`).
KEYED_PREFIX_SIZE = HEADER_SIZE - NONCE_SIZE               # 26
#: Sizes of version 1.
V1_HEADER_SIZE = _ID_END + NONCE_SIZE                      # 34
V1_OVERHEAD = V1_HEADER_SIZE + TAG_SIZE                    # 50
V1_KEYED_PREFIX_SIZE = _ID_END                             # 22
#: The size of the keyed prefix (see :meth:`Sealer.opener`) by version
#: byte, 0 for the versions this zodbkmi does not read: the key of an
#: envelope in a caller's table is ``data[:KEYED_PREFIX_SIZES[data[3]]]``
#: (the empty key, in no table, for those versions).
KEYED_PREFIX_SIZES = tuple(
    {1: V1_KEYED_PREFIX_SIZE, 2: KEYED_PREFIX_SIZE}.get(v, 0)
    for v in range(256))

#: Seals under one subkey before a writer draws a new one.  The bound of
#: ``docs/format.rst`` ("Record envelope, version 2") rests on it.  Tests
#: lower it (a documented private seam); nothing else may change it.
SUBKEY_LIMIT = 2 ** 20
SUBKEY_INFO = b'zodbkmi/envelope/v2/subkey'
#: Derived subkeys an opener keeps per DEK (the dict is emptied when full).
SUBKEY_CACHE_SIZE = 4096

_CONTEXT_NAMES = {CONTEXT_DATA: 'data', CONTEXT_RECORD: 'storage record',
                  CONTEXT_STATE: 'object state',
                  CONTEXT_METADATA: 'transaction metadata'}
_A_CONTEXT = {CONTEXT_DATA: 'a data', CONTEXT_RECORD: 'a storage record',
              CONTEXT_STATE: 'an object state',
              CONTEXT_METADATA: 'a transaction metadata'}
_CONTEXTS = tuple(_CONTEXT_NAMES)
_V1_CONTEXTS = (CONTEXT_DATA, CONTEXT_RECORD)
_V1_PREFIX = MAGIC + bytes([VERSION_1, SUITE_AES256_GCM])
_V2_PREFIX = MAGIC + bytes([VERSION_2, SUITE_HKDF_AES256_GCM])
_SUITES = {VERSION_1: SUITE_AES256_GCM, VERSION_2: SUITE_HKDF_AES256_GCM}
_MIN_SIZES = {VERSION_1: V1_OVERHEAD, VERSION_2: OVERHEAD}
_CONTEXTS_OF = {VERSION_1: _V1_CONTEXTS, VERSION_2: _CONTEXTS}
# The envelope kinds accepted where a context is asked for: the first 6
# bytes of their header -> their minimum size.  A version 1 data envelope
# is legacy data: accepted as data and as an object state (version 1 had
# no state context).
_ACCEPTED = {
    CONTEXT_DATA: {_V2_PREFIX + b'\x00': OVERHEAD,
                   _V1_PREFIX + b'\x00': V1_OVERHEAD},
    CONTEXT_RECORD: {_V2_PREFIX + b'\x01': OVERHEAD,
                     _V1_PREFIX + b'\x01': V1_OVERHEAD},
    CONTEXT_STATE: {_V2_PREFIX + b'\x02': OVERHEAD,
                    _V1_PREFIX + b'\x00': V1_OVERHEAD},
    # version 2 only: metadata was never sealed before
    CONTEXT_METADATA: {_V2_PREFIX + b'\x03': OVERHEAD},
}
_V2_BYTE = VERSION_2
# random(n): the operating system's generator.  On Linux os.getrandom is
# the system call os.urandom makes, without releasing the GIL around it
# (12 bytes never block once the generator is seeded): cheaper per seal.
_urandom = getattr(os, 'getrandom', os.urandom)


# -- fork detection ---------------------------------------------------------
#
# A child process must not go on sealing under its parent's subkey: it
# would share the parent's use count.  (Nonces are random for every seal,
# so even then no nonce would be handed out twice; the subkey keeps the
# per-subkey count of the bound honest.)  os.register_at_fork hooks do not
# run when a process is forked from C (uWSGI's pre-fork master, C
# extensions), so the marker is a private anonymous page advised with
# MADV_WIPEONFORK: the kernel hands every child, however forked, a zeroed
# copy of it.  Where that is not available, the process id is compared.

# MADV_WIPEONFORK of <asm-generic/mman-common.h> (Linux >= 4.14), for the
# Pythons whose mmap module was built without the constant; parisc, whose
# numbering differs, gets it from Python or not at all.
_LINUX_MADV_WIPEONFORK = 18


def _wipe_on_fork_page():
    """A one-page anonymous private mapping whose first byte is 1, advised
    MADV_WIPEONFORK, or None when the platform cannot do it."""
    advice = getattr(mmap, 'MADV_WIPEONFORK', None)
    if advice is None and sys.platform.startswith('linux') and not (
            os.uname().machine.startswith('parisc')):
        advice = _LINUX_MADV_WIPEONFORK
    if advice is None or not hasattr(mmap.mmap, 'madvise'):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        page.madvise(advice)     # EINVAL before Linux 4.14
    except (OSError, ValueError):
        page.close()
        return None
    page[0] = 1
    return page


class _PidMarker:
    """The marker where no wipe-on-fork page exists: its item 0 is true in
    the process that set it (process ids are compared)."""

    __slots__ = ('pid',)

    def __init__(self):
        self.pid = os.getpid()

    def __getitem__(self, index):
        return os.getpid() == self.pid

    def __setitem__(self, index, value):
        self.pid = os.getpid()


_page = _wipe_on_fork_page()
#: ``_marker[0]`` is true in the process that last set it (after import,
#: or after a fork was noticed) and false in any child forked since.
_marker = _page if _page is not None else _PidMarker()
#: How forks are detected: "wipe-on-fork page" or "process id".
FORK_DETECTION = 'wipe-on-fork page' if _page is not None else 'process id'
# every Sealer that has sealed: a child resets their current subkeys
_writers = weakref.WeakSet()


def _after_fork():
    """Called in a child by the first seal after a fork: every writer of
    the process forgets the subkeys, IVs and counts of all its threads
    (the child has one thread, the forking one), and draws new ones at its
    next seal."""
    for sealer in list(_writers):
        sealer._local = threading.local()
    _marker[0] = 1      # after the reset: a racing seal resets again


def new_nonce():
    """A fresh random 96-bit value from the operating system (``os.urandom``
    or the same ``getrandom`` call): the IV of a writer's subkey."""
    return _urandom(NONCE_SIZE)


# -- reading headers --------------------------------------------------------

def is_envelope(data):
    """Tell whether ``data`` starts with the envelope magic (any version)."""
    return data[:len(MAGIC)] == MAGIC


def version_of(data):
    """The version byte of the envelope ``data`` (validated or not), or
    None when ``data`` is too short to have one."""
    return data[3] if len(data) > 3 else None


def unique_part(data):
    """The bytes that make the envelope ``data`` unique among all sealed
    under its DEK: ``salt || nonce`` (16 bytes) in version 2, the nonce
    (12 bytes) in version 1.  Used as a hint (the storage's oid hints for
    conflict resolution and pack); the header is not validated here, the
    AEAD checks what matters."""
    if data[3:4] == b'\x02':
        part = data[_ID_END:HEADER_SIZE]
    else:
        part = data[_ID_END:V1_HEADER_SIZE]
    return part if type(part) is bytes else bytes(part)


def _check_oid(context, oid):
    if context == CONTEXT_RECORD:
        if not isinstance(oid, bytes) or len(oid) != OID_SIZE:
            raise ValueError('a storage record needs an 8 byte oid')
        return oid
    if context not in _CONTEXTS:
        raise ValueError('unknown envelope context %r' % (context,))
    if oid is not None:
        raise ValueError('only storage records are bound to an oid')
    return b''


def read_dek_id(data, context=CONTEXT_DATA):
    """Validate the header of ``data`` and return its DEK id (16 bytes).

    Checks, in this order: the magic, the version (1 or 2), the suite,
    the context (it must be ``context``: a data envelope is never accepted
    as a record nor as an object state, nor the reverse; a version 1 data
    envelope is accepted as data and as an object state) and the length.
    Nothing is decrypted.
    """
    try:
        if len(data) >= _ACCEPTED[context][data[:6]]:
            return data[6:22] if type(data) is bytes else bytes(data[6:22])
    except (KeyError, TypeError):
        pass
    return _diagnose(data, context)


def _diagnose(data, context):
    if context not in _CONTEXTS:
        raise ValueError('unknown envelope context %r' % (context,))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError('ciphertext must be bytes, not %s'
                        % type(data).__name__)
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise TruncatedDataError(
                'envelope truncated inside its magic (%d bytes)' % len(data))
        raise UnsupportedFormatError('not a zodbkmi envelope (bad magic)')
    if len(data) <= len(MAGIC):
        raise TruncatedDataError('envelope truncated after its magic')
    version = data[3]
    if version not in VERSIONS:
        raise UnsupportedFormatError(
            'unsupported envelope version %d (this zodbkmi reads versions '
            '%s)' % (version, ' and '.join(map(str, VERSIONS))))
    if len(data) <= 4:
        raise TruncatedDataError('envelope truncated after its version')
    if data[4] != _SUITES[version]:
        raise UnsupportedFormatError(
            'unsupported envelope cipher suite %d' % data[4])
    if len(data) <= 5:
        raise TruncatedDataError('envelope truncated inside its header')
    found = data[5]
    if found not in _CONTEXTS_OF[version]:
        raise UnsupportedFormatError('unknown envelope context %d' % found)
    if data[:6] not in _ACCEPTED[context]:
        raise UnsupportedFormatError(
            'envelope is %s envelope where %s envelope is required'
            % (_A_CONTEXT[found], _A_CONTEXT[context]))
    if len(data) < _MIN_SIZES[version]:
        raise TruncatedDataError(
            'envelope truncated: %d bytes, at least %d required'
            % (len(data), _MIN_SIZES[version]))
    return data[6:22]


# -- sealing and opening ------------------------------------------------------

def _deriver(dek):
    """The subkey derivation of one DEK, as a function of the salt (the
    DEK stays in the closure, not in an attribute)."""
    sha256 = hashes.SHA256()

    def derive(salt):
        return AESGCM(HKDF(sha256, 32, salt, SUBKEY_INFO).derive(dek))
    return derive


# The current subkey of a writer is one tuple, replaced as a whole (so a
# thread never pairs one subkey's context with another's header):
#   (use counter, IV, AESGCM, header prefix per context (0, 1, 2, 3), salt)


class Sealer:
    """Seals and opens envelopes under one DEK.

    Seals version 2: under the current subkey (see the module docstring),
    so that a seal costs one random nonce, one AEAD call and one
    concatenation.  Opens both versions; derived subkeys are kept by salt
    (:data:`SUBKEY_CACHE_SIZE` at most).  The DEK bytes are not kept as an
    attribute and never shown.
    """

    __slots__ = ('dek_id', '_aead', '_derive', '_local', '_subkeys',
                 '_v1_heads', '__weakref__')

    def __init__(self, dek_id, dek):
        if not isinstance(dek_id, bytes) or len(dek_id) != DEK_ID_SIZE:
            raise ValueError('a DEK id has %d bytes' % DEK_ID_SIZE)
        if not isinstance(dek, bytes) or len(dek) != 32:
            raise InvalidKeyError('a data encrypting key has 32 bytes')
        self.dek_id = dek_id
        self._aead = AESGCM(dek)        # version 1: the DEK itself
        self._derive = _deriver(dek)
        # this thread's current subkey: (count, IV, AES-GCM context, the
        # four header prefixes, salt)
        self._local = threading.local()
        self._subkeys = {}
        self._v1_heads = tuple(_V1_PREFIX + bytes([c]) + dek_id
                               for c in _V1_CONTEXTS)

    def __repr__(self):
        return '<Sealer for DEK %s>' % self.dek_id.hex()

    # -- subkeys ---------------------------------------------------------

    def _subkey(self, salt):
        """The AES-GCM context of the subkey of ``salt`` (4 bytes)."""
        if type(salt) is not bytes:
            salt = bytes(salt)
        subkeys = self._subkeys
        aead = subkeys.get(salt)
        if aead is None:
            aead = self._derive(salt)
            if len(subkeys) >= SUBKEY_CACHE_SIZE:
                subkeys.clear()
            subkeys[salt] = aead
        return aead

    def _renew(self, salt=None):
        """Draw a new current subkey for this thread (a salt, its subkey,
        an IV); return it, its count at 1."""
        salt = salt or _urandom(SALT_SIZE)
        aead = self._subkey(salt)
        heads = tuple(_V2_PREFIX + bytes([c]) + self.dek_id + salt
                      for c in _CONTEXTS)
        iv = int.from_bytes(new_nonce(), 'big')
        current = (itertools.count(1), iv, aead) + heads + (salt,)
        _writers.add(self)
        self._local.current = current
        return current

    @property
    def current_salt(self):
        """The salt of this thread's current subkey (None before its first
        seal)."""
        current = getattr(self._local, 'current', None)
        return None if current is None else current[-1]

    # -- sealing ---------------------------------------------------------

    def seal(self, plaintext, context=CONTEXT_DATA, oid=None, _nonce=None,
             _salt=None):
        """Return the envelope of ``plaintext`` (version 2).

        ``_nonce`` and ``_salt`` are private seams for the fixed test
        vectors; never pass them in real code.  ``_salt`` and ``_nonce``
        seal version 2 with that subkey and nonce; ``_nonce`` alone seals
        version 1 with that nonce (how the released vectors of
        ``tests/vectors/envelope.json`` are reproduced: nothing else
        writes version 1 any more).
        """
        # an unknown context, an oid outside records: ValueError
        aad = _check_oid(context, oid)
        if _salt is not None or _nonce is not None:
            return self._seal_fixed(plaintext, context, aad, _nonce, _salt)
        if context == CONTEXT_RECORD:
            return self.seal_record(plaintext, oid)
        if context == CONTEXT_STATE:
            return self.seal_state(plaintext)
        if context == CONTEXT_METADATA:
            return self.seal_metadata(plaintext)
        return self.seal_data(plaintext)

    def _seal_fixed(self, plaintext, context, aad, nonce, salt):
        if nonce is None or len(nonce) != NONCE_SIZE:
            raise ValueError('a nonce has %d bytes' % NONCE_SIZE)
        if salt is None:
            if context not in _V1_CONTEXTS:
                raise ValueError('version 1 has no %s context'
                                 % _CONTEXT_NAMES[context])
            header = self._v1_heads[context] + nonce
            return header + self._aead.encrypt(nonce, plaintext,
                                               header + aad)
        if len(salt) != SALT_SIZE:
            raise ValueError('a salt has %d bytes' % SALT_SIZE)
        header = (_V2_PREFIX + bytes([context]) + self.dek_id + salt
                  + nonce)
        return header + self._subkey(salt).encrypt(nonce, plaintext,
                                                   header + aad)

    # The seal_* methods repeat the same steps inline (the fork
    # marker, this thread's subkey, its count): they are the hot path of
    # every object state, record and facility.encrypt.

    def seal_data(self, plaintext):
        """:meth:`seal` for the data context (``facility.encrypt``)."""
        if not _marker[0]:
            _after_fork()
        try:
            current = self._local.current
        except AttributeError:
            current = self._renew()
        i = next(current[0])
        if i > SUBKEY_LIMIT:
            current = self._renew()
            i = next(current[0])
        nonce = (current[1] ^ i).to_bytes(12, 'big')
        header = current[3] + nonce
        return header + current[2].encrypt(nonce, plaintext, header)

    def seal_state(self, plaintext):
        """:meth:`seal` for the object state context (the hot path of
        ``EncryptedPersistent``)."""
        if not _marker[0]:
            _after_fork()
        try:
            current = self._local.current
        except AttributeError:
            current = self._renew()
        i = next(current[0])
        if i > SUBKEY_LIMIT:
            current = self._renew()
            i = next(current[0])
        nonce = (current[1] ^ i).to_bytes(12, 'big')
        header = current[5] + nonce
        return header + current[2].encrypt(nonce, plaintext, header)

    def seal_metadata(self, plaintext):
        """:meth:`seal` for the transaction metadata context (the storage
        wrapper's ``tpc_begin``: once per transaction, not a hot path)."""
        if not _marker[0]:
            _after_fork()
        try:
            current = self._local.current
        except AttributeError:
            current = self._renew()
        i = next(current[0])
        if i > SUBKEY_LIMIT:
            current = self._renew()
            i = next(current[0])
        nonce = (current[1] ^ i).to_bytes(12, 'big')
        header = current[6] + nonce
        return header + current[2].encrypt(nonce, plaintext, header)

    def seal_record(self, plaintext, oid):
        """:meth:`seal` for a storage record of ``oid`` (8 bytes)."""
        if type(oid) is not bytes or len(oid) != OID_SIZE:
            _check_oid(CONTEXT_RECORD, oid)
        if not _marker[0]:
            _after_fork()
        try:
            current = self._local.current
        except AttributeError:
            current = self._renew()
        i = next(current[0])
        if i > SUBKEY_LIMIT:
            current = self._renew()
            i = next(current[0])
        nonce = (current[1] ^ i).to_bytes(12, 'big')
        header = current[4] + nonce
        return header + current[2].encrypt(nonce, plaintext, header + oid)

    def prefix(self, context=CONTEXT_DATA):
        """The first :data:`KEYED_PREFIX_SIZE` bytes of the envelopes this
        sealer makes now in ``context`` (its current subkey; None before
        the first seal)."""
        if context not in _CONTEXTS:
            raise ValueError('unknown envelope context %r' % (context,))
        current = getattr(self._local, 'current', None)
        return None if current is None else current[3 + context]

    # -- opening ---------------------------------------------------------

    def opener(self, data):
        """For an envelope ``data`` under this DEK whose header
        :func:`read_dek_id` validated: ``(key, aead, nonce_start,
        header_size)``, where ``key`` is the part of the header that
        selects ``aead`` (format, context, DEK id and, in version 2, the
        salt: :data:`KEYED_PREFIX_SIZE` or ``V1_KEYED_PREFIX_SIZE``
        bytes).  The envelope opens as ``aead.decrypt(data[nonce_start:
        header_size], data[header_size:], data[:header_size] + oid)``
        (no oid outside storage records), and so does every envelope of
        the same ``key``: callers keep them in a table."""
        if data[3] == _V2_BYTE:
            key = bytes(data[:KEYED_PREFIX_SIZE])
            return (key, self._subkey(key[_ID_END:]), KEYED_PREFIX_SIZE,
                    HEADER_SIZE)
        return (bytes(data[:V1_KEYED_PREFIX_SIZE]), self._aead,
                V1_KEYED_PREFIX_SIZE, V1_HEADER_SIZE)

    def _open(self, data, tail):
        if data[3] == _V2_BYTE:
            return self._subkey(data[_ID_END:KEYED_PREFIX_SIZE]).decrypt(
                data[KEYED_PREFIX_SIZE:HEADER_SIZE], data[HEADER_SIZE:],
                data[:HEADER_SIZE] + tail)
        return self._aead.decrypt(data[V1_KEYED_PREFIX_SIZE:V1_HEADER_SIZE],
                                  data[V1_HEADER_SIZE:],
                                  data[:V1_HEADER_SIZE] + tail)

    def open_data(self, data):
        """:meth:`open` for the data, object state and transaction
        metadata contexts (either version; metadata: version 2 only)."""
        try:
            return self._open(data, b'')
        except InvalidTag:
            raise AuthenticationError(
                'ciphertext under DEK %s did not authenticate (altered or '
                'wrong key)' % self.dek_id.hex()) from None

    open_state = open_data
    open_metadata = open_data

    def open(self, data, context=CONTEXT_DATA, oid=None):
        """Return the plaintext of ``data``, sealed under this DEK.

        The caller validated the header with :func:`read_dek_id` (which
        checks the context: the AEAD authenticates the header the envelope
        carries, whatever context the caller asks for).
        """
        if context == CONTEXT_RECORD:
            return self.open_record(data, oid)
        _check_oid(context, oid)    # an unknown context, an oid: ValueError
        return self.open_data(data)

    def open_record(self, data, oid):
        """:meth:`open` for a storage record of ``oid`` (8 bytes)."""
        if type(oid) is not bytes or len(oid) != OID_SIZE:
            _check_oid(CONTEXT_RECORD, oid)
        try:
            return self._open(data, oid)
        except InvalidTag:
            raise AuthenticationError(
                'record of oid 0x%s under DEK %s did not authenticate '
                '(altered, moved from another oid, or wrong key)'
                % (oid.hex(), self.dek_id.hex())) from None


def seal(dek_id, dek, plaintext, context=CONTEXT_DATA, oid=None):
    """One-shot :meth:`Sealer.seal`."""
    return Sealer(dek_id, dek).seal(plaintext, context, oid)


def open_envelope(dek_id, dek, data, context=CONTEXT_DATA, oid=None):
    """One-shot open: validate the header, check the DEK id, decrypt."""
    found = read_dek_id(data, context)
    if found != dek_id:
        raise UnknownKeyError(
            'envelope is encrypted under DEK %s, not %s'
            % (found.hex(), dek_id.hex()), found.hex())
    return Sealer(dek_id, dek).open(data, context, oid)
