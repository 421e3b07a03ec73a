"""EncryptedPersistent: persistent objects whose state is stored encrypted.

Subclass :class:`EncryptedPersistent` instead of ``persistent.Persistent``.
The state an object gives to ZODB (or to ``pickle``) is then::

    envelope                          when the state refers to no persistent
                                      object
    (envelope, ref_1, ..., ref_n)     otherwise

``envelope`` is a record envelope (``docs/format.rst``, object state
context, not bound to an oid) made by ``encrypt_state`` of the registered
``IEncryptionService`` utility under the key of the registered
``IKeyHolder`` utility: data sealed by ``facility.encrypt`` is never
accepted as a state, nor the reverse.  (A version 1 data envelope, which
zodbkmi wrote for states before version 2, still loads.)  Its plaintext is the
object's state pickled with protocol 3 (so it starts with ``b'\\x80\\x03'``),
in which every persistent object, persistent weak reference and persistent
class is replaced by the call ``zodbkmi.persistent._ref(i)``: a reference to
``ref_i`` of the tuple, which ZODB's own pickler writes as an ordinary
persistent reference.  When there are references, a second protocol 3
pickle follows the first: the number *n* of references, checked on load.

So ZODB sees every reference (loading, pack garbage collection, export and
import, undo, historical connections and savepoints work unchanged) and
nothing else: what stays readable is the class of the object, the classes of
the objects it refers to and the reference graph (``docs/persistent.rst``).
"""
import io
import pickle
import threading

from persistent import Persistent
from persistent.wref import WeakRef
from zope.component import getSiteManager
from zope.component.globalregistry import base as _global_registry
from ZODB.ConflictResolution import PersistentReference
from ZODB.POSException import POSError

from zodbkmi import exceptions
from zodbkmi.interfaces import IEncryptionService
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.interfaces import IKeySelector
from zodbkmi.interfaces import ITenant

__all__ = ['EncryptedPersistent', 'convert_object_to_encrypted']

_PROTOCOL = 3
_PROTO_HEADER = b'\x80\x03'
_ATOMIC = frozenset((str, bytes, int, float, bool, type(None)))
_REF_TYPES = (Persistent, WeakRef, PersistentReference)
_FRESH_PICKLER_SIZE = 1 << 14     # a larger state leaves a large memo behind
_dumps = pickle.dumps
_loads = pickle.loads
_plain_getstate = Persistent.__getstate__
_plain_setstate = Persistent.__setstate__


# -- errors --------------------------------------------------------------

class _PassedThroughZODB(POSError):
    """Mixed into the errors raised while loading a state.

    ZODB wraps every exception raised by ``__setstate__`` in
    ``StateLoadError`` unless it is a ``POSError``; with this mixin the
    zodbkmi exception itself reaches the caller.  Pickled as its zodbkmi
    base class.
    """

    def __reduce__(self):
        return (_rebuild, (self._zodbkmi_class, self.args, self.__dict__))


def _rebuild(cls, args, state):
    error = cls(*args)
    error.__dict__.update(state)
    return error


_error_classes = {}
_error_classes_lock = threading.Lock()


def _error_class(cls):
    try:
        return _error_classes[cls]
    except KeyError:
        pass
    with _error_classes_lock:
        if cls not in _error_classes:
            _error_classes[cls] = type(cls.__name__, (cls, _PassedThroughZODB),
                                       {'__module__': cls.__module__,
                                        '__qualname__': cls.__qualname__,
                                        '__doc__': cls.__doc__,
                                        '_zodbkmi_class': cls})
        return _error_classes[cls]


def _describe(obj):
    oid = getattr(obj, '_p_oid', None)
    name = '%s.%s' % (type(obj).__module__, type(obj).__qualname__)
    if isinstance(oid, bytes):
        return 'object 0x%s (%s)' % (oid.hex(), name)
    return 'an object without oid (%s)' % name


