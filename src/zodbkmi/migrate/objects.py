"""The object-level transformer: states of ``EncryptedPersistent`` objects."""
import io

from ZODB.utils import oid_repr
from zope.interface import implementer

from zodbkmi.exceptions import DecryptionError
from zodbkmi.format import envelope
from zodbkmi.migrate.interfaces import ITransformer
from zodbkmi.migrate.keys import MigrationKeys
from zodbkmi.migrate.kinds import DECRYPT
from zodbkmi.migrate.kinds import ENCRYPT
from zodbkmi.migrate.kinds import ENCRYPTED
from zodbkmi.migrate.kinds import INVALID
from zodbkmi.migrate.kinds import LEGACY
from zodbkmi.migrate.kinds import MigrationError
from zodbkmi.migrate.kinds import PLAINTEXT
from zodbkmi.migrate.kinds import REKEY
from zodbkmi.migrate.scan import iter_records


class _Opaque:
    """Stands for any global while a state is peeked at (nothing of the
    application is imported or run)."""

    def __init__(self, *args, **kw):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Ref:
    """A persistent reference met while a state is peeked at."""

    def __init__(self, ref):
        self.ref = ref


def peek_state(record):
    """The state pickled in a ZODB record, with every global replaced by an
    opaque stand-in and every persistent reference by a :class:`_Ref`.

    Enough to see the shape of an encrypted state without importing the
    application's classes.
    """
    from zodbpickle import pickle as zpickle

    class Unpickler(zpickle.Unpickler):

        def find_class(self, module, name):
            return type(name, (_Opaque,), {'__module__': module})

        def persistent_load(self, ref):
            return _Ref(ref)

    unpickler = Unpickler(io.BytesIO(record))
    unpickler.load()            # the class metadata
    return unpickler.load()


class PersistentStateCodec:
    """Reads the states that ``zodbkmi.persistent.EncryptedPersistent``
    writes (``envelope`` or ``(envelope, ref_1, ..., ref_n)``), for
    ``decrypt`` and ``scan`` at the object level.

    The keys are those of ``keys`` (:class:`MigrationKeys`) when it can
    decrypt, else the registered ``IKeyHolder`` and
    ``IEncryptionService`` utilities.
    """

    def __init__(self, keys=None):
        self.keys = keys

    def classify(self, state):
        return None, None     # the envelope says it all: see _state_kind

    def _service_and_keys(self):
        keys = self.keys
        if keys is not None and keys.service is not None and \
                keys.can_decrypt:
            return keys.service, keys.decrypt_keys
        import zope.component
        from zodbkmi.interfaces import IEncryptionService
        from zodbkmi.interfaces import IKeyHolder
        holder = zope.component.getUtility(IKeyHolder)
        previous = tuple(getattr(holder, 'previous_keys', None) or ())
        return (zope.component.getUtility(IEncryptionService),
                (holder.key,) + previous if previous else holder.key)

    def decrypt(self, state):
        from zodbkmi.persistent import _unpickle_state
        if type(state) is bytes:
            sealed, refs = state, ()
        else:
            sealed, refs = state[0], state[1:]
        service, keys = self._service_and_keys()
        return _unpickle_state(service.decrypt_state(keys, sealed), refs)

    def verify(self, state):
        """Check that the state authenticates (nothing is unpickled)."""
        sealed = state if type(state) is bytes else state[0]
        service, keys = self._service_and_keys()
        service.decrypt_state(keys, sealed)


def _envelope_dek_id(state):
    """The DEK id (hex) of a state holding a zodbkmi envelope, or None.
    The envelope is the state, or the first item of a tuple: an object
    state envelope (``EncryptedPersistent``) or a data envelope (a class
    of the application that seals its state with ``facility.encrypt``).
    This only tells which DEK; opening checks the context."""
    if isinstance(state, tuple) and state:
        state = state[0]
    if isinstance(state, bytes) and envelope.is_envelope(state):
        for context in (envelope.CONTEXT_STATE, envelope.CONTEXT_DATA):
            try:
                return envelope.read_dek_id(state, context).hex()
            except DecryptionError:
                pass
        return INVALID
    return None


