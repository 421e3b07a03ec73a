"""What the migration engine expects of its transformers and observers."""
from zope.interface import Attribute
from zope.interface import Interface


class ITransformer(Interface):
    """How the engine (:class:`zodbkmi.migrate.Migration`) reads, judges
    and writes the records of one level (storage records, object states).

    The engine calls, in this order: :meth:`check` once, when the
    migration is made; :meth:`records` once, when it runs; for every
    record :meth:`classify`, then (scan) :meth:`verify` or (other modes)
    :meth:`needs_work` and, for a record that needs work, :meth:`verify`
    (dry run) or :meth:`rewrite`; then :meth:`write` once per chunk that
    has work, and :meth:`reload` for each of its records when
    :meth:`write` raised ``ConflictError`` (the chunk is then prepared and
    written again).

    Decryption failures raise
    :class:`~zodbkmi.exceptions.DecryptionError` (the engine counts the
    record as failed and goes on); a mode the keys cannot carry out,
    or a record that cannot be rewritten at all, raises
    :class:`~zodbkmi.migrate.MigrationError` (the migration stops).
    Nothing here logs or returns key material.
    """

    level = Attribute("``'storage'`` or ``'object'``: named in reports.")

    keys = Attribute(
        "The :class:`~zodbkmi.migrate.MigrationKeys` of the migration. "
        "The engine sets ``keys.create`` to False for a dry run (no data "
        "key is created) and asks ``keys.kek_of`` for the report.")

    _mode = Attribute(
        "The mode of the migration, set by the engine before "
        ":meth:`check`; a transformer whose writes depend on it (blob "
        "files, the class check of the object level) reads it.")

    def check(mode):
        """Raise MigrationError if ``mode`` cannot be carried out with the
        keys given (before anything is read)."""

    def records(storage, start=None):
        """Return an iterator of ``(oid, tid, data)``: the current record
        of every object of ``storage`` in oid order, from oid ``start``
        on.  Memory stays bounded by the chunk, not the database."""

    def classify(oid, data):
        """Return ``(kind, dek_id)``: one of the kinds of
        :mod:`zodbkmi.migrate.kinds` (plaintext, encrypted, legacy,
        invalid) and, for an encrypted record, the hex id of its DEK
        (else None).  Never raises for a malformed record: it is
        ``invalid``."""

    def needs_work(mode, kind, dek_id, oid=None, data=None):
        """Tell whether the record must be rewritten by ``mode``."""

    def verify(oid, data, kind):
        """Check, when the keys to open the record were given, that it
        opens; raise DecryptionError if not.  Writes nothing."""

    def rewrite(mode, oid, data, kind):
        """Return what :meth:`write` needs to write the new form of the
        record (the new record, for the storage level)."""

    def write(storage, items, description):
        """Write ``items`` (``[(oid, tid_read, new)]``) as one transaction
        described by ``description``; raise ``ConflictError`` when a record
        changed since it was read.  Return ``[(oid, reason)]`` of the
        records left as they were (each counted as failed)."""

    def reload(storage, oid):
        """Return the current ``(tid, data)`` of ``oid`` (after a
        conflict)."""


class IBlobTransformer(ITransformer):
    """A transformer that also looks at the blob file of each record
    during a scan."""

    def verify_blob(storage, oid, serial, report):
        """Count the blob file of ``oid`` at ``serial`` (if any) in
        ``report.blobs`` and check that it opens when the keys to open it
        were given; raise DecryptionError."""


class IMigrationProgress(Interface):
    """What a migration reports while it runs (an observer the caller
    gives as ``progress``; the command line draws it on the terminal).

    Called from the thread that runs the migration, after each chunk and
    once at the end; a method must not raise.
    """

    def update(done, chunk=None, rewritten=None):
        """``done`` records were seen so far, in ``chunk`` chunks;
        ``rewritten`` of them were (or, in a dry run, would be)
        rewritten."""

    def finish():
        """The migration went through every record (not called when it
        stopped on an error)."""
