"""``zodbkmi encrypt-file``, ``decrypt-file`` and ``public-key``.

Streams from a path or standard input to a path or standard output, so a
backup can be encrypted while it is written::

    repozo -B -F -r /backup -f Data.fs ... ; tar cf - /backup \\
        | zodbkmi encrypt-file --recipient backup.pub -o backup.tar.zks
"""
import argparse
import contextlib
import io
import os
import select
import signal
import stat
import sys
import threading

from zodbkmi import files
from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import UsageError
from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.fileutil import write_atomic
from zodbkmi.format import stream
from zodbkmi.keyholder import read_key_file


def _chunk_size(text):
    try:
        value = int(text, 0)
        stream._exponent(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            '%r is not a chunk size: a power of two from %d to %d bytes'
            % (text, 1 << stream.MIN_EXPONENT, 1 << stream.MAX_EXPONENT)
        ) from None
    return value


def _common(parser):
    parser.add_argument(
        'input', nargs='?', default='-', metavar='INPUT',
        help='file to read (default or "-": standard input)')
    parser.add_argument(
        '-o', '--output', default='-', metavar='OUTPUT',
        help='file to write, atomically: it appears only when complete '
             '(default or "-": standard output, written as the chunks '
             'come, so not atomic)')
    parser.add_argument(
        '-f', '--force', action='store_true',
        help='overwrite OUTPUT if it exists')
    parser.add_argument(
        '-k', '--key-file', '--identity', dest='key_file', metavar='KEK',
        help='the key encrypting key: a file holding the PEM of a hybrid '
             'or RSA private key or a base64 AES-256 key, mode 0600')
    parser.add_argument(
        '-d', '--key-dir', metavar='DIR',
        help='the key store directory of the master facility (the DEKs '
             'wrapped by KEK)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        '--progress', action='store_true', default=None,
        help='show progress on standard error (default: when INPUT is a '
             'file and standard error a terminal)')
    group.add_argument('--no-progress', dest='progress',
                       action='store_false')


def register(subparsers):
    p = subparsers.add_parser(
        'encrypt-file', help='encrypt a file or a pipe (stream format)',
        description='Encrypt INPUT into OUTPUT in one pass, in constant '
                    'memory: under the active DEK of KEK in the key store DIR '
                    '(--key-file and --key-dir), or for the holder of a '
                    'private key (--recipient).')
    _common(p)
    p.add_argument(
        '-r', '--recipient', metavar='PUBKEY',
        help='encrypt for the holder of the private key of this hybrid or '
             'RSA public key (see "zodbkmi public-key"; a private key is '
             'refused): the output is self-contained and this machine '
             'cannot read it')
    p.add_argument(
        '--chunk-size', type=_chunk_size,
        default=stream.DEFAULT_CHUNK_SIZE, metavar='BYTES',
        help='plaintext bytes per chunk, a power of two from 64 to 16 MiB '
             '(default: 65536)')
    p.set_defaults(func=encrypt_file)

    p = subparsers.add_parser(
        'decrypt-file', help='decrypt a file or a pipe (stream format)',
        description='Decrypt INPUT into OUTPUT in one pass.  A stream that '
                    'names its DEK needs --key-file and --key-dir; a '
                    'self-contained one (encrypt-file --recipient) needs '
                    'the private key only (--identity).  No byte of a '
                    'chunk is written before that chunk authenticated, '
                    'and each chunk is released as soon as it did: to '
                    'standard output, a stream that turns out cut or '
                    'altered has already written its earlier chunks when '
                    'the error comes (only the exit status, 2, and the '
                    'error on standard error tell).  With -o OUTPUT the '
                    'output is atomic: OUTPUT appears only when the whole '
                    'stream authenticated, and nothing is left otherwise.  '
                    'Use -o wherever a partial result must not be used.')
    _common(p)
    p.set_defaults(func=decrypt_file)

    p = subparsers.add_parser(
        'public-key', help='print the public key of a hybrid or RSA KEK',
        description='Write the public half of the hybrid or RSA key '
                    'encrypting key in KEK (PEM), for encrypt-file '
                    '--recipient.')
    p.add_argument('key_file', metavar='KEK')
    p.add_argument('-o', '--output', default='-', metavar='OUTPUT',
                   help='file to write (default: standard output)')
    p.set_defaults(func=public_key)


def _facility(args):
    from zodbkmi.facility import KeyManagementFacility
    if not os.path.isdir(args.key_dir):
        raise UsageError('key store directory %s does not exist'
                         % args.key_dir)
    return KeyManagementFacility(args.key_dir)


def _read_public(path):
    with open(path, 'rb') as f:
        data = f.read(1 << 20)
    if b'PRIVATE KEY' in data[:80] or b'PUBLIC KEY' not in data[:80]:
        # a private key (or an AES key) has no place on the machine that
        # writes backups: the recipient's public key is all it needs
        try:
            name = 'KEK %s' % files.recipient_kek(read_key_file(path)).key_id
        except (ZodbKmiError, OSError):
            name = 'a key'
        raise UsageError('--recipient %s holds %s that is no public key: '
                         'give its public half (zodbkmi public-key)'
                         % (path, name))
    try:
        return files.recipient_kek(data)
    except InvalidKeyError as e:
        raise InvalidKeyError('key file %s: %s' % (path, e)) from None


