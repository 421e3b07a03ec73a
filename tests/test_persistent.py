"""Tests of zodbkmi.persistent: the state format, errors, keys, overrides."""
import datetime
import os
import pickle as stdlib_pickle
import shutil
import sys
import tempfile
import threading
import unittest

import persistent
import transaction
import zope.component
import zope.component.testing
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from zodbpickle import pickle

from zodbkmi import exceptions
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.persistent import EncryptedPersistent
from zodbkmi.testing import StaticKeyHolder as Holder

SECRET = 'S3cr3t-value-7d41'


class Secret(EncryptedPersistent):
    """The class most tests store."""

    def __init__(self, name='', value=SECRET, **kw):
        self.name = name
        self.value = value
        self.__dict__.update(kw)


class Plain(persistent.Persistent):

    def __init__(self, name='', **kw):
        self.name = name
        self.__dict__.update(kw)


class Marker:
    """An ordinary class whose name must not leak."""

    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is Marker and other.x == self.x


class DropsCache(EncryptedPersistent):
    """Overrides __getstate__/__setstate__ with super()."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop('cache', None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.cache = 'rebuilt'


class DropsMore(DropsCache):
    """A second level of overrides."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop('scratch', None)
        return state


class OwnState(EncryptedPersistent):
    """Overrides __getstate__ without super(): builds its own state."""

    def __getstate__(self):
        return {'value': self.value}


class StateMixin:
    """A mixin before EncryptedPersistent that defines __getstate__."""

    def __getstate__(self):
        return {'value': self.value, 'mixed': True}


class Mixed(StateMixin, EncryptedPersistent):
    pass


class EncryptedMapping(PersistentMapping, EncryptedPersistent):
    pass


class Counter(EncryptedPersistent):
    """Resolves conflicts by adding increments."""

    def __init__(self):
        self.value = 0
        self.label = SECRET

    def _p_resolveConflict(self, old, committed, new):
        self.seen = (old, committed, new)
        resolved = dict(committed)
        resolved['value'] = (committed['value'] + new['value']
                             - old['value'])
        return resolved


class KeyedTestBase(unittest.TestCase):
    """A registry with a facility (AES KEK) and a key holder."""

    def setUp(self):
        from zodbkmi.facility import KeyManagementFacility
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        self.addCleanup(transaction.abort)
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        self.holder = Holder()
        self.dek_id = self.facility.create_key(self.holder.key)
        zope.component.provideUtility(self.facility)
        zope.component.provideUtility(self.holder)


