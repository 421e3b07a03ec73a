"""What a migration found and did: counts by kind and key, failures."""
from ZODB.utils import oid_repr

from zodbkmi.migrate.kinds import ENCRYPTED
from zodbkmi.migrate.kinds import INVALID
from zodbkmi.migrate.kinds import LEGACY
from zodbkmi.migrate.kinds import MAX_FAILED_LISTED
from zodbkmi.migrate.kinds import MAX_OIDS_PER_REASON
from zodbkmi.migrate.kinds import PLAINTEXT
from zodbkmi.migrate.kinds import SCAN


class Report:
    """What a migration found and did.

    ``records`` is the number of current records seen, ``kinds`` counts
    them by kind before the migration, ``by_dek`` counts encrypted records
    by DEK id and ``by_kek`` by the KEK id wrapping that DEK,
    ``rewritten`` the records written (or that would be, in a dry run),
    ``failed`` the number of records that could not be read (their oids,
    up to :data:`MAX_FAILED_LISTED`, in ``failed_oids`` with the reason),
    ``failures`` their exact count by reason.  :meth:`format` summarises
    the failures by reason: a wrong key fails every record for the same
    reason, which is said once with a few of the oids.
    """

    def __init__(self, mode, level, dry_run=False):
        self.mode = mode
        self.level = level
        self.dry_run = dry_run
        self.records = 0
        self.kinds = {PLAINTEXT: 0, ENCRYPTED: 0, LEGACY: 0, INVALID: 0}
        self.blobs = {PLAINTEXT: 0, ENCRYPTED: 0}   # blob files seen (scan)
        self.by_dek = {}
        self.by_kek = {}
        self.rewritten = 0
        self.failed = 0
        self.failed_oids = []
        self.failures = {}      # reason -> [count, first oids]
        self.chunks = 0
        self.transactions = 0
        self.conflicts = 0
        self.elapsed = 0.0

    def fail(self, oid, reason):
        self.failed += 1
        if len(self.failed_oids) < MAX_FAILED_LISTED:
            self.failed_oids.append((oid_repr(oid), reason))
        entry = self.failures.setdefault(reason, [0, []])
        entry[0] += 1
        if len(entry[1]) < MAX_OIDS_PER_REASON:
            entry[1].append(oid_repr(oid))

    def format(self):
        """The report as lines of text (no key material, only ids)."""
        lines = ['%s (%s level)%s: %d records in %.1f s'
                 % (self.mode, self.level,
                    ' [dry run]' if self.dry_run else '',
                    self.records, self.elapsed)]
        for kind in (PLAINTEXT, ENCRYPTED, LEGACY, INVALID):
            lines.append('  %-10s %d' % (kind, self.kinds[kind]))
        for dek_id, n in sorted(self.by_dek.items()):
            lines.append('    DEK %s: %d' % (dek_id, n))
        for kek_id, n in sorted(self.by_kek.items()):
            lines.append('    KEK %s: %d' % (kek_id or '(unknown)', n))
        if any(self.blobs.values()):
            lines.append('  blob files: %d plaintext, %d encrypted'
                         % (self.blobs[PLAINTEXT], self.blobs[ENCRYPTED]))
        if self.mode != SCAN:
            lines.append('  %s %d in %d transactions (%d conflicts retried)'
                         % ('would rewrite' if self.dry_run else 'rewritten',
                            self.rewritten, self.transactions,
                            self.conflicts))
        if self.failed:
            lines.append('  FAILED     %d' % self.failed)
            # most frequent reason first, then in the order met
            for reason, (count, oids) in sorted(
                    self.failures.items(), key=lambda item: -item[1][0]):
                more = count - len(oids)
                lines.append('    FAILED %d: %s (oid%s %s%s)' % (
                    count, reason, 's' if count > 1 else '',
                    ', '.join(oids),
                    ' and %d more' % more if more else ''))
        return lines