def _error(obj, cls, message, **attributes):
    """Build an exception of class ``cls`` about ``obj``."""
    error = _error_class(cls)(
        '%s: %s' % (_describe(obj), message))
    for name, value in attributes.items():
        setattr(error, name, value)
    return error


def _reraise(obj, error, doing):
    """Raise ``error`` again, same class, with ``obj`` named.

    An unknown DEK that a shred destroyed becomes a
    :class:`~zodbkmi.exceptions.KeyDestroyedError`."""
    cls = getattr(type(error), '_zodbkmi_class', type(error))
    if (isinstance(error, exceptions.UnknownKeyError)
            and not isinstance(error, exceptions.KeyDestroyedError)):
        tenant = _destroyed_by(error.key_id)
        if tenant is not None:
            raise _error(
                obj, exceptions.KeyDestroyedError,
                'cannot %s: its data key %s was destroyed when tenant %s '
                'was shredded' % (doing, error.key_id, tenant),
                key_id=error.key_id, oid=getattr(obj, '_p_oid', None),
                tenant=tenant) from None
    attributes = {k: v for k, v in vars(error).items()
                  if not k.startswith('__')}
    raise _error(obj, cls, 'cannot %s: %s' % (doing, error),
                 **attributes) from None


# -- the registered utilities ---------------------------------------------

# (registry if it has no bases (for the fast paths), its generation, its
#  bases, their generations, key holder, encryption service, the holder's
#  key, the keys for decryption, registry, service.encrypt_state,
#  service.decrypt_state, the key selection: obj -> key)
_UNRESOLVED = (None, -1, (), (), None, None, None, None, None, None, None,
               None)
_resolved = _UNRESOLVED
_unhooked = getSiteManager.original


def _registry():
    """The utility registry of the current site manager."""
    if getSiteManager.implementation is _unhooked:
        return _global_registry.utilities
    return getSiteManager().utilities


def _generations(registries):
    return [r._generation for r in registries]


def _utilities(obj):
    """Return the registered (key holder, encryption service).

    Resolved once per registry and generation of the registry (and of its
    bases): a registration or an unregistration changes the generation, so
    the next call looks the utilities up again.
    """
    registry = _registry()
    r = _resolved
    if (registry is r[8] and registry._generation == r[1]
            and (not r[2] or _generations(r[2]) == r[3])):
        return r[4], r[5]
    return _resolve(obj, registry)


def _resolve(obj, registry):
    global _resolved
    sm = getSiteManager()
    holder = sm.queryUtility(IKeyHolder)
    if holder is None:
        raise _error(
            obj, exceptions.NoKeyHolderError,
            'no IKeyHolder utility is registered: register the holder of '
            'the key encrypting key, e.g. zope.component.provideUtility('
            'zodbkmi.keyholder.KeyHolder(path))')
    service = sm.queryUtility(IEncryptionService)
    if service is None:
        raise _error(
            obj, exceptions.NoKeyHolderError,
            'no IEncryptionService utility is registered: register a key '
            'management facility, e.g. zope.component.provideUtility('
            'zodbkmi.facility.KeyManagementFacility(directory))')
    encrypt = getattr(service, 'encrypt_state', None)
    decrypt = getattr(service, 'decrypt_state', None)
    if encrypt is None or decrypt is None:
        raise _error(
            obj, exceptions.NoKeyHolderError,
            'the registered IEncryptionService utility (%s) has no '
            'encrypt_state and decrypt_state: register a zodbkmi key '
            'management facility' % type(service).__name__)
    bases = list(getattr(registry, 'ro', (registry,))[1:])
    key = holder.key
    tenants = _tenant_holders(sm)
    _resolved = (None if bases else registry, registry._generation, bases,
                 _generations(bases), holder, service, key,
                 _decryption_keys(holder, key, tenants), registry, encrypt,
                 decrypt, _selection(sm, holder, tenants))
    return holder, service