class EncryptedPersistentTests(KeyedTestBase):

    def _getTargetClass(self):
        return EncryptedPersistent

    def _makeOne(self, **kw):
        return Secret(**kw)

    def test_subclass_of_persistent(self):
        from persistent.interfaces import IPersistent
        from zope.interface.verify import verifyObject
        self.assertTrue(issubclass(self._getTargetClass(),
                                   persistent.Persistent))
        verifyObject(IPersistent, self._makeOne())

    def test_pickle_roundtrip_hides_values(self):
        obj = self._makeOne(name='alice', when=datetime.date(2024, 5, 6),
                            marker=Marker(42))
        data = pickle.dumps(obj)
        for leak in (SECRET.encode(), b'alice', b'datetime', b'Marker',
                     b'when', b'value'):
            self.assertNotIn(leak, data)
        copy = pickle.loads(data)
        self.assertEqual(copy.value, SECRET)
        self.assertEqual(copy.when, datetime.date(2024, 5, 6))
        self.assertEqual(copy.marker, Marker(42))

    def test_stdlib_pickle_roundtrip(self):
        obj = self._makeOne(name='bob')
        copy = stdlib_pickle.loads(stdlib_pickle.dumps(obj, 3))
        self.assertEqual((copy.name, copy.value), ('bob', SECRET))

    def test_state_without_references_is_one_envelope(self):
        state = self._makeOne().__getstate__()
        self.assertIs(type(state), bytes)
        # an envelope of version 2, object state context (0x02)
        self.assertTrue(state.startswith(b'.km\x02\x01\x02'))
        self.assertEqual(self.facility.key_id_of(state), self.dek_id)

    def test_state_w_references_lists_them_outside(self):
        a, b = Plain('a'), Plain('b')
        weak = WeakRef(b)
        obj = self._makeOne(friends=[a, {'x': b}], again=a, weak=weak,
                            me=None)
        obj.me = obj
        state = obj.__getstate__()
        self.assertIs(type(state), tuple)
        self.assertEqual(state[1:], (a, b, weak, obj))
        copy = Secret.__new__(Secret)
        copy.__setstate__(state)
        self.assertIs(copy.friends[0], a)
        self.assertIs(copy.friends[1]['x'], b)
        self.assertIs(copy.again, a)
        self.assertIs(copy.weak, weak)
        self.assertIs(copy.me, obj)

    def test_ordinary_classes_stay_inside(self):
        # A class used as a value is no reference: it is pickled inside
        # (only persistent classes, with an oid, are references).
        obj = self._makeOne(kind=Marker, ptype=Plain)
        state = obj.__getstate__()
        self.assertIs(type(state), bytes)
        copy = pickle.loads(pickle.dumps(obj))
        self.assertIs(copy.kind, Marker)
        self.assertIs(copy.ptype, Plain)

    def test_persistent_class_is_a_reference(self):
        from ZODB.persistentclass import PersistentMetaClass
        klass = PersistentMetaClass('Dynamic', (object,), {})
        state = self._makeOne(kind=klass).__getstate__()
        self.assertEqual(state[1:], (klass,))

    def test_two_states_differ(self):
        obj = self._makeOne()
        self.assertNotEqual(obj.__getstate__(), obj.__getstate__())

    def test_slots_are_encrypted(self):
        class WithSlots(EncryptedPersistent):
            __slots__ = ('slot',)
        obj = WithSlots()
        obj.slot = SECRET
        obj.other = 1
        state = obj.__getstate__()
        self.assertNotIn(SECRET.encode(), pickle.dumps(state))
        copy = WithSlots.__new__(WithSlots)
        copy.__setstate__(state)
        self.assertEqual((copy.slot, copy.other), (SECRET, 1))

    def test_large_state_roundtrip(self):
        items = [Marker(i) for i in range(5000)]
        obj = self._makeOne(items=items, ref=Plain())
        copy = pickle.loads(pickle.dumps(obj))
        self.assertEqual(copy.items, items)
        small = self._makeOne(x=[1])
        self.assertEqual(pickle.loads(pickle.dumps(small)).x, [1])

    def test_concurrent_pickling_in_threads(self):
        errors = []

        def work(n):
            try:
                for i in range(200):
                    ref = Plain(str(i))
                    obj = self._makeOne(name='%d-%d' % (n, i), ref=ref,
                                        items=[Marker(i)])
                    copy = pickle.loads(pickle.dumps(obj))
                    assert copy.name == '%d-%d' % (n, i), copy.name
                    assert copy.items == [Marker(i)]
            except Exception as e:  # pragma: no cover
                errors.append(e)
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])


class OverrideTests(KeyedTestBase):

    def _roundtrip(self, obj):
        data = pickle.dumps(obj)
        self.assertNotIn(SECRET.encode(), data)
        return pickle.loads(data)

    def test_getstate_setstate_w_super(self):
        obj = DropsCache()
        obj.value, obj.cache = SECRET, 'big'
        state = obj.__getstate__()
        self.assertIs(type(state), bytes)
        copy = self._roundtrip(obj)
        self.assertEqual(copy.value, SECRET)
        self.assertEqual(copy.cache, 'rebuilt')

    def test_two_levels_of_overrides(self):
        obj = DropsMore()
        obj.value, obj.cache, obj.scratch = SECRET, 'big', 'tmp'
        copy = self._roundtrip(obj)
        self.assertEqual(copy.__dict__, {'value': SECRET, 'cache': 'rebuilt'})

    def test_getstate_without_super_is_encrypted(self):
        obj = OwnState()
        obj.value, obj.other = SECRET, 1
        copy = self._roundtrip(obj)
        self.assertEqual(copy.__dict__, {'value': SECRET})

    def test_mixin_getstate_is_encrypted(self):
        obj = Mixed()
        obj.value = SECRET
        copy = self._roundtrip(obj)
        self.assertEqual(copy.__dict__, {'value': SECRET, 'mixed': True})

    def test_persistent_mapping_mixin(self):
        obj = EncryptedMapping({'k': SECRET})
        copy = self._roundtrip(obj)
        self.assertEqual(dict(copy), {'k': SECRET})

    def test_explicit_base_call_gives_plain_state(self):
        obj = DropsCache()
        obj.value = SECRET
        self.assertEqual(EncryptedPersistent.__getstate__(obj),
                         {'value': SECRET})

    def test_resolve_conflict_sees_plain_states(self):
        from ZODB.ConflictResolution import PersistentReference
        ref = PersistentReference(b'\0' * 7 + b'\x09')
        obj = Counter()
        obj.ref = ref
        old = self._stored(obj, 1)
        committed = self._stored(obj, 5)
        new = self._stored(obj, 2)
        inst = Counter.__new__(Counter)
        resolved = inst._p_resolveConflict(old, committed, new)
        self.assertEqual(inst.seen[0]['value'], 1)
        self.assertIs(inst.seen[0]['ref'], ref)
        self.assertEqual(resolved[1:], (ref,))
        copy = Counter.__new__(Counter)
        copy.__setstate__(resolved)
        self.assertEqual(copy.value, 6)
        self.assertEqual(copy.label, SECRET)

    def _stored(self, obj, value):
        obj.value = value
        return obj.__getstate__()


