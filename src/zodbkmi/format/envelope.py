"""The record envelope: AES-256-GCM ciphertext of one object state or record.

Layout, version 1 (all of it specified in ``docs/format.rst``)::

    offset  size  field
    0       3     magic   b".km"  (starts with the pickle STOP opcode)
    3       1     version 0x01
    4       1     suite   0x01 = AES-256-GCM, 96-bit random nonce, 128-bit tag
    5       1     context 0x00 = data, not bound
                          0x01 = storage record, bound to its 8 byte oid
    6       16    DEK id
    22      12    nonce
    34      n+16  AES-256-GCM(DEK, nonce, plaintext, aad) = ciphertext || tag

    aad = bytes 0..33 (the whole header) || oid (context 0x01 only)

Overhead: 50 bytes.  This module is pure: bytes in, bytes out.
"""
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.exceptions import UnsupportedFormatError

MAGIC = b'.km'
VERSION = 1
SUITE_AES256_GCM = 1
CONTEXT_DATA = 0
CONTEXT_RECORD = 1
DEK_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 3 + DEK_ID_SIZE + NONCE_SIZE    # 34
OVERHEAD = HEADER_SIZE + TAG_SIZE                          # 50
OID_SIZE = 8
# The part of a header before the nonce: it names the format, the context
# and the DEK.  Callers may use it as a dictionary key (Sealer.prefix).
KEYED_PREFIX_SIZE = HEADER_SIZE - NONCE_SIZE               # 22

_PREFIX = MAGIC + bytes([VERSION, SUITE_AES256_GCM])
_PREFIX_SIZE = len(_PREFIX)
_CONTEXTS = (CONTEXT_DATA, CONTEXT_RECORD)
_HEAD6 = {c: _PREFIX + bytes([c]) for c in _CONTEXTS}
_CONTEXT_NAMES = {CONTEXT_DATA: 'data', CONTEXT_RECORD: 'storage record'}


class _NoncePool:
    """Random 96-bit nonces from the OS, fetched 1024 at a time.

    One ``os.urandom`` call costs about as much as the AES-GCM call itself
    on a small record, so nonces are drawn in batches: a batch is split
    into nonces and handed out through one list iterator, ``it``.  Taking a
    nonce is ``next(it)``, which is atomic, so every nonce of a batch is
    handed out at most once, whatever the threads do; a new batch replaces
    the iterator as a whole (two threads that both find it exhausted each
    start their own batch, and the one replaced is dropped, never reused).
    A child process forgets the parent's batch at fork, so parent and child
    never share a nonce.
    """

    BATCH = 1024

    def __init__(self):
        self.it = iter(())
        if hasattr(os, 'register_at_fork'):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self):
        self.it = iter(())

    def refill(self):
        """Start a new batch; return its first nonce."""
        buf = os.urandom(NONCE_SIZE * self.BATCH)
        it = iter([buf[i:i + NONCE_SIZE]
                   for i in range(0, len(buf), NONCE_SIZE)])
        first = next(it)
        self.it = it
        return first

    def __call__(self):
        return next(self.it, None) or self.refill()


new_nonce = _NoncePool()


