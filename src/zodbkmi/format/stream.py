"""The stream format: files of any size as chunks of AES-256-GCM (STREAM).

Layout, version 1 (all of it specified in ``docs/format.rst``)::

    offset  size  field
    0       3     magic    b"zks"
    3       1     version  0x01
    4       1     suite    0x01 = HKDF-SHA256 payload key, AES-256-GCM chunks
    5       1     e        chunk size exponent: chunks of 2**e bytes, 6..24
    6       1     kind     0x01 = DEK named by id, 0x02 = wrapped DEK embedded
    7       16    salt     random
    23      16    DEK id                            (kind 0x01)
    23      2+n   n (big endian) || wrapped DEK     (kind 0x02)

    payload key = HKDF-SHA256(ikm=DEK, salt=salt,
                              info=b"zodbkmi/stream/v1\\n" || header || aad)
    chunk i     = AES-256-GCM(payload key,
                              nonce = i (11 bytes, big endian) || last,
                              plaintext chunk i, no associated data)

Every chunk but the last holds exactly 2**e plaintext bytes; the last one
(``last`` = 0x01, 0x00 for the others) holds 0 to 2**e bytes and is empty
only when the whole plaintext is.  The header is authenticated through the
payload key: changing any of its bytes changes the key of every chunk.
``aad`` is associated data the caller knows and passes again to decrypt
(empty for plain files; the 8 byte oid for blob files, which binds a blob
to its object); the header is self-delimiting, so it is unambiguous.

The functions read and write binary file objects in one pass, 256 KiB
at a time, in memory that does not depend on the size of the input, so
pipes and sockets work.  This module is pure:
give it the DEK; it knows nothing of facilities or vaults.
"""
import io
import mmap
import os
import queue
import stat
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from zodbkmi import threads
from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.exceptions import UnsupportedFormatError
from zodbkmi.format import wrapped as wrappedmod

MAGIC = b'zks'
VERSION = 1
SUITE_HKDF_AES256_GCM = 1
KIND_DEK_ID = 1
KIND_WRAPPED = 2
SALT_SIZE = 16
DEK_ID_SIZE = 16
DEK_SIZE = 32
TAG_SIZE = 16
NONCE_SIZE = 12
FIXED_SIZE = 23                     # magic .. salt
MIN_EXPONENT = 6                    # 64 byte chunks (test vectors)
MAX_EXPONENT = 24                   # 16 MiB chunks
DEFAULT_EXPONENT = 16
DEFAULT_CHUNK_SIZE = 1 << DEFAULT_EXPONENT      # 64 KiB
MAX_WRAPPED_SIZE = 0xffff
INFO_LABEL = b'zodbkmi/stream/v1\n'
BATCH_SIZE = 1 << 18                # bytes read or written at a time
OVERLAP_AFTER = 1 << 22             # bytes before a writer thread starts

_LAST = b'\x01'
_NOT_LAST = b'\x00'
_MAX_COUNTER = 1 << 88


class StreamHeader:
    """A parsed stream header.

    ``chunk_size``, ``salt``, ``dek_id`` (16 bytes), ``wrapped`` (the
    embedded wrapped DEK, bytes, or None when the DEK is named by id) and
    ``raw`` (the header bytes, which the payload key is bound to).
    """

    __slots__ = ('chunk_size', 'salt', 'dek_id', 'wrapped', 'raw')

    def __init__(self, chunk_size, salt, dek_id, wrapped, raw):
        self.chunk_size = chunk_size
        self.salt = salt
        self.dek_id = dek_id
        self.wrapped = wrapped
        self.raw = raw

    @property
    def size(self):
        return len(self.raw)

    def __repr__(self):
        return '<StreamHeader DEK %s, %s, chunks of %d bytes>' % (
            self.dek_id.hex(),
            'wrapped DEK embedded' if self.wrapped else 'named by id',
            self.chunk_size)