class ErrorTests(KeyedTestBase):

    oid = b'\0\0\0\0\0\0\x12\x34'

    def _state(self, **kw):
        return Secret(**kw).__getstate__()

    def _load(self, state):
        obj = Secret.__new__(Secret)
        obj._p_oid = self.oid
        obj.__setstate__(state)
        return obj

    def _assertNames(self, error, *names):
        message = str(error)
        self.assertIn('0x0000000000001234', message)
        self.assertIn('tests.test_persistent.Secret', message)
        for name in names:
            self.assertIn(name, message)

    def test_tampered_state(self):
        state = bytearray(self._state())
        state[-1] ^= 1
        with self.assertRaises(exceptions.AuthenticationError) as cm:
            self._load(bytes(state))
        self._assertNames(cm.exception, self.dek_id)

    def test_tampered_header(self):
        state = bytearray(self._state())
        state[25] ^= 1      # in the nonce
        with self.assertRaises(exceptions.AuthenticationError):
            self._load(bytes(state))

    def test_truncated_state(self):
        state = self._state()
        for size in (len(state) - 1, 49, 20, 4, 2):
            with self.assertRaises(exceptions.DecryptionError) as cm:
                self._load(state[:size])
            self._assertNames(cm.exception)
        with self.assertRaises(exceptions.TruncatedDataError):
            self._load(state[:20])

    def test_error_is_a_posexception_too(self):
        # so that ZODB does not wrap it in StateLoadError
        from ZODB.POSException import POSError
        state = self._state()[:30]
        with self.assertRaises(POSError) as cm:
            self._load(state)
        self.assertIsInstance(cm.exception, exceptions.TruncatedDataError)
        self.assertEqual(type(cm.exception).__name__, 'TruncatedDataError')

    def test_error_pickles_as_its_zodbkmi_class(self):
        with self.assertRaises(exceptions.TruncatedDataError) as cm:
            self._load(self._state()[:30])
        copy = pickle.loads(pickle.dumps(cm.exception))
        self.assertIs(type(copy), exceptions.TruncatedDataError)
        self.assertEqual(copy.args, cm.exception.args)

    def test_state_under_unknown_key(self):
        state = self._state()
        self.facility.delete(self.dek_id)
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            self._load(state)
        self._assertNames(cm.exception, self.dek_id)
        self.assertEqual(cm.exception.key_id, self.dek_id)

    def test_state_under_another_kek(self):
        state = self._state()
        zope.component.provideUtility(Holder())
        self.facility.create_key(zope.component.getUtility(IKeyHolder).key)
        with self.assertRaises(exceptions.WrongKeyError) as cm:
            self._load(state)
        self._assertNames(cm.exception, self.dek_id)

    def test_no_key_holder(self):
        state = self._state()
        zope.component.getGlobalSiteManager().unregisterUtility(
            self.holder, IKeyHolder)
        from zope.interface.interfaces import ComponentLookupError
        with self.assertRaises(exceptions.NoKeyHolderError) as cm:
            self._load(state)
        self.assertIsInstance(cm.exception, ComponentLookupError)
        self._assertNames(cm.exception, 'IKeyHolder', 'provideUtility')
        with self.assertRaises(exceptions.NoKeyHolderError):
            Secret().__getstate__()

    def test_no_facility(self):
        from zodbkmi.interfaces import IEncryptionService
        state = self._state()
        self.assertTrue(zope.component.getGlobalSiteManager()
                        .unregisterUtility(self.facility))
        self.assertIsNone(
            zope.component.queryUtility(IEncryptionService))
        with self.assertRaises(exceptions.NoKeyHolderError) as cm:
            self._load(state)
        self._assertNames(cm.exception, 'IEncryptionService')

    def test_no_active_key_on_write(self):
        zope.component.provideUtility(Holder())
        with self.assertRaises(exceptions.UnknownKeyError) as cm:
            Secret().__getstate__()
        self.assertIn('no active data key', str(cm.exception))
        self.assertIn('an object without oid', str(cm.exception))

    def test_plaintext_state(self):
        for state in ({'value': SECRET}, None, ({}, {'slot': 1})):
            with self.assertRaises(exceptions.NotEncryptedError) as cm:
                self._load(state)
            self._assertNames(cm.exception, 'convert_object_to_encrypted')

    def test_neither_encrypted_nor_plain(self):
        for state in ([1, 2], 42, ('x', 'y'), ()):
            with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
                self._load(state)
            self._assertNames(cm.exception)

    def test_foreign_ciphertext(self):
        # keas.kmi stored (ciphertext, [references])
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._load((b'\x93' * 48, []))
        self.assertIn('bad magic', str(cm.exception))

    def test_references_removed(self):
        state = self._state(ref=Plain())
        with self.assertRaises(exceptions.AuthenticationError) as cm:
            self._load(state[0])
        self._assertNames(cm.exception, 'reference list was altered')

    def test_references_added_or_dropped(self):
        a, b = Plain(), Plain()
        state = self._state(a=a, b=b)
        for bad in (state + (Plain(),), state[:2], (self._state(), a)):
            with self.assertRaises(exceptions.AuthenticationError) as cm:
                self._load(bad)
            self._assertNames(cm.exception, 'reference list was altered')

    def test_future_state_format(self):
        state = self.facility.encrypt_state(self.holder.key, b'\x01future')
        with self.assertRaises(exceptions.UnsupportedFormatError) as cm:
            self._load(state)
        self._assertNames(cm.exception, 'newer zodbkmi')

    def test_failed_load_leaves_object_unchanged(self):
        obj = Secret.__new__(Secret)
        state = bytearray(self._state(name='x'))
        state[-1] ^= 1
        with self.assertRaises(exceptions.AuthenticationError):
            obj.__setstate__(bytes(state))
        self.assertEqual(obj.__dict__, {})


