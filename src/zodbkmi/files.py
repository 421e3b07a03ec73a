"""Encrypting files and streams: recipients, safe output files, progress.

The stream format itself is :mod:`zodbkmi.format.stream`; facilities
encrypt streams under their DEKs with ``encrypt_file(key, fsrc, fdst)`` and
``decrypt_file(key, fsrc, fdst)``.  This module adds what needs no
facility:

- :func:`encrypt_to_recipient` / :func:`decrypt_with_private_key`: a
  digital envelope.  A fresh DEK per file, wrapped by the recipient's
  public key (hybrid ML-KEM-768 + X25519, or RSA) and embedded in the
  stream header, so that the machine that writes a backup never holds a
  key that could read it.
- :func:`~zodbkmi.fileutil.atomic_output` (from :mod:`zodbkmi.fileutil`):
  an output file that appears under its name only once it is complete (a
  temporary name, then a rename).
- :func:`transform`: runs one of those functions from a path or standard
  input to a path or standard output, with an optional progress display.
"""
import contextlib
import os
import stat
import sys
import time

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.fileutil import TEMP_SUFFIX
from zodbkmi.fileutil import atomic_output
from zodbkmi.format import stream
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IKeyEncryptingKey
from zodbkmi.kek import HYBRID_PUBLIC_LABEL
from zodbkmi.kek import HybridPublicKeyEncryptingKey
from zodbkmi.kek import RSAPublicKeyEncryptingKey
from zodbkmi.kek import as_kek

PART_SUFFIX = TEMP_SUFFIX


def recipient_kek(recipient):
    """Return the key encrypting key that wraps for ``recipient``.

    ``recipient`` is the PEM of a hybrid or RSA public key (what
    :func:`public_key_pem` gives), the PEM of a hybrid or RSA private key
    (its public half is used), 32 AES bytes or an IKeyEncryptingKey.
    """
    if IKeyEncryptingKey.providedBy(recipient):
        return recipient
    if isinstance(recipient, str):
        recipient = recipient.encode('ascii', 'replace')
    if isinstance(recipient, bytes) and b'PUBLIC KEY-----' in recipient[:80]:
        if HYBRID_PUBLIC_LABEL in recipient[:80]:
            return HybridPublicKeyEncryptingKey.from_pem(recipient)
        return RSAPublicKeyEncryptingKey.from_pem(recipient)
    kek = as_kek(recipient)
    return kek.public() if hasattr(kek, 'public') else kek


def public_key_pem(key):
    """Return the PEM of the public half of the hybrid or RSA KEK ``key``
    (PEM of a private or public key, or such an IKeyEncryptingKey)."""
    kek = recipient_kek(key)
    if not hasattr(kek, 'public_pem'):
        raise InvalidKeyError('KEK %s is not a hybrid or RSA key: it has '
                              'no public half' % kek.key_id)
    return kek.public_pem()


def encrypt_to_recipient(recipient, fsrc, fdst,
                         chunk_size=stream.DEFAULT_CHUNK_SIZE):
    """Encrypt ``fsrc`` into ``fdst`` for ``recipient`` (see
    :func:`recipient_kek`); return the number of plaintext bytes.

    A fresh random DEK is wrapped by the recipient's key (HPKE with
    ML-KEM-768 + X25519 for a hybrid key, RSA-OAEP-SHA256 for an RSA key,
    the wrapped-DEK header bound to it) and embedded in
    the stream header: the result is self-contained and opens with the
    recipient's private key only.  Nothing is stored anywhere.
    """
    kek = recipient_kek(recipient)
    dek, dek_id = os.urandom(stream.DEK_SIZE), os.urandom(stream.DEK_ID_SIZE)
    # version 1: the writer holds the public key only (a self-contained
    # stream proves who can read it, not who wrote it)
    header = stream.build_header(
        wrapped=wrapped.wrap(kek, dek_id, dek, version=wrapped.VERSION_1),
        chunk_size=chunk_size)
    return stream.encrypt(fsrc, fdst, dek, header)