#: The name prefix of the key holder of a tenant (a named IKeyHolder
#: utility ``TENANT_PREFIX + tenant_id``).
TENANT_PREFIX = 'tenant:'


def _tenant_holders(sm):
    """{tenant id: key holder} of the named IKeyHolder utilities."""
    return {name[len(TENANT_PREFIX):]: holder
            for name, holder in sm.getUtilitiesFor(IKeyHolder)
            if name.startswith(TENANT_PREFIX)}


class _KeyRing(tuple):
    """The keys that may open a state: the default holder's and every
    tenant's.  Hashed and compared by identity: the facility keeps its
    tables of opened envelopes per key object, and hashing a tuple of a
    hundred keys on every load would cost more than the lookup saves."""

    __slots__ = ()
    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other


def _decryption_keys(holder, key, tenants=None):
    previous = getattr(holder, 'previous_keys', None)
    if tenants is None and _resolved[4] is holder:
        tenants = _tenant_holders(getSiteManager())
    if not previous and not tenants:
        return key
    keys = [key]
    keys.extend(previous or ())
    for tenant in (tenants or {}).values():
        keys.append(tenant.key)
        keys.extend(getattr(tenant, 'previous_keys', None) or ())
    return _KeyRing(keys)


# -- choosing the key that seals (IKeySelector or the tenant rule) ----------

#: How far up ``__parent__`` the tenant rule looks (a cycle stops there).
MAX_TENANT_DEPTH = 64

# class -> 0 (neither), 1 (implements ITenant), 2 (implements IKeyHolder)
_tenant_kinds = {}


def _kind(cls):
    try:
        return _tenant_kinds[cls]
    except KeyError:
        pass
    kind = (1 if ITenant.implementedBy(cls)
            else 2 if IKeyHolder.implementedBy(cls) else 0)
    if len(_tenant_kinds) > 4096:
        _tenant_kinds.clear()
    _tenant_kinds[cls] = kind
    return kind


def _selection(sm, holder, tenants):
    """The function ``obj -> key`` that chooses the key sealing ``obj``:
    the registered IKeySelector, else the tenant rule."""
    selector = sm.queryUtility(IKeySelector)
    if selector is not None:
        def select(obj):
            chosen = selector(obj)
            return holder.key if chosen is None else chosen.key
        return select
    keys = {tid: h for tid, h in tenants.items()}
    kinds = _tenant_kinds

    def select(obj):
        # The nearest object along __parent__ (obj first) whose class is a
        # tenant or a key holder.  Parents are read, not cached: a move of
        # any of them re-seals on the next commit, and an invalidated
        # parent is a ghost, loaded here because its __parent__ may have
        # changed.  Parents of an object being committed are nearly always
        # loaded (the application reached the object through them).
        node = obj
        for _ in range(MAX_TENANT_DEPTH):
            kind = kinds.get(type(node))
            if kind is None:
                kind = _kind(type(node))
            if kind:
                if kind == 2:
                    return node.key
                tenant_id = node.tenant_id
                tenant = keys.get(tenant_id)
                if tenant is None:
                    return _no_tenant_key(obj, tenant_id)
                return tenant.key
            node = getattr(node, '__parent__', None)
            if node is None:
                return holder.key
        return holder.key

    return select


def _no_tenant_key(obj, tenant_id):
    by = _destroyed_tenant(tenant_id)
    if by:
        raise _error(obj, exceptions.KeyDestroyedError,
                     'cannot encrypt its state: tenant %s was shredded'
                     % tenant_id, oid=getattr(obj, '_p_oid', None),
                     tenant=tenant_id)
    raise _error(obj, exceptions.NoKeyHolderError,
                 'its tenant %s has no key holder: register one as the '
                 'IKeyHolder utility named %r '
                 '(zodbkmi.tenants.register_tenants(registry))'
                 % (tenant_id, TENANT_PREFIX + tenant_id))


