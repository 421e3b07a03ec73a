"""The key store in PostgreSQL: wrapped data keys shared by server replicas.

:class:`PostgresKeyStore` has the interface of
:class:`zodbkmi.keystore.DirectoryKeyStore` and keeps the same entries
(the wrapped DEK, authenticated by format version 2, with its KEK id,
state and creation time) as rows of one table, so that any number of
``zodbkmi serve`` processes on any machines serve the same keys.  It
holds no unwrapped key and no KEK: a copy of the database is as useless
without the KEKs as a copy of the key directory.

The schema (``docs/server.rst``, "The key store in PostgreSQL")::

    zodbkmi_schema (version, migrated)               one row per migration
    zodbkmi_keys   (dek_id, kek_id, state, created, version, wrapped)
    zodbkmi_keys_one_active  UNIQUE (kek_id) WHERE state = 'active'
    zodbkmi_tokens (name, role, sha256)              optional token table

The unique partial index makes "one active DEK per KEK" a rule of the
database: two replicas rotating the same KEK at once cannot both commit
an active key; the second one fails with
:class:`~zodbkmi.exceptions.KeyStateError` (the server answers 409).
Every write is one transaction.

The driver is psycopg 2 (``psycopg2-binary``, which RelStorage uses too,
so a RelStorage deployment has it already) behind a small bounded pool of
our own: a request waits at most ``pool_timeout`` seconds for a
connection, a connection broken by a database restart is dropped and
replaced on next use, and connecting gives up after ``connect_timeout``
seconds.  Every database failure becomes a
:class:`~zodbkmi.exceptions.KeyStoreError` whose message never holds the
password (:func:`redact`).

Each store keeps the entries it read in a bounded in-memory cache
(``cache_size`` entries, 0: none), as the directory store keeps the files
it read.  A trigger on ``zodbkmi_keys`` sends a notification (``NOTIFY
zodbkmi_keys``) naming the key of every row updated or deleted, by any
writer; a thread of each store listens on a connection of its own and
drops what changed.  The cache is used only while that connection is
known good: it is emptied when the connection is (re)made, and bypassed
when the database last answered it more than ``3 * cache_check`` seconds
ago (a heartbeat every ``cache_check`` seconds), so a replica cut off
from the database answers 503 instead of serving what may have changed.
A change made on one replica reaches another's cache in the time the
notification takes (``docs/server.rst``, "The key store in PostgreSQL").
"""
import os
import re
import select
import threading
import time
import weakref
from urllib.parse import parse_qsl
from urllib.parse import urlencode
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

from zope.interface import implementer

from zodbkmi import keystore
from zodbkmi.exceptions import DecryptionError
from zodbkmi.exceptions import KeyStateError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.format import wrapped as wrappedmod
from zodbkmi.interfaces import IKeyStore
from zodbkmi.interfaces import IKeyStoreCheck

#: The version of the schema this module writes; older ones are migrated
#: by :meth:`PostgresKeyStore.init_schema`, newer ones refused.
SCHEMA_VERSION = 1
#: Options of a ``postgresql://`` URL read by us, not passed to libpq:
#: connections at most, seconds a request waits for one, entries cached
#: (0: no cache), seconds between heartbeats of the cache's listener.
POOL_OPTIONS = {'pool_size': 8, 'pool_timeout': 10.0, 'cache_size': 10000,
                'cache_check': 1.0}
#: The notification channel of changed entries.
CHANNEL = 'zodbkmi_keys'
#: libpq options we set unless the URL does (seconds).
LIBPQ_DEFAULTS = {'connect_timeout': '5', 'keepalives': '1',
                  'keepalives_idle': '10', 'keepalives_interval': '5',
                  'keepalives_count': '3',
                  'application_name': 'zodbkmi-server'}