class UtilityLookupTests(KeyedTestBase):

    def _counting_site_manager(self):
        """A real registry that counts utility lookups, made current."""
        from zope.interface.registry import Components

        class Counting(Components):
            lookups = 0

            def queryUtility(self, *args, **kw):
                Counting.lookups += 1
                return super().queryUtility(*args, **kw)

            def getUtility(self, *args, **kw):
                Counting.lookups += 1
                return super().getUtility(*args, **kw)
        sm = Counting('counting')
        sm.registerUtility(self.facility)
        sm.registerUtility(self.holder)
        zope.component.getSiteManager.sethook(lambda context=None: sm)
        self.addCleanup(zope.component.getSiteManager.reset)
        return sm

    def test_utilities_resolved_once(self):
        sm = self._counting_site_manager()
        states = [Secret(name=str(i)).__getstate__() for i in range(50)]
        with_refs = [Secret(ref=Plain()).__getstate__() for i in range(50)]
        for state in states + with_refs:
            Secret.__new__(Secret).__setstate__(state)
        self.assertEqual(sm.lookups, 3)      # holder, facility, IKeySelector

    def test_registration_change_is_noticed(self):
        sm = self._counting_site_manager()
        first = Secret().__getstate__()
        other = Holder()
        other_dek = self.facility.create_key(other.key)
        sm.registerUtility(other)
        second = Secret().__getstate__()
        self.assertEqual(self.facility.key_id_of(first), self.dek_id)
        self.assertEqual(self.facility.key_id_of(second), other_dek)
        sm.unregisterUtility(other)
        with self.assertRaises(exceptions.NoKeyHolderError):
            Secret().__getstate__()
        sm.registerUtility(self.holder)
        self.assertEqual(
            self.facility.key_id_of(Secret().__getstate__()), self.dek_id)

    def test_registry_reset_is_noticed(self):
        Secret().__getstate__()
        zope.component.testing.tearDown()
        zope.component.testing.setUp()
        with self.assertRaises(exceptions.NoKeyHolderError):
            Secret().__getstate__()

    def test_local_site_w_base(self):
        # A local registry whose base is the global one: a change in the
        # base is noticed too.
        from zope.interface.registry import Components
        gsm = zope.component.getGlobalSiteManager()
        local = Components('local', bases=(gsm,))
        zope.component.getSiteManager.sethook(lambda context=None: local)
        self.addCleanup(zope.component.getSiteManager.reset)
        state = Secret().__getstate__()
        self.assertEqual(self.facility.key_id_of(state), self.dek_id)
        other = Holder()
        other_dek = self.facility.create_key(other.key)
        gsm.registerUtility(other)
        state = Secret().__getstate__()
        self.assertEqual(self.facility.key_id_of(state), other_dek)
        local.registerUtility(self.holder)
        state = Secret().__getstate__()
        self.assertEqual(self.facility.key_id_of(state), self.dek_id)