def _tenant_directory():
    from zodbkmi.tenants import ITenantDirectory
    return getSiteManager().queryUtility(ITenantDirectory)


def _destroyed_by(dek_id):
    """The tenant whose shred destroyed the DEK ``dek_id``, or None."""
    directory = _tenant_directory()
    if directory is None or dek_id is None:
        return None
    return directory.destroyed_by(dek_id)


def _destroyed_tenant(tenant_id):
    directory = _tenant_directory()
    return directory is not None and directory.is_shredded(tenant_id)


def _keys_for_decryption(holder):
    """The holder's key, or a tuple of its key and previous keys.

    Read again when the holder's ``key`` attribute changes; the tuple is
    kept so that the facility sees the same object every time.
    """
    global _resolved
    key = holder.key
    r = _resolved
    if r[4] is holder:
        if r[6] is key:
            return r[7]
        keys = _decryption_keys(holder, key)
        _resolved = r[:6] + (key, keys) + r[8:]
        return keys
    return _decryption_keys(holder, key, {})


# -- pickling the state ------------------------------------------------------

def _is_reference(obj):
    """Whether ZODB stores ``obj`` as a persistent reference."""
    if isinstance(obj, _REF_TYPES):
        return True
    if isinstance(obj, type):
        # A persistent class has an oid (bytes or None); an ordinary
        # class, even a Persistent subclass, has a descriptor there.
        oid = getattr(obj, '_p_oid', 0)
        return oid is None or isinstance(oid, bytes)
    return False


def _ref(index):
    """Stands for a reference of the state's reference list.

    Only called when the list was removed from a stored state."""
    raise exceptions.AuthenticationError(
        'the state refers to reference #%d but stores no references: its '
        'reference list was altered' % index)


class _StatePickler(pickle.Pickler):
    """Pickles a state, replacing references by ``_ref(i)``."""

    def __init__(self):
        self.file = io.BytesIO()
        super().__init__(self.file, _PROTOCOL)
        self.refs = []

    def reducer_override(self, obj):
        if _is_reference(obj):
            refs = self.refs
            refs.append(obj)
            return _ref, (len(refs) - 1,)
        return NotImplemented

    def pickle(self, state):
        """Return the plaintext of ``state`` and its references."""
        f = self.file
        f.seek(0)
        f.truncate()
        self.clear_memo()
        self.refs = refs = []
        self.dump(state)
        if refs:
            self.clear_memo()
            self.dump(len(refs))
        return f.getvalue(), refs


class _StateUnpickler(pickle.Unpickler):
    """Unpickles a state, resolving ``_ref(i)`` in ``refs``."""

    def __init__(self, data, refs):
        super().__init__(io.BytesIO(data))
        self.refs = refs

    def find_class(self, module, name):
        if name == '_ref' and module == __name__:
            return self.ref
        return super().find_class(module, name)

    def ref(self, index):
        try:
            return self.refs[index]
        except IndexError:
            raise exceptions.AuthenticationError(
                'the state refers to reference #%d but stores %d: its '
                'reference list was altered' % (index, len(self.refs))
            ) from None


_local = threading.local()


def _pickle_state(state):
    if type(state) is dict:
        for value in state.values():
            if type(value) not in _ATOMIC:
                break
        else:
            # Nothing in there can be a reference: the fast path.
            return _dumps(state, _PROTOCOL), ()
    pickler = getattr(_local, 'pickler', None)
    _local.pickler = None     # a nested call gets a pickler of its own
    if pickler is None:
        pickler = _StatePickler()
    data, refs = pickler.pickle(state)
    if len(data) < _FRESH_PICKLER_SIZE:
        _local.pickler = pickler
    return data, refs