# Each step takes the schema from version N - 1 to N; one transaction.
_MIGRATIONS = {
    1: (
        """CREATE TABLE zodbkmi_keys (
            dek_id  char(32) PRIMARY KEY CHECK (dek_id ~ '^[0-9a-f]{32}$'),
            kek_id  text NOT NULL CHECK (length(kek_id) BETWEEN 1 AND 255),
            state   text NOT NULL CHECK (state IN ('active', 'retired')),
            created bigint NOT NULL,
            version smallint NOT NULL CHECK (version IN (1, 2)),
            wrapped bytea NOT NULL)""",
        """CREATE UNIQUE INDEX zodbkmi_keys_one_active
            ON zodbkmi_keys (kek_id) WHERE state = 'active'""",
        """CREATE INDEX zodbkmi_keys_by_kek
            ON zodbkmi_keys (kek_id, created)""",
        # every row changed or deleted, by any writer, is named on the
        # channel; a TRUNCATE empties every cache ('*')
        """CREATE FUNCTION zodbkmi_keys_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_LEVEL = 'STATEMENT' THEN
                    PERFORM pg_notify('zodbkmi_keys', '*');
                ELSE
                    PERFORM pg_notify('zodbkmi_keys', OLD.dek_id);
                END IF;
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER zodbkmi_keys_changed
            AFTER UPDATE OR DELETE ON zodbkmi_keys
            FOR EACH ROW EXECUTE FUNCTION zodbkmi_keys_notify()""",
        """CREATE TRIGGER zodbkmi_keys_truncated
            AFTER TRUNCATE ON zodbkmi_keys
            FOR EACH STATEMENT EXECUTE FUNCTION zodbkmi_keys_notify()""",
        """CREATE TABLE zodbkmi_tokens (
            name   text PRIMARY KEY,
            role   text NOT NULL,
            sha256 char(64) NOT NULL UNIQUE)""",
    ),
}
_ONE_ACTIVE = 'zodbkmi_keys_one_active'
_COLUMNS = 'dek_id, kek_id, state, created, version, wrapped'


def _driver():
    try:
        import psycopg2
    except ImportError:   # pragma: no cover
        raise KeyStoreError('a postgresql:// key store needs psycopg2: pip '
                            'install "zodbkmi[server]"') from None
    return psycopg2


def redact(text, password=None):
    """``text`` with the password of any ``scheme://user:password@`` URL
    (and ``password`` itself, when given) replaced by ``***``."""
    text = re.sub(r'(://[^:/@\s]*:)[^@\s]*@', r'\1***@', str(text))
    text = re.sub(r'(password\s*=\s*)\S+', r'\1***', text)
    if password:
        text = text.replace(password, '***')
    return text


def parse_url(url):
    """Split a ``postgresql://`` URL into ``(libpq URL, pool options,
    shown)``: our pool options are taken out, libpq defaults
    (:data:`LIBPQ_DEFAULTS`) added, ``shown`` is the URL without password
    nor query, for messages and logs."""
    parts = urlsplit(url)
    if parts.scheme not in ('postgresql', 'postgres'):
        raise KeyStoreError('not a postgresql:// URL: %s' % redact(url))
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    options = dict(POOL_OPTIONS)
    for name, default in POOL_OPTIONS.items():
        if name in query:
            try:
                options[name] = type(default)(query.pop(name))
            except ValueError:
                raise KeyStoreError('invalid %s in key store URL' % name) \
                    from None
            if options[name] < 0 or (options[name] == 0
                                     and name != 'cache_size'):
                raise KeyStoreError('%s must be positive' % name)
    for name, value in LIBPQ_DEFAULTS.items():
        query.setdefault(name, value)
    netloc = parts.netloc.rpartition('@')
    shown_netloc = netloc[2]
    if netloc[0]:
        shown_netloc = netloc[0].partition(':')[0] + '@' + netloc[2]
    shown = urlunsplit((parts.scheme, shown_netloc, parts.path, '', ''))
    libpq = urlunsplit((parts.scheme, parts.netloc, parts.path,
                        urlencode(query), ''))
    return libpq, options, shown