class RotationTests(KeyedTestBase):

    def test_kek_rotation(self):
        old_state = Secret(name='old').__getstate__()
        new = Holder(previous_keys=[self.holder.key])
        new_dek = self.facility.create_key(new.key)
        zope.component.provideUtility(new)
        new_state = Secret(name='new').__getstate__()
        self.assertEqual(self.facility.key_id_of(new_state), new_dek)
        for state, name in ((old_state, 'old'), (new_state, 'new')):
            obj = Secret.__new__(Secret)
            obj.__setstate__(state)
            self.assertEqual(obj.name, name)
        # Without the previous key, old states no longer load.
        zope.component.provideUtility(Holder(new.key))
        with self.assertRaises(exceptions.WrongKeyError):
            Secret.__new__(Secret).__setstate__(old_state)

    def test_key_attribute_change_is_noticed(self):
        old_state = Secret(name='old').__getstate__()
        old_key = self.holder.key
        self.holder.key = os.urandom(32)
        self.holder.previous_keys = (old_key,)
        new_dek = self.facility.create_key(self.holder.key)
        new_state = Secret().__getstate__()
        self.assertEqual(self.facility.key_id_of(new_state), new_dek)
        obj = Secret.__new__(Secret)
        obj.__setstate__(old_state)
        self.assertEqual(obj.name, 'old')

    def test_dek_rotation(self):
        old_state = Secret(name='old').__getstate__()
        new_dek = self.facility.rotate(self.holder.key)
        new_state = Secret(name='new').__getstate__()
        self.assertEqual(self.facility.key_id_of(new_state), new_dek)
        obj = Secret.__new__(Secret)
        obj.__setstate__(old_state)     # the retired DEK still decrypts
        self.assertEqual(obj.name, 'old')


