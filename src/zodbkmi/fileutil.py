"""Files that hold secrets or keys: one atomic writer, one checked reader.

Every file zodbkmi writes whole (key store entries, key files, token
files, TLS keys, the output of ``decrypt-file``) goes through
:func:`atomic_output` (or :func:`write_atomic`, its one-call form): it
appears under its name complete or not at all.  Every key, PIN, token and
password file zodbkmi reads goes through :func:`read_secret_file` (or
:func:`read_secret_text`), which refuses a file that group or others can
access.  This module depends on nothing of zodbkmi but its exceptions, so
every layer may use it.
"""
import contextlib
import os
import stat
import tempfile

from zodbkmi.exceptions import SecretFileError

#: The largest key, PIN, token or password file read (bytes).
MAX_SECRET_FILE = 1 << 20
#: The temporary files of :func:`write_atomic` are ``.tmp-*.part``: the key
#: store knows them by these names (they are never taken for entries, and
#: are swept when their key is destroyed or rewrapped).
TEMP_PREFIX = '.tmp-'
TEMP_SUFFIX = '.part'


@contextlib.contextmanager
def atomic_output(path, overwrite=False, mode=0o600, buffering=-1,
                  temp_prefix=None):
    """Open ``path`` for writing so that it appears only when complete.

    Yields a binary file object (``buffering`` as for ``open()``) on a
    temporary file in the same directory (``.NAME.XXXXXXXX.part``, or
    ``temp_prefix`` + ``XXXXXXXX.part``), created with ``mode`` whatever
    the umask; a symbolic link is followed, the file it names is
    replaced.  When the block ends normally the data is flushed and
    synced, the file renamed to ``path`` and the directory synced, so a
    crash or a power cut leaves the old file or the new one, whole.  When
    the block raises (including KeyboardInterrupt) the temporary file is
    removed and ``path`` is left as it was.

    Raises ``FileExistsError`` if ``path`` exists (or appears while
    writing) unless ``overwrite``, ``ValueError`` if ``path`` is not a
    regular file (a device, a FIFO: never renamed over), and ``OSError``
    named by ``path`` (never by the temporary name) when the temporary
    file cannot be made.
    """
    path = os.path.realpath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError('%s exists (overwrite it with --force)' % path)
    if os.path.lexists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        # never rename over a device, a FIFO or a socket (/dev/null!)
        raise ValueError('%s is not a regular file' % path)
    directory, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=temp_prefix or '.%s.' % name, suffix=TEMP_SUFFIX,
            dir=directory)
    except OSError as e:
        # named by the file asked for, not by its temporary name
        raise OSError(e.errno, e.strerror, 'output file %s' % path) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb', buffering) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and os.path.lexists(path):
            raise FileExistsError('%s appeared while writing' % path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(directory)


def _sync_directory(directory):
    """fsync ``directory``: the rename is on disk."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_atomic(path, data, mode=0o600, overwrite=True):
    """Write ``data`` to ``path`` atomically with ``mode`` (default
    0600): :func:`atomic_output` with a ``.tmp-*.part`` temporary file.

    Replaces an existing file unless ``overwrite`` is false (then
    ``FileExistsError``, also when the file appears while writing).  Key
    files everywhere in zodbkmi are written this way.
    """
    with atomic_output(path, overwrite, mode,
                       temp_prefix=TEMP_PREFIX) as f:
        f.write(data)


def read_secret_file(path, role='key'):
    """Return the bytes of the secret file ``path``: a key, PIN, token or
    password file (``role`` says which, for the messages).

    This is the one reader of such files in zodbkmi.  It refuses, with
    :class:`~zodbkmi.exceptions.SecretFileError` (a ``KeyStoreError`` and a
    ``KeySourceError``) naming the file, its role and its mode, a file that
    cannot be read, one larger than 1 MiB, and one that group or others
    can access in any way (any bit of ``0o077``: readable leaks the
    secret, writable lets another user plant one); the message gives the
    ``chmod`` that fixes it.  The mode is checked on the open file, so a
    file swapped after the check is not read.  The content is never
    shown.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
    except OSError as e:
        raise SecretFileError('%s file %s cannot be read: %s'
                              % (role, path, e.strerror), path) from None
    with os.fdopen(fd, 'rb') as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                '%s file %s is accessible by group or others (mode %04o); '
                'run: chmod 600 %s'
                % (role, path, stat.S_IMODE(mode), path), path)
        try:
            data = f.read(MAX_SECRET_FILE + 1)
        except OSError as e:
            raise SecretFileError('%s file %s cannot be read: %s'
                                  % (role, path, e.strerror), path) from None
    if len(data) > MAX_SECRET_FILE:
        raise SecretFileError('%s file %s is larger than %d bytes: not a %s '
                              'file' % (role, path, MAX_SECRET_FILE, role),
                              path)
    return data


def read_secret_text(path, role='token', encoding='ascii'):
    """Return the text of the secret file ``path`` (a token, a PIN, a
    password), stripped, read by :func:`read_secret_file`.  Text that is
    not ``encoding``, and an empty file, raise
    :class:`~zodbkmi.exceptions.SecretFileError`: a secret is never changed
    by a lossy decoding."""
    data = read_secret_file(path, role).strip()
    if not data:
        raise SecretFileError('%s file %s is empty' % (role, path), path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise SecretFileError('%s file %s does not hold %s text'
                              % (role, path, encoding.upper()), path) \
            from None