def decrypt_with_private_key(key, fsrc, fdst):
    """Decrypt the self-contained stream ``fsrc`` into ``fdst`` with the
    KEK ``key`` (PEM of the hybrid or RSA private key, 32 AES bytes, an
    IKeyEncryptingKey, or a list of them); return the number of plaintext
    bytes.

    Raises :class:`~zodbkmi.exceptions.UnknownKeyError` for a stream that
    names its DEK by id (open those with a facility),
    :class:`~zodbkmi.exceptions.WrongKeyError` when the embedded DEK is
    wrapped by another KEK, and the errors of
    :func:`zodbkmi.format.stream.decrypt`.
    """
    header = stream.read_header(fsrc)
    if header.wrapped is None:
        raise UnknownKeyError(
            'stream names DEK %s by id: open it with the facility that '
            'holds the key (zodbkmi decrypt-file --key-dir)'
            % header.dek_id.hex(), header.dek_id.hex())
    keys = key if isinstance(key, (list, tuple)) else [key]
    keks = {}
    for k in keys:
        kek = as_kek(k)
        keks[kek.key_id] = kek
    kek_id = wrapped.parse(header.wrapped).kek_id
    _, dek = wrapped.unwrap(keks.get(kek_id, kek), header.wrapped)
    return stream.decrypt(fsrc, fdst, dek, header)


class ProgressReader:
    """Wraps a binary source file and shows how much of it was read.

    Writes ``NAME: 42% 430.1 MiB of 1.0 GiB, 1.2 GB/s`` on ``out`` (a
    terminal), rewriting the line at most every ``interval`` seconds, and
    ends the line in :meth:`done`.
    """

    def __init__(self, f, total, name, out=None, interval=0.25,
                 clock=time.monotonic):
        self._f = f
        self.total = total
        self.name = name
        self.read_bytes = 0
        self._out = out if out is not None else sys.stderr
        self._interval = interval
        self._clock = clock
        self._start = self._next = clock()

    def readinto(self, buf):
        n = self._f.readinto(buf)
        if n:
            self.read_bytes += n
            if self._clock() >= self._next:
                self.show()
        return n

    def read(self, size=-1):
        data = self._f.read(size)
        self.read_bytes += len(data)
        return data

    def line(self):
        elapsed = max(self._clock() - self._start, 1e-9)
        done = self.read_bytes
        rate = done / elapsed / 1e6
        if self.total is None:
            return '%s: %s, %.1f MB/s' % (self.name, format_size(done), rate)
        pct = 100 * done // self.total if self.total else 100
        return '%s: %3d%% %s of %s, %.1f MB/s' % (
            self.name, pct, format_size(done), format_size(self.total), rate)

    def show(self):
        self._out.write('\r' + self.line() + '\x1b[K')
        self._out.flush()
        self._next = self._clock() + self._interval

    def done(self):
        """Show the last state and end the line."""
        self.show()
        self._out.write('\n')
        self._out.flush()


def format_size(n):
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return ('%d %s' if unit == 'bytes' else '%.1f %s') % (n, unit)
        n /= 1024


def transform(func, source=None, target=None, overwrite=False,
              progress=None, stdin=None, stdout=None, stderr=None):
    """Run ``func(fsrc, fdst)`` from ``source`` to ``target``; return what
    it returns.

    ``source`` and ``target`` are paths, or ``None`` / ``'-'`` for standard
    input and output (pipes work: everything is one pass).  ``target`` is
    written through :func:`~zodbkmi.fileutil.atomic_output`: an
    interrupted or failed run leaves no file under that name (a device or
    a FIFO, such as ``/dev/null``, is written directly).  ``progress``
    shows a progress line on ``stderr``: True, False, or None for "when
    ``source`` is a regular file and ``stderr`` is a terminal".
    """
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    with contextlib.ExitStack() as stack:
        if source in (None, '-'):
            fsrc, name = stdin, 'stdin'
        else:
            # unbuffered: the stream format reads 256 KiB at a time
            try:
                fsrc = stack.enter_context(open(source, 'rb', buffering=0))
            except OSError as e:
                raise OSError(e.errno, e.strerror,
                              'input file %s' % source) from None
            name = os.path.basename(source)
        try:
            st = os.fstat(fsrc.fileno())
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (AttributeError, OSError, ValueError):
            size = None
        if progress is None:
            progress = size is not None and stderr.isatty()
        reader = None
        if progress:
            fsrc = reader = ProgressReader(fsrc, size, name, stderr)
        if target in (None, '-'):
            result = func(fsrc, stdout)
            stdout.flush()
        elif _special(target):
            with open(target, 'wb', buffering=0) as fdst:   # a device
                result = func(fsrc, fdst)
        else:
            with atomic_output(target, overwrite, buffering=0) as fdst:
                result = func(fsrc, fdst)
        if reader is not None:
            reader.done()
        return result


def _special(path):
    """Tell whether ``path`` exists and is not a regular file."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