class ConvertTests(KeyedTestBase):
    """convert_object_to_encrypted, with a class that changes."""

    def setUp(self):
        super().setUp()
        self.module = sys.modules[__name__]
        self.addCleanup(delattr, self.module, 'Password')
        self.db = self._open()
        self.addCleanup(lambda: self.db.close())

    def _open(self):
        import ZODB
        import ZODB.FileStorage
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(self.tmp, 'Data.fs')))
        return db

    def _define(self, base):
        class Password(base):
            def __init__(self, password):
                self.password = password
        Password.__module__ = __name__
        self.module.Password = Password
        return Password

    def _store_plain(self, count=1):
        self._define(persistent.Persistent)
        conn = self.db.open()
        for i in range(count):
            conn.root()['pwd%d' % i] = self.module.Password('xyzzy%d' % i)
        transaction.commit()
        self.db.close()
        self.db = self._open()     # no cached instances of the old class
        return self._define(EncryptedPersistent)

    def _callFUT(self, obj):
        from zodbkmi.persistent import convert_object_to_encrypted
        return convert_object_to_encrypted(obj)

    def test_load_before_conversion_says_what_to_do(self):
        self._store_plain()
        conn = self.db.open()
        pwd = conn.root()['pwd0']
        with self.assertRaises(exceptions.NotEncryptedError) as cm:
            pwd.password
        self.assertIn('convert_object_to_encrypted', str(cm.exception))
        self.assertIn('0x', str(cm.exception))
        self.assertEqual(pwd._p_changed, None)      # still a ghost

    def test_convert(self):
        self._store_plain()
        conn = self.db.open()
        pwd = conn.root()['pwd0']
        self.assertTrue(self._callFUT(pwd))
        self.assertEqual(pwd.password, 'xyzzy0')
        self.assertTrue(pwd._p_changed)
        self.assertFalse(self._callFUT(pwd))      # idempotent
        transaction.commit()
        data, _ = self.db.storage.load(pwd._p_oid)
        self.assertNotIn(b'xyzzy0', data)
        conn2 = self.db.open(transaction.TransactionManager())
        pwd2 = conn2.root()['pwd0']
        self.assertFalse(self._callFUT(pwd2))     # encrypted already
        self.assertFalse(pwd2._p_changed)
        self.assertEqual(pwd2.password, 'xyzzy0')
        conn2.close()

    def test_convert_new_and_non_encrypted_objects(self):
        self._define(EncryptedPersistent)
        self.assertFalse(self._callFUT(self.module.Password('new')))
        with self.assertRaises(TypeError):
            self._callFUT(Plain())

    def test_convert_in_threads(self):
        self._store_plain(count=16)
        errors, converted = [], []

        def work(names):
            try:
                tm = transaction.TransactionManager()
                conn = self.db.open(tm)
                for name in names:
                    converted.append(self._callFUT(conn.root()[name]))
                tm.commit()
                conn.close()
            except Exception as e:  # pragma: no cover
                errors.append(e)
        threads = [threading.Thread(
            target=work, args=(['pwd%d' % i for i in range(n, 16, 4)],))
            for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(converted, [True] * 16)
        conn = self.db.open()
        self.assertEqual(sorted(conn.root()['pwd%d' % i].password
                                for i in range(16)),
                         sorted('xyzzy%d' % i for i in range(16)))
        # The class was not patched
        self.assertIs(self.module.Password.__setstate__,
                      EncryptedPersistent.__setstate__)


class StateVectorTests(unittest.TestCase):
    """The state format, pinned by tests/vectors/persistent-state.json."""

    def setUp(self):
        import json
        from zodbkmi.testing import TestingKeyHolder
        from zodbkmi.testing import TestingKeyManagementFacility
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        zope.component.provideUtility(TestingKeyHolder())
        zope.component.provideUtility(TestingKeyManagementFacility(self.tmp))
        path = os.path.join(os.path.dirname(__file__), 'vectors',
                            'persistent-state.json')
        with open(path) as f:
            self.vectors = json.load(f)

    def _stored(self, v, count):
        refs = tuple(Plain(str(i)) for i in range(count))
        envelope = bytes.fromhex(v['envelope'])
        return (envelope,) + refs if refs else envelope, refs

    def _expected(self, v, refs):
        return {k: refs[x[1]] if isinstance(x, list) else x
                for k, x in v['state'].items()}

    def test_valid_vectors_load(self):
        for v in self.vectors['valid']:
            stored, refs = self._stored(v, v['references'])
            obj = Secret.__new__(Secret)
            obj.__setstate__(stored)
            self.assertEqual(obj.__dict__, self._expected(v, refs), v['name'])

    def test_valid_vectors_plaintext_is_what_we_write(self):
        from zodbkmi.persistent import _pickle_state
        for v in self.vectors['valid']:
            refs = tuple(Plain(str(i)) for i in range(v['references']))
            plaintext, written = _pickle_state(self._expected(v, refs))
            self.assertEqual(plaintext.hex(), v['plaintext'], v['name'])
            self.assertEqual(tuple(written), refs)

    def test_invalid_vectors_raise_their_error(self):
        for v in self.vectors['invalid']:
            stored, _ = self._stored(
                v, v.get('stored_references', v['references']))
            with self.assertRaises(getattr(exceptions, v['error'])) as cm:
                Secret.__new__(Secret).__setstate__(stored)
            self.assertIs(getattr(type(cm.exception), '_zodbkmi_class'),
                          getattr(exceptions, v['error']), v['name'])