def _exponent(chunk_size):
    e = chunk_size.bit_length() - 1
    if (not isinstance(chunk_size, int) or chunk_size != 1 << e
            or not MIN_EXPONENT <= e <= MAX_EXPONENT):
        raise ValueError('the chunk size is a power of two from %d to %d'
                         % (1 << MIN_EXPONENT, 1 << MAX_EXPONENT))
    return e


def build_header(dek_id=None, wrapped=None, chunk_size=DEFAULT_CHUNK_SIZE,
                 _salt=None):
    """Return a new :class:`StreamHeader` with a fresh random salt.

    Give either ``dek_id`` (16 bytes: the reader finds the DEK by id) or
    ``wrapped`` (a wrapped DEK, :mod:`zodbkmi.format.wrapped`, embedded for
    a self-contained file).  ``_salt`` is a private seam for the test
    vectors; never pass it in real code.
    """
    e = _exponent(chunk_size)
    salt = _salt or os.urandom(SALT_SIZE)
    if len(salt) != SALT_SIZE:
        raise ValueError('a salt has %d bytes' % SALT_SIZE)
    fixed = MAGIC + bytes([VERSION, SUITE_HKDF_AES256_GCM, e])
    if (dek_id is None) == (wrapped is None):
        raise ValueError('give a DEK id or a wrapped DEK, not both')
    if wrapped is None:
        if not isinstance(dek_id, bytes) or len(dek_id) != DEK_ID_SIZE:
            raise ValueError('a DEK id has %d bytes' % DEK_ID_SIZE)
        raw = fixed + bytes([KIND_DEK_ID]) + salt + dek_id
    else:
        if not 0 < len(wrapped) <= MAX_WRAPPED_SIZE:
            raise ValueError('a wrapped DEK has 1 to %d bytes'
                             % MAX_WRAPPED_SIZE)
        dek_id = wrappedmod.parse(wrapped).dek_id
        raw = (fixed + bytes([KIND_WRAPPED]) + salt
               + len(wrapped).to_bytes(2, 'big') + wrapped)
    return StreamHeader(chunk_size, salt, dek_id, wrapped, raw)


def _readinto(f):
    """A function that fills a buffer from ``f``; short only at the end."""
    readinto = getattr(f, 'readinto', None)
    if readinto is None:
        def readinto(buf):
            data = f.read(len(buf))
            buf[:len(data)] = data
            return len(data)

    def fill(buf):
        n = readinto(buf)
        if n is None:
            raise OSError('non-blocking stream without data')
        if n == len(buf) or not n:
            return n
        view = memoryview(buf)
        while n < len(buf):
            k = readinto(view[n:])
            if k is None:
                raise OSError('non-blocking stream without data')
            if not k:
                break
            n += k
        return n
    return fill


def _writer(f):
    """A function that writes a whole buffer to ``f``."""
    write = f.write

    def writeall(data):
        n = write(data)
        if n is not None and n < len(data):
            view = memoryview(data)
            while n < len(data):
                n += write(view[n:])
    return writeall


#: Whether a stream longer than ``OVERLAP_AFTER`` bytes is written by a
#: thread of its own from then on (see ``_Output``): None decides by the
#: destination: yes for regular files, pipes and sockets, no for character
#: devices such as /dev/null and for in-memory files, where writing costs
#: too little to overlap.
OVERLAP_WRITES = None


