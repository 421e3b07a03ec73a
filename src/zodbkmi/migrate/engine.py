"""The engine: walks the records in chunks, one transaction per chunk.

The engine (:class:`Migration`) walks the current record of every object
of a storage in oid order, in chunks of ``chunk_size`` records; each chunk
that needs work is written as one transaction.  A process killed at any
moment loses at most the chunk it was writing: every record is, at all
times, either in its old form or in its new form, both readable.  Nothing
is remembered between runs: every record is classified each time
(plaintext, under DEK *x*, legacy, invalid) and only what needs work is
rewritten, so running a migration again is harmless and resuming is
running again.

How a chunk is read, judged and written is the business of a transformer
(:class:`zodbkmi.migrate.interfaces.ITransformer`); how far the migration
got is told to an observer
(:class:`zodbkmi.migrate.interfaces.IMigrationProgress`), if one is given.
"""
import time

from ZODB.POSException import ConflictError
from ZODB.utils import oid_repr

from zodbkmi.exceptions import DecryptionError
from zodbkmi.migrate.interfaces import IBlobTransformer
from zodbkmi.migrate.kinds import DEFAULT_CHUNK_SIZE
from zodbkmi.migrate.kinds import ENCRYPT
from zodbkmi.migrate.kinds import INVALID
from zodbkmi.migrate.kinds import MAX_RETRIES
from zodbkmi.migrate.kinds import MODES
from zodbkmi.migrate.kinds import MigrationError
from zodbkmi.migrate.kinds import REKEY
from zodbkmi.migrate.kinds import SCAN
from zodbkmi.migrate.report import Report


class Migration:
    """Run ``mode`` over every current record of ``storage``.

    ``storage`` is the raw storage (for the storage level, the storage under
    the ``EncryptingStorage`` wrapper).  ``chunk_size`` records are read at a
    time; those that need work are written as one transaction.  With
    ``dry_run`` nothing is written.  ``progress`` is an observer
    (:class:`~zodbkmi.migrate.interfaces.IMigrationProgress`, such as the
    command line's :class:`zodbkmi.cli.progress.Progress`) or
    None.  ``start`` is the oid to start from (default: the first).
    """

    def __init__(self, storage, transformer, mode,
                 chunk_size=DEFAULT_CHUNK_SIZE, dry_run=False,
                 progress=None, start=None, max_retries=MAX_RETRIES):
        if mode not in MODES:
            raise MigrationError('unknown mode %r (one of %s)'
                                 % (mode, ', '.join(MODES)))
        if chunk_size < 1:
            raise MigrationError('chunk size must be at least 1')
        self.storage = storage
        self.transformer = transformer
        self.mode = mode
        self.chunk_size = chunk_size
        self.dry_run = dry_run or mode == SCAN
        self.progress = progress
        self.start = start
        self.max_retries = max_retries
        self.report = Report(mode, transformer.level, dry_run)
        transformer._mode = mode
        transformer.check(mode)
        if self.dry_run:
            transformer.keys.create = False
        elif mode in (ENCRYPT, REKEY) and transformer.keys.new is not None:
            transformer.keys.target_dek_id   # creates the DEK if needed

    def _count(self, kind, dek_id):
        report = self.report
        report.records += 1
        report.kinds[kind] += 1
        if dek_id is not None:
            report.by_dek[dek_id] = report.by_dek.get(dek_id, 0) + 1

    def _prepare(self, oid, tid, data, kind=None, dek_id=None):
        """Classify one record; return ``(oid, tid, new)`` or None."""
        t = self.transformer
        if kind is None:
            kind, dek_id = t.classify(oid, data)
        if kind == INVALID:
            self.report.fail(oid, 'malformed envelope')
            return None
        if self.mode == SCAN:
            try:
                t.verify(oid, data, kind)
                if IBlobTransformer.providedBy(t):
                    t.verify_blob(self.storage, oid, tid, self.report)
            except DecryptionError as e:
                self.report.fail(oid, str(e))
            return None
        if not t.needs_work(self.mode, kind, dek_id, oid, data):
            return None
        try:
            if self.dry_run:
                t.verify(oid, data, kind)
                return oid, tid, None
            return oid, tid, t.rewrite(self.mode, oid, data, kind)
        except DecryptionError as e:
            self.report.fail(oid, str(e))
            return None

    def run(self):
        """Run the migration; return the :class:`Report`."""
        report = self.report
        started = time.monotonic()
        chunk = []
        for oid, tid, data in self.transformer.records(self.storage,
                                                       self.start):
            kind, dek_id = self.transformer.classify(oid, data)
            self._count(kind, dek_id)
            chunk.append((oid, tid, data, kind, dek_id))
            if len(chunk) >= self.chunk_size:
                self._chunk(chunk)
                chunk = []
        if chunk:
            self._chunk(chunk)
        report.elapsed = time.monotonic() - started
        if self.progress is not None:
            self.progress.finish()
        by_kek = {}
        for dek_id, n in report.by_dek.items():
            kek_id = self.transformer.keys.kek_of(dek_id)
            by_kek[kek_id] = by_kek.get(kek_id, 0) + n
        report.by_kek = by_kek
        return report

    def _chunk(self, chunk):
        report = self.report
        report.chunks += 1
        work = [w for w in (self._prepare(*r) for r in chunk)
                if w is not None]
        if work and not self.dry_run:
            self._write(work)
        report.rewritten += len(work)
        if self.progress is not None:
            self.progress.update(report.records, report.chunks,
                                 report.rewritten)

    def _write(self, work):
        description = 'zodbkmi migrate %s: %d records from oid %s' % (
            self.mode, len(work), oid_repr(work[0][0]))
        for attempt in range(self.max_retries + 1):
            try:
                failed = self.transformer.write(self.storage, work,
                                                description)
            except ConflictError:
                if attempt == self.max_retries:
                    raise MigrationError(
                        'chunk from oid %s still conflicts after %d '
                        'retries' % (oid_repr(work[0][0]), attempt))
                self.report.conflicts += 1
                work = self._reread(work)
                if not work:
                    return
            else:
                self.report.transactions += 1
                for oid, reason in failed or ():
                    self.report.fail(oid, reason)
                    self.report.rewritten -= 1
                return

    def _reread(self, work):
        """Read the records of a conflicting chunk again and prepare
        them again (the application wrote some meanwhile)."""
        fresh = []
        for oid, _, _ in work:
            tid, data = self.transformer.reload(self.storage, oid)
            item = self._prepare(oid, tid, data)
            if item is not None:
                fresh.append(item)
        self.report.rewritten -= len(work) - len(fresh)
        return fresh


def pack(storage):
    """Pack ``storage`` now, removing the revisions a migration replaced.

    Raw records may be ciphertext that only the wrapper can read, so the
    pack is done without garbage collection (``gc=False``) where the
    storage supports it; unreachable objects stay until a pack through the
    wrapper.
    """
    from ZODB.serialize import referencesf
    try:
        storage.pack(time.time(), referencesf, gc=False)
    except TypeError:
        storage.pack(time.time(), referencesf)