@implementer(ITransformer)
class ObjectTransformer:
    """Object level: the states of ``EncryptedPersistent`` objects.

    Objects are loaded and stored through ZODB (``db``): their class
    encrypts the state on store (``__getstate__``).  So ``encrypt``
    rewrites the plaintext states of objects whose class now encrypts
    (``encrypting``: base classes, default
    ``zodbkmi.persistent.EncryptedPersistent``) and the states of keas.kmi
    objects (``legacy``: :class:`zodbkmi.migrate.legacy.KeasKMIKeys`);
    ``decrypt`` rewrites encrypted states of objects whose class no
    longer encrypts (switch the class back to ``persistent.Persistent``
    first); ``rekey`` rewrites encrypted states whose DEK is not the
    target of ``keys``.

    While an object is loaded for its rewrite, its old state is decoded
    here (keas.kmi, zodbkmi or plaintext) and given to
    ``Persistent.__setstate__``, whatever its class does.
    """

    level = 'object'

    def __init__(self, db, keys=None, legacy=None, encrypting=None,
                 codec=None):
        self.db = db
        self.keys = keys if keys is not None else MigrationKeys(None)
        self.legacy = legacy
        if encrypting is None:
            try:
                from zodbkmi.persistent import EncryptedPersistent
                encrypting = (EncryptedPersistent,)
            except ImportError:
                encrypting = ()
        self.encrypting = tuple(encrypting)
        self.codec = codec if codec is not None else PersistentStateCodec(
            self.keys)
        self._class_encrypts = {}

    # -- classification ---------------------------------------------------

    def _state_kind(self, state):
        from zodbkmi.migrate.legacy import is_keas_state
        if self.codec is not None:
            kind, dek_id = self.codec.classify(state)
            if kind is not None:
                return kind, dek_id
        dek_id = _envelope_dek_id(state)
        if dek_id == INVALID:
            return INVALID, None
        if dek_id is not None:
            return ENCRYPTED, dek_id
        if is_keas_state(state):
            return LEGACY, None
        return PLAINTEXT, None

    def check(self, mode):
        """Every mode can start: the keys are those of the application."""

    def classify(self, oid, data):
        try:
            state = peek_state(data)
        except Exception:
            return INVALID, None
        return self._state_kind(state)

    def class_encrypts(self, data):
        """Tell whether the class of a record encrypts its state."""
        from ZODB.utils import get_pickle_metadata
        module, cname = name = get_pickle_metadata(data)
        encrypts = self._class_encrypts.get(name)
        if encrypts is None:
            try:
                klass = self.db.classFactory(None, module, cname)
            except Exception:
                klass = None
            encrypts = (isinstance(klass, type) and
                        issubclass(klass, self.encrypting)
                        if self.encrypting else False)
            self._class_encrypts[name] = encrypts
        return encrypts

    def needs_work(self, mode, kind, dek_id, oid=None, data=None):
        if kind == INVALID:
            return False
        if mode == ENCRYPT:
            return kind == LEGACY or (
                kind == PLAINTEXT and self.class_encrypts(data))
        if mode == REKEY:
            return kind == LEGACY or (
                kind == ENCRYPTED and dek_id != self.keys.target_dek_id)
        if mode == DECRYPT:
            return kind in (ENCRYPTED, LEGACY)
        return False

    def verify(self, oid, data, kind):
        if kind == LEGACY and self.legacy is not None:
            self.legacy.decrypt(peek_state(data)[0])
        elif kind == ENCRYPTED and self.codec is not None:
            self.codec.verify(peek_state(data))

    def rewrite(self, mode, oid, data, kind):
        if kind == LEGACY and self.legacy is None:
            raise MigrationError(
                'oid %s is a keas.kmi object: give the keas.kmi keys to '
                'import it' % oid_repr(oid))
        return kind         # the work is done by write(), through ZODB

    # -- reading and writing through ZODB ---------------------------------

    def records(self, storage, start=None):
        return iter_records(storage, start)

    def reload(self, storage, oid):
        data, tid = storage.load(oid)
        return tid, data

    def _set_state(self, obj, state):
        """Give ``obj`` its state, whatever form the state is in."""
        import persistent
        from zodbkmi.migrate.legacy import decrypt_keas_state
        kind, _ = self._state_kind(state)
        encrypting = isinstance(obj, self.encrypting)
        if kind == LEGACY and self.legacy is not None:
            state = decrypt_keas_state(self.legacy, state)
        elif kind == ENCRYPTED and not encrypting:
            if self.codec is None:
                raise MigrationError(
                    'oid %s: cannot decrypt the state of a %s here'
                    % (oid_repr(obj._p_oid), type(obj).__name__))
            state = self.codec.decrypt(state)
        elif not (kind == PLAINTEXT and encrypting):
            obj.__setstate__(state)     # the class reads its own state
            return
        persistent.Persistent.__setstate__(obj, state)

    def write(self, storage, items, description):
        """Load each object with its decoded state, mark it changed and
        commit: its class writes the new state."""
        import transaction
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        reader = conn._reader
        transformer = self

        def setGhostState(obj, pickle):
            transformer._set_state(obj, reader.getState(pickle))
        reader.setGhostState = setGhostState
        failed = []
        try:
            tm.begin()
            tm.get().note(description)
            for oid, _, _ in items:
                obj = conn.get(oid)
                try:
                    obj._p_activate()
                except DecryptionError as e:
                    failed.append((oid, str(e)))
                    continue
                problem = self._check_class(obj)
                if problem:
                    failed.append((oid, problem))
                    continue
                obj._p_changed = True
            tm.commit()
        except BaseException:
            tm.abort()
            raise
        finally:
            del reader.setGhostState
            conn.cacheMinimize()
            conn.close()
        return failed

    _mode = None

    def _check_class(self, obj):
        """Why the class of ``obj`` cannot write what the mode needs, or
        None.  Looks at what its ``__getstate__`` gives."""
        kind = self._state_kind(obj.__getstate__())[0]
        name = '%s.%s' % (type(obj).__module__, type(obj).__qualname__)
        if self._mode == DECRYPT and kind != PLAINTEXT:
            return ('class %s still encrypts its state: make it a plain '
                    'persistent class to decrypt' % name)
        if self._mode in (ENCRYPT, REKEY) and kind != ENCRYPTED:
            return ('class %s does not encrypt its state: make it a '
                    'subclass of zodbkmi.persistent.EncryptedPersistent'
                    % name)
        return None