class _InterruptibleInput(io.RawIOBase):
    """A pipe, terminal or socket read so that a signal is never lost.

    Python runs a signal's handler (KeyboardInterrupt for SIGINT) between
    two bytecodes of the main thread; its C-level handler only notes the
    signal.  A signal that comes while the main thread is in C code but
    not in a system call (between two ``read()`` of BufferedReader's
    loop, or at any time when another thread takes it) interrupts
    nothing, and the next ``read()`` on a pipe that stays silent blocks
    for ever with the handler pending.  So: a wakeup fd
    (:func:`signal.set_wakeup_fd`, written by the C-level handler), a
    ``select()`` on the input and on it before each read, and one
    ``read()`` per call, returning to Python code in between, where the
    pending handler runs.  Either the signal came before ``select()``
    (the wakeup fd is readable: it returns at once) or during it (EINTR:
    Python runs the handler).  After ``select()`` says the input is
    readable, ``read()`` does not block (unless another process sharing
    this input takes the data first).
    """

    def __init__(self, fd, wakeup):
        self._fd = fd
        self._wakeup = wakeup
        self._raw = io.FileIO(fd, 'rb', closefd=False)

    def readable(self):
        return True

    def fileno(self):
        return self._fd

    def readinto(self, buf):
        while True:
            ready = select.select([self._fd, self._wakeup], [], [])[0]
            if self._wakeup in ready:
                # a signal: drain the fd; its handler runs before the
                # next select(), as Python checks for pending signals
                # at the loop's jump back
                try:
                    while os.read(self._wakeup, 512):
                        pass
                except BlockingIOError:
                    pass
            if self._fd in ready:
                n = self._raw.readinto(buf)
                if n is not None:       # None: non-blocking, taken
                    return n


@contextlib.contextmanager
def _interruptible_input(source):
    """Yield ``(source, stdin)`` for :func:`files.transform`.

    Standard input (``source`` ``None`` or ``'-'``) or a path that is not
    a regular file (a FIFO such as bash's ``<(...)``, a device) is read
    as an :class:`_InterruptibleInput` (the path opened here, and given
    to ``transform`` as standard input); a regular file is left to
    ``transform`` (a file does not block: no ``select()`` per read, the
    fast path), and so is everything in a thread other than the main one
    (only that one can set a wakeup fd), or where ``select()`` cannot
    take it (Windows pipes, an fd over FD_SETSIZE).

    This belongs to the command line, not to :func:`files.transform`: a
    wakeup fd is one per process, and a library must not take it over
    from its caller (asyncio uses it).  The command line owns its
    process."""
    stdin = sys.stdin.buffer
    opened = None
    if threading.current_thread() is not threading.main_thread():
        yield source, stdin
        return
    if source not in (None, '-'):
        try:
            # a FIFO blocks in open() until its writer opens it; Ctrl-C
            # interrupts that
            if not stat.S_ISREG(os.stat(source).st_mode):
                opened = open(source, 'rb', buffering=0)
        except OSError:
            pass    # transform says what is wrong with it
        if opened is None:
            yield source, stdin
            return
    try:
        fd = (opened or stdin).fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fd = None
        else:
            select.select([fd], [], [], 0)
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        if opened is not None:
            with opened:
                yield '-', opened
        else:
            yield source, stdin
        return
    rfd, wfd = os.pipe()
    try:
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)     # the C handler must not block
        previous = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        try:
            yield ('-' if opened is not None else source,
                   _InterruptibleInput(fd, rfd))
        finally:
            signal.set_wakeup_fd(previous)
    finally:
        os.close(rfd)
        os.close(wfd)
        if opened is not None:
            opened.close()


def _run(func, args):
    try:
        with _interruptible_input(args.input) as (source, stdin):
            files.transform(func, source, args.output, args.force,
                            args.progress, stdin=stdin)
    except BrokenPipeError:
        # the reader of our output went away (``| head``): not our error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return 0


def encrypt_file(args):
    if args.recipient:
        if args.key_file or args.key_dir:
            raise UsageError('--recipient excludes --key-file and --key-dir')
        kek = _read_public(args.recipient)

        def func(fsrc, fdst):
            return files.encrypt_to_recipient(kek, fsrc, fdst,
                                              args.chunk_size)
    else:
        if not (args.key_file and args.key_dir):
            raise UsageError('give --recipient, or --key-file and --key-dir')
        key = read_key_file(args.key_file)
        facility = _facility(args)

        def func(fsrc, fdst):
            return facility.encrypt_file(key, fsrc, fdst, args.chunk_size)
    return _run(func, args)


def decrypt_file(args):
    if not args.key_file:
        raise UsageError('give --identity (or --key-file), and --key-dir '
                         'for a stream that names its DEK')
    key = read_key_file(args.key_file)
    if args.key_dir:
        facility = _facility(args)

        def func(fsrc, fdst):
            # the user asks for this file: a self-contained one opens too
            return facility.decrypt_file(key, fsrc, fdst,
                                         self_contained=True)
    else:
        def func(fsrc, fdst):
            return files.decrypt_with_private_key(key, fsrc, fdst)
    return _run(func, args)


def public_key(args):
    pem = files.public_key_pem(read_key_file(args.key_file))
    if args.output == '-':
        sys.stdout.write(pem.decode('ascii'))
    else:
        write_atomic(args.output, pem, 0o644)
    return 0