def _overlaps(f):
    if OVERLAP_WRITES is not None:
        return OVERLAP_WRITES
    try:
        mode = os.fstat(f.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _Output:
    """Where the batches of chunks go, through :meth:`view` (the buffer to
    fill next) and :meth:`put` (write its first ``n`` bytes).

    Batches are written at once.  When a stream proves longer than
    ``OVERLAP_AFTER``, :meth:`overlap` gives a second buffer and a thread
    of its own writes each batch while the caller reads and seals or opens
    the next one (the two buffers in turn): the write system calls release
    the GIL, so copying to the page cache overlaps the cryptography.
    :meth:`close` waits until everything put is written.
    """

    def __init__(self, write, buf):
        self._write = write
        self._view = memoryview(buf)
        self._thread = None
        self._error = None

    def view(self):
        if self._thread is None:
            return self._view
        view = self._free.get()
        if self._error is not None:
            raise self._error
        return view

    def put(self, view, n):
        if self._thread is None:
            self._write(view[:n])
        else:
            self._work.put((view, n))

    def overlap(self, buf):
        """From now on, write in a thread; ``buf`` is the second buffer
        (None: go on writing at once)."""
        if buf is None:
            return
        self._free = queue.SimpleQueue()
        self._work = queue.SimpleQueue()
        self._free.put(self._view)
        self._free.put(memoryview(buf))
        self._thread = threads.spawn(self._run, name='zodbkmi stream writer')

    def _run(self):
        while True:
            item = self._work.get()
            if item is None:
                return
            view, n = item
            if self._error is None:
                try:
                    self._write(view[:n])
                except BaseException as e:   # raised by view() or close()
                    self._error = e
            self._free.put(view)

    def close(self, raise_error=True):
        """Wait until all that was put is written (the caller may then
        reuse the buffers); raise the writer's error, if any and if
        ``raise_error``."""
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None
            if self._error is not None and raise_error:
                raise self._error


def _second(bufs, size, fdst):
    """A function that, called when a stream proves longer than
    ``OVERLAP_AFTER``, gives a second output buffer (appended to
    ``bufs``), or None when writes to ``fdst`` are not overlapped (asked
    only then: shorter streams, most blobs, never look at their
    destination)."""
    def more():
        if not _overlaps(fdst):
            return None
        bufs.append(_buffer(size))
        return bufs[-1]
    return more


def _read_exact(f, size):
    buf = bytearray(size)
    n = _readinto(f)(buf)
    return bytes(buf[:n])


def parse_header(data):
    """Parse the header at the start of ``data`` (bytes); see
    :func:`read_header`."""
    return read_header(io.BytesIO(data))


def read_header(fsrc):
    """Read and validate the stream header at the current position of
    ``fsrc``; return a :class:`StreamHeader`.

    Reads exactly the header's bytes.  Checks, in this order: magic, version,
    suite, chunk size, key kind, length.  Raises
    :class:`~zodbkmi.exceptions.UnsupportedFormatError` or
    :class:`~zodbkmi.exceptions.TruncatedDataError`.
    """
    fixed = _read_exact(fsrc, FIXED_SIZE)
    if fixed[:3] != MAGIC:
        if len(fixed) < 3 and MAGIC.startswith(fixed):
            raise TruncatedDataError(
                'stream truncated inside its magic (%d bytes)' % len(fixed))
        raise UnsupportedFormatError('not a zodbkmi stream (bad magic)')
    if len(fixed) < 4:
        raise TruncatedDataError('stream truncated after its magic')
    if fixed[3] != VERSION:
        raise UnsupportedFormatError(
            'unsupported stream version %d (this zodbkmi reads version %d)'
            % (fixed[3], VERSION))
    if len(fixed) > 4 and fixed[4] != SUITE_HKDF_AES256_GCM:
        raise UnsupportedFormatError(
            'unsupported stream cipher suite %d' % fixed[4])
    if len(fixed) > 5 and not MIN_EXPONENT <= fixed[5] <= MAX_EXPONENT:
        raise UnsupportedFormatError(
            'unsupported stream chunk size 2**%d' % fixed[5])
    if len(fixed) > 6 and fixed[6] not in (KIND_DEK_ID, KIND_WRAPPED):
        raise UnsupportedFormatError(
            'unknown stream key kind %d' % fixed[6])
    if len(fixed) < FIXED_SIZE:
        raise TruncatedDataError(
            'stream truncated inside its header (%d bytes)' % len(fixed))
    chunk_size = 1 << fixed[5]
    salt = fixed[7:23]
    if fixed[6] == KIND_DEK_ID:
        dek_id = _read_exact(fsrc, DEK_ID_SIZE)
        if len(dek_id) < DEK_ID_SIZE:
            raise TruncatedDataError('stream truncated inside its DEK id')
        return StreamHeader(chunk_size, salt, dek_id, None, fixed + dek_id)
    length = _read_exact(fsrc, 2)
    n = int.from_bytes(length, 'big')
    if len(length) < 2:
        raise TruncatedDataError(
            'stream truncated inside its wrapped DEK length')
    if n == 0:
        raise UnsupportedFormatError('stream has an empty wrapped DEK')
    blob = _read_exact(fsrc, n)
    if len(blob) < n:
        raise TruncatedDataError(
            'stream truncated inside its wrapped DEK (%d of %d bytes)'
            % (len(blob), n))
    dek_id = wrappedmod.parse(blob).dek_id
    return StreamHeader(chunk_size, salt, dek_id, blob, fixed + length + blob)


def payload_key(header, dek, aad=b''):
    """The AES-256-GCM key of the chunks: HKDF-SHA256 of the DEK, salted,
    bound to the whole header and to the associated data ``aad``."""
    if not isinstance(dek, bytes) or len(dek) != DEK_SIZE:
        raise InvalidKeyError('a data encrypting key has %d bytes' % DEK_SIZE)
    if not isinstance(aad, bytes):
        raise TypeError('associated data is bytes')
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=header.salt,
                info=INFO_LABEL + header.raw + aad).derive(dek)