def _unpickle_state(data, refs):
    if data[:2] != _PROTO_HEADER:
        raise exceptions.UnsupportedFormatError(
            'unsupported encrypted state format (it starts with %r, not a '
            'protocol 3 pickle): written by a newer zodbkmi?' % data[:2])
    if not refs:
        return _loads(data)
    unpickler = _StateUnpickler(data, refs)
    state = unpickler.load()
    try:
        count = unpickler.load()
    except EOFError:
        count = 0
    if count != len(refs):
        raise exceptions.AuthenticationError(
            'the state has %d references where %d were written: its '
            'reference list was altered' % (len(refs), count))
    return state


# -- encrypting and decrypting ----------------------------------------------

def _encrypt_state(obj, state):
    """Return the stored form of the plain ``state`` of ``obj``."""
    holder, service = _utilities(obj)
    select = _resolved[11]
    key = holder.key if select is None else select(obj)
    data, refs = _pickle_state(state)
    try:
        envelope = service.encrypt_state(key, data)
    except exceptions.ZodbKmiError as e:
        _reraise(obj, e, 'encrypt its state')
    if refs:
        return (envelope,) + tuple(refs)
    return envelope


def _is_plain_state(state):
    if state is None or type(state) is dict:
        return True
    return (type(state) is tuple and len(state) == 2
            and (state[0] is None or isinstance(state[0], dict))
            and isinstance(state[1], dict))


def _decrypt_state(obj, state):
    """Return the plain state of ``obj`` from its stored form ``state``."""
    kind = type(state)
    if kind is bytes:
        envelope, refs = state, ()
    elif kind is tuple and state and type(state[0]) is bytes:
        envelope, refs = state[0], state[1:]
    elif _is_plain_state(state):
        converting = getattr(_local, 'converting', None)
        if converting is not None and id(obj) in converting:
            converting[id(obj)] = True
            return state
        raise _error(
            obj, exceptions.NotEncryptedError,
            'its stored state is not encrypted (it was written before '
            '%s became an EncryptedPersistent subclass); convert it with '
            'zodbkmi.persistent.convert_object_to_encrypted(obj) and commit'
            % type(obj).__qualname__)
    else:
        raise _error(
            obj, exceptions.UnsupportedFormatError,
            'its stored state is neither an encrypted state nor the state '
            'of a plain Persistent object')
    holder, service = _utilities(obj)
    try:
        data = service.decrypt_state(_keys_for_decryption(holder),
                                     envelope)
        return _unpickle_state(data, refs)
    except exceptions.ZodbKmiError as e:
        _reraise(obj, e, 'load its state')


# -- the class ----------------------------------------------------------------

def _getstate(self):
    state = _plain_getstate(self)
    if type(self).__getstate__ is _getstate and type(state) is dict:
        # The common case inline: utilities resolved, nothing in the state
        # that can be a reference.  The general one in _encrypt_state.
        r = _resolved
        if getSiteManager.implementation is _unhooked:
            registry = _global_registry.utilities
        else:
            registry = getSiteManager().utilities
        if registry is r[0] and registry._generation == r[1]:
            for value in state.values():
                if type(value) not in _ATOMIC:
                    break
            else:
                try:
                    return r[9](r[11](self), _dumps(state, _PROTOCOL))
                except exceptions.ZodbKmiError as e:
                    _reraise(self, e, 'encrypt its state')
    elif type(self).__getstate__ is not _getstate:
        # Reached with super() from an overriding __getstate__: the
        # wrapper around that one encrypts.
        return state
    return _encrypt_state(self, state)


def _setstate(self, state):
    if type(self).__setstate__ is _setstate:
        if type(state) is bytes:
            # The common case inline: no references, utilities resolved,
            # the holder's key unchanged.  The general one in
            # _decrypt_state.
            r = _resolved
            if getSiteManager.implementation is _unhooked:
                registry = _global_registry.utilities
            else:
                registry = getSiteManager().utilities
            if (registry is r[0] and registry._generation == r[1]
                    and r[4].key is r[6]):
                try:
                    data = r[10](r[7], state)
                    if data[:2] == _PROTO_HEADER:
                        return _plain_setstate(self, _loads(data))
                except exceptions.ZodbKmiError as e:
                    _reraise(self, e, 'load its state')
        state = _decrypt_state(self, state)
    _plain_setstate(self, state)