def is_envelope(data):
    """Tell whether ``data`` starts with the envelope magic (any version)."""
    return data[:len(MAGIC)] == MAGIC


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

    Checks, in this order: the magic, the version, the suite, the context
    (it must be ``context``: a data envelope is never accepted as a record,
    nor the reverse) and the length.  Nothing is decrypted.
    """
    if data[:6] == _HEAD6.get(context) and len(data) >= OVERHEAD:
        return data[6:22] if type(data) is bytes else bytes(data[6:22])
    return _diagnose(data, context)


def _diagnose(data, context):
    if context not in _CONTEXTS:
        raise ValueError('unknown envelope context %r' % (context,))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError('ciphertext must be bytes, not %s'
                        % type(data).__name__)
    if data[:_PREFIX_SIZE] != _PREFIX:
        if data[:len(MAGIC)] != MAGIC:
            if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
                raise TruncatedDataError(
                    'envelope truncated inside its magic (%d bytes)'
                    % len(data))
            raise UnsupportedFormatError('not a zodbkmi envelope (bad magic)')
        if len(data) <= len(MAGIC):
            raise TruncatedDataError('envelope truncated after its magic')
        if data[3] != VERSION:
            raise UnsupportedFormatError(
                'unsupported envelope version %d (this zodbkmi reads '
                'version %d)' % (data[3], VERSION))
        if len(data) <= 4:
            raise TruncatedDataError('envelope truncated after its version')
        raise UnsupportedFormatError(
            'unsupported envelope cipher suite %d' % data[4])
    if len(data) <= 5:
        raise TruncatedDataError('envelope truncated inside its header')
    if data[5] != context:
        if data[5] not in _CONTEXTS:
            raise UnsupportedFormatError(
                'unknown envelope context %d' % data[5])
        raise UnsupportedFormatError(
            'envelope is a %s envelope where a %s envelope is required'
            % (_CONTEXT_NAMES[data[5]], _CONTEXT_NAMES[context]))
    raise TruncatedDataError(
        'envelope truncated: %d bytes, at least %d required'
        % (len(data), OVERHEAD))


class Sealer:
    """Seals and opens envelopes under one DEK.

    Holds the AES-GCM context and the precomputed header prefix, so that a
    seal costs one random nonce, one AEAD call and one concatenation.  The
    DEK bytes are not kept as an attribute and never shown.
    """

    __slots__ = ('dek_id', '_aead', '_heads', '_head0')

    def __init__(self, dek_id, dek):
        if not isinstance(dek_id, bytes) or len(dek_id) != DEK_ID_SIZE:
            raise ValueError('a DEK id has %d bytes' % DEK_ID_SIZE)
        if not isinstance(dek, bytes) or len(dek) != 32:
            raise InvalidKeyError('a data encrypting key has 32 bytes')
        self.dek_id = dek_id
        self._aead = AESGCM(dek)
        self._heads = tuple(_PREFIX + bytes([c]) + dek_id for c in _CONTEXTS)
        self._head0 = self._heads[CONTEXT_DATA]

    def __repr__(self):
        return '<Sealer for DEK %s>' % self.dek_id.hex()

    def seal(self, plaintext, context=CONTEXT_DATA, oid=None, _nonce=None):
        """Return the envelope of ``plaintext``.

        ``_nonce`` is a private seam for the fixed test vectors; never pass
        it in real code.
        """
        if context == CONTEXT_RECORD:
            return self.seal_record(plaintext, oid, _nonce)
        _check_oid(context, oid)    # an unknown context, an oid: ValueError
        return self.seal_data(plaintext, _nonce)

    def seal_data(self, plaintext, _nonce=None):
        """:meth:`seal` for the data context (the hot path of object
        states)."""
        nonce = _nonce or next(new_nonce.it, None) or new_nonce.refill()
        header = self._head0 + nonce
        return header + self._aead.encrypt(nonce, plaintext, header)

    def seal_record(self, plaintext, oid, _nonce=None):
        """:meth:`seal` for a storage record of ``oid`` (8 bytes)."""
        if type(oid) is not bytes or len(oid) != OID_SIZE:
            _check_oid(CONTEXT_RECORD, oid)
        nonce = _nonce or next(new_nonce.it, None) or new_nonce.refill()
        header = self._heads[CONTEXT_RECORD] + nonce
        return header + self._aead.encrypt(nonce, plaintext, header + oid)

    def prefix(self, context=CONTEXT_DATA):
        """The first ``KEYED_PREFIX_SIZE`` bytes of every envelope this
        sealer makes in ``context``."""
        return self._heads[context]

    def open_data(self, data):
        """:meth:`open` for the data context (the hot path of object
        states)."""
        try:
            return self._aead.decrypt(data[KEYED_PREFIX_SIZE:HEADER_SIZE],
                                      data[HEADER_SIZE:], data[:HEADER_SIZE])
        except InvalidTag:
            raise AuthenticationError(
                'ciphertext under DEK %s did not authenticate (altered or '
                'wrong key)' % self.dek_id.hex()) from None

    def open(self, data, context=CONTEXT_DATA, oid=None):
        """Return the plaintext of ``data``, sealed under this DEK.

        The caller validated the header with :func:`read_dek_id`.
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
            return self._aead.decrypt(data[KEYED_PREFIX_SIZE:HEADER_SIZE],
                                      data[HEADER_SIZE:],
                                      data[:HEADER_SIZE] + oid)
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