def _nonce(counter, last):
    if counter >= _MAX_COUNTER:   # pragma: no cover (2**88 chunks)
        raise OverflowError('stream too long')
    return counter.to_bytes(11, 'big') + (_LAST if last else _NOT_LAST)


_pool = threading.local()


def _buffer(size):
    """A writable buffer of ``size`` bytes: one this thread gave back with
    :func:`_give_back`, or a new anonymous mmap, whose pages are only
    allocated when touched.  Reusing buffers spares each file the page
    faults and zeroing of fresh memory (most of the cost of a 1 MiB
    blob)."""
    pool = getattr(_pool, 'buffers', None)
    if pool:
        for i, buf in enumerate(pool):
            if len(buf) == size:
                return pool.pop(i)
    return mmap.mmap(-1, size)


def _give_back(buffers, plaintext=()):
    """Keep ``buffers`` for the next call of this thread (at most four);
    the first ``used`` bytes of each ``(buffer, used)`` in ``plaintext``
    are overwritten with zeros first, so no plaintext lingers there."""
    for buf, used in plaintext:
        if used:
            buf[:used] = _zeros(used)
    pool = getattr(_pool, 'buffers', None)
    if pool is None:
        pool = _pool.buffers = []
    for buf in buffers:
        if len(pool) < 4:
            pool.append(buf)