def _wrap_getstate(method):
    def __getstate__(self):
        if type(self).__getstate__ is __getstate__:
            return _encrypt_state(self, method(self))
        return method(self)
    __getstate__._zodbkmi_wraps = method
    __getstate__.__doc__ = method.__doc__
    return __getstate__


def _wrap_setstate(method):
    def __setstate__(self, state):
        if type(self).__setstate__ is __setstate__:
            state = _decrypt_state(self, state)
        method(self, state)
    __setstate__._zodbkmi_wraps = method
    __setstate__.__doc__ = method.__doc__
    return __setstate__


def _wrap_resolve(method):
    def _p_resolveConflict(self, old, committed, new):
        if type(self)._p_resolveConflict is not _p_resolveConflict:
            return method(self, old, committed, new)
        resolved = method(self, _decrypt_state(self, old),
                          _decrypt_state(self, committed),
                          _decrypt_state(self, new))
        return _encrypt_state(self, resolved)
    _p_resolveConflict._zodbkmi_wraps = method
    _p_resolveConflict.__doc__ = method.__doc__
    return _p_resolveConflict


_WRAPPERS = (('__getstate__', _wrap_getstate, _getstate),
             ('__setstate__', _wrap_setstate, _setstate),
             ('_p_resolveConflict', _wrap_resolve, None))


class EncryptedPersistent(Persistent):
    """A persistent object whose state is stored encrypted.

    The registered ``IKeyHolder`` utility gives the key, the registered
    ``IEncryptionService`` utility encrypts; see the module docstring for
    what is stored.

    Subclasses may override ``__getstate__``, ``__setstate__`` and
    ``_p_resolveConflict`` as with ``Persistent``, calling ``super()`` or
    not: they see and return plain states (in ``_p_resolveConflict``,
    references are ``ZODB.ConflictResolution.PersistentReference`` objects,
    as usual); encryption wraps them.
    """

    __getstate__ = _getstate
    __setstate__ = _setstate

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # Whatever the class uses (its own method or one from a mixin
        # before EncryptedPersistent in its MRO) is wrapped so that states
        # are encrypted: never a plaintext state by accident.
        for name, wrap, base in _WRAPPERS:
            method = getattr(cls, name, None)
            if method is None or method is base or hasattr(
                    method, '_zodbkmi_wraps'):
                continue
            setattr(cls, name, wrap(method))


# -- conversion ---------------------------------------------------------------

def convert_object_to_encrypted(obj):
    """Mark ``obj``, stored with a plaintext state, to be stored encrypted.

    ``obj`` is an instance of a class that became an
    :class:`EncryptedPersistent` subclass after ``obj`` was stored.  Its
    plaintext state is loaded and the object is marked changed: the next
    commit stores it encrypted.  Return True if it was converted, False if
    there was nothing to do (its stored state is encrypted already, it was
    changed in this transaction, or it is new).

    Thread-safe (nothing is patched; the connection of ``obj`` loads the
    state as usual).  The old plaintext records stay in the storage until
    it is packed, and in every backup.
    """
    if not isinstance(obj, EncryptedPersistent):
        raise TypeError('%r is not an EncryptedPersistent object' % (obj,))
    if obj._p_jar is None or obj._p_oid is None:
        return False
    if obj._p_changed is not None:      # not a ghost: loaded already
        return False
    converting = getattr(_local, 'converting', None)
    if converting is None:
        converting = _local.converting = {}
    converting[id(obj)] = False
    try:
        obj._p_activate()
    finally:
        plaintext = converting.pop(id(obj))
    if plaintext:
        obj._p_changed = True
    return plaintext