class _Pool:
    """At most ``size`` connections; idle ones are reused, broken ones
    dropped.  ``get`` waits ``timeout`` seconds for a free slot."""

    def __init__(self, connect, size, timeout):
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._idle = []
        self._lock = threading.Lock()
        self.timeout = timeout

    def get(self):
        if not self._slots.acquire(timeout=self.timeout):
            raise KeyStoreError('key store busy: no database connection '
                                'free after %gs' % self.timeout)
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            try:
                conn = self._connect()
            except BaseException:
                self._slots.release()
                raise
        return conn

    def put(self, conn, broken=False):
        try:
            if broken or conn.closed:
                try:
                    conn.close()
                except Exception:
                    pass
            else:
                with self._lock:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _EntryCache:
    """Entries read from the database, served while a listening connection
    vouches that no change was missed (see the module's docstring).

    ``generation`` grows with every change heard of: a reader notes it
    before its query and caches the row only if it has not moved, so a
    row read before a change is never cached after the change was heard
    of."""

    def __init__(self, libpq, size, check):
        self._libpq = libpq
        self.size = size
        self.check = check
        self.generation = 0
        self._entries = {}
        self._lock = threading.Lock()
        self._contact = None    # time.monotonic() of the last answer
        self._thread = None
        self._pid = None
        self._stop = None       # the listener's threading.Event
        self._wake = None       # (read fd, write fd) waking the listener

    def valid(self):
        contact = self._contact
        return contact is not None and \
            time.monotonic() - contact <= 3 * self.check

    def get(self, dek_id):
        if self._pid != os.getpid():
            self._start()
        if not self.valid():
            return None
        return self._entries.get(dek_id)

    def put(self, entry, generation):
        with self._lock:
            if generation != self.generation or not self.valid():
                return
            if entry.dek_id not in self._entries and \
                    len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]   # the oldest
            self._entries[entry.dek_id] = entry

    def drop(self, dek_id=None):
        """Forget ``dek_id`` (None: everything)."""
        with self._lock:
            self.generation += 1
            if dek_id is None:
                self._entries.clear()
            else:
                self._entries.pop(dek_id, None)

    def __len__(self):
        return len(self._entries)

    def _start(self):
        with self._lock:
            if self._pid == os.getpid():
                return
            # first use, or a forked process: the parent's thread is not
            # here, and what it heard of is not ours
            self._pid = os.getpid()
            self._contact = None
            self._entries.clear()
            self.generation += 1
            self._stop = threading.Event()
            self._wake = os.pipe()
            self._thread = threading.Thread(
                target=self._listen, args=(self._wake, self._stop),
                daemon=True,
                name='zodbkmi key store listener')
            self._thread.start()

    def close(self, wait=True):
        """Stop listening (the cache is not used any more)."""
        with self._lock:
            thread, wake, stop = self._thread, self._wake, self._stop
            self._thread = self._wake = self._stop = None
            self._pid = None
            if stop is not None:
                stop.set()
            self._contact = None
            self._entries.clear()
        if wake is not None:
            try:
                os.write(wake[1], b'x')
            except OSError:   # pragma: no cover
                pass
        if wait and thread is not None and \
                thread is not threading.current_thread():
            thread.join(10)

    def _listen(self, wake, stop):
        psycopg2 = _driver()
        delay = 0.1
        try:
            while not stop.is_set():
                conn = None
                try:
                    conn = psycopg2.connect(self._libpq)
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute('LISTEN ' + CHANNEL)
                    self.drop()   # what changed while nobody listened
                    self._heard(stop)
                    delay = 0.1
                    self._heed(conn, wake[0], stop)
                except (psycopg2.Error, OSError, ValueError):
                    pass
                finally:
                    if not stop.is_set():   # else close() did it
                        self._contact = None
                        self.drop()
                    if conn is not None:
                        conn.close()
                stop.wait(delay)
                delay = min(2 * delay, self.check)
        finally:
            for fd in wake:
                os.close(fd)

    def _heed(self, conn, wake, stop):
        """Drop what each notification names; a heartbeat when there is
        none for ``check`` seconds."""
        while not stop.is_set():
            ready = select.select([conn, wake], [], [], self.check)[0]
            if wake in ready:
                return
            if ready:
                conn.poll()
            else:
                with conn.cursor() as cur:
                    cur.execute('SELECT 1')
            while conn.notifies:
                payload = conn.notifies.pop(0).payload
                self.drop(None if payload == '*' else payload)
            self._heard(stop)

    def _heard(self, stop):
        if not stop.is_set():   # a closed cache stays unused
            self._contact = time.monotonic()


class _Stale(Exception):
    """Rolls back a rotation whose new entry is not the newest."""


def _entry(row, name='row'):
    """A KeyStoreEntry from a row, checked against its wrapped DEK as
    :meth:`~zodbkmi.keystore.KeyStoreEntry.from_json` checks a file."""
    dek_id, kek_id, state, created, version, data = row
    data = bytes(data)
    try:
        parsed = wrappedmod.parse(data)
        if parsed.version != version:
            raise ValueError('a version %d entry holds a version %d wrapped '
                             'DEK' % (version, parsed.version))
        entry = keystore.KeyStoreEntry(dek_id, kek_id, data, state, created)
    except (ValueError, DecryptionError) as e:
        raise KeyStoreError('corrupt key store entry %s: %s'
                            % (dek_id, str(e)[:100])) from None
    if parsed.dek_id.hex() != dek_id or parsed.kek_id != kek_id:
        raise KeyStoreError('corrupt key store entry %s: ids do not match '
                            'its wrapped DEK' % dek_id)
    return entry