def _zeros(n, _cache=[b'']):
    if len(_cache[0]) < n:
        _cache[0] = bytes(max(n, BATCH_SIZE + BATCH_SIZE // 64))
    return memoryview(_cache[0])[:n]


def _per_batch(chunk_size):
    """Chunks handled per read and write: 256 KiB at a time (four chunks
    of the default size), so that the three buffers and the page cache
    copies stay in the processor's L2 cache (1 MiB batches were 15% slower
    file to file, see docs/performance.rst)."""
    return max(1, BATCH_SIZE // chunk_size)


def encrypt(fsrc, fdst, dek, header, aad=b''):
    """Encrypt ``fsrc`` into ``fdst`` under ``dek`` (32 bytes).

    ``header`` comes from :func:`build_header` (it names the DEK and holds
    a fresh salt: use it once).  Writes the header, then the chunks; reads
    ``fsrc`` to its end, in one pass, 256 KiB at a time (memory: three
    such buffers, whatever the size of the input).  ``aad`` is bound in and
    must be given again to decrypt.  Return the number of plaintext bytes.
    """
    aead = AESGCM(payload_key(header, dek, aad))
    cs = header.chunk_size
    per = _per_batch(cs)
    bsize = per * cs
    fill = _readinto(fsrc)
    write = _writer(fdst)
    write(header.raw)
    cur, nxt = _buffer(bsize), _buffer(bsize)
    osize = per * (cs + TAG_SIZE)
    bufs = [cur, nxt, _buffer(osize)]
    output = _Output(write, bufs[2])
    return _pump(lambda: _encrypt_chunks(aead, cs, per, fill, output, cur,
                                         nxt, _second(bufs, osize, fdst)),
                 output, bufs, lambda: (cur, nxt), bsize)


def encrypt_in_place(fd, dek, header, aad=b''):
    """Encrypt the regular file open for reading and writing on the file
    descriptor ``fd`` into itself: the file then holds exactly what
    :func:`encrypt` would write for its content (same ``header`` and
    ``aad``).  Return the number of plaintext bytes.

    A chunk's ciphertext never starts before its plaintext (each chunk
    before it grows by its tag, the header comes first), so the batches
    are processed from the end of the file to its start: a batch is read
    whole before its ciphertext is written over it and over batches
    already done.  The plaintext's pages are overwritten rather than
    freed, and no second file is made.  On an error the file holds a mix
    of plaintext and ciphertext: discard it.  The file must not change
    meanwhile, nor have other names (hard links) that expect plaintext.
    """
    aead = AESGCM(payload_key(header, dek, aad))
    cs = header.chunk_size
    per = _per_batch(cs)
    bsize = per * cs
    size = os.fstat(fd).st_size
    count = max(1, -(-size // cs))       # an empty file: one empty chunk
    buf, out = _buffer(bsize), _buffer(per * (cs + TAG_SIZE))
    view, outview = memoryview(buf), memoryview(out)
    encrypt_into = aead.encrypt_into
    try:
        b = count
        while b > 0:
            a = max(0, b - per)
            start, end = a * cs, min(size, b * cs)
            n = 0
            while n < end - start:
                k = os.preadv(fd, [view[n:end - start]], start + n)
                if not k:
                    raise OSError('file %d shrank while it was encrypted '
                                  'in place' % fd)
                n += k
            pos = opos = 0
            for i in range(a, b):
                k = min(cs, n - pos)
                encrypt_into(_nonce(i, i == count - 1), view[pos:pos + k],
                             None, outview[opos:opos + k + TAG_SIZE])
                pos += k
                opos += k + TAG_SIZE
            _pwrite_all(fd, outview[:opos],
                        header.size + a * (cs + TAG_SIZE))
            b = a
        _pwrite_all(fd, memoryview(header.raw), 0)
    finally:
        _give_back([buf, out], [(buf, min(bsize, size))])
    return size


def _pwrite_all(fd, view, offset):
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pump(work, output, bufs, plain, size):
    """Return ``work()``, the number of plaintext bytes it sealed or
    opened into ``output``, once all of it is written; on an error, what
    was put into ``output`` before it (what authenticated) is written,
    then the error raised.  Then give ``bufs`` back, the first ``size``
    bytes (at most the plaintext's length) of the buffers ``plain()``
    names overwritten."""
    used = size
    try:
        try:
            total = work()
        except BaseException:
            output.close(raise_error=False)
            raise
        output.close()
        used = min(used, total)
        return total
    finally:
        _give_back(bufs, [(b, used) for b in plain()])


def _encrypt_chunks(aead, cs, per, fill, output, cur, nxt, more):
    """Seal batches of chunks into ``output``; ``more()`` gives a second
    output buffer (or None) for a stream longer than ``OVERLAP_AFTER``."""
    bsize = per * cs
    encrypt_into = aead.encrypt_into
    n = fill(cur)
    total = 0
    counter = 0
    while True:
        if n < bsize:
            m, last = 0, True
        else:
            m = fill(nxt)
            last = not m
            if not last and more is not None and total >= OVERLAP_AFTER:
                output.overlap(more())
                more = None
        view = memoryview(cur)
        outview = output.view()
        pos = opos = 0
        while True:
            k = min(cs, n - pos)
            end = pos + k
            nonce = counter.to_bytes(11, 'big') + (
                _LAST if last and end >= n else _NOT_LAST)
            encrypt_into(nonce, view[pos:end], None,
                         outview[opos:opos + k + TAG_SIZE])
            pos = end
            opos += k + TAG_SIZE
            counter += 1
            if pos >= n:
                break
        output.put(outview, opos)
        total += n
        if last:
            return total
        if counter >= _MAX_COUNTER:   # pragma: no cover (2**88 chunks)
            raise OverflowError('stream too long')
        cur, nxt, n = nxt, cur, m


def _fail(aead, header, counter, last, chunk):
    """Raise the error that explains why chunk ``counter`` did not open."""
    dek = header.dek_id.hex()
    try:
        aead.decrypt(_nonce(counter, not last), bytes(chunk), None)
    except InvalidTag:
        pass
    else:
        if last:
            raise TruncatedDataError(
                'stream under DEK %s truncated: it ends after chunk %d '
                'without its final chunk' % (dek, counter))
        raise AuthenticationError(
            'stream under DEK %s has data after its final chunk %d'
            % (dek, counter))
    if counter == 0:
        raise AuthenticationError(
            'stream under DEK %s did not authenticate: first chunk (wrong '
            'key, altered header or data, or truncated)' % dek)
    raise AuthenticationError(
        'stream under DEK %s did not authenticate at chunk %d (altered, '
        'reordered, dropped or duplicated chunks, or truncated)'
        % (dek, counter))


def _empty_last(header, counter):
    # only an empty plaintext has an empty final chunk
    raise AuthenticationError(
        'stream under DEK %s ends with an empty chunk %d after full ones, '
        'which no writer produces' % (header.dek_id.hex(), counter))


def decrypt(fsrc, fdst, dek, header, aad=b''):
    """Decrypt the chunks that follow ``header`` in ``fsrc`` into ``fdst``.

    ``header`` was read from ``fsrc`` by :func:`read_header`; ``dek`` is the
    DEK it names.  Chunks are read 256 KiB at a time, and written only
    after they authenticated; the end of the stream is checked (final chunk
    flag, nothing after it).  Return the number of plaintext bytes.

    Raises :class:`~zodbkmi.exceptions.AuthenticationError` (wrong key,
    altered, reordered, dropped or duplicated chunks, data after the final
    chunk, a stream cut inside a chunk) and
    :class:`~zodbkmi.exceptions.TruncatedDataError` (the stream ends at a chunk
    boundary before its final chunk, or inside a tag).  The chunks before the
    one that failed have been written: write to a temporary file and keep it
    only on success (see :mod:`zodbkmi.files`).
    """
    aead = AESGCM(payload_key(header, dek, aad))
    cs = header.chunk_size
    size = cs + TAG_SIZE
    per = _per_batch(cs)
    bsize = per * size
    fill = _readinto(fsrc)
    write = _writer(fdst)
    cur, nxt = _buffer(bsize), _buffer(bsize)
    osize = per * cs
    bufs = [cur, nxt, _buffer(osize)]
    output = _Output(write, bufs[2])
    return _pump(lambda: _decrypt_chunks(aead, header, size, bsize, fill,
                                         output, cur, nxt,
                                         _second(bufs, osize, fdst)),
                 output, bufs, lambda: bufs[2:], osize)


def _decrypt_chunks(aead, header, size, bsize, fill, output, cur, nxt,
                    more):
    """Open batches of chunks into ``output``; ``more()`` gives a second
    output buffer (or None) for a stream longer than ``OVERLAP_AFTER``."""
    decrypt_into = aead.decrypt_into
    n = fill(cur)
    if not n:
        raise TruncatedDataError('stream under DEK %s truncated after its '
                                 'header' % header.dek_id.hex())
    total = 0
    counter = 0
    while True:
        if n < bsize:
            m, last = 0, True
        else:
            m = fill(nxt)
            last = not m
            if not last and more is not None and total >= OVERLAP_AFTER:
                output.overlap(more())
                more = None
        view = memoryview(cur)
        outview = output.view()
        pos = opos = 0
        while pos < n:
            k = min(size, n - pos)
            end = pos + k
            final = last and end >= n
            if final and k <= TAG_SIZE and (k < TAG_SIZE or counter):
                output.put(outview, opos)   # the chunks that authenticated
                if k < TAG_SIZE:
                    raise TruncatedDataError(
                        'stream under DEK %s truncated inside the tag of '
                        'chunk %d' % (header.dek_id.hex(), counter))
                _empty_last(header, counter)
            nonce = counter.to_bytes(11, 'big') + (
                _LAST if final else _NOT_LAST)
            try:
                decrypt_into(nonce, view[pos:end], None,
                             outview[opos:opos + k - TAG_SIZE])
            except InvalidTag:
                output.put(outview, opos)   # the chunks that authenticated
                _fail(aead, header, counter, final, view[pos:end])
            pos = end
            opos += k - TAG_SIZE
            counter += 1
        output.put(outview, opos)
        total += opos
        if last:
            return total
        cur, nxt, n = nxt, cur, m


def decrypt_range(fsrc, fdst, dek, header, offset, length=None, aad=b''):
    """Decrypt ``length`` plaintext bytes from ``offset`` (all the rest
    when None) of a *seekable* stream, reading only the chunks needed.

    ``header`` was read with :func:`read_header` from the start of
    ``fsrc``.  Every chunk read is authenticated; the chunk holding the end
    of the file is recognised by the file's size.  Return the number of
    bytes written.
    """
    if offset < 0 or (length is not None and length < 0):
        raise ValueError('offset and length are >= 0')
    aead = AESGCM(payload_key(header, dek, aad))
    cs = header.chunk_size
    size = cs + TAG_SIZE
    end = fsrc.seek(0, os.SEEK_END)
    body = end - header.size
    if body < TAG_SIZE:
        raise TruncatedDataError('stream under DEK %s truncated after its '
                                 'header' % header.dek_id.hex())
    last_index = (body - 1) // size
    counter = offset // cs
    skip = offset - counter * cs
    write = _writer(fdst)
    written = 0
    while counter <= last_index and (length is None or written < length):
        fsrc.seek(header.size + counter * size)
        chunk = _read_exact(fsrc, size)
        last = counter == last_index
        if last and len(chunk) < TAG_SIZE:
            raise TruncatedDataError(
                'stream under DEK %s truncated inside the tag of chunk %d'
                % (header.dek_id.hex(), counter))
        if last and len(chunk) == TAG_SIZE and counter:
            _empty_last(header, counter)
        try:
            plain = aead.decrypt(_nonce(counter, last), chunk, None)
        except InvalidTag:
            _fail(aead, header, counter, last, chunk)
        piece = memoryview(plain)[skip:]
        if length is not None:
            piece = piece[:length - written]
        write(piece)
        written += len(piece)
        skip = 0
        counter += 1
    return written


def check_dek_id(header, dek_id):
    """Raise :class:`~zodbkmi.exceptions.UnknownKeyError` unless ``header``
    names ``dek_id``."""
    if header.dek_id != dek_id:
        raise UnknownKeyError(
            'stream is encrypted under DEK %s, not %s'
            % (header.dek_id.hex(), dek_id.hex()), header.dek_id.hex())


def encrypt_bytes(dek_id, dek, data, chunk_size=DEFAULT_CHUNK_SIZE,
                  _salt=None):
    """Return the stream of ``data`` (bytes) under the DEK ``dek_id``."""
    out = io.BytesIO()
    encrypt(io.BytesIO(data), out, dek,
            build_header(dek_id, chunk_size=chunk_size, _salt=_salt))
    return out.getvalue()


def decrypt_bytes(dek_id, dek, data):
    """Return the plaintext of the stream ``data`` (bytes)."""
    src = io.BytesIO(data)
    header = read_header(src)
    check_dek_id(header, dek_id)
    out = io.BytesIO()
    decrypt(src, out, dek, header)
    return out.getvalue()