def _row(entry):
    return (entry.dek_id, entry.kek_id, entry.state, entry.created,
            entry.version, entry.wrapped)


@implementer(IKeyStore, IKeyStoreCheck)
class PostgresKeyStore:
    """Wrapped DEKs in PostgreSQL at ``url`` (``postgresql://user@host:port
    /dbname?sslmode=verify-full&sslrootcert=ca.pem``; any libpq option,
    plus ``pool_size``, ``pool_timeout``, ``cache_size`` and
    ``cache_check``: :data:`POOL_OPTIONS`).

    ``init`` says what to do with the schema: ``True`` creates or
    migrates it (see :meth:`init_schema`), ``False`` only checks its
    version when first connected.  Thread-safe.  Entries read are cached
    (see the module's docstring): a write through this store is seen by
    it at once, a write through another one as soon as its notification
    arrives.  ``path`` is the URL without password, for messages.
    """

    def __init__(self, url, init=True):
        self._libpq, options, self.path = parse_url(url)
        self.url = self.path
        self._password = urlsplit(url).password
        self._pool = _Pool(self._connect, options['pool_size'],
                           options['pool_timeout'])
        self.pool_size = options['pool_size']
        self._cache = None
        if options['cache_size']:
            self._cache = _EntryCache(self._libpq, int(options['cache_size']),
                                      options['cache_check'])
            # a store dropped unclosed stops its listener
            weakref.finalize(self, self._cache.close, False)
        self._checked = False
        if init:
            self.init_schema()

    def __repr__(self):
        return '<PostgresKeyStore %s>' % self.path

    def close(self):
        """Close the idle connections (busy ones close when returned) and
        stop the cache's listener."""
        if self._cache is not None:
            self._cache.close()
        self._pool.close()

    # -- connections -----------------------------------------------------

    def _connect(self):
        psycopg2 = _driver()
        try:
            return psycopg2.connect(self._libpq)
        except psycopg2.Error as e:
            raise self._error('unreachable', e) from None

    def _error(self, what, e):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return KeyStoreError('key store %s (%s): %s' % (
            what, self.path, redact(first, self._password)[:200]))

    def _run(self, work, retry=True, transaction=False):
        """Run ``work(cursor)`` and return its result: in autocommit mode
        when it runs one statement (a statement is a transaction by
        itself, and BEGIN and COMMIT would cost two more round trips per
        request), in one transaction when ``transaction`` is true.

        A connection found broken (the database restarted since it was
        last used) is dropped and the work retried once on a new one; a
        database that cannot be reached raises KeyStoreError."""
        psycopg2 = _driver()
        self._check_schema()
        for attempt in (0, 1):
            conn = self._pool.get()
            broken = False
            try:
                if not transaction:
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        return work(cur)
                conn.autocommit = False
                with conn:      # commit, or roll back on an exception
                    with conn.cursor() as cur:
                        return work(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                broken = bool(conn.closed)
                if broken and retry and attempt == 0:
                    continue
                raise self._error('unreachable', e) from None
            except psycopg2.IntegrityError:
                raise
            except psycopg2.Error as e:
                raise self._error('error', e) from None
            finally:
                self._pool.put(conn, broken)

    def _check_schema(self):
        if self._checked:
            return
        version = self.schema_version()
        if version != SCHEMA_VERSION:
            raise KeyStoreError(
                'key store %s has schema version %s, this zodbkmi needs %d: '
                'run "zodbkmi serve --init-vault"' % (
                    self.path, version, SCHEMA_VERSION))
        self._checked = True

    # -- schema ----------------------------------------------------------

    def schema_version(self):
        """The schema version of the database (None: no schema yet)."""
        def read(cur):
            cur.execute("SELECT to_regclass('zodbkmi_schema')")
            if cur.fetchone()[0] is None:
                return None
            cur.execute('SELECT max(version) FROM zodbkmi_schema')
            return cur.fetchone()[0]
        checked, self._checked = self._checked, True
        try:
            return self._run(read)
        finally:
            self._checked = checked

    def init_schema(self):
        """Create the schema, or migrate it to :data:`SCHEMA_VERSION`;
        return the version found before (None: there was none).

        Idempotent, and safe with several replicas starting at once: it
        runs under a transaction-level advisory lock."""
        def migrate(cur):
            cur.execute("SELECT pg_advisory_xact_lock(hashtext("
                        "'zodbkmi_schema'))")
            cur.execute("SELECT to_regclass('zodbkmi_schema')")
            found = None
            if cur.fetchone()[0] is None:
                # no DDL at all when up to date: the server's database
                # user then needs no CREATE privilege once initialised
                cur.execute('CREATE TABLE zodbkmi_schema ('
                            'version integer NOT NULL, '
                            'migrated timestamptz NOT NULL DEFAULT now())')
            else:
                cur.execute('SELECT max(version) FROM zodbkmi_schema')
                found = cur.fetchone()[0]
            current = found or 0
            if current > SCHEMA_VERSION:
                raise KeyStoreError(
                    'key store %s has schema version %d, newer than this '
                    'zodbkmi knows (%d): upgrade zodbkmi'
                    % (self.path, current, SCHEMA_VERSION))
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    cur.execute(statement)
                cur.execute('INSERT INTO zodbkmi_schema (version) '
                            'VALUES (%s)', (version,))
            return found
        checked, self._checked = self._checked, True
        try:
            found = self._run(migrate, transaction=True)
        except KeyStoreError:
            self._checked = checked
            raise
        return found

    # -- IKeyStoreCheck --------------------------------------------------

    def check(self):
        """Raise KeyStoreError unless the database answers."""
        self._run(lambda cur: cur.execute('SELECT 1'))

    # -- IKeyStore -------------------------------------------------------

    def add(self, entry):
        psycopg2 = _driver()

        def insert(cur):
            cur.execute('INSERT INTO zodbkmi_keys (%s) VALUES '
                        '(%%s, %%s, %%s, %%s, %%s, %%s)' % _COLUMNS,
                        _row(entry))
        try:
            self._run(insert, retry=False)
        except psycopg2.IntegrityError as e:
            raise self._integrity(entry, e, False) from None

    def _integrity(self, entry, e, rotating=True):
        constraint = getattr(getattr(e, 'diag', None), 'constraint_name', '')
        if constraint == _ONE_ACTIVE and not rotating:
            return KeyStateError('KEK %s has an active key already (a new '
                                 'one is added by rotation)' % entry.kek_id)
        if constraint == _ONE_ACTIVE:
            return KeyStateError(
                'KEK %s was rotated at the same moment by another request: '
                'it has another active key now (none of this request was '
                'stored)' % entry.kek_id)
        if constraint == 'zodbkmi_keys_pkey':
            return ValueError('key %s exists already' % entry.dek_id)
        return KeyStoreError('key %s refused by the key store: %s'
                             % (entry.dek_id, constraint or 'constraint'))

    def rotate(self, entry):
        """Add ``entry`` (active) and retire every other active entry of
        its KEK in one transaction; return the retired entries.

        Raises ``ValueError`` when the DEK id exists and
        :class:`~zodbkmi.exceptions.KeyStateError` when another
        transaction made a new active key of the same KEK meanwhile (the
        unique index refused ours) or when an entry of the KEK is as new
        as this one (the active DEK is always the newest); nothing is
        changed then."""
        psycopg2 = _driver()

        def rotate(cur):
            cur.execute("UPDATE zodbkmi_keys SET state = 'retired' "
                        "WHERE kek_id = %%s AND state = 'active' "
                        "RETURNING %s" % _COLUMNS, (entry.kek_id,))
            retired = cur.fetchall()
            cur.execute('SELECT max(created) FROM zodbkmi_keys '
                        'WHERE kek_id = %s AND version = 2', (entry.kek_id,))
            newest = cur.fetchone()[0]
            if newest is not None and newest >= entry.created:
                raise _Stale(newest)
            cur.execute('INSERT INTO zodbkmi_keys (%s) VALUES '
                        '(%%s, %%s, %%s, %%s, %%s, %%s)' % _COLUMNS,
                        _row(entry))
            return retired
        try:
            rows = self._run(rotate, retry=False, transaction=True)
        except psycopg2.IntegrityError as e:
            raise self._integrity(entry, e) from None
        except _Stale:
            raise keystore.stale_error(entry) from None
        self._changed(*(r[0] for r in rows))
        return [_entry(r) for r in rows]

    def get(self, dek_id):
        try:
            keystore.check_dek_id(dek_id)
        except UnknownKeyError:
            return None

        cache = self._cache
        if cache is not None:
            entry = cache.get(dek_id)
            if entry is not None:
                return entry
            generation = cache.generation

        def select(cur):
            cur.execute('SELECT %s FROM zodbkmi_keys WHERE dek_id = %%s'
                        % _COLUMNS, (dek_id,))
            return cur.fetchone()
        row = self._run(select)
        if row is None:
            return None
        entry = _entry(row)
        if cache is not None:
            cache.put(entry, generation)
        return entry

    def _changed(self, *dek_ids):
        """Forget the entries this store just changed (the notification
        of the change comes too, a little later)."""
        if self._cache is not None:
            for dek_id in dek_ids:
                self._cache.drop(dek_id)

    def update(self, entry):
        psycopg2 = _driver()

        def update(cur):
            cur.execute('UPDATE zodbkmi_keys SET kek_id = %s, state = %s, '
                        'created = %s, version = %s, wrapped = %s '
                        'WHERE dek_id = %s',
                        _row(entry)[1:] + (entry.dek_id,))
            return cur.rowcount
        try:
            count = self._run(update, retry=False)
        except psycopg2.IntegrityError as e:
            raise self._integrity(entry, e) from None
        finally:
            self._changed(entry.dek_id)
        if not count:
            raise UnknownKeyError('no key %s' % entry.dek_id, entry.dek_id)

    def remove(self, dek_id):
        keystore.check_dek_id(dek_id)

        def delete(cur):
            cur.execute('DELETE FROM zodbkmi_keys WHERE dek_id = %s',
                        (dek_id,))
            return cur.rowcount
        try:
            deleted = self._run(delete, retry=False)
        finally:
            self._changed(dek_id)
        if not deleted:
            raise UnknownKeyError('no key %s' % dek_id, dek_id)

    def ids(self):
        def select(cur):
            cur.execute('SELECT dek_id FROM zodbkmi_keys ORDER BY dek_id')
            return [r[0] for r in cur.fetchall()]
        return self._run(select)

    def entries(self):
        def select(cur):
            cur.execute('SELECT %s FROM zodbkmi_keys ORDER BY dek_id'
                        % _COLUMNS)
            return cur.fetchall()
        return [_entry(r) for r in self._run(select)]

    def active_for(self, kek_id):
        """The newest version 2 entry of ``kek_id`` if it is active, else
        None: the same rule as the directory store's (the state is not
        authenticated, so it can only take the active role away)."""
        def select(cur):
            cur.execute('SELECT %s FROM zodbkmi_keys WHERE kek_id = %%s '
                        'AND version = 2 ORDER BY created DESC, dek_id DESC '
                        'LIMIT 1' % _COLUMNS, (kek_id,))
            return cur.fetchone()
        row = self._run(select)
        if row is None or row[2] != keystore.ACTIVE:
            return None
        return _entry(row)

    def count_by_state(self):
        """``{state: number of keys}`` (for the server's metrics)."""
        def select(cur):
            cur.execute('SELECT state, count(*) FROM zodbkmi_keys '
                        'GROUP BY state')
            return dict(cur.fetchall())
        return self._run(select)

    # -- tokens ----------------------------------------------------------

    def load_tokens(self):
        """The token table kept in the database (``tokens_file =
        "key_store"``): a :class:`zodbkmi.rest.TokenTable`."""
        from zodbkmi.rest import TokenTable

        def select(cur):
            cur.execute('SELECT name, role, sha256 FROM zodbkmi_tokens '
                        'ORDER BY name')
            return cur.fetchall()
        try:
            return TokenTable(self._run(select))
        except ValueError as e:
            raise KeyStoreError('invalid token in %s: %s'
                                % (self.path, str(e)[:100])) from None

    def remove_token(self, name):
        """Delete the token ``name``; False when there is none."""
        def delete(cur):
            cur.execute('DELETE FROM zodbkmi_tokens WHERE name = %s',
                        (name,))
            return cur.rowcount == 1
        return self._run(delete, retry=False)

    def add_token(self, name, role, digest):
        """Store the token ``name`` (its SHA-256 ``digest``); False when a
        token of that name exists."""
        def insert(cur):
            cur.execute('INSERT INTO zodbkmi_tokens (name, role, sha256) '
                        'VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING',
                        (name, role, digest))
            return cur.rowcount == 1
        return self._run(insert, retry=False)
